"""The pass that claims slots (the scheduler's worker thread, never the event loop).

How a pass works:

1. Apply the control plane (:mod:`nanobot.cron.reconcile`), at most once per poll interval;
   run-now requests become manual claims.
2. Find the due jobs, split each one's slots into the one to run and the missed ones
   (:func:`nanobot.cron.schedules.due_slots`, by the task's schedule), and in ONE
   transaction fenced by the lease: advance the jobs in the job store, claim the slots to run
   in ``task_runs``, record missed and skipped slots, and mirror the next run times into
   ``tasks``. The same transaction claims the pending retries that are due (attempt 2, 3... of
   a failed slot, :mod:`nanobot.cron.retries`), or records them missed or given up.
3. Hand each slot (and attempt) this transaction claimed to the event loop
   (:class:`~nanobot.cron.launcher.Launcher`), grouped by instant, its task already built.
4. Claim the next slots of each pending backfill (:mod:`nanobot.cron.backfill`), at most once
   per poll interval, and say how long to sleep before the next pass.

Threads: the worker thread owns the pass, the lead and cost estimate, and (in the context) the
retries' bookkeeping, the claimed and next slots and the backfills' cursors. What it hands to
the loop goes through ``scheduler.call_soon``, and is noted in ``Launcher.handed`` (under the
lock) until the loop sees it, so that a stop finds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Connection

from nanobot.cron import backfill, control, history, retries
from nanobot.cron.aps_adapter import EPHEMERAL, PERSISTENT, DueJob, NanobotScheduler
from nanobot.cron.context import CronContext
from nanobot.cron.history import Claim, Finish
from nanobot.cron.launcher import NOW_SLOT, SCHEDULE_LEAD, Launcher
from nanobot.cron.overlap import RunKind
from nanobot.cron.reconcile import Reconciler
from nanobot.cron.recorder import Recorder
from nanobot.cron.records import (
    DueRetries,
    GivenUpRetry,
    Launch,
    MissedRetry,
    RunRequest,
    SlotToRun,
)
from nanobot.cron.registry import Registry
from nanobot.cron.retries import NO_RETRIES
from nanobot.cron.task import TaskDefinition
from nanobot.db import write_transaction
from nanobot.exceptions import InvalidTaskError, NotLeaderError
from nanobot.gcsteward import release
from nanobot.models import TaskOutcome, error_text

log = structlog.get_logger(__name__)

# How far ahead of its time a slot is claimed at most, for a burst of many slots at one instant.
MAX_LEAD: Final = 5.0
# A slot claimed at most this far ahead of its instant is dispatched at its claim; one claimed
# further ahead (a burst) is marked dispatched before its instant by the launcher (MARK_AHEAD
# at least, longer for a large burst: launcher._mark_ahead). The default of cron.dispatch_ahead
# (Dispatcher.dispatch_ahead): a crash records the slots claimed this far ahead interrupted,
# not caught up; a longer one means fewer passes (measured, 200 tasks at 1 s: 0.25 s took a
# fifth off the service's CPU per run).
DISPATCH_AHEAD: Final = 2 * SCHEDULE_LEAD
# How long before the next slot it claims a pass wakes at least: its duration at a steady load
# (a few milliseconds), with a margin. Each pass claims up to dispatch_ahead ahead, so with
# hundreds of tasks spread over the second a pass comes every dispatch_ahead - PASS_MARGIN
# seconds: 12 a second, not the 20 of a lead of SCHEDULE_LEAD (each pass has a cost of its own:
# three statements and a fence check).
PASS_MARGIN: Final = 0.02
# A pass's cost per due slot is learnt from passes with at least this many (first guess below).
COST_SAMPLE_MIN: Final = 50
INITIAL_COST_PER_JOB: Final = 0.0002


@dataclass(slots=True)
class _PassPlan:
    """What one pass claims and records, gathered before its transaction (worker thread)."""

    claims: list[Claim] = field(default_factory=list)
    unrun: list[Finish] = field(default_factory=list)
    next_runs: dict[str, tuple[datetime | None, int]] = field(default_factory=dict)
    to_run: dict[tuple[str, datetime], SlotToRun] = field(default_factory=dict)


@dataclass(slots=True)
class _Claimed:
    """What the pass's transaction claimed: run ids by (task, slot), slots and retries."""

    slots: dict[tuple[str, datetime], int] = field(default_factory=dict)
    retries: dict[tuple[str, datetime], int] = field(default_factory=dict)


class Dispatcher:
    """Runs each pass of the scheduler (worker thread)."""

    def __init__(
        self,
        ctx: CronContext,
        registry: Registry,
        reconciler: Reconciler,
        launcher: Launcher,
        recorder: Recorder,
    ) -> None:
        self._ctx = ctx
        self._registry = registry
        self._reconciler = reconciler
        self._launcher = launcher
        self._recorder = recorder
        # The lead of the next pass, and what a pass was measured to cost per due slot.
        self.lead = PASS_MARGIN
        self.cost_per_job = INITIAL_COST_PER_JOB
        # cron.dispatch_ahead, set by the manager at each start before the scheduler's first
        # pass (loop), read by the passes (worker).
        self.dispatch_ahead: float = DISPATCH_AHEAD
        # When the next pass's slots are due and how many (written by the worker as one tuple;
        # the loop reads it for CronManager.backlog).
        self.upcoming: tuple[datetime | None, int] = (None, 0)

    # --- the pass ------------------------------------------------------------------------------

    def run_pass(self, scheduler: NanobotScheduler, now: datetime) -> float | None:
        """One pass (the scheduler's ``process``): claim what is due, hand it to the loop; the
        seconds to sleep before the next pass (None: nothing scheduled)."""
        if not self._ctx.holds_lease():
            # Frozen past the lease (SIGSTOP, a stalled VM) and not yet stepped down: another
            # node may lead and write the job table now. Nothing is written here, not even the
            # control plane's changes, which no fence guards: the leader's index of next run
            # times (nanobot.cron.next_runs) assumes every write of the table is its own.
            raise NotLeaderError(
                f"node {self._ctx.node}: the scheduling lease ran out by this process's clock"
            )
        lost = scheduler.take_lost()
        if lost:
            self._reconciler.apply_again(lost)
        requests: list[RunRequest] = []
        reconciled = self._reconciler.due()
        if reconciled:
            requests = self._reconciler.reconcile(scheduler, now)
        elif self._reconciler.deferred_wait() == 0.0:
            # The rows a start left for later, a chunk per pass (passes follow each other
            # until none is left).
            self._reconciler.apply_deferred(scheduler, now)
        # Slots due within the lead are claimed now and started by the loop at their exact time,
        # so that the pass's own duration does not make every start late.
        horizon = now + timedelta(seconds=max(self.lead + SCHEDULE_LEAD, self.dispatch_ahead))
        started = time.perf_counter()
        # A task whose row is not applied yet is not run with settings not read yet.
        due = scheduler.due(now, horizon, dict(self._ctx.policies), held=self._reconciler.deferred)
        plan = self._plan(due, requests, now)
        due_retries = self._due_retries(scheduler, due, now, horizon)
        plan.unrun.extend(self._missed_retries(due_retries, now))
        claimed = _Claimed()
        if due or plan.claims or plan.unrun or due_retries:
            claimed = self._commit(scheduler, plan, requests, due_retries)
        self._hand_over(scheduler, plan, claimed, due_retries, now)
        if reconciled and self._ctx.backfills:
            try:
                self._run_backfills(scheduler)
            except NotLeaderError:
                raise
            except Exception as exc:
                # The scheduling goes on; the backfills are tried again at the next poll.
                log.error("cron.backfill_failed", error=error_text(exc))
        self._sync_unloadable(scheduler)
        if len(due) >= COST_SAMPLE_MIN:
            per_job = (time.perf_counter() - started) / len(due)
            self.cost_per_job = 0.5 * self.cost_per_job + 0.5 * per_job
        # What a pass of a burst read and built is freed here a slice at a time, not all at
        # once as this function returns (see nanobot.gcsteward.release). Not plan.unrun: the
        # loop announces that list.
        release(due, plan.claims, plan.to_run, plan.next_runs, claimed.slots)
        return self._next_wait(scheduler)

    def _plan(self, due: list[DueJob], requests: list[RunRequest], now: datetime) -> _PassPlan:
        """The claims, missed slots and next-run mirrors of the due jobs and run requests."""
        plan = _PassPlan()
        # A slot this close is dispatched by its claim; one further ahead is marked just
        # before its instant, so that a stop or a crash before then leaves it to catch up.
        dispatch_by = now + timedelta(seconds=self.dispatch_ahead)
        for job in due:
            version = self._reconciler.applied.get(job.name)
            if job.store == PERSISTENT and version is not None:
                plan.next_runs[job.name] = (job.next_run_at, version)
            self._ctx.next_slots[job.name] = job.next_run_at
            if job.slots.missed_count and job.slots.missed_first is not None:
                plan.unrun.append(self._missed(job, now))
            if job.run_slot is None:
                continue
            dispatched = job.run_slot <= dispatch_by
            plan.claims.append(Claim(job.name, job.run_slot, dispatched=dispatched))
            plan.to_run[(job.name, job.run_slot)] = SlotToRun(
                job.task_class, job.kwargs, manual=False, dispatched=dispatched
            )
        for request in requests:
            slot = request.requested_at
            plan.claims.append(Claim(request.name, slot, manual=True))
            plan.to_run[(request.name, slot)] = SlotToRun(
                request.task_class,
                request.kwargs,
                manual=True,
                dispatched=True,
                kind=RunKind.FORCED if request.forced else RunKind.MANUAL,
            )
        return plan

    def _missed(self, job: DueJob, now: datetime) -> Finish:
        missed = job.slots
        assert missed.missed_first is not None
        return Finish(
            task=job.name,
            run_id=None,
            scheduled_at=missed.missed_first,
            outcome=TaskOutcome.MISSED,
            started_at=None,
            finished_at=now,
            error=(
                f"{'at least ' if missed.missed_capped else ''}{missed.missed_count} "
                "slot(s) passed while nothing could run them"
            ),
            slots=missed.missed_count,
            node=self._ctx.node,
        )

    def _commit(
        self,
        scheduler: NanobotScheduler,
        plan: _PassPlan,
        requests: list[RunRequest],
        due_retries: DueRetries,
    ) -> _Claimed:
        """The pass's one transaction, then the bookkeeping of what it committed."""
        ctx = self._ctx
        deferred: dict[str, tuple[datetime | None, int]] = {}
        with write_transaction(ctx.engine) as conn:
            ctx.check_fence(conn)
            scheduler.advance_due(conn)
            history.record_unrun(conn, plan.unrun)
            claimed = _Claimed(history.claim_slots(conn, plan.claims, node=ctx.node))
            claimed.retries = self._settle_retries(conn, due_retries)
            # The next-run mirror of a task whose slot this pass claimed is written with
            # that run's outcome, in the same row write as its last-run mirror: one new
            # version of the tasks row per run instead of two (on PostgreSQL each one is a
            # dead row of the whole row's size). The others are written now.
            for name, _slot in claimed.slots:
                if name in plan.next_runs:
                    deferred[name] = plan.next_runs.pop(name)
            history.set_next_runs(conn, plan.next_runs)
            # A run request is consumed in the transaction that claims its run, so a pass
            # that fails (a lost lease, a locked database) leaves it for the next one.
            for request in requests:
                control.consume_run_request(conn, request.name, request.requested_at)
        scheduler.advance_memory()
        ctx.next_mirrors.update(deferred)
        for name, slot in claimed.slots:
            if name not in ctx.claimed_slots or slot > ctx.claimed_slots[name]:
                ctx.claimed_slots[name] = slot
        self._forget_retries(due_retries)
        # Rows inserted for each task, for the history trimmer (see Recorder.write_outcomes).
        ctx.trimmer.count(
            [name for name, _slot in claimed.slots]
            + [f.task for f in plan.unrun]
            + [name for name, _slot in claimed.retries]
        )
        return claimed

    def _hand_over(
        self,
        scheduler: NanobotScheduler,
        plan: _PassPlan,
        claimed: _Claimed,
        due_retries: DueRetries,
        now: datetime,
    ) -> None:
        """Hand what the pass claimed to the loop, and what it recorded to the recorder."""
        # Grouped by instant here, in the worker, so that the loop only arms one timer per
        # instant: sorting thousands of launches there would hold it for tens of milliseconds.
        groups: dict[datetime, list[Launch]] = {}
        for key, slot in plan.to_run.items():
            run_id = claimed.slots.get(key)
            if run_id is None:
                log.info("cron.slot_already_claimed", task=key[0], scheduled_at=key[1].isoformat())
                continue
            launch = self.prepare(
                key[0], slot.task_class, slot.kwargs, key[1], run_id, slot.manual, slot.kind
            )
            if not slot.dispatched:
                launch = replace(launch, dispatched=False)
            groups.setdefault(NOW_SLOT if slot.manual else key[1], []).append(launch)
        self._group_retries(groups, claimed, due_retries, now)
        # A missed or given-up retry settled its slot as failed: auto-pause may apply.
        settled = {r.task for r in due_retries.settled()}
        if settled:
            scheduler.call_soon(self._recorder.pause_soon, sorted(settled))
        if groups:
            with self._ctx.lock:
                for group in groups.values():
                    self._launcher.handed.update((launch.run_id, launch) for launch in group)
            scheduler.call_soon(self._launcher.launch_groups, groups)
        if plan.unrun:
            scheduler.call_soon(self._recorder.announce_batch, plan.unrun)

    def _group_retries(
        self,
        groups: dict[datetime, list[Launch]],
        claimed: _Claimed,
        due_retries: DueRetries,
        now: datetime,
    ) -> None:
        for retry in due_retries.claims:
            run_id = claimed.retries.get((retry.task, retry.slot))
            if run_id is None:
                log.info(
                    "cron.retry_already_claimed",
                    task=retry.task,
                    scheduled_at=retry.slot.isoformat(),
                    attempt=retry.attempt,
                )
                continue
            job_state = due_retries.jobs[retry.task]
            launch = self.prepare(
                retry.task, job_state.task_class, job_state.kwargs, retry.slot, run_id, False
            )
            groups.setdefault(max(retry.at, now), []).append(replace(launch, attempt=retry.attempt))

    def prepare(
        self,
        name: str,
        task_class: str,
        kwargs: dict[str, Any],
        slot: datetime,
        run_id: int,
        manual: bool,
        kind: RunKind | None = None,
    ) -> Launch:
        """Build (or find) the task of a claimed slot, in the worker thread: importing a class
        and constructing a task is no work for the event loop."""
        if kind is None:
            kind = RunKind.MANUAL if manual else RunKind.SCHEDULED
        try:
            task = self._registry.instance(name, task_class, kwargs)
        except InvalidTaskError as exc:
            return Launch(name, slot, run_id, manual, None, str(exc), kind=kind)
        return Launch(name, slot, run_id, manual, task, kind=kind)

    # --- retries in the pass -------------------------------------------------------------------

    def _due_retries(
        self, scheduler: NanobotScheduler, due: list[DueJob], now: datetime, horizon: datetime
    ) -> DueRetries:
        """Sort the pending retries due by ``horizon``: to claim, missed (too late after a
        restart), given up (the task's next slot came first) or dropped (task gone or paused)."""
        result = DueRetries()
        ctx = self._ctx
        if not ctx.retries:
            return result
        first_due: dict[str, datetime] = {}
        for job in due:
            slots = [s for s in (job.slots.missed_first, job.run_slot) if s is not None]
            if slots:
                first_due[job.name] = min(slots)
        for name, retry in ctx.retries.items():
            if name in self._reconciler.deferred:
                continue  # its row is not applied yet: a later pass settles the retry
            if name not in ctx.policies or name in ctx.paused:
                result.dropped.append(retry)
                continue
            if retry.at > horizon:
                continue
            claimed = ctx.claimed_slots.get(name)
            later = first_due.get(name)
            if later is None or later > retry.at:
                # A slot after this one already claimed (a schedule changed meanwhile).
                later = claimed if claimed is not None and claimed > retry.slot else later
            # The retry would start at its instant, or now if that has passed (a restart).
            if later is not None and later <= max(retry.at, now):
                result.given_up.append(GivenUpRetry(retry, later))
                continue
            policy, window = ctx.policies[name]
            late = retries.retry_is_late(retry, now, policy, window or None)
            if late is not None:
                result.missed.append(MissedRetry(retry, late))
                continue
            state = scheduler.lookup(name, PERSISTENT) or scheduler.lookup(name, EPHEMERAL)
            if state is None:
                result.dropped.append(retry)  # a task stopped in this process only
                continue
            result.jobs[name] = state
            result.claims.append(retry)
        return result

    def _missed_retries(self, due_retries: DueRetries, now: datetime) -> list[Finish]:
        return [
            Finish(
                task=m.retry.task,
                run_id=None,
                scheduled_at=m.retry.slot,
                outcome=TaskOutcome.MISSED,
                started_at=None,
                finished_at=now,
                error=retries.missed_text(m.retry.attempt, m.retry.at, m.late),
                node=self._ctx.node,
                attempt=m.retry.attempt,
            )
            for m in due_retries.missed
        ]

    def _settle_retries(
        self, conn: Connection, due_retries: DueRetries
    ) -> dict[tuple[str, datetime], int]:
        """In the pass's transaction: claim the due retries like slots (unique per attempt),
        note the given-up ones on their slot's last attempt, count the slots that a missed or
        given-up retry settled as failed, and clear every handled retry from the tasks rows."""
        claims = [
            Claim(r.task, r.slot, attempt=r.attempt, started_at=r.at) for r in due_retries.claims
        ]
        claimed = history.claim_slots(conn, claims, node=self._ctx.node)
        for given_up in due_retries.given_up:
            retry, next_slot = given_up.retry, given_up.next_slot
            policy = self._ctx.retry_policies.get(retry.task, NO_RETRIES)
            text = retries.given_up_text(retry.attempt, policy.retries, retry.at, next_slot)
            history.note_given_up(conn, retry.task, retry.slot, retry.attempt - 1, text)
            log.warning(
                "task.retry_given_up",
                task=retry.task,
                scheduled_at=retry.slot.isoformat(),
                attempt=retry.attempt,
                next_slot=next_slot.isoformat(),
            )
        history.settle_failed_slots(conn, [r.task for r in due_retries.settled()])
        history.clear_retries(conn, due_retries.handled())
        return claimed

    def _forget_retries(self, due_retries: DueRetries) -> None:
        pending = self._ctx.retries
        for retry in due_retries.handled():
            if pending.get(retry.task) == retry:
                del pending[retry.task]

    # --- backfills -----------------------------------------------------------------------------

    def _run_backfills(self, scheduler: NanobotScheduler) -> None:
        """Claim the next slots of each pending backfill and hand them to the loop (at most
        once per poll interval; fenced by the lease like every claim)."""
        ctx = self._ctx
        launches: list[Launch] = []
        done: list[backfill.BackfillJob] = []
        with write_transaction(ctx.engine) as conn:
            ctx.check_fence(conn)
            for name, job in list(ctx.backfills.items()):
                if job.paused:
                    continue
                claimed, finished = backfill.claim_next(
                    conn, job, node=ctx.node, after=ctx.backfill_after.get(name)
                )
                if finished:
                    done.append(job)
                launches.extend(
                    self.prepare(
                        name, job.task_class, job.kwargs, slot, run_id, True, RunKind.BACKFILL
                    )
                    for slot, run_id in claimed
                )
        # Only once committed: a slot whose claim was rolled back is claimed again.
        for launch in launches:
            after = ctx.backfill_after.get(launch.name, launch.slot)
            ctx.backfill_after[launch.name] = max(after, launch.slot)
        for job in done:
            self._backfill_done(job)
        if launches:
            ctx.trimmer.count([launch.name for launch in launches])
            for launch in launches:
                log.info(
                    "cron.backfill_claimed",
                    task=launch.name,
                    run_id=launch.run_id,
                    scheduled_at=launch.slot.isoformat(),
                )
            with ctx.lock:
                self._launcher.handed.update((launch.run_id, launch) for launch in launches)
            scheduler.call_soon(self._launcher.launch_batch, launches)

    def _backfill_done(self, job: backfill.BackfillJob) -> None:
        name = job.backfill.task
        self._ctx.backfills.pop(name, None)
        self._ctx.backfill_after.pop(name, None)
        log.info(
            "cron.backfill_done",
            task=name,
            start=job.backfill.start.isoformat(),
            end=job.backfill.end.isoformat(),
        )

    # --- between passes ------------------------------------------------------------------------

    def _next_wait(self, scheduler: NanobotScheduler) -> float | None:
        """How long to sleep before the next pass, and the lead that pass will claim with.

        The lead grows with the number of slots due at the next instant, by what a pass has
        been measured to cost per slot, so that a burst of thousands is claimed before its
        instant and starts on time instead of after one long pass. A pending retry wakes the
        pass at its instant too.
        """
        next_run, count = scheduler.next_wakeup(SCHEDULE_LEAD)
        pending = self._ctx.retries
        if pending:
            earliest = min(r.at for r in pending.values())
            if next_run is None or earliest < next_run:
                next_run = earliest
                count = scheduler.count_due(next_run + timedelta(seconds=SCHEDULE_LEAD))
        deferred = self._reconciler.deferred_wait()  # the next chunk of deferred rows
        self.upcoming = (next_run, count)
        if next_run is None:
            self.lead = PASS_MARGIN
            return deferred
        self.lead = min(MAX_LEAD, max(PASS_MARGIN, 2 * count * self.cost_per_job))
        wait = max(0.0, (next_run - self._ctx.clock()).total_seconds() - self.lead)
        return wait if deferred is None else min(wait, deferred)

    def _sync_unloadable(self, scheduler: NanobotScheduler) -> None:
        """Store which tasks cannot be built or loaded (and which build again)."""
        ctx = self._ctx
        reasons: dict[str, str | None] = dict(scheduler.unloadable())
        with ctx.lock:
            reasons.update(ctx.broken)
            ctx.broken.clear()
        changes = {n: r for n, r in reasons.items() if (r is not None) != (n in ctx.known_broken)}
        if changes:
            history.set_broken(ctx.engine, changes)
            for name, reason in changes.items():
                if reason is None:
                    ctx.known_broken.discard(name)
                else:
                    ctx.known_broken.add(name)

    # --- manual runs of tasks only this process can build --------------------------------------

    def claim_manual_ephemeral(
        self, scheduler: NanobotScheduler, definition: TaskDefinition
    ) -> None:
        """Claim a run-now of a task that is not stored, and hand it to the loop."""
        ctx = self._ctx
        now = ctx.clock()
        with write_transaction(ctx.engine) as conn:
            ctx.check_fence(conn)
            claimed = history.claim_slots(conn, [Claim(definition.name, now, True)], node=ctx.node)
        run_id = claimed.get((definition.name, now))
        if run_id is not None:
            launch = self.prepare(
                definition.name, definition.task_class, definition.kwargs, now, run_id, True
            )
            scheduler.call_soon(self._launcher.launch_batch, [launch])
