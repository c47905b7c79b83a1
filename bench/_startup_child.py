"""The process figure 6 starts: a scheduler on a database of stored tasks, until its first run.

``python -m bench._startup_child nanobot|aps DB OUT`` starts a CronManager (or APScheduler's
AsyncIOScheduler on the stock SQLAlchemyJobStore) on the SQLite file DB and exits once the due
task wrote OUT. It writes OUT + ".phases" with when its imports ended and ``start()`` returned.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path


async def _nanobot(db: str) -> float:
    from bench.common import nanobot_manager
    from nanobot.db import create_db_engine

    manager = nanobot_manager(create_db_engine(f"sqlite:///{db}"))
    await manager.start()  # its engine property migrates the database first, as the service
    return time.time()


async def _aps(db: str) -> float:
    from bench.common import aps_scheduler

    scheduler = aps_scheduler("sqlite-wal", Path(db))
    scheduler.start()
    return time.time()


def _finish(out: str, imported: float, started: float) -> None:
    Path(out + ".phases").write_text(json.dumps({"imported": imported, "started": started}))
    sys.stdout.flush()
    os._exit(0)  # the figure ends at the first dispatch; no need to wait for a clean stop


async def main(kind: str, db: str, out: str) -> None:
    from bench.common import wait_for

    imported = time.time()
    started = await (_nanobot(db) if kind == "nanobot" else _aps(db))
    await wait_for(Path(out).exists, 300, step=0.002)
    _finish(out, imported, started)


if __name__ == "__main__":
    from bench.common import quiet_logging

    quiet_logging(Path(sys.argv[3] + ".log"))
    if sys.argv[1] == "nanobot":
        import nanobot.cron  # noqa: F401 - counted in "imports", as in the service
    else:
        import apscheduler.schedulers.asyncio  # noqa: F401
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
