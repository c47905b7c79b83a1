"""An APScheduler 3 baseline in a process of its own: ``python -m bench.aps_process SPEC``.

``SPEC`` is JSON: ``store`` (``memory``, or ``stock`` for the stock SQLAlchemyJobStore on
``url``, its jobs stored beforehand by :func:`bench.proc.aps_store`), ``stamp`` (the file runs
append to), ``ready`` (written with ``time.time()`` once ``start()`` returned) and, for the
memory store, ``groups``: ``[{"prefix", "count", "interval", "anchor", "spread"}]``, job ``i``
of a group having its first slot at ``anchor + spread * i / count``.

The scheduler is configured as nanobot configures APScheduler (``AsyncIOScheduler``,
``coalesce``, no misfire grace, one instance per job) and the job is a coroutine function
(:func:`bench.tasks.stamp_file`). Its loggers are at WARNING, as nanobot's QUIET_LOGGERS leave
APScheduler's executors. It runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


async def main(spec: dict[str, Any]) -> None:
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    from bench.proc import stock_engine
    from bench.tasks import stamp_file

    if spec["store"] == "memory":
        store: Any = MemoryJobStore()
    else:
        store = SQLAlchemyJobStore(engine=stock_engine(spec["url"]))
    scheduler = AsyncIOScheduler(
        jobstores={"default": store},
        job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        timezone=UTC,
    )
    for group in spec.get("groups", []):
        count, spread = group["count"], group.get("spread", 0.0)
        for i in range(count):
            anchor = group["anchor"] + spread * i / count
            trigger = IntervalTrigger(
                seconds=group["interval"],
                start_date=datetime.fromtimestamp(anchor, UTC),
                timezone=UTC,
            )
            scheduler.add_job(
                stamp_file,
                trigger=trigger,
                args=(spec["stamp"], anchor),
                id=f"{group['prefix']}{i:06d}",
                name=f"{group['prefix']}{i:06d}",
            )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    scheduler.start()
    Path(spec["ready"]).write_text(repr(time.time()))  # noqa: ASYNC240 - once, at start
    await stop.wait()
    scheduler.shutdown(wait=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(json.loads(sys.argv[1])))
