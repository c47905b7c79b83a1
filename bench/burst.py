"""Figure 2, burst dispatch: N persistent tasks all due at the same instant.

Measured for each N: the time from that instant to the start of the last of the N runs (each
run records ``time.time()`` as its first statement), and the longest time the event loop was
held in one go from half a second before the instant until every run started and (nanobot)
its history was written.

- nanobot: N tasks stored as ``nanobot cron add`` stores them, with their first slot at the
  instant (:func:`bench.common.insert_stored_tasks`), interval 1 h; a CronManager is started
  early enough to have loaded them all before the instant (checked; the lead is the load time
  with a margin). The run history is recorded: after the burst the N ``task_runs`` rows are
  counted, every one ``success``.
- APScheduler 3 AsyncIOScheduler with its MemoryJobStore (jobs added before start), and with
  its stock SQLAlchemyJobStore on SQLite, default journal and WAL (the N jobs stored before the
  scheduler starts; see :func:`bench.common.aps_store_jobs`). No run history there: APScheduler
  keeps none.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    wait_for,
)
from nanobot.gcsteward import GcSteward

INTERVAL = 3600.0
TIMEOUT = 300.0


async def _measure(key: str, n: int, instant: float, done: asyncio.Event) -> dict[str, Any]:
    """Wait for the N starts under a loop monitor started half a second before the instant."""
    await asyncio.sleep(max(0.0, instant - 0.5 - time.time()))
    monitor = LoopMonitor().start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), TIMEOUT + max(0.0, instant - time.time()))
    starts = [t for t, _ in tasks.STARTS[key]]
    return {
        "monitor": monitor,
        "started": len(starts),
        "first": min(starts) - instant if starts else None,
        "last": max(starts) - instant if len(starts) == n else None,
    }


async def nanobot_burst(home: Path, n: int) -> dict[str, Any]:
    from nanobot.models import TaskOutcome, TaskRun

    lead = 2.0 + 0.003 * n  # the first pass loads about 1.2 ms per stored task (cold)
    for _attempt in range(3):
        db = home / f"nanobot-{n}-{lead:.0f}.db"
        engine = nanobot_engine(db)
        key = f"nanobot-{n}"
        done = tasks.expect(key, n)
        instant = time.time() + lead
        insert_stored_tasks(
            engine,
            [f"t{i:05d}" for i in range(n)],
            task_class="bench.tasks:Stamp",
            interval=INTERVAL,
            kwargs_of=lambda _i, key=key: {"interval": INTERVAL, "key": key},
            anchor_of=lambda _i, instant=instant: epoch_to_dt(instant),
        )
        manager = nanobot_manager(engine)
        started = time.time()
        await manager.start()
        # As the service does: start-up collected and frozen once, full collections made at
        # the scheduler's quiet moments from then on.
        steward = GcSteward(manager.quiet)
        steward.collect(everything=True)
        await wait_for(lambda m=manager: m.last_wakeup_at is not None, TIMEOUT)
        loaded = time.time() - started
        if time.time() < instant - 0.5:
            break
        # Loading took longer than the lead: the burst would include it. Again, with more.
        await manager.shutdown(0)
        engine.dispose()
        lead = 2 * lead + loaded
    else:
        raise RuntimeError(f"nanobot could not load {n} tasks in time")
    steward.start()
    result = await _measure(key, n, instant, done)
    await manager.flush()
    result["monitor_held"] = await result["monitor"].stop()
    with engine.connect() as conn:
        result["history"] = conn.execute(
            select(func.count())
            .select_from(TaskRun)
            .where(
                TaskRun.outcome == TaskOutcome.SUCCESS.value,
                TaskRun.scheduled_at == epoch_to_dt(instant),
            )
        ).scalar_one()
    await manager.shutdown(5)
    steward.stop()
    engine.dispose()
    result["load_s"] = loaded
    return result


async def aps_burst(home: Path, n: int, store: str) -> dict[str, Any]:
    from apscheduler.triggers.interval import IntervalTrigger

    from bench.tasks import stamp

    key = f"{store}-{n}"
    done = tasks.expect(key, n)
    instant = time.time() + 2.0 + (0.0005 * n)
    trigger = IntervalTrigger(seconds=INTERVAL, start_date=epoch_to_dt(instant), timezone="UTC")
    jobs = [(f"t{i:05d}", trigger, (key,)) for i in range(n)]
    path = home / f"{store}-{n}.db"
    if store != "memory":
        aps_store_jobs(path, wal=store == "sqlite-wal", jobs=jobs)
    scheduler = aps_scheduler(store, path)
    if store == "memory":
        for job_id, trig, args in jobs:
            scheduler.add_job(stamp, trigger=trig, args=args, id=job_id, name=job_id)
    scheduler.start()
    if time.time() > instant - 0.5:
        raise RuntimeError(f"APScheduler ({store}) could not start with {n} jobs in time")
    result = await _measure(key, n, instant, done)
    # APScheduler moves each job to its next run after submitting it; let it finish that.
    await asyncio.sleep(0.2)
    result["monitor_held"] = await result["monitor"].stop()
    result["history"] = None
    scheduler.shutdown(wait=False)
    return result


STORES = (
    ("memory", "APScheduler MemoryJobStore"),
    ("sqlite-wal", "stock SQLAlchemyJobStore, WAL"),
    ("sqlite", "stock SQLAlchemyJobStore, default journal"),
)


async def _run(quick: bool, res: Result) -> None:
    sizes = (100, 1000) if quick else (100, 1000, 5000)
    res.settings = {"N": list(sizes), "interval_s": INTERVAL}
    with bench_home("burst") as home:
        for n in sizes:
            nb = await nanobot_burst(home, n)
            base = {store: await aps_burst(home, n, store) for store, _ in STORES}
            mem = base["memory"]
            target = "<= 2x memory" if n >= 1000 else ""
            last = nb["last"]
            res.add(
                f"N={n} instant -> last start, nanobot (history: {nb['history']} rows)",
                last,
                "s",
                STORES[0][1],
                mem["last"],
                target,
                None
                if not target
                else (last is not None and nb["history"] == n and last <= 2 * mem["last"]),
            )
            for store, label in STORES[1:]:
                res.add(
                    f"N={n} instant -> last start, {label}",
                    base[store]["last"],
                    "s",
                    STORES[0][1],
                    mem["last"],
                )
            res.add(
                f"N={n} loop held longest, nanobot",
                nb["monitor_held"],
                "s",
                STORES[0][1],
                mem["monitor_held"],
                "<= 20 ms" if n >= 5000 else "",
                nb["monitor_held"] <= 0.020 if n >= 5000 else None,
            )
            for store, label in STORES[1:]:
                res.add(
                    f"N={n} loop held longest, {label}",
                    base[store]["monitor_held"],
                    "s",
                    STORES[0][1],
                    mem["monitor_held"],
                )
            res.notes.append(
                f"N={n}: nanobot loaded the {n} stored tasks in {nb['load_s']:.2f} s before the "
                f"instant; first start after the instant: nanobot "
                f"{1000 * (nb['first'] or 0):.1f} ms, memory {1000 * (mem['first'] or 0):.1f} ms."
            )


def run(quick: bool) -> Result:
    res = Result("2 burst")
    asyncio.run(_run(quick, res))
    return res
