"""A process that runs a CronManager until SIGTERM, for the restart tests.

Usage: python cron_runner.py SPEC_JSON, where SPEC_JSON maps task names to
[class name in cron_tasks, constructor kwargs]. Prints "ready" once the tasks are started.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import cron_tasks

from nanobot.cron import CronManager


async def main(spec: dict[str, list[object]]) -> None:
    manager = CronManager(poll_interval=0.05)
    for name, (class_name, kwargs) in spec.items():
        cls = getattr(cron_tasks, str(class_name))
        manager.register_task(name, cls(**kwargs))  # type: ignore[arg-type]
    await manager.start_all_tasks()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await manager.shutdown(grace=0)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
