"""The scheduler's worker items start just after a run's start, not just before one.

The event loop starts each run at its instant. The scheduler's worker thread runs the passes
and the history writes: a few milliseconds each, mostly Python (SQLAlchemy), holding the
interpreter lock most of that time. A run whose instant comes while the worker holds the lock
starts late, by up to a switch interval (5 ms). Under the steady load of the benchmark (200
tasks at 1 s, spread over the second), the event loop sat idle while a worker item ran before
26-39 of the 59 starts at or past the lateness p99 of a 30 s window, though such items covered
about 9 % of the time (the timelines :mod:`bench._late_starts_child` records); a history write
met 13 of them, 3 with the gate (``python -m bench.late_starts``).

With tasks spread over the second, instants come every few milliseconds: an item started
right after one has the whole gap before the next. So an item the loop hands to the worker
first asks the gate: when the next instant is at most :data:`GATE_S` away, it waits for that
instant's runs to start, and at most :data:`GATE_S` + :data:`SLACK_S` in all (a cancelled
instant, a stop). With no instant that close, or none at all, it goes at once.

Threads: the event loop owns the gate; the launcher opens it after each instant's launches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Final

# An instant at most this far away holds back a worker item until its runs have started.
GATE_S: Final = 0.003
# How much longer than GATE_S an item waits at most.
SLACK_S: Final = 0.002


class StartGate:
    """Holds worker items back until the next instant's runs started (event loop).

    ``next_instant`` answers when the launcher's next instant is (None: none waiting);
    ``clock`` is the wall clock the instants are on.
    """

    def __init__(
        self, next_instant: Callable[[], datetime | None], clock: Callable[[], datetime]
    ) -> None:
        self._next_instant = next_instant
        self._clock = clock
        self._waiting: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def then(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` now, or right after the next instant's runs started if that
        instant is at most :data:`GATE_S` away."""
        upcoming = self._next_instant()
        if upcoming is None or (upcoming - self._clock()).total_seconds() > GATE_S:
            callback()
            return
        self._waiting.append(callback)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(GATE_S + SLACK_S, self.open)

    async def clear(self) -> None:
        """Return now, or once the next instant's runs started (see :meth:`then`)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def go() -> None:
            if not done.done():  # cancelled with the task that waits
                done.set_result(None)

        self.then(go)
        await done

    def open(self) -> None:
        """The launcher started an instant's runs (or the wait ran out, or it stops): what
        waits goes, after the runs' first steps (queued before it on the loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        loop = asyncio.get_running_loop()
        for callback in waiting:
            loop.call_soon(callback)
