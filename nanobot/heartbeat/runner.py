"""Running health checks: plain or async, concurrently, each under one timeout.

A health check is code the monitor does not trust to return. Async checks run as tasks of the
loop and are cancelled at the timeout. Plain checks run in a daemon thread each: a hung thread
cannot be killed, so it is abandoned at the timeout, and a daemon thread (not the loop's
executor, which ``asyncio.run`` and the interpreter wait for at exit) never keeps the process
from exiting. A :class:`CheckSlot` remembers the run that may still be going on, so that a hung
check is reported instead of started a second time.

Threads: :func:`run_checks` and every :class:`CheckSlot` belong to the event loop; a plain check
runs in its own thread and hands its outcome back to the loop (``call_soon_threadsafe``), never
touching the slot itself.
"""

from __future__ import annotations

import asyncio
import inspect
import reprlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from nanobot.loopwatch import HOLD_REPORT_S, Stepper
from nanobot.models import bound_error, error_text

# A health check: no arguments; a truthy result (or awaited result) means healthy.
HealthCheck = Callable[[], Any]

CHECK_BUSY_REASON: Final = "health check still running from previous cycle"

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    reason: str | None = None


def is_async_callable(func: Any) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - the object's own __call__ is what we test
    )


def _call_in_thread(
    func: HealthCheck, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]
) -> None:
    """Run a plain check and hand its outcome to ``future`` on ``loop``."""
    try:
        outcome: tuple[bool, Any] = (True, func())
    except BaseException as exc:  # whatever it is, it is the check's failure
        outcome = (False, exc)

    def deliver() -> None:
        if future.done():  # timed out and abandoned: a late result is dropped
            if outcome[0] and inspect.iscoroutine(outcome[1]):
                outcome[1].close()
            return
        if outcome[0]:
            future.set_result(outcome[1])
        else:
            future.set_exception(outcome[1])

    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the loop is closed; nobody waits for this result any more
        if outcome[0] and inspect.iscoroutine(outcome[1]):
            outcome[1].close()


def _consume(task: asyncio.Task[Any]) -> None:
    # An abandoned check that fails later must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()


class CheckSlot:
    """One component's health check and the run of it that may still be going on."""

    def __init__(self, check: HealthCheck, name: str) -> None:
        self.check = check
        self.name = name
        self._task: asyncio.Task[Any] | None = None
        self._thread: threading.Thread | None = None
        # Where the thread hands its result: done (not cancelled) once the check has returned.
        self._result: asyncio.Future[Any] | None = None
        # The longest step of the last async run: how long it held the event loop at once.
        self.held = 0.0

    def busy(self) -> bool:
        """The previous run has not finished (a hung thread, a task that ignores cancelling)."""
        if self._task is not None and not self._task.done():
            return True
        if self._thread is None or not self._thread.is_alive():
            return False
        # A thread whose result was delivered is only exiting: the check itself has returned.
        result = self._result
        return result is None or not result.done() or result.cancelled()

    def start(self) -> asyncio.Task[Any]:
        self._task = asyncio.get_running_loop().create_task(
            self._invoke(), name=f"heartbeat-check:{self.name}"
        )
        return self._task

    async def _invoke(self) -> Any:
        self.held = 0.0
        if is_async_callable(self.check):
            result = await self._stepped(self.check())
        else:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            self._result = future
            self._thread = threading.Thread(
                target=_call_in_thread,
                args=(self.check, loop, future),
                name=f"heartbeat-check:{self.name}",
                daemon=True,
            )
            # Thread.start() waits until the new thread runs: hundreds of them started from the
            # loop would hold it for a second. Start it from a worker instead.
            await asyncio.to_thread(self._thread.start)
            result = await future
        if inspect.isawaitable(result):  # a plain callable that returned a coroutine
            result = await (self._stepped(result) if inspect.iscoroutine(result) else result)
        return result

    async def _stepped(self, coro: Any) -> Any:
        # Each step is timed, so that a check that blocks the loop is named as the cause.
        stepper = Stepper(coro, f"health check of component {self.name}")
        try:
            return await stepper
        finally:
            self.held = max(self.held, stepper.held)

    def held_reason(self) -> str | None:
        """Why this check fails for holding the event loop, or None if it did not."""
        if self.held < HOLD_REPORT_S:
            return None
        return (
            f"health check held the event loop for {self.held:.2f}s in one step: "
            "an async check must not block (run blocking work in a thread)"
        )


async def run_checks(
    slots: Sequence[tuple[K, CheckSlot]], check_timeout: float
) -> list[tuple[K, Outcome]]:
    """Run every check at once and wait ``check_timeout`` seconds at most for all of them.

    A check passes when its result is truthy; it fails when it raises, returns a false value
    (or one whose truth cannot be told), times out, is still running from an earlier call, or
    held the event loop in one step for :data:`nanobot.loopwatch.HOLD_REPORT_S` or more (a
    blocking call in an async check). Never raises for a check.
    """
    outcomes: list[tuple[K, Outcome]] = []
    tasks: dict[asyncio.Task[Any], tuple[K, CheckSlot]] = {}
    for key, slot in slots:
        if slot.busy():
            outcomes.append((key, Outcome(False, CHECK_BUSY_REASON)))
        else:
            tasks[slot.start()] = (key, slot)
    if not tasks:
        return outcomes
    try:
        done, pending = await asyncio.wait(tasks, timeout=check_timeout)
        held = max((slot.held for _, slot in tasks.values()), default=0.0)
        if pending and held >= HOLD_REPORT_S:
            # A check that blocked the loop ate the others' time: they get it back, so that
            # only the culprit is blamed.
            more, pending = await asyncio.wait(pending, timeout=min(held, check_timeout))
            done |= more
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
            task.add_done_callback(_consume)
        raise
    for task in pending:
        task.cancel()
        task.add_done_callback(_consume)
        key, slot = tasks[task]
        reason = slot.held_reason() or f"health check timed out after {check_timeout:g}s"
        outcomes.append((key, Outcome(False, reason)))
    for task in done:
        key, slot = tasks[task]
        if task.cancelled():
            outcomes.append((key, Outcome(False, "health check was cancelled")))
        elif (exc := task.exception()) is not None:
            raised = bound_error(f"health check raised {error_text(exc)}")
            outcomes.append((key, Outcome(False, raised)))
        elif (blocked := slot.held_reason()) is not None:
            outcomes.append((key, Outcome(False, blocked)))
        else:
            outcomes.append((key, _judge(task.result())))
    return outcomes


def _judge(result: Any) -> Outcome:
    """The outcome of a check's result: its truth, taken with care.

    The truth test is the check's own code (``__bool__``, ``__len__``) and may raise: that fails
    this one component, never the cycle that judges every component.
    """
    try:
        healthy = bool(result)
    except Exception as exc:
        reason = f"health check returned a result whose truth cannot be told: {error_text(exc)}"
        return Outcome(False, bound_error(reason))
    if healthy:
        return Outcome(True)
    # reprlib.repr never raises: a repr that does is shown as "<Type instance at 0x...>".
    return Outcome(False, f"health check returned {reprlib.repr(result)}")
