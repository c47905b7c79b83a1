"""Figure 3, steady lateness: 1000 tasks with 5 s intervals spread evenly over the period.

Task i has its slots at ``T0 + i x 5 ms + k x 5 s``; each run records ``time.time()`` first
thing, and its lateness is that start minus its slot. The first period (the first run of every
task, just after the scheduler loaded them) is a warm-up and is left out; the next periods are
measured: p50, p99 and maximum lateness over all their runs.

- nanobot: the tasks stored as ``nanobot cron add`` stores them (first slot ``T0 + i x 5 ms``),
  run history recorded (its ``task_runs`` rows are counted at the end).
- APScheduler 3 AsyncIOScheduler with its MemoryJobStore (the baseline of the target), and with
  the stock SQLAlchemyJobStore on SQLite in WAL mode (for comparison; no history).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench import tasks
from bench.common import (
    LoopMonitor,
    Result,
    aps_scheduler,
    aps_store_jobs,
    bench_home,
    epoch_to_dt,
    insert_stored_tasks,
    nanobot_engine,
    nanobot_manager,
    percentile,
    wait_for,
)
from nanobot.gcsteward import GcSteward

TASKS = 1000
INTERVAL = 5.0


def _lateness(key: str, t0: float, periods: int) -> list[float]:
    """Lateness of every start in the measured periods (after the first one)."""
    lo, hi = t0 + INTERVAL, t0 + INTERVAL * (1 + periods)
    result = []
    for started, anchor in tasks.STARTS[key]:
        assert anchor is not None
        slot = anchor + INTERVAL * int((started - anchor) // INTERVAL)
        if lo <= slot < hi:
            result.append(started - slot)
    return result


async def _observe(key: str, t0: float, periods: int) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + INTERVAL - 0.1 - time.time()))
    monitor = LoopMonitor().start()
    await asyncio.sleep(max(0.0, t0 + INTERVAL * (1 + periods) + 1.0 - time.time()))
    held = await monitor.stop()
    late = _lateness(key, t0, periods)
    return {
        "late": late,
        "runs": len(late),
        "p50": percentile(late, 50),
        "p99": percentile(late, 99),
        "max": max(late, default=float("nan")),
        "held": held,
    }


async def nanobot_lateness(home: Path, periods: int) -> dict[str, Any]:
    from nanobot.models import TaskOutcome, TaskRun

    engine = nanobot_engine(home / "nanobot.db")
    key = "nanobot"
    tasks.expect(key, 10**9)
    t0 = time.time() + 2.0 + 0.003 * TASKS
    insert_stored_tasks(
        engine,
        [f"t{i:04d}" for i in range(TASKS)],
        task_class="bench.tasks:Stamp",
        interval=INTERVAL,
        kwargs_of=lambda i: {"interval": INTERVAL, "key": key, "anchor": t0 + i * INTERVAL / TASKS},
        anchor_of=lambda i: epoch_to_dt(t0 + i * INTERVAL / TASKS),
    )
    manager = nanobot_manager(engine)
    await manager.start()
    # As the service does: start-up collected and frozen once, then full collections at the
    # scheduler's quiet moments.
    steward = GcSteward(manager.quiet)
    steward.collect(everything=True)
    steward.start()
    await wait_for(lambda: manager.last_wakeup_at is not None, 120)
    loaded_before = time.time() < t0
    result = await _observe(key, t0, periods)
    await manager.shutdown(5)
    steward.stop()
    with engine.connect() as conn:
        result["history"] = conn.execute(
            select(func.count())
            .select_from(TaskRun)
            .where(TaskRun.outcome == TaskOutcome.SUCCESS.value)
        ).scalar_one()
    result["loaded_before"] = loaded_before
    engine.dispose()
    return result


async def aps_lateness(home: Path, periods: int, store: str) -> dict[str, Any]:
    from apscheduler.triggers.interval import IntervalTrigger

    key = store
    tasks.expect(key, 10**9)
    t0 = time.time() + 2.0 + 0.001 * TASKS
    jobs = []
    for i in range(TASKS):
        anchor = t0 + i * INTERVAL / TASKS
        trigger = IntervalTrigger(seconds=INTERVAL, start_date=epoch_to_dt(anchor), timezone="UTC")
        jobs.append((f"t{i:04d}", trigger, (key, anchor)))
    path = home / f"{store}.db"
    if store != "memory":
        aps_store_jobs(path, wal=True, jobs=jobs)
    scheduler = aps_scheduler(store, path)
    if store == "memory":
        for job_id, trigger, args in jobs:
            scheduler.add_job(tasks.stamp, trigger=trigger, args=args, id=job_id)
    scheduler.start()
    result = await _observe(key, t0, periods)
    scheduler.shutdown(wait=False)
    return result


async def _run(quick: bool, res: Result) -> None:
    periods = 1 if quick else 5
    res.settings = {"tasks": TASKS, "interval_s": INTERVAL, "measured_periods": periods}
    with bench_home("lateness") as home:
        nb = await nanobot_lateness(home, periods)
        mem = await aps_lateness(home, periods, "memory")
        # The stock store only for comparison: left out of the quick setting, to stay < 1 min.
        wal = None if quick else await aps_lateness(home, periods, "sqlite-wal")
    base = "APScheduler MemoryJobStore"
    for stat in ("p50", "p99", "max"):
        target, met = "", None
        if stat == "p99":
            target = "<= 1.5x memory + 1 ms"
            met = nb["p99"] <= 1.5 * mem["p99"] + 0.001
        res.add(
            f"lateness {stat}, nanobot ({nb['runs']} runs; {nb['history']} rows of history)",
            nb[stat],
            "s",
            base,
            mem[stat],
            target,
            met,
        )
    if wal is not None:
        for stat in ("p50", "p99", "max"):
            label = f"lateness {stat}, stock SQLAlchemyJobStore WAL"
            res.add(label, wal[stat], "s", base, mem[stat])
    res.add("loop held longest, nanobot", nb["held"], "s", base, mem["held"])
    if wal is not None:
        label = "loop held longest, stock SQLAlchemyJobStore WAL"
        res.add(label, wal["held"], "s", base, mem["held"])
    expected = TASKS * periods
    for label, r in (("nanobot", nb), ("memory", mem), ("stock WAL", wal)):
        if r is not None and r["runs"] != expected:
            res.notes.append(f"{label}: {r['runs']} runs measured, {expected} expected.")
    if not nb["loaded_before"]:
        res.notes.append("nanobot had not loaded every task before the first slot (warm-up).")


def run(quick: bool) -> Result:
    res = Result("3 lateness")
    asyncio.run(_run(quick, res))
    return res
