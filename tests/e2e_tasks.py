"""Task classes for the command-line and end-to-end service tests.

Importable by name (``e2e_tasks:AppendLine``) in the test process and in the service
subprocesses, which get tests/ on their PYTHONPATH. Each run leaves a line in a file, so that
what ran survives the process that ran it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from nanobot.cron import CronTask


def _append(path: str, text: str) -> None:
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(f"{text} {time.time():.3f} {os.getpid()}\n")


class AppendLine(CronTask):
    """Appends ``run <time> <pid>`` to ``path`` at every run."""

    def __init__(self, interval: float = 1, path: str = "runs.txt") -> None:
        super().__init__(interval)
        self.path = path

    async def run(self) -> None:
        _append(self.path, "run")


class SlowTask(CronTask):
    """Writes ``start``, works for ``seconds``, writes ``end``; ``cancelled`` if cancelled."""

    def __init__(self, interval: float = 60, path: str = "slow.txt", seconds: float = 30) -> None:
        super().__init__(interval)
        self.path = path
        self.seconds = seconds

    async def run(self) -> None:
        _append(self.path, "start")
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            _append(self.path, "cancelled")
            raise
        _append(self.path, "end")


class NotATask:
    """A class that is not a CronTask: ``cron add`` must refuse it."""
