"""Task classes for the scheduler's tests, importable by name (``cron_tasks:Counter``) in this
process and in the subprocesses that the restart tests start (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import ClassVar

from nanobot.cron import CronTask


class Counter(CronTask):
    """Counts its runs, per name, in this process."""

    counts: ClassVar[dict[str, int]] = {}

    def __init__(self, interval: float = 1, label: str = "counter") -> None:
        super().__init__(interval)
        self.label = label

    async def run(self) -> None:
        Counter.counts[self.label] = Counter.counts.get(self.label, 0) + 1


class AppendLine(CronTask):
    """Appends one line per run to a file: the run count survives the process."""

    def __init__(self, interval: float = 1, path: str = "runs.txt") -> None:
        super().__init__(interval)
        self.path = path

    async def run(self) -> None:
        with Path(self.path).open("a") as f:
            f.write(f"{os.getpid()}\n")


class Sleeper(CronTask):
    """Runs for ``seconds`` (long enough to be caught in flight)."""

    def __init__(self, interval: float = 1, seconds: float = 60.0, path: str | None = None) -> None:
        super().__init__(interval)
        self.seconds = seconds
        self.path = path

    async def run(self) -> None:
        if self.path:
            Path(self.path).write_text("started")
        await asyncio.sleep(self.seconds)


class Failing(CronTask):
    """Raises on every run."""

    def __init__(self, interval: float = 1, message: str = "boom") -> None:
        super().__init__(interval)
        self.message = message

    async def run(self) -> None:
        raise RuntimeError(self.message)


class Gate(CronTask):
    """Signals when a run starts and holds it until released (in this process)."""

    started: ClassVar[asyncio.Event | None] = None
    release: ClassVar[asyncio.Event | None] = None
    runs: ClassVar[int] = 0

    def __init__(self, interval: float = 1, timeout: float | None = None) -> None:
        super().__init__(interval, timeout=timeout)

    async def run(self) -> None:
        Gate.runs += 1
        assert Gate.started is not None
        assert Gate.release is not None
        Gate.started.set()
        await Gate.release.wait()


class Flaky(CronTask):
    """Fails while ``Flaky.failing`` is true, succeeds otherwise."""

    failing: ClassVar[bool] = True

    async def run(self) -> None:
        if Flaky.failing:
            raise RuntimeError("flaky")


class Busy(CronTask):
    """Runs for ``seconds`` each time, with an overlap policy given by keyword: the task that
    takes longer than its interval of the overlap policies' golden tables."""

    started: ClassVar[int] = 0

    def __init__(
        self,
        interval: float = 1,
        seconds: float = 2.5,
        overlap: str | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        super().__init__(interval, overlap=overlap, max_concurrent=max_concurrent)
        self.seconds = seconds

    async def run(self) -> None:
        Busy.started += 1
        await asyncio.sleep(self.seconds)
