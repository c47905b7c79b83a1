"""Task classes for the scheduler's tests, importable by name (``cron_tasks:Counter``) in this
process and in the subprocesses that the restart tests start (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from nanobot.cron import CronTask


class Counter(CronTask):
    """Counts its runs: this instance's in ``runs``; with a ``path``, every instance's (built
    again after a restart, or in another scheduler) as one line of ``label`` per run there."""

    def __init__(
        self, interval: float = 1, label: str = "counter", path: str | None = None
    ) -> None:
        super().__init__(interval)
        self.label = label
        self.path = path
        self.runs = 0

    async def run(self) -> None:
        self.runs += 1
        if self.path is not None:
            with Path(self.path).open("a") as f:
                f.write(f"{self.label}\n")


class SlowToBuild(Counter):
    """A Counter that takes ``build_s`` to construct, as a task that imports a heavy module or
    sets up a client does. A scheduler builds a stored task in its pass, the first time it
    claims one of its slots; what that pass cost per slot is what it learns to claim ahead by."""

    def __init__(
        self,
        interval: float = 1,
        label: str = "slow",
        path: str | None = None,
        build_s: float = 0.02,
    ) -> None:
        time.sleep(build_s)
        super().__init__(interval, label, path)


def counted(path: Path) -> list[str]:
    """The labels of the runs that Counters with this ``path`` recorded, in order."""
    return path.read_text().splitlines() if path.exists() else []


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


class TimesOut(CronTask):
    """Raises TimeoutError on every run, as a client whose own timeout expired does."""

    async def run(self) -> None:
        raise TimeoutError("the remote end did not answer")


class Gate(CronTask):
    """Signals ``started`` when a run starts and holds it until ``release`` is set."""

    def __init__(self, interval: float = 1, timeout: float | None = None) -> None:
        super().__init__(interval, timeout=timeout)
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0

    async def run(self) -> None:
        self.runs += 1
        self.started.set()
        await self.release.wait()


class Flaky(CronTask):
    """Fails while its ``failing`` is true, succeeds otherwise."""

    def __init__(self, interval: float = 1) -> None:
        super().__init__(interval)
        self.failing = True

    async def run(self) -> None:
        if self.failing:
            raise RuntimeError("flaky")


class Busy(CronTask):
    """Runs for ``seconds`` each time, with an overlap policy given by keyword: the task that
    takes longer than its interval of the overlap policies' golden tables. Counts its starts in
    ``started``; with a ``path``, every instance's (another scheduler's too) as a line there."""

    def __init__(
        self,
        interval: float = 1,
        seconds: float = 2.5,
        overlap: str | None = None,
        max_concurrent: int | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(interval, overlap=overlap, max_concurrent=max_concurrent)
        self.seconds = seconds
        self.path = path
        self.started = 0

    async def run(self) -> None:
        self.started += 1
        if self.path is not None:
            with Path(self.path).open("a") as f:
                f.write("start\n")
        await asyncio.sleep(self.seconds)
