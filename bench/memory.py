"""Figure 7, memory: 100 tasks every 0.1 s for 5 minutes (30 s quick), retention active.

The process runs what the service runs around the scheduler: a CronManager on the configured
database with the built-in cleanup task every 5 s (``cron.history_max_rows`` = 200, so that
retention deletes rows all along), and a started heartbeat monitor (interval 5 s) that the
tasks report to. Resident memory (VmRSS) is sampled every second. The baseline is the RSS at
the end of the warm-up (the first fifth of the run); the figure is the largest RSS after it.

Also measured, for a user choosing a scheduler: the runs actually done against the 1000 a
second asked for, and the CPU time per run (process time over the measured window), beside
APScheduler 3's AsyncIOScheduler with its MemoryJobStore running the same 100 jobs (no
history) for a shorter window.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from sqlalchemy import func, select

from bench import tasks
from bench.common import (
    Result,
    aps_scheduler,
    bench_home,
    epoch_to_dt,
    insert_stored_tasks,
    rss_mb,
)

TASKS = 100
INTERVAL = 0.1
MAX_ROWS = 200


async def nanobot_memory(duration: float) -> dict[str, Any]:
    from nanobot.bus import MessageBus
    from nanobot.cron import CleanupTask, CronManager
    from nanobot.db import get_engine, upgrade_database
    from nanobot.heartbeat import HeartbeatMonitor
    from nanobot.models import TaskRun

    engine = get_engine()  # the configured database: the one the cleanup task prunes
    upgrade_database(engine)
    start = time.time() + 2.0
    insert_stored_tasks(
        engine,
        [f"m{i:03d}" for i in range(TASKS)],
        task_class="bench.tasks:Count",
        interval=INTERVAL,
        kwargs_of=lambda _i: {"interval": INTERVAL, "key": "nanobot"},
        anchor_of=lambda _i: epoch_to_dt(start),
    )
    bus = MessageBus()
    monitor = HeartbeatMonitor(bus, 5, engine=engine, node="bench")
    await monitor.start()
    manager = CronManager(engine, node="bench", poll_interval=1.0, bus=bus, monitor=monitor)
    manager.register_task("cleanup", CleanupTask(5))
    await manager.start_task("cleanup")
    await asyncio.sleep(max(0.0, start - time.time()))
    warmup = duration / 5
    samples: list[tuple[float, float]] = []
    began = time.time()
    cpu_at = runs_at = 0.0
    while (elapsed := time.time() - began) < duration:
        samples.append((elapsed, rss_mb()))
        if not cpu_at and elapsed >= warmup:
            cpu_at, runs_at = time.process_time(), tasks.COUNTS.get("nanobot", 0)
            measured_from = time.time()
        await asyncio.sleep(1.0)
    cpu = time.process_time() - cpu_at
    runs = tasks.COUNTS.get("nanobot", 0) - runs_at
    window = time.time() - measured_from
    await manager.shutdown(2)
    await monitor.stop()
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(TaskRun)).scalar_one()
        outcomes = dict(
            conn.execute(select(TaskRun.outcome, func.count()).group_by(TaskRun.outcome)).all()
        )
    warm = [rss for t, rss in samples if t >= warmup]
    return {
        "warm": warm[0],
        "max": max(warm),
        "end": warm[-1],
        "runs_per_s": runs / window,
        "cpu_per_run": cpu / runs if runs else float("nan"),
        "rows": rows,
        "outcomes": outcomes,
    }


async def aps_cpu(window: float) -> dict[str, float]:
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = aps_scheduler("memory")
    start = epoch_to_dt(time.time() + 0.5)
    trigger = IntervalTrigger(seconds=INTERVAL, start_date=start, timezone="UTC")
    for i in range(TASKS):
        scheduler.add_job(tasks.count, trigger=trigger, args=("aps",), id=f"m{i:03d}")
    scheduler.start()
    await asyncio.sleep(1.5)
    cpu, runs, began = time.process_time(), tasks.COUNTS.get("aps", 0), time.time()
    await asyncio.sleep(window)
    cpu = time.process_time() - cpu
    runs = tasks.COUNTS.get("aps", 0) - runs
    elapsed = time.time() - began
    scheduler.shutdown(wait=False)
    return {"runs_per_s": runs / elapsed, "cpu_per_run": cpu / runs if runs else float("nan")}


def run(quick: bool) -> Result:
    res = Result("7 memory")
    duration = 30.0 if quick else 300.0
    res.settings = {
        "tasks": TASKS,
        "interval_s": INTERVAL,
        "duration_s": duration,
        "cleanup_interval_s": 5,
        "history_max_rows": MAX_ROWS,
    }
    os.environ["NANOBOT_CRON__HISTORY_MAX_ROWS"] = str(MAX_ROWS)
    with bench_home("memory"):
        aps = asyncio.run(aps_cpu(5.0 if quick else 15.0))
        nb = asyncio.run(nanobot_memory(duration))
    growth = nb["max"] / nb["warm"] - 1
    res.add(
        "largest RSS after warm-up, nanobot",
        nb["max"],
        "MB",
        "RSS at end of warm-up",
        nb["warm"],
        "<= 1.1x (+10 %)",
        growth <= 0.10,
    )
    res.add("RSS at the end, nanobot", nb["end"], "MB", "RSS at end of warm-up", nb["warm"])
    res.add(
        f"runs per second done (asked: {TASKS / INTERVAL:.0f}), nanobot",
        nb["runs_per_s"],
        "/s",
        "APScheduler memory",
        aps["runs_per_s"],
    )
    res.add(
        "CPU time per run, nanobot (history, retention, health)",
        nb["cpu_per_run"] * 1000,
        "ms",
        "APScheduler memory",
        aps["cpu_per_run"] * 1000,
    )
    res.notes.append(
        f"task_runs rows at the end: {nb['rows']} (retention keeps {MAX_ROWS} per task); "
        f"outcomes: {nb['outcomes']}"
    )
    return res
