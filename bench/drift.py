"""Figure 1, drift: a task with interval 0.2 s whose run takes 50 ms, for 100 periods.

The figure is the start-time error of the last period: its start minus its ideal time
``anchor + 99 x interval`` (each run records ``time.time()`` first thing), where the anchor is
the instant the schedule began: when the loop was entered (seed), the task's ``anchor_at``
(nanobot, the moment ``start_task`` stored it), the trigger's ``start_date`` (APScheduler).
The same definition is applied to every variant:

- baseline, the seed's design: ``while True: await run(); await asyncio.sleep(interval)``,
  which drifts by every run's duration (about 99 x 50 ms = 5 s);
- nanobot: ``register_task`` + ``start_task`` of a stored task on a CronManager;
- APScheduler 3 with its MemoryJobStore (an interval job), for comparison.

The largest error of any period is reported too (for nanobot it is usually the first one,
which includes ``start_task``'s own work).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import select

from bench import tasks
from bench.common import (
    LoopMonitor,
    Result,
    aps_scheduler,
    bench_home,
    epoch_to_dt,
    nanobot_engine,
    nanobot_manager,
    percentile,
)
from nanobot.gcsteward import GcSteward

INTERVAL = 0.2
BUSY = 0.05


def _errors(starts: list[float], anchor: float) -> list[float]:
    return [t - (anchor + k * INTERVAL) for k, t in enumerate(starts)]


async def seed_loop(periods: int) -> list[float]:
    """The seed's CronTask loop: run, then sleep the interval."""
    key = "seed"
    tasks.expect(key, periods)
    anchor = time.time()
    for _ in range(periods):
        await tasks.stamp(key, busy=BUSY)
        await asyncio.sleep(INTERVAL)
    return _errors([t for t, _ in tasks.STARTS[key]], anchor)


async def nanobot_drift(home: Path, periods: int) -> tuple[list[float], float]:
    from nanobot.models import Task

    engine = nanobot_engine(home / "drift.db")
    key = "nanobot"
    done = tasks.expect(key, periods)
    manager = nanobot_manager(engine)
    manager.register_task("drift", tasks.Stamp(INTERVAL, key=key, busy=BUSY))
    await manager.start()
    # As the service does: start-up collected and frozen once, then full collections at the
    # scheduler's quiet moments.
    steward = GcSteward(manager.quiet)
    steward.collect(everything=True)
    steward.start()
    monitor = LoopMonitor().start()
    await manager.start_task("drift")
    await asyncio.wait_for(done.wait(), periods * INTERVAL * 3 + 30)
    held = await monitor.stop()
    await manager.stop_task("drift")
    await manager.shutdown(2)
    steward.stop()
    with engine.connect() as conn:
        anchor = conn.execute(select(Task.anchor_at).where(Task.name == "drift")).scalar_one()
    engine.dispose()
    starts = [t for t, _ in tasks.STARTS[key]][:periods]
    assert anchor is not None, "a task's anchor is set when it is first scheduled"
    return _errors(starts, anchor.timestamp()), held


async def aps_drift(periods: int) -> list[float]:
    from apscheduler.triggers.interval import IntervalTrigger

    key = "aps"
    done = tasks.expect(key, periods)
    scheduler = aps_scheduler("memory")
    anchor = time.time() + 0.1
    trigger = IntervalTrigger(seconds=INTERVAL, start_date=epoch_to_dt(anchor), timezone="UTC")
    scheduler.add_job(tasks.stamp, trigger=trigger, args=(key, None, BUSY), id="drift")
    scheduler.start()
    await asyncio.wait_for(done.wait(), periods * INTERVAL * 3 + 30)
    scheduler.shutdown(wait=False)
    return _errors([t for t, _ in tasks.STARTS[key]][:periods], anchor)


async def _run(quick: bool, res: Result) -> None:
    periods = 25 if quick else 100
    res.settings = {"periods": periods, "interval_s": INTERVAL, "run_s": BUSY}
    with bench_home("drift") as home:
        seed = await seed_loop(periods)
        nb, held = await nanobot_drift(home, periods)
        aps = await aps_drift(periods)
    res.add(
        f"last period ({periods}) start error, nanobot",
        nb[-1],
        "s",
        "seed run+sleep loop",
        seed[-1],
        "<= 10 ms",
        abs(nb[-1]) <= 0.010,
    )
    res.add(
        f"last period ({periods}) start error, APScheduler memory",
        aps[-1],
        "s",
        "seed run+sleep loop",
        seed[-1],
    )
    res.add("start error p50 over all periods, nanobot", percentile(nb, 50), "s")
    res.add("largest start error of any period, nanobot", max(nb, key=abs), "s")
    res.add("largest start error of any period, APScheduler memory", max(aps, key=abs), "s")
    res.add("loop held longest during the run, nanobot", held, "s")


def run(quick: bool) -> Result:
    res = Result("1 drift")
    asyncio.run(_run(quick, res))
    return res
