"""Recording outcomes: the batched history writer, the retries it plans, the announcements on
the bus, the tasks' health components, and auto-pause.

Threads: outcomes are recorded on the event loop (:meth:`Recorder.record`), which owns the
pending batch, the flush loop, the health and announce queues and the health components; each
batch is written by the scheduler's worker thread (:meth:`Recorder.write_outcomes`), which
also plans the retries of failed attempts and keeps the context's retry bookkeeping, since the
passes read it there. History never blocks the loop. :meth:`Recorder.idle` is the loop's too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import structlog

from nanobot.cron import autopause, history, retries
from nanobot.cron.aps_adapter import NanobotScheduler
from nanobot.cron.context import TASK_PREFIX, CronContext, task_component
from nanobot.cron.history import Fenced, Finish
from nanobot.cron.records import HealthUpdate
from nanobot.cron.retries import NO_RETRIES, PendingRetry
from nanobot.cron.start_gate import StartGate
from nanobot.models import FAILED_OUTCOMES, TaskOutcome, error_text

log = structlog.get_logger(__name__)

FLUSH_RETRY_S: Final = 1.0
FLUSH_WINDOW_S: Final = 0.02
# After a write, outcomes that come within this long are written with the next batch (see
# Recorder._busy_window): four transactions a second for hundreds of runs, not one per run. A
# failed outcome ends the window at once: what follows a failure (auto-pause, a retry) must not
# wait for it. (Before failures ended it, the window was 0.1 s: at 0.25 s a task that pauses
# after failures, with slots 0.3 s apart, ran once more before its pause applied.)
FLUSH_BUSY_WINDOW_S: Final = 0.25
# Outcomes written per transaction (see Recorder.write_outcomes).
WRITE_CHUNK: Final = 2000
# How long health updates and task.finished events wait for a burst's launches, at most.
LAUNCH_DEFER_MAX_S: Final = 1.0
# Health updates and task.finished events of finished runs handled per loop iteration, at most;
# health updates for at most AFTER_RUNS_SLICE_S seconds (a component's registration costs ten
# times its next heartbeats).
AFTER_RUNS_CHUNK: Final = 200
AFTER_RUNS_SLICE_S: Final = 0.002


class Recorder:
    """Writes outcomes in batches, announces them and keeps the tasks' health components.

    ``apply_pauses`` is called in the worker thread after auto-pause paused tasks, to apply
    the pauses to the scheduler at once (the reconciliation).
    """

    def __init__(
        self,
        ctx: CronContext,
        *,
        apply_pauses: Callable[[NanobotScheduler], None],
        launched: asyncio.Event | None = None,
    ) -> None:
        self._ctx = ctx
        self._apply_pauses = apply_pauses
        # loop: set by the launcher while no burst's launches wait to be started (see
        # Launcher.launched); None: never wait.
        self._launched = launched
        # loop: the launcher's gate, set by the manager; a write waits at it for an imminent
        # instant's runs to start (see nanobot.cron.start_gate). None: never wait.
        self.gate: StartGate | None = None
        # loop: outcomes waiting to be written, and the task writing them.
        self.pending: list[Finish] = []
        self._flusher: asyncio.Task[None] | None = None
        # loop: how many outcomes the batch being written holds.
        self._writing = 0
        # Set while flush() waits: the flusher writes at once, without its busy window.
        self._hurry = asyncio.Event()
        # Set by flush() and by a failed outcome: the busy window in progress ends.
        self._cut_window = asyncio.Event()
        # loop: per-run bookkeeping done once per burst, not once per run (see _after_runs):
        # health updates of task components and task.finished events.
        self._health_registered: set[str] = set()
        self._health_pending: list[HealthUpdate] = []
        self._announce_pending: list[Finish] = []
        self._after_runs_task: asyncio.Task[None] | None = None

    # --- recording (event loop) ----------------------------------------------------------------

    def record(self, finish: Finish) -> None:
        """Write ``finish`` with the next batch, and announce it."""
        self.pending.append(finish)
        if finish.outcome in FAILED_OUTCOMES:
            self._cut_window.set()
        if self._flusher is None or self._flusher.done():
            self._start_flusher()
        self.announce(finish)

    def record_health(self, update: HealthUpdate) -> None:
        """Update a task's component with the burst's other runs (see _after_runs)."""
        self._health_pending.append(update)

    async def flush(self) -> None:
        """Wait until every recorded outcome is written to the database (and its health update
        and ``task.finished`` event are done)."""
        self._hurry.set()
        self._cut_window.set()
        try:
            while self.pending or (self._flusher is not None and not self._flusher.done()):
                if self._flusher is None or self._flusher.done():
                    self._start_flusher()
                assert self._flusher is not None
                await asyncio.shield(self._flusher)
            if self._after_runs_task is not None and not self._after_runs_task.done():
                await asyncio.shield(self._after_runs_task)
        finally:
            self._hurry.clear()

    def idle(self) -> bool:
        """Whether no outcome waits to be written, announced or applied to health, and no
        write is in progress."""
        return not (
            self.pending
            or self._health_pending
            or self._announce_pending
            or (self._flusher is not None and not self._flusher.done())
            or (self._after_runs_task is not None and not self._after_runs_task.done())
        )

    def backlog(self) -> int:
        """How many outcomes wait to be written or are being written, announced or applied to
        health (event loop)."""
        return (
            len(self.pending)
            + self._writing
            + len(self._health_pending)
            + len(self._announce_pending)
        )

    def drop_pending(self) -> None:
        """Give up the outcomes not written (the database does not answer at a stop): their
        claims stay ``running`` and are recorded interrupted at the next start."""
        log.error("cron.history_unwritten", count=len(self.pending))
        if self._flusher is not None:
            self._flusher.cancel()
        self.pending = []

    def _start_flusher(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _launches_done(self) -> None:
        """Wait (at most LAUNCH_DEFER_MAX_S) until no burst's launches wait to be started."""
        launched = self._launched
        if launched is None or self._hurry.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAUNCH_DEFER_MAX_S):
                # Set by the end of one hand-over's launches, it may be cleared again by the
                # next (a chunk of marked slots) before this task runs: wait on then.
                while not launched.is_set():
                    await launched.wait()

    async def _flush_loop(self) -> None:
        # Outcomes that come within a few milliseconds are written together: during a burst the
        # worker thread writes a few large batches instead of competing with the loop all along.
        await asyncio.sleep(FLUSH_WINDOW_S)
        failures = 0  # consecutive failed writes
        while self.pending:
            # Nor while a burst's launches go on: the worker thread's writes would hold the
            # interpreter lock in turns with the loop that starts them.
            await self._launches_done()
            batch, self.pending = self.pending, []
            # A failure among the outcomes that come from now on ends the next busy window.
            self._cut_window.clear()
            self._writing = len(batch)
            wrote = False
            try:
                scheduler = self._ctx.in_worker()
                if scheduler is not None:
                    if self.gate is not None and not self._hurry.is_set():
                        await self.gate.clear()
                    planned, fenced = await scheduler.run_in_worker(self.write_outcomes, batch)
                else:
                    planned, fenced = await asyncio.to_thread(self.write_outcomes, batch)
                self.log_fenced(fenced)
                _announce_retries(planned)
                await self._auto_pause(planned)
                wrote = True
                failures = 0
            except asyncio.CancelledError:
                # The loop ends (a script returned without shutdown()): the exit hook writes it.
                self.pending = batch + self.pending
                raise
            except Exception as exc:
                # Keep the outcomes and try again: history is never dropped for a passing fault.
                failures += 1
                if failures == 1:
                    log.exception("cron.history_write_failed", pending=len(batch), failures=1)
                else:
                    # Retried every FLUSH_RETRY_S for as long as the fault lasts (a full disk):
                    # the traceback was logged with the first failure, not once a second.
                    log.error(
                        "cron.history_write_failed",
                        pending=len(batch),
                        failures=failures,
                        error=error_text(exc),
                    )
                self.pending = batch + self.pending
                await asyncio.sleep(FLUSH_RETRY_S)
            finally:
                self._writing = 0
            if wrote:
                await self._busy_window()

    async def _busy_window(self) -> None:
        """After a write, outcomes that come within a longer window are written together: with
        runs ending every few milliseconds (hundreds of tasks spread over the second), writing
        each as it came made a transaction per one or two outcomes. A run after a quiet spell is
        still written FLUSH_WINDOW_S after it ends; :meth:`flush` and a failed outcome (one
        that came during the write too) cut the window short."""
        if self._hurry.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_BUSY_WINDOW_S):
                await self._cut_window.wait()

    def write_at_exit(self) -> None:
        """At interpreter exit (no event loop any more): write the outcomes still pending."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        try:
            fenced = history.write_finishes(self._ctx.engine, self.plan_retries(pending))
        except Exception as exc:
            log.error("cron.history_unwritten", count=len(pending), error=error_text(exc))
        else:
            self.log_fenced([f for f in fenced if f.recorded != f.finish.outcome.value])

    # --- writing (worker thread) ---------------------------------------------------------------

    def write_outcomes(self, batch: list[Finish]) -> tuple[list[Finish], list[Fenced]]:
        """Write a batch of outcomes with the retries that follow failed attempts, then trim
        the history of the tasks that are due for it, so that no task's history outgrows its
        limit between two cleanups (worker thread; passes count the rows they insert). The
        batch as written (each failed attempt's retry planned), and the fenced finishes.

        Written :data:`WRITE_CHUNK` outcomes per transaction, each chunk taken out of ``batch``
        once committed: a burst's 20,000 outcomes in one transaction held SQLite's write lock
        for seconds (the lease renewal waits behind it), and a chunk that fails leaves in
        ``batch`` only what is still to write."""
        ctx = self._ctx
        planned: list[Finish] = []
        fenced: list[Fenced] = []
        while batch:
            chunk = self.plan_retries(batch[:WRITE_CHUNK])
            mirrors = {f.task: m for f in chunk if (m := ctx.next_mirrors.pop(f.task, None))}
            lost = history.write_finishes(ctx.engine, chunk, next_runs=mirrors)
            del batch[: len(chunk)]
            lost_ids = {item.finish.run_id for item in lost}
            for f in chunk:
                if f.retry_at is not None and f.run_id not in lost_ids:
                    ctx.retries[f.task] = PendingRetry(
                        f.task, f.scheduled_at, f.attempt + 1, f.retry_at
                    )
            planned.extend(chunk)
            fenced.extend(lost)
        ctx.trimmer.trim(ctx.engine)
        return planned, fenced

    def plan_retries(self, batch: list[Finish]) -> list[Finish]:
        """Each failed attempt of a task with retries either gets its retry (not final: its
        slot is not settled) or, when the task's next slot would come first, the note that the
        slot's remaining attempts are given up (:mod:`nanobot.cron.retries`)."""
        return [self._plan_retry(f) for f in batch]

    def _plan_retry(self, f: Finish) -> Finish:
        ctx = self._ctx
        with ctx.lock:
            policy = ctx.retry_policies.get(f.task, NO_RETRIES)
        if f.run_id is None or policy.retries == 0 or f.task in ctx.paused:
            return f
        next_slot = ctx.next_slots.get(f.task)
        plan = retries.plan_retry(
            task=f.task,
            slot=f.scheduled_at,
            attempt=f.attempt,
            outcome=f.outcome,
            failed_at=f.finished_at,
            policy=policy,
            next_slot=next_slot,
            u=random.random(),
        )
        if plan is None or plan.verdict is retries.RetryVerdict.EXHAUSTED:
            return f
        if plan.retry is not None:
            return replace(f, final=False, retry_at=plan.retry.at)
        assert next_slot is not None
        assert plan.would_be_at is not None
        text = retries.given_up_text(f.attempt + 1, policy.retries, plan.would_be_at, next_slot)
        return replace(f, error=f"{f.error}; {text}" if f.error else text)

    def log_fenced(self, fenced: list[Fenced]) -> None:
        for item in fenced:
            finish = item.finish
            log.warning(
                "cron.fenced_finish",
                task=finish.task,
                run_id=finish.run_id,
                scheduled_at=finish.scheduled_at.isoformat(),
                outcome=finish.outcome.value,
                started_at=finish.started_at.isoformat() if finish.started_at else None,
                finished_at=finish.finished_at.isoformat(),
                recorded=item.recorded,
                node=self._ctx.node,
                reason="another node settled this run first; its record stands",
            )

    # --- auto-pause (event loop, the database in the worker) -----------------------------------

    def pause_soon(self, names: list[str]) -> None:
        """From a pass: slots settled as failed without a run (retries missed or given up)."""
        self._ctx.spawn(self._auto_pause_tasks(set(names)))

    async def _auto_pause(self, batch: list[Finish]) -> None:
        """Pause the tasks of ``batch`` whose failed slots in a row reached their threshold
        (:mod:`nanobot.cron.autopause`), and apply the pause to the scheduler at once. A failed
        attempt that a retry follows does not settle its slot: it is not counted."""
        await self._auto_pause_tasks(
            {
                f.task
                for f in batch
                if f.run_id is not None and f.final and f.outcome in FAILED_OUTCOMES
            }
        )

    async def _auto_pause_tasks(self, names: set[str]) -> None:
        if not names:
            return
        ctx = self._ctx
        scheduler = ctx.in_worker()
        try:
            call = functools.partial(
                autopause.pause_failing,
                ctx.engine,
                names,
                default=ctx.pause_default,
                now=ctx.clock(),
            )
            if scheduler is not None:
                paused = await scheduler.run_in_worker(call)
            else:
                paused = await asyncio.to_thread(call)
        except Exception as exc:
            # The next failure tries again: the count stays in the database.
            log.error("cron.auto_pause_failed", tasks=sorted(names), error=error_text(exc))
            return
        for item in paused:
            log.warning(
                "task.auto_paused",
                task=item.task,
                failures=item.failures,
                threshold=item.threshold,
                reason=item.reason,
            )
            payload = {
                "task": item.task,
                "reason": item.reason,
                "failures": item.failures,
                "threshold": item.threshold,
                "paused_at": item.paused_at.isoformat(),
            }
            ctx.spawn(ctx.bus.publish("task.auto_paused", payload))
        if paused and scheduler is not None:
            await scheduler.run_in_worker(self._apply_pauses, scheduler)

    # --- announcing and health (event loop) ----------------------------------------------------

    def announce_batch(self, finishes: list[Finish]) -> None:
        for finish in finishes:
            self.announce(finish)

    def announce(self, finish: Finish) -> None:
        self._announce_pending.append(finish)
        if self._after_runs_task is None or self._after_runs_task.done():
            # In a context of its own: not the bound task/run_id of the run that started it.
            self._after_runs_task = asyncio.get_running_loop().create_task(
                self._after_runs(), context=contextvars.Context()
            )

    async def _after_runs(self) -> None:
        """Health updates and ``task.finished`` events of the runs that ended in the last few
        milliseconds, in one task: during a burst, one pass over thousands of outcomes instead
        of a task, a publish and a lock per run while the burst's launches wait. A few hundred
        at a time, yielding in between, so that the event loop is never held for long; every
        pending health update is applied before the next events are published, so that a
        subscriber sees the task's component as its run left it."""
        await asyncio.sleep(FLUSH_WINDOW_S)
        bus = self._ctx.bus
        # A burst's first runs register thousands of components: done between its launches, it
        # would make the last ones late.
        await self._launches_done()
        while self._health_pending or self._announce_pending:
            while self._health_pending:
                self._apply_health(time.perf_counter() + AFTER_RUNS_SLICE_S)
                await asyncio.sleep(0)
            finishes = self._announce_pending[:AFTER_RUNS_CHUNK]
            del self._announce_pending[:AFTER_RUNS_CHUNK]
            if finishes and bus.subscribers("task.finished"):
                await bus.publish_many("task.finished", [_payload(f) for f in finishes])
            await asyncio.sleep(0)
            if not self._health_pending and not self._announce_pending:
                await self._busy_window()

    def _apply_health(self, until: float) -> None:
        """Apply pending health updates, in order, until ``until`` (perf_counter) or
        :data:`AFTER_RUNS_CHUNK` of them."""
        pending = self._health_pending
        done = 0
        while done < len(pending) and done < AFTER_RUNS_CHUNK:
            update = pending[done]
            done += 1
            self.health(update.name, update.interval, update.outcome, update.error)
            if time.perf_counter() >= until:
                break
        del pending[:done]

    def health(self, name: str, interval: float, outcome: TaskOutcome, error: str | None) -> None:
        """Section 5.2.3 of the seed: a task is a component, ``task:<name>``; a failed run
        puts it in error and the next successful run clears it."""
        if interval <= 0:
            # A one-shot runs once: as a component it would go stale, then stay in error, for
            # ever after. Its outcome is in its history and in 'cron list'.
            return
        component = task_component(name)
        monitor = self._ctx.monitor
        try:
            if component not in self._health_registered:
                # A task that runs hourly must not look stale after two heartbeat intervals.
                monitor.register_component(component, stale_after=2 * interval + 60)
                self._health_registered.add(component)
            if outcome is TaskOutcome.SUCCESS:
                monitor.update_component_heartbeat(component)
            elif outcome in (TaskOutcome.ERROR, TaskOutcome.TIMEOUT):
                monitor.mark_component_error(component, error or outcome.value)
        except Exception:
            # Health reporting must never break a run's bookkeeping.
            log.exception("cron.health_update_failed", task=name)

    def forget_health(self, name: str) -> None:
        # A health update still waiting for _after_runs must not register the component again.
        self._health_pending = [h for h in self._health_pending if h.name != name]
        # Whether or not this process registered it: a component left by an earlier process
        # (known to the monitor from the database) must go too.
        component = task_component(name)
        self._health_registered.discard(component)
        try:
            self._ctx.monitor.unregister_component(component)
        except Exception:
            log.exception("cron.health_update_failed", task=name)

    def forget_task_components(self) -> None:
        """Unregister every task component this process registered (a leader that steps
        down), in one call and one log line."""
        components = sorted(self._health_registered)
        names = {component[len(TASK_PREFIX) :] for component in components}
        self._health_pending = [h for h in self._health_pending if h.name not in names]
        self._health_registered.difference_update(components)
        try:
            self._ctx.monitor.unregister_components(components)
        except Exception:
            log.exception("cron.health_update_failed", tasks=len(components))


def _announce_retries(planned: list[Finish]) -> None:
    for f in planned:
        if f.retry_at is not None:
            log.info(
                "task.retry_scheduled",
                task=f.task,
                scheduled_at=f.scheduled_at.isoformat(),
                attempt=f.attempt + 1,
                retry_at=f.retry_at.isoformat(),
            )


def _payload(finish: Finish) -> dict[str, Any]:
    return {
        "task": finish.task,
        "outcome": finish.outcome.value,
        "duration": (
            (finish.finished_at - finish.started_at).total_seconds()
            if finish.started_at is not None
            else None
        ),
        "scheduled_at": finish.scheduled_at.isoformat(),
        "finished_at": finish.finished_at.isoformat(),
        "slots": finish.slots,
        "error": finish.error,
        "attempt": finish.attempt,
    }
