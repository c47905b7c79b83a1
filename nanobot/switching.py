"""The interpreter's switch interval: short while the scheduler has a burst in hand.

The event loop gives up the interpreter lock at every system call (each poll, read and write
of a request) and, when a worker thread is busy meanwhile (the scheduler's pass, a database
write), waits up to one switch interval to get it back; CPython's default is 5 ms. During a
burst of 20,000 slots, one ``/healthz`` answer needed several such waits: 22-29 ms in all at
5 ms, 12-15 ms at 1 ms (the longest answer of each run, SQLite, probed back to back).

A short interval is not free: every forced switch between the loop and a worker costs both of
them, and in the steady state (200 tasks at 1 s, paired runs) 1 ms instead of 5 cost 6-11 %
more CPU per run. So the :class:`SwitchInterval` makes it short only while the scheduler has at
least :data:`BURST_MIN` slots in hand or due at its next pass (``backlog``), and gives the
process its own interval back once the burst is over.

Threads: the event loop owns it. The interval is process-wide; :meth:`SwitchInterval.stop`
restores the one found at :meth:`SwitchInterval.start`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Final

import structlog

from nanobot.periodic import Periodic

log = structlog.get_logger(__name__)

# The switch interval during a burst.
BURST_INTERVAL_S: Final = 0.001
# A backlog of this many slots is a burst (the steady state of hundreds of tasks a second has
# a few dozen in hand).
BURST_MIN: Final = 1000
# How often the backlog is looked at. A burst is known before its pass begins (the pass
# that claims it is planned from the count due at its instant), at least this long ahead.
PERIOD_S: Final = 0.1


class SwitchInterval:
    """Sets the switch interval from the scheduler's backlog every :data:`PERIOD_S`; see the
    module docstring. ``backlog`` answers, on the event loop, how many slots are in hand."""

    def __init__(self, backlog: Callable[[], int], *, period: float = PERIOD_S) -> None:
        self._backlog = backlog
        self._saved: float | None = None
        self._looks = Periodic(period, self.look)
        self.bursting = False

    def start(self) -> None:
        """Take over the interval (on the event loop); idempotent."""
        if self._saved is not None:
            return
        self._saved = sys.getswitchinterval()
        self._looks.start()

    def stop(self) -> None:
        """Give the interval found at :meth:`start` back; idempotent."""
        self._looks.stop()
        if self._saved is not None:
            sys.setswitchinterval(self._saved)
            self._saved = None
            self.bursting = False

    def look(self) -> bool:
        """Set the interval for the backlog now; whether it is a burst."""
        if self._saved is None:
            return False
        backlog = self._backlog()
        bursting = backlog >= BURST_MIN
        if bursting != self.bursting:
            self.bursting = bursting
            sys.setswitchinterval(BURST_INTERVAL_S if bursting else self._saved)
            log.debug("switching.changed", bursting=bursting, backlog=backlog)
        return bursting
