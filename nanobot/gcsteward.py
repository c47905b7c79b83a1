"""Full garbage collections kept out of bursts.

CPython's full (generation 2) collection scans every tracked object that is not frozen, with
the interpreter lock held: neither the event loop nor the scheduler's worker thread runs
meanwhile, whichever thread it happens in. Left to itself, the collector starts one when enough
objects have survived the young collections, which is exactly what a burst of thousands of runs
does: with their objects alive, a collection took 40-240 ms (N = 5000 to 20000), the longest
holds of the event loop during a burst.

The :class:`GcSteward` turns the collector's own full collections off (young ones stay as they
are: they scan at most a few thousand objects) and, at a quiet moment (the scheduler says that
nothing is being claimed, launched or recorded and few runs are in flight, so that little but
the long-lived state is alive), makes a young collection and freezes its survivors
(``gc.freeze()``): what lived through the young collections until such a moment is the
long-lived state (the loaded jobs and tasks, their components, the metrics), and later
collections skip it. A full collection of the objects a burst of 5,000 left alive still took
35 ms at such a moment, past the 20 ms that the loop may be held; freezing costs no scan at all.

The price: a reference cycle that became garbage after two young collections and before the
freeze (garbage without a cycle is freed by its reference count, frozen or not) is kept until
:data:`REFREEZE_S` has passed, when one full collection at a quiet moment scans everything again
(the one long pause, once an hour, at a quiet moment).

A service that is never quiet still gets its freeze every :data:`MAX_WAIT_S` seconds, whatever
it is doing.

Freeing by reference count holds the lock the same way: dropping the last reference to a list
of 20,000 loaded jobs frees every one of them, and everything they hold, in one call that never
lets another thread in (20-25 ms in the scheduler's worker thread at the end of a pass that
claimed a burst of 20,000: `/healthz` waited that long). :func:`release` empties such a
container a slice at a time instead, so that the interpreter can switch threads between slices.

Threads: the event loop owns the steward; the collector's thresholds are process-wide and are
restored by :meth:`GcSteward.stop`. :func:`release` runs in any thread, on containers that
thread owns.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from nanobot.periodic import Periodic

log = structlog.get_logger(__name__)

# How often the steward looks whether a freeze is due and the moment is quiet.
PERIOD_S: Final = 0.25
# A freeze is due after this many collections of generation 1 since the last one (about
# 350,000 allocations at the default thresholds: after a burst, not after every few runs).
FREEZE_AFTER: Final = 50
# A due freeze waits for a quiet moment at most this long.
MAX_WAIT_S: Final = 60.0
# Every this long, at a quiet moment, the frozen objects are scanned too (see the docstring).
REFREEZE_S: Final = 3600.0
# How many items :func:`release` frees between two chances for another thread to run (a few
# hundred microseconds of freeing for the objects of a loaded job each).
RELEASE_SLICE: Final = 256
# Generation 2's threshold while the steward runs: the collector never starts a full collection
# by itself (generation 1 collections would have to number this many first).
_NEVER: Final = 1 << 30


def release(*containers: list[Any] | dict[Any, Any]) -> None:
    """Empty each list or dict, freeing its items a slice at a time (see the module docstring);
    a container smaller than a slice is simply cleared."""
    for items in containers:
        if isinstance(items, dict):
            while items:
                # One item per step of a Python loop: each step is a point where the
                # interpreter may hand the lock over.
                items.popitem()
        else:
            while items:
                del items[-RELEASE_SLICE:]


class GcSteward:
    """Freezes the long-lived objects of this process at quiet moments and makes its full
    collections; see the module docstring.

    ``quiet`` answers, on the event loop, whether little but long-lived state is alive now.
    """

    def __init__(
        self,
        quiet: Callable[[], bool],
        *,
        period: float = PERIOD_S,
        max_wait: float = MAX_WAIT_S,
        refreeze: float = REFREEZE_S,
    ) -> None:
        self._quiet = quiet
        self._max_wait = max_wait
        self._refreeze = refreeze
        self._saved: tuple[int, int, int] | None = None
        self._looks = Periodic(period, self.look)
        self._last_full = time.monotonic()
        self._last_refreeze = time.monotonic()
        # Generation 2's count (collections of generation 1 since the last full one) at the
        # last freeze: a freeze does not reset it, a full collection does.
        self._counted = 0
        # What the last collection did, for tests and diagnosis.
        self.collections = 0
        self.last_seconds = 0.0

    @property
    def running(self) -> bool:
        return self._saved is not None

    def start(self) -> None:
        """Take over the full collections (on the event loop); idempotent."""
        if self._saved is not None:
            return
        self._saved = gc.get_threshold()
        gc.set_threshold(self._saved[0], self._saved[1], _NEVER)
        self._last_full = self._last_refreeze = time.monotonic()
        self._counted = gc.get_count()[2]
        self._looks.start()

    def stop(self) -> None:
        """Give the full collections back to the collector; idempotent."""
        self._looks.stop()
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def look(self) -> bool:
        """Freeze (or, once per :data:`REFREEZE_S`, collect everything) if due and the moment
        is quiet (or it waited :data:`MAX_WAIT_S`); whether it did. The steward looks every
        :data:`PERIOD_S`."""
        now = time.monotonic()
        due = gc.get_count()[2] - self._counted >= FREEZE_AFTER
        overdue = due and now - self._last_full >= self._max_wait
        if not ((due and self._quiet()) or overdue):
            return False
        self.collect(everything=now - self._last_refreeze >= self._refreeze and not overdue)
        return True

    def collect(self, *, everything: bool = False) -> None:
        """A young collection now, its survivors and the older objects frozen; ``everything``:
        a full collection of every object, frozen ones too (garbage among them is freed)."""
        started = time.perf_counter()
        if everything:
            gc.unfreeze()
        found = gc.collect(2 if everything else 1)
        gc.freeze()
        self._counted = gc.get_count()[2]
        seconds = time.perf_counter() - started
        now = time.monotonic()
        self._last_full = now
        if everything:
            self._last_refreeze = now
        self.collections += 1
        self.last_seconds = seconds
        # Not gc.get_freeze_count(): it walks every frozen object.
        log.debug(
            "gc.collected", seconds=round(seconds, 6), unreachable=found, everything=everything
        )
