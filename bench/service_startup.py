"""Figure ``startup``: the service's start with 10,000 and 100,000 stored tasks.

The parent notes ``time.time()`` and starts ``python -m nanobot`` (default settings) on a SQLite
file holding N tasks stored as ``nanobot cron add`` stores them, due in an hour, plus one task
due now. Measured: process start -> ``/readyz`` answering 200 (polled every 20 ms, one request
at a time), and process start -> the due task's first run (it appends ``time.time()`` to a file).

- cold: the stored tasks are only rows of ``tasks`` (stored while no service ran), so this
  start makes their jobs; warm: the same database started again (their jobs exist, as after
  any restart), with one more task due now. The cold service is stopped only once every
  stored task has its job: a service makes the jobs of tasks due later after it is ready
  (nanobot.cron.reconcile), and a warm start must find them all.
- baseline: the same with no stored task but the due one.

Quick: 10,000 only.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from bench.common import Result, bench_home, epoch_to_dt, insert_stored_tasks
from bench.proc import ServiceProcess, nanobot_db
from bench.tasks import read_stamps

LATER = 3600.0


def _prepare(home: Path, count: int) -> Path:
    """A database of ``count`` tasks due in an hour; the stamp file of a task due now."""
    home.mkdir()
    engine = nanobot_db(f"sqlite:///{home / 'nanobot.db'}")
    later = epoch_to_dt(time.time() + LATER)
    if count:
        insert_stored_tasks(
            engine,
            [f"t{i:06d}" for i in range(count)],
            task_class="bench.tasks:StampFile",
            interval=LATER,
            kwargs_of=lambda _i: {"interval": LATER, "path": str(home / "never.txt")},
            anchor_of=lambda _i: later,
        )
    engine.dispose()
    return _add_due(home, "cold")


def _add_due(home: Path, name: str) -> Path:
    """A task due now, added while the service is stopped (what `cron add` does)."""
    stamp = home / f"{name}.txt"
    engine = nanobot_db(f"sqlite:///{home / 'nanobot.db'}")
    now = time.time()
    insert_stored_tasks(
        engine,
        [f"due-{name}"],
        task_class="bench.tasks:StampFile",
        interval=LATER,
        kwargs_of=lambda _i: {"interval": LATER, "path": str(stamp), "anchor": now},
        anchor_of=lambda _i: epoch_to_dt(now),
    )
    engine.dispose()
    return stamp


def _jobs(home: Path) -> int:
    """How many jobs the service's job store holds (read-only: the service writes)."""
    with contextlib.closing(
        sqlite3.connect(f"file:{home / 'nanobot.db'}?mode=ro", uri=True, timeout=30)
    ) as conn:
        return int(conn.execute("SELECT count(*) FROM apscheduler_jobs").fetchone()[0])


def _start(home: Path, stamp: Path, jobs: int = 0) -> dict[str, float]:
    """Start the service on ``home``; when it was ready and when the due task ran. It is
    stopped once the job store holds ``jobs`` jobs (not timed)."""
    service = ServiceProcess(home)
    with service:
        service.start()
        ready = service.wait_status("/readyz", 200, within=300)
        deadline = time.time() + 300
        while not stamp.exists() and time.time() < deadline:
            time.sleep(0.005)
        while _jobs(home) < jobs and time.time() < deadline:
            time.sleep(0.2)
        service.stop()
    stamps = read_stamps(stamp)
    return {
        "ready": ready - service.started_at,
        "first_run": stamps[0][0] - service.started_at if stamps else float("nan"),
    }


def run(quick: bool) -> Result:
    res = Result("startup")
    sizes = (10_000,) if quick else (10_000, 100_000)
    res.settings = {"stored_tasks": list(sizes)}
    results: dict[str, dict[str, float]] = {}
    with bench_home("startup") as base:
        # A first start warms the file cache (interpreter, .pyc files, compiled beforehand as an
        # installed package has them: bench.common.compile_bytecode); its time is discarded.
        _start(base / "warmup", _prepare(base / "warmup", 0))
        results["empty"] = _start(base / "empty", _prepare(base / "empty", 0))
        for n in sizes:
            home = base / f"tasks-{n}"
            # Cold: the tasks are only rows; this first start makes their jobs. Then warm: the
            # same database started again, with one more task due now.
            results[f"cold-{n}"] = _start(home, _prepare(home, n), jobs=n + 1)
            results[f"warm-{n}"] = _start(home, _add_due(home, "warm"))
    empty = results["empty"]
    for n in sizes:
        limit = 1.5 if n <= 10_000 else 10.0
        for kind in ("warm", "cold"):
            r = results[f"{kind}-{n}"]
            res.add(
                f"process start -> /readyz 200, {kind}, {n:,} stored tasks",
                r["ready"],
                "s",
                "no stored task",
                empty["ready"],
                f"<= {limit:g} s",
                r["ready"] <= limit,
            )
            res.add(
                f"process start -> first run of the due task, {kind}, {n:,} stored tasks",
                r["first_run"],
                "s",
                "no stored task",
                empty["first_run"],
            )
    return res
