"""A callback the event loop calls every few seconds, from start to stop.

Threads: the event loop owns it; :meth:`Periodic.start` and :meth:`Periodic.stop` are called
there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Periodic:
    """Calls ``callback`` every ``period`` seconds between :meth:`start` and :meth:`stop`. A
    callback that raises is reported by the loop's exception handler and called again at the
    next period."""

    def __init__(self, period: float, callback: Callable[[], object]) -> None:
        self._period = period
        self._callback = callback
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Idempotent."""
        if self._timer is None:
            self._arm()

    def stop(self) -> None:
        """Idempotent; a callback running now is not called again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)

    def _tick(self) -> None:
        try:
            self._callback()
        finally:
            # None: stopped meanwhile (by the callback itself, say).
            if self._timer is not None:
                self._arm()
