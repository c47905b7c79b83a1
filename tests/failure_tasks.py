"""Task classes for the failure-handling tests (docs/failures.md), importable by name
(``failure_tasks:Breaking``) in this process and in the service subprocesses."""

from __future__ import annotations

import asyncio
import os
import time

from nanobot.cron import CronTask


class Breaking(CronTask):
    """Fails every run with ``message``; pauses after ``pause_after_failures`` failed slots if
    given (else the class attribute, else the setting)."""

    def __init__(
        self,
        interval: float = 1,
        message: str = "boom",
        pause_after_failures: int | None = None,
        ping_url: str | None = None,
    ) -> None:
        super().__init__(interval, pause_after_failures=pause_after_failures, ping_url=ping_url)
        self.message = message

    async def run(self) -> None:
        raise RuntimeError(self.message)


class BreaksAfterThree(Breaking):
    """Declares its threshold as a class attribute."""

    pause_after_failures = 3


class Quiet(CronTask):
    """Succeeds at once; takes a catch-up window."""

    def __init__(self, interval: float = 1, catch_up_window: float | None = None) -> None:
        super().__init__(interval, catch_up_window=catch_up_window)

    async def run(self) -> None:
        return None


class Flaky(CronTask):
    """Fails its first ``failures`` runs (counted across processes in the file ``path``), then
    succeeds. Each run appends ``start <time> <pid>`` and ``end <time> <pid>`` lines to
    ``path``, so a test can tell when each attempt ran, in which process, and that no two
    overlapped."""

    def __init__(
        self,
        interval: float = 3600,
        path: str = "",
        failures: int = 2,
        seconds: float = 0.0,
        retries: int | None = None,
        retry_backoff: str | None = None,
        pause_after_failures: int | None = None,
        catch_up_window: float | None = None,
    ) -> None:
        super().__init__(
            interval,
            retries=retries,
            retry_backoff=retry_backoff,
            pause_after_failures=pause_after_failures,
            catch_up_window=catch_up_window,
        )
        self.path = path
        self.failures = failures
        self.seconds = seconds

    async def run(self) -> None:

        with open(self.path, "a+") as f:
            f.seek(0)
            done = sum(1 for line in f if line.startswith("start "))
            f.write(f"start {time.time():.6f} {os.getpid()}\n")
        try:
            if self.seconds:
                await asyncio.sleep(self.seconds)
            if done < self.failures:
                raise RuntimeError(f"failure {done + 1}")
        finally:
            with open(self.path, "a") as f:
                f.write(f"end {time.time():.6f} {os.getpid()}\n")
