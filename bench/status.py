"""Figure 5, status at scale: ``build_status`` (the ``status --json`` answer) in process.

Three fresh SQLite databases, migrated by nanobot:

- empty: nothing but the schema (the baseline of the target);
- state, no history: 20 tasks, 3 nodes of 10 components, a held lease, one heartbeat per node;
- full: the same state plus 1 million ``task_runs`` rows (20 tasks x 50,000) and 1 million
  ``heartbeats`` rows (3 nodes, one a second, the newest a second old); 100,000 of each in the
  quick setting. The rows are generated inside SQLite by ``INSERT ... SELECT`` over a
  recursive CTE, in the text format nanobot's ``UTCDateTime`` writes.

Measured: the median time of ``build_status(engine)`` over repeated calls on a warm
connection pool, the three databases' calls interleaved (the first call, which opens the
connection, is reported apart), and the time
of ``python -m nanobot status --json`` as a process, for what an operator waits.

Every statement ``build_status`` issues is captured with a ``before_cursor_execute`` event and
explained with ``EXPLAIN QUERY PLAN`` on the full database (with its parameters); a plan that
scans ``task_runs`` or ``heartbeats`` without an index, or walks an index without a LIMIT to
stop it, is flagged.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, insert

from bench.common import (
    REPO,
    Result,
    bench_home,
    insert_stored_tasks,
    median,
    nanobot_engine,
)

TASKS = 20
NODES = 3
COMPONENTS = 10
CALLS = 30
HISTORY = ("task_runs", "heartbeats")


def _state(engine: Engine, *, heartbeats: bool) -> None:
    from nanobot.db import write_transaction
    from nanobot.models import Component, Heartbeat, SchedulerLease, utcnow

    now = utcnow()
    insert_stored_tasks(
        engine,
        [f"t{i:02d}" for i in range(TASKS)],
        task_class="bench.tasks:Stamp",
        interval=60,
        kwargs_of=lambda _i: {"interval": 60},
        anchor_of=lambda _i: now,
    )
    with write_transaction(engine) as conn:
        conn.execute(
            insert(Component),
            [
                {
                    "name": f"c{c}",
                    "node": f"n{n}",
                    "status": "healthy",
                    "last_heartbeat": now,
                    "registered_at": now,
                    "updated_at": now,
                }
                for n in range(NODES)
                for c in range(COMPONENTS)
            ],
        )
        conn.execute(
            insert(SchedulerLease).values(
                name="scheduler",
                holder="n0:1",
                epoch=1,
                acquired_at=now,
                renewed_at=now,
                expires_at=now + timedelta(hours=1),
            )
        )
        if heartbeats:
            conn.execute(
                insert(Heartbeat),
                [
                    {
                        "at": now - timedelta(seconds=1),
                        "node": f"n{n}",
                        "status": "healthy",
                        "interval_s": 30.0,
                        "total": COMPONENTS,
                        "healthy": COMPONENTS,
                        "error": 0,
                        "unknown": 0,
                    }
                    for n in range(NODES)
                ],
            )


_TS = "strftime('%Y-%m-%d %H:%M:%f', {}, 'unixepoch') || '000'"


def _history(path: Path, rows: int) -> float:
    """``rows`` task_runs and ``rows`` heartbeats, generated inside SQLite; seconds taken."""
    started = time.perf_counter()
    now = time.time()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    seq = "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < ?) "
    # Heartbeats: one a second per node, ending a second ago.
    hb_at = _TS.format(f"(? - (? - i) * 1.0 / {NODES})")
    conn.execute(
        seq + "INSERT INTO heartbeats (at, node, status, interval_s, total, healthy, error, "
        f"unknown) SELECT {hb_at}, 'n' || (i % {NODES}), 'healthy', 30.0, {COMPONENTS}, "
        f"{COMPONENTS}, 0, 0 FROM seq",
        (rows - 1, now - 1, rows),
    )
    # Task runs: 20 tasks, one run a second each, ending two seconds ago; every slot distinct.
    run_at = _TS.format(f"(? - (? - i) * 1.0 / {TASKS})")
    conn.execute(
        seq + "INSERT INTO task_runs (task_name, scheduled_at, started_at, finished_at, "
        "duration_s, outcome, error, slots, manual, node) "
        f"SELECT printf('t%02d', i % {TASKS}), {run_at}, {run_at}, {run_at}, 0.01, 'success', "
        "NULL, 1, 0, 'n0' FROM seq",
        (rows - 1, now - 2, rows, now - 2, rows, now - 2, rows),
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - started


def _time_status(*engines: Engine) -> list[dict[str, float]]:
    """``build_status`` of each engine: its first call, then CALLS more, interleaved (one call
    of each engine in turn), so that every database is timed under the same conditions."""
    from nanobot.status import build_status

    firsts = []
    for engine in engines:
        started = time.perf_counter()
        build_status(engine)
        firsts.append(time.perf_counter() - started)
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(CALLS):
        for engine, took in zip(engines, times, strict=True):
            started = time.perf_counter()
            build_status(engine)
            took.append(time.perf_counter() - started)
    return [
        {"first": first, "median": median(took), "min": min(took)}
        for first, took in zip(firsts, times, strict=True)
    ]


def _cli_status(home: Path) -> float:
    env = dict(os.environ, NANOBOT_HOME=str(home), NANOBOT_LOGGING__LEVEL="warning")
    cmd = [sys.executable, "-m", "nanobot", "status", "--json"]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=False)
    return time.perf_counter() - started


def _plans(engine: Engine, path: Path) -> tuple[list[str], list[str], list[tuple[str, float]]]:
    """The statements of one build_status call, their plans, and the flagged ones."""
    from nanobot.status import build_status

    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    build_status(engine)
    event.remove(engine, "before_cursor_execute", capture)
    conn = sqlite3.connect(path)
    lines, flagged, timings = [], [], []
    for statement, parameters in captured:
        if not statement.lstrip().upper().startswith("SELECT"):
            continue
        params = tuple(parameters) if parameters else ()
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, params)]
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            conn.execute(statement, params).fetchall()
            samples.append(time.perf_counter() - started)
        one_line = " ".join(statement.split())
        timings.append((one_line, median(samples)))
        lines.append(f"-- {1000 * median(samples):.3f} ms\n{one_line}")
        lines.extend(f"   {p}" for p in plan)
        for p in plan:
            for table in HISTORY:
                if not re.match(rf"SCAN {table}\b", p):
                    continue
                unbounded = "USING" not in p or " LIMIT " not in f" {statement.upper()} "
                if unbounded or any("TEMP B-TREE" in q for q in plan):
                    flagged.append(f"{one_line}\n   {p}")
    conn.close()
    return lines, flagged, timings


def run(quick: bool) -> Result:
    res = Result("5 status")
    rows = 100_000 if quick else 1_000_000
    res.settings = {"history_rows_per_table": rows, "calls": CALLS}
    with bench_home("status") as home:
        empty = nanobot_engine(home / "empty.db")
        state = nanobot_engine(home / "state.db")
        _state(state, heartbeats=True)
        full_path = home / "nanobot.db"  # the default path, so the CLI finds it
        full = nanobot_engine(full_path)
        _state(full, heartbeats=False)
        generated = _history(full_path, rows)
        t_empty, t_state, t_full = _time_status(empty, state, full)
        lines, flagged, _timings = _plans(full, full_path)
        cli_full = _cli_status(home)
        empty_home = home / "empty-home"
        empty_home.mkdir()
        (home / "empty.db").rename(empty_home / "nanobot.db")
        cli_empty = _cli_status(empty_home)
        for engine in (empty, state, full):
            engine.dispose()
    label = f"{rows // 1000}k"
    met = t_full["median"] <= 2 * t_empty["median"] and t_full["median"] <= 0.050
    res.add(
        f"build_status, {label} task_runs + {label} heartbeats (median of {CALLS})",
        t_full["median"],
        "s",
        "empty database",
        t_empty["median"],
        "<= 2x empty and <= 50 ms",
        met,
    )
    res.add(
        f"build_status, {label} + {label} rows",
        t_full["median"],
        "s",
        "same state, no history",
        t_state["median"],
    )
    res.add(
        f"build_status first call (opens the connection), {label} + {label} rows",
        t_full["first"],
        "s",
        "empty database",
        t_empty["first"],
    )
    res.add(
        "statements scanning a whole history table",
        len(flagged),
        "",
        target="none",
        met=not flagged,
    )
    res.add(
        f"`python -m nanobot status --json` process, {label} + {label} rows",
        cli_full,
        "s",
        "empty database",
        cli_empty,
    )
    res.notes.append(
        f"History generated in {generated:.1f} s. Query plans of every statement "
        f"`build_status` issues, on the full database ({label} rows per history table), each "
        "with its median execution time in sqlite3:\n\n```\n" + "\n".join(lines) + "\n```"
    )
    if flagged:
        res.notes.append("Flagged plans:\n\n```\n" + "\n".join(flagged) + "\n```")
    return res
