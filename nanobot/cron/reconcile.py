"""Reconciliation with the control plane: stored ``tasks`` rows become jobs.

``tasks`` rows whose version changed since this process applied them (written here or by the
command line in another process, :mod:`nanobot.cron.control`) become added, changed, paused
or removed jobs in the job store; each task's settings (misfire and retry policies, period,
ping URL, overlap policy, pause, backfill) are noted in the context for the passes and the
loop; pending run-now requests are returned for the pass to claim.

Threads: the scheduler's worker thread only (a pass, or a change made in this process applied
at once through ``scheduler.run_in_worker``). It owns :attr:`Reconciler.applied`, which the
pass reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import structlog

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
        self._first = True
        self._last = 0.0

    def reset(self) -> None:
        """Before a new scheduler's first pass: nothing applied yet."""
        self._first = True
        self._last = 0.0
        self.applied.clear()

    def due(self) -> bool:
        """Whether the control plane is to be read in this pass: at most once per poll
        interval, since passes for due slots come many times a second, and changes made in
        this process apply at once anyway."""
        return time.monotonic() - self._last >= self._ctx.poll_interval * 0.9

    def reconcile_now(self, scheduler: NanobotScheduler) -> None:
        """Apply a change made in this process at once, and wake the scheduler."""
        # Run requests are left to the next pass, which claims them with the due slots.
        self.reconcile(scheduler, self._ctx.clock(), take_requests=False)
        scheduler.wakeup()

    def reconcile(
        self, scheduler: NanobotScheduler, now: datetime, *, take_requests: bool = True
    ) -> list[RunRequest]:
        """Apply changed ``tasks`` rows to the job store; return the run-now requests."""
        self._last = time.monotonic()
        versions, rows = self._read_changed(take_requests)
        requests: list[RunRequest] = []
        next_runs: dict[str, tuple[datetime | None, int]] = {}
        to_apply = [row for row in rows if self.applied.get(row.name) != row.version]
        jobs = scheduler.lookup_many(
            [row.name for row in to_apply], all_rows=len(to_apply) > RECONCILE_IN_MAX
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
        self._remove_gone(scheduler, versions)
        if next_runs:
            with write_transaction(self._ctx.engine) as conn:
                history.set_next_runs(conn, next_runs)
        return requests

    def _read_changed(
        self, take_requests: bool
    ) -> tuple[dict[str, control.TaskVersion], list[Any]]:
        """Every stored task's version, and the rows changed since applied (or requested)."""
        with read_transaction(self._ctx.engine) as conn:
            versions = control.task_versions(conn)
            changed = [
                n
                for n, v in versions.items()
                if self.applied.get(n) != v.version
                or (v.run_requested_at is not None and take_requests)
            ]
            # At start every row is new to this process: read them all in one go rather
            # than with an IN list longer than the database accepts.
            rows = control.task_rows(conn, changed, whole_table=len(changed) > RECONCILE_IN_MAX)
        return versions, rows

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
        ctx = self._ctx
        removed = [n for n in self.applied if n not in versions]
        if self._first:
            removed += [n for n in scheduler.persistent_job_ids() if n not in versions]
            self._first = False
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
