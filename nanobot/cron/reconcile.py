"""Reconciliation with the control plane: stored ``tasks`` rows become jobs.

``tasks`` rows whose version changed since this process applied them (written here or by the
command line in another process, :mod:`nanobot.cron.control`) become added, changed, paused
or removed jobs in the job store; each task's settings (misfire and retry policies, period,
ping URL, overlap policy, pause, backfill) are noted in the context for the passes and the
loop; pending run-now requests are returned for the pass to claim.

A scheduler's first reconciliation applies at once only the tasks that may be due soon (within
:data:`DEFER_BEYOND_S`, by their job's next run time or their row's next-run mirror), those with
a run request or a pending retry, and those with no next run at all; with many stored tasks the
others are *deferred*: from :data:`DEFER_START_S` after the first pass (the start of the
service, its built-in tasks and its first probes are not kept waiting by them), passes apply them
:data:`DEFER_CHUNK` at a time, soonest first, one after the other. Until its row is applied,
a deferred task's job is held (:meth:`NanobotScheduler.due` leaves it as it is, due or not), so
nothing runs with settings this process has not read; a deferred row changed meanwhile (or
run-requested) is applied at the next reconciliation like any changed row. A start with 100,000
tasks due in an hour thus schedules the ones due now within a second instead of after reading,
unpickling and comparing every job (about 13 s).

Threads: the scheduler's worker thread only (a pass, or a change made in this process applied
at once through ``scheduler.run_in_worker``). It owns :attr:`Reconciler.applied` and
:attr:`Reconciler.deferred`, which the pass reads.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Connection

from nanobot.cron import backfill, control, history
from nanobot.cron.aps_adapter import EPHEMERAL, PERSISTENT, JobSpec, JobState, NanobotScheduler
from nanobot.cron.context import CronContext
from nanobot.cron.records import DuePolicy, RunRequest, StoredOptions
from nanobot.cron.registry import Registry
from nanobot.cron.retries import DEFAULT_BACKOFF, RetryPolicy
from nanobot.cron.schedules import AtSchedule, IntervalSchedule, slot_at_or_after
from nanobot.cron.task import TaskDefinition
from nanobot.db import read_transaction, write_transaction
from nanobot.times import iso

log = structlog.get_logger(__name__)

# Above this many changed tasks, the reconciliation reads the whole tasks table instead.
RECONCILE_IN_MAX: Final = 500
# A first reconciliation defers the tasks not due within this many seconds...
DEFER_BEYOND_S: Final = 60.0
# ... when there are more than this many of them (below, applying them all costs little);
DEFER_MIN: Final = 2000
# Passes apply them from this many seconds after the first pass...
DEFER_START_S: Final = 1.0
# ... this many each (a pass of 2,000 held the worker for a
# quarter of a second, which a start_task made in the meantime waited for).
DEFER_CHUNK: Final = 500


def retry_policy(definition: TaskDefinition) -> RetryPolicy:
    return RetryPolicy(definition.retries, definition.retry_backoff or DEFAULT_BACKOFF)


def note_definition(ctx: CronContext, definition: TaskDefinition) -> None:
    """Note a task's settings that the passes and the loop read."""
    name = definition.name
    ctx.policies[name] = DuePolicy.of(definition.misfire_policy, definition.catch_up_window)
    ctx.periods[name] = definition.interval
    ctx.ping_urls[name] = definition.ping_url
    ctx.retry_policies[name] = retry_policy(definition)
    ctx.overlaps[name] = definition.overlap


class Reconciler:
    """Applies changed ``tasks`` rows to the job store (worker thread).

    ``on_removed(scheduler, name)`` is called for each task gone from the table, once its job
    is removed: the caller forgets its health component and cancels its runs on the loop.
    """

    def __init__(
        self,
        ctx: CronContext,
        registry: Registry,
        *,
        on_removed: Callable[[NanobotScheduler, str], None],
    ) -> None:
        self._ctx = ctx
        self._registry = registry
        self._on_removed = on_removed
        # The version of each task applied to the job store.
        self.applied: dict[str, int] = {}
        # Tasks whose rows a first reconciliation left for later passes: name -> the version
        # then read, soonest due first. Their jobs are held until applied.
        self.deferred: dict[str, int] = {}
        self._deferred_at = 0.0
        self._first = True
        self._last = 0.0

    def reset(self) -> None:
        """Before a new scheduler's first pass: nothing applied yet."""
        self._first = True
        self._last = 0.0
        self.applied.clear()
        self.deferred.clear()

    def apply_again(self, names: list[str]) -> None:
        """The jobs of ``names`` lost their rows (deleted behind the scheduler): their tasks'
        rows are applied again at the next reconciliation, which is due now (a task whose row
        is still stored gets its job back; its slots already claimed stay claimed)."""
        for name in names:
            self.applied.pop(name, None)
        self._last = 0.0

    def due(self) -> bool:
        """Whether the control plane is to be read in this pass: at most once per poll
        interval, since passes for due slots come many times a second, and changes made in
        this process apply at once anyway."""
        return time.monotonic() - self._last >= self._ctx.poll_interval * 0.9

    def reconcile_now(self, scheduler: NanobotScheduler, name: str | None = None) -> None:
        """Apply a change made in this process at once, and wake the scheduler. ``name``: the
        change was to that task's row alone, which is read and applied (other rows are left to
        the next pass: with 100,000 tasks, reading every version took half a second)."""
        now = self._ctx.clock()
        if name is None:
            # Run requests are left to the next pass, which claims them with the due slots.
            self.reconcile(scheduler, now, take_requests=False)
        else:
            with read_transaction(self._ctx.engine) as conn:
                rows = control.task_rows(conn, [name], whole_table=False)
            if rows and self.applied.get(name) != rows[0].version:
                self.deferred.pop(name, None)
                self._apply_rows(scheduler, rows, now, take_requests=False, whole_table=False)
            # A row gone is the next pass's to remove, with its job.
        scheduler.wakeup()

    def reconcile(
        self, scheduler: NanobotScheduler, now: datetime, *, take_requests: bool = True
    ) -> list[RunRequest]:
        """Apply changed ``tasks`` rows to the job store; return the run-now requests."""
        self._last = time.monotonic()
        versions, rows = self._read_changed(scheduler, now, take_requests)
        whole_table = len(rows) > RECONCILE_IN_MAX
        requests = self._apply_rows(
            scheduler, rows, now, take_requests=take_requests, whole_table=whole_table
        )
        self._remove_gone(scheduler, versions)
        return requests

    def deferred_wait(self) -> float | None:
        """Seconds until a pass may apply deferred rows (0: now); None when none is left."""
        if not self.deferred:
            return None
        return max(0.0, self._deferred_at + DEFER_START_S - time.monotonic())

    def apply_deferred(self, scheduler: NanobotScheduler, now: datetime) -> None:
        """Apply the next :data:`DEFER_CHUNK` deferred rows (the soonest due first)."""
        names = list(itertools.islice(self.deferred, DEFER_CHUNK))
        with read_transaction(self._ctx.engine) as conn:
            rows = control.task_rows(conn, names, whole_table=False)
        for name in names:
            del self.deferred[name]
        self._apply_rows(scheduler, rows, now, take_requests=False, whole_table=False)
        found = {row.name for row in rows}
        # Removed from the table meanwhile: their jobs go too.
        self._forget(scheduler, [name for name in names if name not in found])
        if not self.deferred:
            log.info(
                "cron.deferred_applied",
                duration_s=round(time.monotonic() - self._deferred_at, 3),
            )

    def _apply_rows(
        self,
        scheduler: NanobotScheduler,
        rows: list[Any],
        now: datetime,
        *,
        take_requests: bool,
        whole_table: bool,
    ) -> list[RunRequest]:
        """Apply ``rows`` to the job store; the run-now requests among them. ``whole_table``:
        they are (nearly) every row, so every job is read in one go."""
        requests: list[RunRequest] = []
        next_runs: dict[str, tuple[datetime | None, int]] = {}
        to_apply = [row for row in rows if self.applied.get(row.name) != row.version]
        jobs = scheduler.lookup_many(
            [row.name for row in to_apply],
            all_rows=whole_table and len(to_apply) > RECONCILE_IN_MAX,
        )
        to_add: list[JobSpec] = []
        for row in rows:
            definition = control.stored_definition(row)
            self._note_row(row, definition)
            if self.applied.get(row.name) != row.version:
                next_run = self._apply_row(
                    scheduler, row, definition, now, jobs.get(row.name), to_add
                )
                self._ctx.next_slots[row.name] = next_run
                if next_run != row.next_run_at:
                    next_runs[row.name] = (next_run, row.version)
                self.applied[row.name] = row.version
            if row.run_requested_at is not None and take_requests:
                requests.append(
                    RunRequest(
                        row.name,
                        row.run_requested_at,
                        row.task_class,
                        dict(row.kwargs),
                        bool(row.run_forced),
                    )
                )
        if to_add:
            scheduler.add_many(to_add)
            log.info("cron.jobs_added", count=len(to_add))
        if next_runs:
            with write_transaction(self._ctx.engine) as conn:
                history.set_next_runs(conn, next_runs)
        return requests

    def _read_changed(
        self, scheduler: NanobotScheduler, now: datetime, take_requests: bool
    ) -> tuple[dict[str, control.TaskVersion], list[Any]]:
        """Every stored task's version, and the rows changed since applied (or requested). A
        deferred row is changed once its version differs from the one deferred."""
        with read_transaction(self._ctx.engine) as conn:
            versions = control.task_versions(conn)
            if self._first:
                self._defer(scheduler, conn, versions, now)
            deferred = self.deferred
            changed = [
                n
                for n, v in versions.items()
                if (self.applied.get(n) != v.version and deferred.get(n) != v.version)
                or (v.requested and take_requests)
            ]
            for name in changed:
                deferred.pop(name, None)
            # At start every row may be new to this process: read them all in one go rather
            # than with an IN list longer than the database accepts.
            rows = control.task_rows(conn, changed, whole_table=len(changed) > RECONCILE_IN_MAX)
        return versions, rows

    def _defer(
        self,
        scheduler: NanobotScheduler,
        conn: Connection,
        versions: dict[str, control.TaskVersion],
        now: datetime,
    ) -> None:
        """At a first reconciliation: note in :attr:`deferred` the tasks that cannot be due
        within :data:`DEFER_BEYOND_S` (soonest first), if there are more than :data:`DEFER_MIN`.

        A task can be due soon by its job's next run time (what the passes go by) or by its
        row's next-run mirror (a job not made yet, a row changed while no scheduler ran): it is
        deferred only if both are later. A task without a next run, with a run request or with
        a pending retry is applied now. Both are read by index ranges of names, without
        converting a time per task."""
        soon = now + timedelta(seconds=DEFER_BEYOND_S)
        held = scheduler.due_by(soon)
        retrying = self._ctx.retries
        later = [
            name
            for name in control.names_due_after(conn, soon)
            if name not in held and name not in retrying and name in versions
        ]
        if len(later) <= DEFER_MIN:
            return
        self.deferred = {name: versions[name].version for name in later}
        self._deferred_at = time.monotonic()
        log.info(
            "cron.tasks_deferred",
            count=len(later),
            applied_now=len(versions) - len(later),
            due_after_s=DEFER_BEYOND_S,
        )

    def _note_row(self, row: Any, definition: TaskDefinition) -> None:
        ctx = self._ctx
        note_definition(ctx, definition)
        if row.paused:
            ctx.paused.add(row.name)
        else:
            ctx.paused.discard(row.name)
        job = backfill.job_of(row)
        if job is None:
            ctx.backfills.pop(row.name, None)
            ctx.backfill_after.pop(row.name, None)
        else:
            before = ctx.backfills.get(row.name)
            ctx.backfills[row.name] = job
            if before is None or before.backfill != job.backfill:
                ctx.backfill_after.pop(row.name, None)

    def _remove_gone(self, scheduler: NanobotScheduler, versions: dict[str, Any]) -> None:
        removed = [n for n in self.applied if n not in versions]
        gone_deferred = [n for n in self.deferred if n not in versions]
        for name in gone_deferred:
            del self.deferred[name]
        removed += gone_deferred
        if self._first:
            removed += [n for n in scheduler.persistent_job_ids() if n not in versions]
            self._first = False
        self._forget(scheduler, removed)

    def _forget(self, scheduler: NanobotScheduler, removed: list[str]) -> None:
        """Tasks gone from the table: their settings, jobs, components and runs."""
        ctx = self._ctx
        for name in removed:
            self.applied.pop(name, None)
            ctx.policies.pop(name, None)
            ctx.periods.pop(name, None)
            ctx.retry_policies.pop(name, None)
            ctx.retries.pop(name, None)
            ctx.overlaps.pop(name, None)
            ctx.backfills.pop(name, None)
            if scheduler.remove(name, PERSISTENT):
                log.info("cron.job_removed", task=name)
            self._on_removed(scheduler, name)

    def _apply_row(
        self,
        scheduler: NanobotScheduler,
        row: Any,
        definition: TaskDefinition,
        now: datetime,
        job: JobState | None,
        to_add: list[JobSpec],
    ) -> datetime | None:
        """Make the job of one task match its row (a new job is appended to ``to_add``); the
        job's next run time afterwards."""
        self._registry.set_options(row.name, StoredOptions(definition.timeout, definition.jitter))
        if row.paused:
            if job is not None and job.next_run_at is not None:
                scheduler.change(row.name, store=PERSISTENT, next_run_at=None)
                log.info("cron.job_paused", task=row.name)
            return None
        anchor: datetime = row.anchor_at or now
        if job is None:
            return _new_job(row, definition, now, anchor, to_add)
        return _change_job(scheduler, row, definition, now, anchor, job)

    def add_ephemeral(
        self, scheduler: NanobotScheduler, definition: TaskDefinition, now: datetime
    ) -> None:
        """Schedule a task only this process can build (its first run is now)."""
        if scheduler.lookup(definition.name, EPHEMERAL) is not None:
            return
        scheduler.add(
            definition.name,
            store=EPHEMERAL,
            task_class=definition.task_class,
            kwargs=definition.kwargs,
            interval=definition.interval,
            anchor=now,
            next_run_at=control.first_run(definition.the_schedule, now),
            schedule=definition.the_schedule,
        )


def _new_job(
    row: Any, definition: TaskDefinition, now: datetime, anchor: datetime, to_add: list[JobSpec]
) -> datetime | None:
    schedule = definition.the_schedule
    next_run = row.next_run_at or slot_at_or_after(schedule, now, anchor=anchor)
    if isinstance(schedule, AtSchedule) and (
        row.last_run_at is not None or row.next_run_at is None
    ):
        # A one-shot that ran (or was recorded missed) is done, even if its job went
        # missing: only adding or starting it gives it a next run.
        next_run = None
    to_add.append(
        JobSpec(
            name=row.name,
            task_class=definition.task_class,
            kwargs=definition.kwargs,
            interval=definition.interval,
            anchor=anchor,
            next_run_at=next_run,
            schedule=schedule,
        )
    )
    log.debug("cron.job_added", task=row.name, next_run_at=iso(next_run))
    return next_run


def _change_job(
    scheduler: NanobotScheduler,
    row: Any,
    definition: TaskDefinition,
    now: datetime,
    anchor: datetime,
    job: JobState,
) -> datetime | None:
    schedule = definition.the_schedule
    changes: dict[str, Any] = {}
    if job.task_class != definition.task_class or job.kwargs != definition.kwargs:
        changes["task_class"] = definition.task_class
        changes["kwargs"] = definition.kwargs
    next_run = job.next_run_at
    if job.schedule != schedule or (
        isinstance(schedule, IntervalSchedule) and job.anchor != anchor
    ):
        changes["schedule"] = schedule
        changes["anchor"] = anchor
        if job.next_run_at is not None:
            # An interval keeps its phase (the control plane moved the anchor to the next
            # slot); another schedule starts from its own next slot.
            next_run = (
                anchor
                if isinstance(schedule, IntervalSchedule)
                else row.next_run_at or slot_at_or_after(schedule, now)
            )
            changes["next_run_at"] = next_run
    if job.next_run_at is None and not (
        isinstance(schedule, AtSchedule) and row.last_run_at is not None
    ):
        # Resumed: the next slot of the schedule from now (interval: on its grid). A
        # one-shot whose time passed while it was paused has none.
        next_run = slot_at_or_after(schedule, now, anchor=anchor)
        changes["next_run_at"] = next_run
    if changes:
        scheduler.change(row.name, store=PERSISTENT, **changes)
        log.info("cron.job_changed", task=row.name, changed=sorted(changes))
    return next_run
