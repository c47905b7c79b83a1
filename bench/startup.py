"""Figure 6, start-up with 10,000 stored tasks: from process start to the first dispatch.

The parent notes ``time.time()`` just before it starts the child process
(:mod:`bench._startup_child`), which starts a scheduler on a prepared SQLite file; the one task
that is due writes ``time.time()`` to a file as its first statement. Every other task is due in
an hour. Start-up is the difference; the child also reports when its imports ended and when
``start()`` returned.

- nanobot, warm: the stored tasks were loaded by an earlier run (the job store holds them, as
  after any restart) and the due task was added while it was stopped (``control.add_task``,
  what ``nanobot cron add`` does);
- nanobot, cold: the tasks are only rows of ``tasks`` (stored while no scheduler ever ran),
  so the first start also creates their jobs;
- baseline: the same process on a database holding only the due task;
- APScheduler 3 AsyncIOScheduler on its stock SQLAlchemyJobStore (WAL) with the same number of
  stored jobs, for comparison.

Quick setting: 2,000 stored tasks instead of 10,000.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Result,
    aps_store_jobs,
    bench_home,
    compile_bytecode,
    epoch_to_dt,
    insert_stored_tasks,
    nanobot_engine,
    nanobot_manager,
    wait_for,
)

LATER = 3600.0


def _child(kind: str, db: Path, out: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench._startup_child", kind, str(db), str(out)]
    compile_bytecode()  # as installed: see its docstring
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    phases = json.loads(Path(str(out) + ".phases").read_text())
    first = float(out.read_text())
    return {
        "total": first - t0,
        "imports": phases["imported"] - t0,
        "start": phases["started"] - phases["imported"],
        "dispatch": first - phases["started"],
    }


def _add_due(engine: Any, out: Path) -> None:
    from nanobot.cron import control
    from nanobot.cron.task import TaskDefinition

    definition = TaskDefinition(
        name="due-now",
        task_class="bench.tasks:WriteTime",
        interval=LATER,
        kwargs={"interval": LATER, "path": str(out)},
    )
    control.add_task(engine, definition)


def _store_later(engine: Any, count: int) -> None:
    later = epoch_to_dt(time.time() + LATER)
    insert_stored_tasks(
        engine,
        [f"t{i:05d}" for i in range(count)],
        task_class="bench.tasks:Stamp",
        interval=LATER,
        kwargs_of=lambda _i: {"interval": LATER, "key": "startup"},
        anchor_of=lambda _i: later,
    )


async def _load_once(engine: Any) -> float:
    """Run a manager until it loaded every stored task, then stop it (schedules stay)."""
    manager = nanobot_manager(engine)
    started = time.perf_counter()
    await manager.start()
    await wait_for(lambda: manager.last_wakeup_at is not None, 600)
    loaded = time.perf_counter() - started
    await manager.shutdown(0)
    return loaded


def _nanobot_db(home: Path, name: str, count: int, *, warm: bool) -> tuple[Path, Path, float]:
    db, out = home / f"{name}.db", home / f"{name}.out"
    engine = nanobot_engine(db)
    loaded = 0.0
    if count:
        _store_later(engine, count)
    if warm:
        loaded = asyncio.run(_load_once(engine))
    _add_due(engine, out)
    engine.dispose()
    return db, out, loaded


def _aps_db(home: Path, count: int) -> tuple[Path, Path]:
    from apscheduler.triggers.interval import IntervalTrigger

    db, out = home / "aps.db", home / "aps.out"
    later = IntervalTrigger(
        seconds=LATER, start_date=epoch_to_dt(time.time() + LATER), timezone="UTC"
    )
    jobs = [(f"t{i:05d}", later, ("startup",)) for i in range(count)]
    aps_store_jobs(db, wal=True, jobs=jobs)
    # The due job: a coroutine function that writes the time, added the same way. Its first
    # run is 0.1 s ahead (a trigger never fires in the past), long before the child can start.
    soon = time.time() + 0.1
    now = IntervalTrigger(seconds=LATER, start_date=epoch_to_dt(soon), timezone="UTC")
    aps_store_jobs(
        db, wal=True, jobs=[("due-now", now, (str(out),))], func="bench.tasks:write_time"
    )
    return db, out


def run(quick: bool) -> Result:
    res = Result("6 startup")
    count = 2000 if quick else 10_000
    res.settings = {"stored_tasks": count}
    with bench_home("startup") as home:
        # A first child warms the file cache (interpreter, .pyc files); its time is discarded.
        db, out, _ = _nanobot_db(home, "warmup", 0, warm=False)
        _child("nanobot", db, out)
        db, out, _ = _nanobot_db(home, "empty", 0, warm=False)
        base = _child("nanobot", db, out)
        db, out, loaded = _nanobot_db(home, "warm", count, warm=True)
        warm = _child("nanobot", db, out)
        db, out, _ = _nanobot_db(home, "cold", count, warm=False)
        cold = _child("nanobot", db, out)
        db, out = _aps_db(home, count)
        aps = _child("aps", db, out)
    label = f"{count:,} stored tasks"
    base_label = "nanobot, only the due task"
    res.add(
        f"process start -> first dispatch, nanobot warm, {label}",
        warm["total"],
        "s",
        base_label,
        base["total"],
        "<= 2 s" if count >= 10_000 else "",
        warm["total"] <= 2.0 if count >= 10_000 else None,
    )
    res.add(
        f"process start -> first dispatch, nanobot cold, {label}",
        cold["total"],
        "s",
        base_label,
        base["total"],
        "<= 2 s" if count >= 10_000 else "",
        cold["total"] <= 2.0 if count >= 10_000 else None,
    )
    res.add(
        f"process start -> first dispatch, APScheduler stock WAL, {label}",
        aps["total"],
        "s",
        base_label,
        base["total"],
    )
    for name, r in (("only the due task", base), ("warm", warm), ("cold", cold), ("APS", aps)):
        res.notes.append(
            f"{name}: imports {r['imports']:.2f} s, start() {r['start']:.2f} s, "
            f"start() -> first dispatch {r['dispatch']:.2f} s"
        )
    res.notes.append(f"The earlier run that loaded the {label} (warm) took {loaded:.2f} s.")
    return res
