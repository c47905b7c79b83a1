"""Watching the event loop: how late it answers, and which coroutine held it.

Two tools, both used on the event loop only (no thread touches their state):

* :class:`LagProbe` arms a timer every :data:`PROBE_PERIOD_S` seconds and measures how late it
  fires: the event loop's lag. A loop blocked for 5 s by one call shows a lag of about 5 s.
  The worst lag since the last :meth:`LagProbe.take` is what a health cycle reports.
* :class:`Stepper` drives a coroutine one step at a time, as the task running it would, and
  around every step (every resumption after an ``await``) it can

  - time the step: a step is the code that runs without giving the loop back, so a step of
    five seconds is a blocking call that held the whole loop for five seconds, and the coroutine
    that made it is named;
  - check a fence before the step: when the fence says no (a leader that lost its lease while
    it was frozen), :class:`FencedError` is thrown into the coroutine instead of resuming it,
    so that not one more line of it runs.

A process-wide record of the worst step seen (:func:`note_hold`, :func:`last_hold`) lets the
health cycle attribute a lag it measured to whoever caused it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Final

# How often the probe's timer fires; its own cost is one timer per period.
PROBE_PERIOD_S: Final = 0.25
# A step holding the loop this long is reported (and the lag it causes is attributed to it).
HOLD_REPORT_S: Final = 0.25


class FencedError(asyncio.CancelledError):
    """Thrown into a run whose node no longer may run it (it lost its lease while frozen)."""


@dataclass(frozen=True, slots=True)
class Hold:
    """One step that held the event loop: who, how long, and when it ended (monotonic)."""

    owner: str
    seconds: float
    ended_at: float


# The latest holds, newest last: few enough to scan, enough to span one health cycle.
_holds: deque[Hold] = deque(maxlen=32)


def note_hold(owner: str, seconds: float) -> None:
    """Remember a step that held the loop for ``seconds``."""
    _holds.append(Hold(owner, seconds, time.monotonic()))


def last_hold(since: float) -> Hold | None:
    """The longest recorded hold that ended at or after ``since`` (monotonic), if any."""
    recent = [hold for hold in list(_holds) if hold.ended_at >= since]
    return max(recent, key=lambda hold: hold.seconds, default=None)


class Stepper:
    """Awaitable that runs ``coro`` step by step; see the module's docstring.

    ``owner`` names the coroutine in reports; ``fence`` (optional) is called before each
    resumption and, if it answers False, :class:`FencedError` is thrown in instead; ``timed``
    turns the timing of steps on. ``held`` is the longest step seen, in seconds.
    """

    __slots__ = ("_coro", "_fence", "_timed", "fenced", "held", "owner")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        owner: str,
        *,
        fence: Callable[[], bool] | None = None,
        timed: bool = True,
    ) -> None:
        self._coro = coro
        self.owner = owner
        self._fence = fence
        self._timed = timed
        self.fenced = False
        self.held = 0.0

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        fence = self._fence
        timed = self._timed
        value: Any = None
        error: BaseException | None = None
        while True:
            if error is None and fence is not None and not fence():
                self.fenced = True
                error = FencedError("this node no longer holds the scheduling lease")
            started = time.perf_counter() if timed else 0.0
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                self._timing(started)
                return stop.value
            except BaseException:
                self._timing(started)
                raise
            self._timing(started)
            try:
                value = yield yielded
                error = None
            except BaseException as exc:  # a cancellation of the task, passed on to the coroutine
                value = None
                error = exc

    def _timing(self, started: float) -> None:
        if not self._timed:
            return
        step = time.perf_counter() - started
        if step > self.held:
            self.held = step
        if step >= HOLD_REPORT_S:
            note_hold(self.owner, step)

    def close(self) -> None:
        """Close the wrapped coroutine if it never ran (so that Python does not warn)."""
        self._coro.close()


class LagProbe:
    """Measures the event loop's lag with one timer; see the module's docstring."""

    def __init__(self, period: float = PROBE_PERIOD_S) -> None:
        self.period = period
        self.worst = 0.0
        self.last = 0.0
        self.since = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0

    def start(self) -> None:
        """Start probing on the running loop; idempotent."""
        if self._handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._expected = loop.time() + self.period
        self._handle = loop.call_at(self._expected, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.last = max(0.0, now - self._expected)
        if self.last > self.worst:
            self.worst = self.last
        self._expected = now + self.period
        self._handle = loop.call_at(self._expected, self._tick)

    def take(self) -> tuple[float, float]:
        """The worst lag since the previous call, and when that window began (monotonic).

        A tick still pending counts too: a loop blocked right now shows its block so far.
        """
        worst = self.worst
        if self._handle is not None:
            pending = asyncio.get_running_loop().time() - self._expected
            worst = max(worst, pending)
        since = self.since
        self.worst = 0.0
        self.since = time.monotonic()
        return worst, since
