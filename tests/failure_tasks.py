"""Task classes for the failure-handling tests (docs/failures.md), importable by name
(``failure_tasks:Breaking``) in this process and in the service subprocesses."""

from __future__ import annotations

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
