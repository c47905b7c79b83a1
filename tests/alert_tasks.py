"""Task classes for the alert tests, importable by the service subprocesses (tests/ is on their
PYTHONPATH)."""

from __future__ import annotations

from nanobot.cron import CronTask


class Failing(CronTask):
    """Fails at every run with ``RuntimeError(message)``."""

    def __init__(self, interval: float = 1, message: str = "upstream refused the request") -> None:
        super().__init__(interval)
        self.message = message

    async def run(self) -> None:
        raise RuntimeError(self.message)
