"""Launching claimed slots on the event loop, and running them.

A pass (:mod:`nanobot.cron.dispatch`) hands its claimed slots to :meth:`Launcher.launch_groups`,
grouped by instant: one timer per instant starts them at their exact time, a few per loop
iteration; a slot claimed well ahead is first marked dispatched. Each slot meets its task's
overlap policy (:mod:`nanobot.cron.overlap`) as it is about to start: started, skipped,
buffered until the run in flight ends, or started once that run is cancelled. A run is
executed under its timeout and the lease (every step fenced), its outcome handed to the
:class:`~nanobot.cron.recorder.Recorder`; a watch marks runs in flight past their bound.

Threads: the event loop owns everything here (the runs in flight, the buffered, delayed and
queued launches, the cancel reasons and overruns; :meth:`Launcher.quiet` reads them there);
the only entry from the worker thread is through ``scheduler.call_soon``. Launches handed
over and not yet seen by the loop are in :attr:`Launcher.handed` (under the context's lock), so
that a stop finds them. Slots claimed ahead are marked dispatched in a thread of their own
(``_mark``: the database write, and the launches copied as dispatched: immutable records).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Final

import structlog
from sqlalchemy import Connection, Engine

from nanobot.cron import claims, history
from nanobot.cron.context import CronContext
from nanobot.cron.history import Finish
from nanobot.cron.overlap import CANCELLED_BY_NEXT, Action, RunKind, decide, skip_reason
from nanobot.cron.overlap import DEFAULT as DEFAULT_OVERLAP
from nanobot.cron.pings import Pinger
from nanobot.cron.recorder import Recorder
from nanobot.cron.records import HealthUpdate, Launch, RunInFlight, Running
from nanobot.cron.registry import Registry
from nanobot.cron.start_gate import StartGate
from nanobot.cron.task import CronTask
from nanobot.loopwatch import FencedError, Stepper
from nanobot.models import TaskOutcome, error_text

log = structlog.get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)

# Launches handed to the loop in one go are started this many per loop iteration, so that a burst
# of thousands of due tasks never holds the event loop for long.
LAUNCH_CHUNK: Final = 25
# The instant of launches that start at once whatever their slot (manual runs).
NOW_SLOT: Final = datetime.min.replace(tzinfo=UTC)
# How far ahead of its time a slot is claimed at least; the loop then starts it at its exact time.
SCHEDULE_LEAD: Final = 0.05
# A slot claimed further ahead than DISPATCH_AHEAD (dispatch) is marked dispatched this many
# seconds before its instant at least; a burst MARK_S_PER_SLOT per slot before it, at most
# MARK_AHEAD_MAX: marked just in time, 20,000 slots were marked while their launches went on,
# and the launches waited for each chunk (for the outcome writes that took the database's write
# lock in between), 200-400 ms at a time.
MARK_AHEAD: Final = SCHEDULE_LEAD
MARK_S_PER_SLOT: Final = 0.00004
MARK_AHEAD_MAX: Final = 2.0
# Slots claimed ahead marked dispatched per transaction (see Launcher._mark_and_launch).
MARK_CHUNK: Final = 1000
# How long a shutdown waits for such marks in progress.
MARK_WAIT_S: Final = 5.0
# Longest period of the watch over runs in flight (overruns).
WATCH_PERIOD_S: Final = 1.0
# The launcher is quiet (see Launcher.quiet) with at most this many runs in flight, and no
# launch (nor, for the manager, a pass) due within QUIET_LEAD_S: the garbage-collection
# steward's work at such a moment must not delay a launch.
QUIET_RUNS: Final = 100
QUIET_LEAD_S: Final = 0.3


def _mark(
    engine: Engine, fence: Callable[[Connection], bool] | None, chunk: list[Launch]
) -> list[Launch]:
    """Mark ``chunk`` dispatched (fenced); its launches that were, now dispatched (in a thread:
    copying a thousand launches on the event loop held it for milliseconds under load)."""
    marked = history.mark_dispatched(engine, [launch.run_id for launch in chunk], fence)
    return [replace(launch, dispatched=True) for launch in chunk if launch.run_id in marked]


def _mark_ahead(unmarked: int) -> float:
    """How long before their instant ``unmarked`` slots claimed ahead start being marked."""
    return min(MARK_AHEAD_MAX, max(MARK_AHEAD, unmarked * MARK_S_PER_SLOT))


class Launcher:
    """Starts claimed slots at their instant and runs them (event loop)."""

    def __init__(
        self, ctx: CronContext, registry: Registry, recorder: Recorder, *, launched: asyncio.Event
    ) -> None:
        self._ctx = ctx
        self._registry = registry
        self._recorder = recorder
        # name -> run id -> run, for every run in flight (several under the overlap policy
        # allow, a forced run or a backfill).
        self.inflight: dict[str, dict[int, Running]] = {}
        # The slot of each buffer_one task held to start when its run in flight ends.
        self._buffered: dict[str, Launch] = {}
        # One timer per instant, and the launches it starts; the instants as a heap, which
        # may hold some no longer in ``delayed`` (dropped when they come to its top).
        self.delayed: dict[datetime, tuple[asyncio.Handle, list[Launch]]] = {}
        self._instants: list[datetime] = []
        # Claimed slots handed to the loop and not yet seen by it (worker -> loop; lock).
        self.handed: dict[int, Launch] = {}
        # Slots that reached the loop while it was stopping: released, never started.
        self._held_back: list[Launch] = []
        # The rest of launches handed over together, started a chunk per loop iteration (a
        # burst); ``launched`` is set while there is none, cleared while there is some: the
        # recorder holds a burst's health updates and events until every launch of it is
        # started.
        self._queued: dict[int, list[Launch]] = {}
        self.launched = launched
        self._marking: set[asyncio.Task[None]] = set()
        self._undispatch: list[int] = []
        self._cancel_reasons: dict[int, str] = {}
        # Run ids of the runs in flight past their bound (see _watch_runs).
        self._overrunning: set[int] = set()
        self._watch: asyncio.TimerHandle | None = None
        # healthchecks.io-style pings of runs.
        self.pings = Pinger()
        # Worker items wait at it for an imminent instant's runs to start (opened by
        # _launch_delayed and at a stop).
        self.gate = StartGate(self.next_instant, ctx.clock)

    # --- runs in flight ------------------------------------------------------------------------

    def runs_of(self, name: str) -> dict[int, Running]:
        """The runs of ``name`` in flight, by run id."""
        return {i: r for i, r in self.inflight.get(name, {}).items() if not r.run.done()}

    def running_tasks(self) -> list[str]:
        return [n for n in self.inflight if self.runs_of(n)]

    def runs_in_flight(self) -> list[RunInFlight]:
        """The runs in flight, with their age and overrun bound: one per task, its oldest (a
        task may have several under the overlap policy allow)."""
        now = time.monotonic()
        intervals = self._ctx.overrun_intervals
        result = []
        # No entry is empty: _start adds a task's entry with its run, _end drops it with its
        # last one.
        for name, runs in list(self.inflight.items()):
            run_id, oldest = min(runs.items(), key=lambda item: item[1].started)
            bound = intervals * oldest.interval if intervals > 0 else None
            result.append(
                RunInFlight(
                    task=name,
                    run_id=run_id,
                    scheduled_at=oldest.slot,
                    age_s=now - oldest.started,
                    bound_s=bound,
                    overrunning=run_id in self._overrunning,
                )
            )
        return result

    def all_runs(self) -> list[asyncio.Task[None]]:
        return [r.run for n in list(self.inflight) for r in self.runs_of(n).values()]

    def cancel_all(self, reason: str) -> None:
        """Cancel every run in flight now (each is recorded ``cancelled`` with ``reason``)."""
        for name in list(self.inflight):
            for run_id, running in self.runs_of(name).items():
                self._cancel_reasons[run_id] = reason
                running.run.cancel()

    def cancel_run(self, name: str, reason: str) -> list[asyncio.Task[None]]:
        """Cancel every run of ``name`` in flight (and release its slots not started)."""
        self._cancel_delayed(name)
        cancelled = []
        for run_id, running in self.runs_of(name).items():
            self._cancel_reasons[run_id] = reason
            running.run.cancel()
            cancelled.append(running.run)
        return cancelled

    async def cancel_and_wait(self, name: str, reason: str) -> None:
        runs = self.cancel_run(name, reason)
        if runs:
            await asyncio.wait(runs)

    async def cancel_every_task(self, reason: str) -> None:
        for name in list(self.inflight):
            await self.cancel_and_wait(name, reason)

    # --- handing over (event loop) -------------------------------------------------------------

    def launch_batch(self, batch: list[Launch]) -> None:
        """Start claimed slots: those due now at once, later ones at their exact time."""
        groups: dict[datetime, list[Launch]] = {}
        for launch in batch:
            groups.setdefault(NOW_SLOT if launch.manual else launch.slot, []).append(launch)
        self.launch_groups(groups)

    def launch_groups(self, groups: dict[datetime, list[Launch]]) -> None:
        """Start each instant's launches at that instant: one timer per instant, so that a
        burst of thousands at one instant costs the loop one timer, not thousands. A group
        with undispatched slots fires early enough to mark them first (:func:`_mark_ahead`)."""
        loop = asyncio.get_running_loop()
        now = self._ctx.clock()
        with self._ctx.lock:
            for launches in groups.values():
                for launch in launches:
                    self.handed.pop(launch.run_id, None)
        for slot, launches in groups.items():
            if self._ctx.closing:
                self._held_back.extend(launches)
                continue
            early = (slot - now).total_seconds()
            pending = self.delayed.get(slot)
            unmarked = sum(1 for launch in launches if not launch.dispatched)
            marking = unmarked > 0
            if marking:
                if pending is not None:
                    unmarked += sum(1 for launch in pending[1] if not launch.dispatched)
                early -= _mark_ahead(unmarked)
            if early <= 0:
                if marking:
                    # A group already waiting for this instant joins this one (one hand-over's
                    # launches must never replace another's: they would be neither started
                    # nor released).
                    pending = self.delayed.pop(slot, None)
                    if pending is not None:
                        pending[0].cancel()
                        launches = [*pending[1], *launches]
                    if pending is None:
                        heapq.heappush(self._instants, slot)
                    self.delayed[slot] = (loop.call_soon(self._launch_delayed, slot), launches)
                else:
                    self._launch_chunks(launches)
                continue
            if pending is None:
                handle = loop.call_later(early, self._launch_delayed, slot)
                heapq.heappush(self._instants, slot)
                self.delayed[slot] = (handle, launches)
                continue
            pending[1].extend(launches)
            armed = pending[0]
            if isinstance(armed, asyncio.TimerHandle) and loop.time() + early < armed.when():
                # More slots to mark at this instant than its timer was armed for: earlier.
                armed.cancel()
                self.delayed[slot] = (
                    loop.call_later(early, self._launch_delayed, slot),
                    pending[1],
                )

    def quiet(self) -> bool:
        """Whether nothing is being handed over, marked or launched, no launch is due within
        :data:`QUIET_LEAD_S` and at most :data:`QUIET_RUNS` runs are in flight: a moment
        between bursts."""
        if self._queued or self._marking or self.handed:
            return False
        upcoming = self.next_instant()
        if upcoming is not None:
            soon = self._ctx.clock() + timedelta(seconds=QUIET_LEAD_S)
            if upcoming <= soon:
                return False
        runs = 0
        for by_id in self.inflight.values():
            runs += len(by_id)
            if runs > QUIET_RUNS:
                return False
        return True

    def in_hand(self) -> int:
        """How many claimed slots are handed over, waiting for their instant, queued or
        running (event loop)."""
        waiting = sum(len(launches) for _handle, launches in self.delayed.values())
        queued = sum(len(launches) for launches in self._queued.values())
        running = sum(len(by_id) for by_id in self.inflight.values())
        return len(self.handed) + waiting + queued + running

    def _launch_chunks(self, launches: list[Launch]) -> None:
        # A few per loop iteration, so that a burst never holds the event loop for long.
        for launch in launches[:LAUNCH_CHUNK]:
            self._launch(launch)
        rest = launches[LAUNCH_CHUNK:]
        if rest:
            # Kept where a stop finds them: a slot not started when the scheduler stops is
            # released, not left behind.
            self._queued[id(rest)] = rest
            self.launched.clear()
            asyncio.get_running_loop().call_soon(self._launch_queued, id(rest))

    def _launch_queued(self, key: int) -> None:
        rest = self._queued.pop(key, None)
        if rest is not None:  # else taken by a stop
            self._launch_chunks(rest)
        # Looked at after the chunk is started, which queues the next one: set before it (and
        # cleared again), the event would wake the recorder in the middle of the burst.
        if not self._queued:
            self.launched.set()

    def next_instant(self) -> datetime | None:
        """The earliest instant whose launches wait for their timer (None: none)."""
        instants = self._instants
        while instants and instants[0] not in self.delayed:
            heapq.heappop(instants)
        return instants[0] if instants else None

    def _launch_delayed(self, slot: datetime) -> None:
        try:
            self._launch_instant(slot)
        finally:
            # After the instant's runs are queued: what waits at the gate comes after them.
            self.gate.open()

    def _launch_instant(self, slot: datetime) -> None:
        group = self.delayed.pop(slot, None)
        if group is None:
            return
        waiting = [launch for launch in group[1] if not launch.dispatched]
        ready = [launch for launch in group[1] if launch.dispatched]
        if waiting:
            task = asyncio.get_running_loop().create_task(self._mark_and_launch(slot, waiting))
            self._marking.add(task)
            task.add_done_callback(self._marking.discard)
        if not ready:
            return
        if not self._ctx.closing and self._ctx.clock() >= slot:
            # The common case, straight to the start: the instant's timer fired on time.
            self._launch_chunks(ready)
        else:
            # Closing, or the timer fired a hair before the wall clock reached the instant (the
            # loop's clock is monotonic): launch_groups holds them back or re-arms the timer.
            self.launch_groups({slot: ready})

    async def _mark_and_launch(self, slot: datetime, launches: list[Launch]) -> None:
        """Mark slots claimed ahead as dispatched (fenced), then start them at their instant.

        A burst is marked MARK_CHUNK slots per transaction, each chunk handed to the instant's
        timer once marked: its first starts do not wait for the marks of the thousands after
        them (on PostgreSQL 5,000 marks took about 90 ms, longer than MARK_AHEAD)."""
        ctx = self._ctx
        for start in range(0, len(launches), MARK_CHUNK):
            chunk = launches[start : start + MARK_CHUNK]
            try:
                ready = await asyncio.to_thread(_mark, ctx.engine, ctx.fence, chunk)
            except Exception as exc:
                # Not marked, so not started: released (and caught up) rather than lost.
                rest = launches[start:]
                log.error("cron.dispatch_failed", count=len(rest), error=error_text(exc))
                self._release_soon(rest)
                return
            if len(ready) < len(chunk):
                log.warning(
                    "cron.slots_not_dispatched",
                    count=len(chunk) - len(ready),
                    reason="released by another node, or this node no longer leads",
                )
            if ready:
                self.launch_groups({slot: ready})

    # --- not started: released -----------------------------------------------------------------

    async def wait_marking(self) -> None:
        """Wait (a bounded time) for the marks of slots claimed ahead in progress."""
        if self._marking:
            await asyncio.wait(set(self._marking), timeout=MARK_WAIT_S)

    def take_unstarted(self) -> list[Launch]:
        """Every claimed slot this process has not started: timers cancelled, lists emptied."""
        unstarted: list[Launch] = []
        for handle, launches in self.delayed.values():
            handle.cancel()
            unstarted.extend(launches)
        self.delayed.clear()
        self._instants.clear()
        unstarted.extend(self._held_back)
        self._held_back = []
        for launches in self._queued.values():
            unstarted.extend(launches)
        self._queued.clear()
        self.launched.set()
        unstarted.extend(self._buffered.values())
        self._buffered.clear()
        with self._ctx.lock:
            unstarted.extend(self.handed.values())
            self.handed.clear()
        self.gate.open()
        return unstarted

    def _release_soon(self, launches: list[Launch]) -> None:
        scheduler = self._ctx.in_worker()
        if scheduler is not None:
            self._ctx.spawn(
                scheduler.run_in_worker(
                    claims.release_unstarted, self._ctx, self._registry, scheduler, launches
                )
            )
        else:
            self._held_back.extend(launches)

    def _cancel_delayed(self, name: str) -> None:
        """Release the claimed slots of ``name`` that have not started yet (its job stopped,
        removed or unregistered: a slot that never came is not recorded as cancelled)."""
        for slot, (handle, launches) in list(self.delayed.items()):
            mine = [launch for launch in launches if launch.name == name]
            if not mine:
                continue
            rest = [launch for launch in launches if launch.name != name]
            if rest:
                self.delayed[slot] = (handle, rest)
            else:
                handle.cancel()
                del self.delayed[slot]
            self._release_soon(mine)
        buffered = self._buffered.pop(name, None)
        if buffered is not None:
            self._release_soon([buffered])

    def _undispatch_soon(self, run_id: int) -> None:
        self._undispatch.append(run_id)
        if len(self._undispatch) == 1:
            asyncio.get_running_loop().call_soon(self._write_undispatch)

    def _write_undispatch(self) -> None:
        ids, self._undispatch = self._undispatch, []
        engine = self._ctx.engine

        def write() -> None:
            try:
                history.undispatch(engine, ids)
            except Exception as exc:
                log.error("cron.undispatch_failed", count=len(ids), error=error_text(exc))

        self._ctx.spawn(asyncio.to_thread(write))

    def _end_unstarted(self, launch: Launch, outcome: TaskOutcome, error: str) -> None:
        """Record the end of a claimed slot whose task never started."""
        now = self._ctx.clock()
        self._recorder.record(
            Finish(
                task=launch.name,
                run_id=launch.run_id,
                scheduled_at=launch.slot,
                outcome=outcome,
                # A task that could not be built did "run" and fail: the mirror shows when.
                started_at=now if outcome is TaskOutcome.ERROR else None,
                finished_at=now,
                error=error,
                attempt=launch.attempt,
            )
        )

    # --- starting (event loop) -----------------------------------------------------------------

    def _launch(self, launch: Launch) -> None:
        ctx = self._ctx
        if ctx.closing:
            self._held_back.append(launch)
            return
        if not ctx.holds_lease():
            # Frozen past the lease, or it could not be renewed: another node may lead now.
            # The slot never started here; whoever leads next catches it up.
            log.warning(
                "cron.start_refused",
                task=launch.name,
                run_id=launch.run_id,
                reason="this node no longer holds the scheduling lease",
            )
            self._undispatch_soon(launch.run_id)
            return
        # The runs the overlap policy counts: a backfill's runs are bounded by the backfill.
        # (Most launches find their task with no run in flight: nothing to count.)
        counted = (
            {i: r for i, r in self.runs_of(launch.name).items() if r.kind is not RunKind.BACKFILL}
            if launch.name in self.inflight
            else {}
        )
        overlap = ctx.overlaps.get(launch.name, DEFAULT_OVERLAP)
        buffered = launch.name in self._buffered
        action = decide(overlap, launch.kind, running=len(counted), buffered=buffered)
        if action is Action.SKIP:
            self._end_unstarted(
                launch, TaskOutcome.SKIPPED, skip_reason(overlap, buffered=buffered)
            )
            return
        if action is Action.BUFFER:
            # Started by _start_buffered when the run in flight ends; released by a stop.
            self._buffered[launch.name] = launch
            log.info(
                "task.buffered",
                task=launch.name,
                run_id=launch.run_id,
                scheduled_at=launch.slot.isoformat(),
            )
            return
        after: list[asyncio.Task[None]] = []
        if action is Action.CANCEL_AND_START:
            for run_id, running in counted.items():
                self._cancel_reasons[run_id] = CANCELLED_BY_NEXT
                running.run.cancel()
                after.append(running.run)
        self._start(launch, after)

    def _start(self, launch: Launch, after: list[asyncio.Task[None]]) -> None:
        ctx = self._ctx
        task = launch.task
        if task is None:
            error = launch.build_error or "the task could not be built"
            log.error("task.unbuildable", task=launch.name, run_id=launch.run_id, error=error)
            with ctx.lock:
                ctx.broken[launch.name] = error
            self._end_unstarted(launch, TaskOutcome.ERROR, error)
            return
        if launch.name in ctx.known_broken:
            with ctx.lock:
                ctx.broken[launch.name] = None
        run = asyncio.get_running_loop().create_task(
            self._execute(launch, task, after), name=f"nanobot-task:{launch.name}"
        )
        self.inflight.setdefault(launch.name, {})[launch.run_id] = Running(
            run, launch.slot, time.monotonic(), task.get_interval(), launch.kind
        )
        task.set_task(run)
        task.set_running(True)

    def _start_buffered(self, name: str) -> None:
        """Start the slot buffered behind a run that ended (buffer_one), once no counted run
        of its task is left; a stopping scheduler releases it instead (take_unstarted)."""
        if self._ctx.closing or name not in self._buffered:
            return
        if any(r.kind is not RunKind.BACKFILL for r in self.runs_of(name).values()):
            return  # another run still goes (a forced one): the last to end starts it
        self._launch(self._buffered.pop(name))

    # --- running (event loop) ------------------------------------------------------------------

    async def _execute(
        self, launch: Launch, task: CronTask, after: list[asyncio.Task[None]] | None = None
    ) -> None:
        timeout = task.timeout if task.timeout is not None else self._ctx.default_timeout
        outcome = TaskOutcome.SUCCESS
        error: str | None = None
        started = self._ctx.clock()
        # No timeout (the default): no Timeout object and no timer armed and cancelled per run.
        deadline = asyncio.timeout(timeout) if timeout is not None else None
        # Every line logged during this run, by nanobot or by the task, carries its task and
        # run id. Bound without a reset: the run is an asyncio task of its own, whose context
        # is a copy that ends with it (the with-block that reset them took about 5 % of the
        # event loop's samples in a sampling profile of the steady state).
        structlog.contextvars.bind_contextvars(task=launch.name, run_id=launch.run_id)
        try:
            if after:
                # cancel_previous: the cancelled run really stops (a command's process is
                # gone) before this one starts.
                await asyncio.wait(after)
            if task.jitter:
                await asyncio.sleep(random.uniform(0, task.jitter))
            if after or task.jitter:
                started = self._ctx.clock()
            self._began(launch, task, started)
            async with deadline or contextlib.nullcontext():
                # Every step of the run is fenced by the lease and timed (a step that
                # blocks the loop is named as the cause of the loop's lag).
                await Stepper(task.run(), f"task {launch.name}", fence=self._ctx.step_fence())
        # A run that did not succeed is logged once, here, with its duration; a success is
        # only a debug line below (task_runs records every run with its times).
        except TimeoutError as exc:
            if deadline is not None and deadline.expired():
                outcome = TaskOutcome.TIMEOUT
                error = f"the run took longer than its timeout of {timeout} s"
                log.warning("task.timed_out", timeout_s=timeout, duration_s=self._since(started))
            else:
                outcome = TaskOutcome.ERROR
                error = f"TimeoutError: {exc}"
                log.exception("task.failed", duration_s=self._since(started))
        except FencedError:
            outcome = TaskOutcome.CANCELLED
            error = "this node lost the scheduling lease while the run was in flight"
            log.warning("task.fenced", reason=error)
        except asyncio.CancelledError:
            outcome = TaskOutcome.CANCELLED
            error = self._cancel_reasons.pop(launch.run_id, "the run was cancelled")
            log.warning("task.cancelled", reason=error, duration_s=self._since(started))
        except Exception as exc:
            outcome = TaskOutcome.ERROR
            error = error_text(exc)
            log.exception("task.failed", duration_s=self._since(started))
        finally:
            self._end(launch, task, started, outcome, error)

    def _began(self, launch: Launch, task: CronTask, started: datetime) -> None:
        """A run's real start (after the runs cancelled for it and its jitter)."""
        self.pings.started(launch.name, self._ctx.ping_urls.get(launch.name) or task.ping_url)
        if _stdlib_log.isEnabledFor(logging.DEBUG):
            log.debug(
                "task.started",
                scheduled_at=launch.slot.isoformat(),
                lateness_s=round((started - launch.slot).total_seconds(), 6),
                manual=launch.manual,
            )

    def _end(
        self,
        launch: Launch,
        task: CronTask,
        started: datetime,
        outcome: TaskOutcome,
        error: str | None,
    ) -> None:
        """A run's end: out of the runs in flight, the buffered slot started, its outcome
        recorded, its health update and ping made."""
        ctx = self._ctx
        finished = ctx.clock()
        runs = self.inflight.get(launch.name, {})
        runs.pop(launch.run_id, None)
        if not runs:
            self.inflight.pop(launch.name, None)
        self._overrunning.discard(launch.run_id)
        self._cancel_reasons.pop(launch.run_id, None)
        if task.get_task() is asyncio.current_task():
            task.set_task(None)
        if launch.name in self._buffered:
            # Outside this run's context (its bound task and run_id).
            asyncio.get_running_loop().call_soon(
                self._start_buffered, launch.name, context=contextvars.Context()
            )
        if _stdlib_log.isEnabledFor(logging.DEBUG):
            duration = (finished - started).total_seconds()
            log.debug("task.finished", outcome=outcome.value, duration_s=round(duration, 6))
        period = ctx.periods.get(launch.name, task.get_interval())
        self._recorder.record_health(HealthUpdate(launch.name, period, outcome, error))
        self.pings.finished(
            launch.name, ctx.ping_urls.get(launch.name) or task.ping_url, outcome, error
        )
        self._recorder.record(
            Finish(
                task=launch.name,
                run_id=launch.run_id,
                scheduled_at=launch.slot,
                outcome=outcome,
                started_at=started,
                finished_at=finished,
                error=error,
                attempt=launch.attempt,
            )
        )

    def _since(self, started: datetime) -> float:
        return round((self._ctx.clock() - started).total_seconds(), 6)

    # --- overruns (event loop) -----------------------------------------------------------------

    def arm_watch(self) -> None:
        if self._ctx.overrun_intervals > 0 and self._watch is None:
            period = min(WATCH_PERIOD_S, self._ctx.poll_interval)
            self._watch = asyncio.get_running_loop().call_later(period, self._watch_runs)

    def disarm_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _watch_runs(self) -> None:
        """Put a task whose run has been in flight longer than its bound in error, once per
        run; the run's end (a success) clears it."""
        self._watch = None
        if self._ctx.closing or self._ctx.scheduler is None:
            return
        now = time.monotonic()
        for name, runs in list(self.inflight.items()):
            for run_id, running in list(runs.items()):
                self._watch_run(name, run_id, running, now)
        self.arm_watch()

    def _watch_run(self, name: str, run_id: int, running: Running, now: float) -> None:
        intervals = self._ctx.overrun_intervals
        bound = intervals * running.interval
        age = now - running.started
        if run_id in self._overrunning or age <= bound:
            return
        self._overrunning.add(run_id)
        text = (
            f"a run in flight for {age:.1f}s, longer than its bound of {bound:g}s "
            f"({intervals:g} intervals)"
        )
        log.warning("task.overrunning", task=name, run_id=run_id, age_s=round(age, 3))
        self._recorder.health(name, running.interval, TaskOutcome.TIMEOUT, text)
