"""``CronManager``: the seed's interface on a persistent APScheduler scheduler.

How a pass works (in the scheduler's worker thread, never on the event loop):

1. Apply the control plane: ``tasks`` rows whose version changed (written here or by the
   command line in another process) become added, changed, paused or removed jobs; run-now
   requests become manual claims.
2. Find the due jobs, split each one's slots into the one to run and the missed ones
   (:func:`nanobot.cron.schedules.due_slots`, by the task's schedule), and in ONE
   transaction: advance the jobs in the job store, claim the slots to run in ``task_runs``,
   record the missed slots, and mirror the next run times into ``tasks``.
   The same transaction claims the pending retries that are due (attempt 2, 3... of a failed
   slot, :mod:`nanobot.cron.retries`), or records them missed or given up.
3. Hand each slot (and attempt) this transaction claimed to the event loop, which runs it.

Outcomes are written in batches by the same worker thread, so history never blocks the loop.

Only the holder of the scheduling lease schedules (:mod:`nanobot.lease`). In the service, the
service holds the lease and hands it to the manager (:meth:`CronManager.use_lease`). A manager
used as a library (a script calling ``get_cron_manager().register_task(...)`` and ``await
start_task(...)``) takes the lease itself when it is free, and keeps it renewed while it runs;
when another process holds it (a running service), the manager is a *client* of the control
plane: ``start_task`` stores the task started and that service schedules it; a task that cannot
be stored is refused (:class:`nanobot.exceptions.TaskNotStorableError`).

Before any run starts and at every step of a run, the lease is checked by this process's own
monotonic clock (no database round trip): a leader frozen past its lease (SIGSTOP, a paused
VM) starts nothing when it resumes, and not one more step of its runs in flight executes.

A claimed slot that comes while a run of its task still goes is decided by the task's overlap
policy (:mod:`nanobot.cron.overlap`) when the loop is about to start it: started, skipped,
buffered until the run ends, or started once the run in flight is cancelled.

Threads: the event loop owns ``_inflight``, ``_buffered``, ``_delayed``, ``_pending`` and the
runs; the worker thread owns the passes, the job store, ``_applied``, ``_backfills`` and the
retries' bookkeeping (``_retries``, ``_next_slots``, ``_claimed_slots``, ``_paused_names``),
since it also writes the outcomes that plan retries; ``_lock`` guards the registrations that
both read.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Connection, Engine, select, update

from nanobot.bus import MessageBus, get_bus
from nanobot.config import get_config
from nanobot.cron import autopause, backfill, control, history, retries
from nanobot.cron.aps_adapter import (
    EPHEMERAL,
    PERSISTENT,
    JobSpec,
    JobState,
    NanobotScheduler,
)
from nanobot.cron.history import Claim, Fenced, Finish
from nanobot.cron.overlap import (
    CANCELLED_BY_NEXT,
    Action,
    Overlap,
    RunKind,
    decide,
    skip_reason,
)
from nanobot.cron.overlap import DEFAULT as DEFAULT_OVERLAP
from nanobot.cron.pings import Pinger
from nanobot.cron.retention import HistoryTrimmer
from nanobot.cron.retries import DEFAULT_BACKOFF, NO_RETRIES, PendingRetry, RetryPolicy
from nanobot.cron.schedules import AtSchedule, IntervalSchedule, slot_at_or_after
from nanobot.cron.task import CronTask, TaskDefinition, definition_of
from nanobot.db import get_engine, read_transaction, upgrade_database, write_transaction
from nanobot.exceptions import (
    InvalidTaskError,
    NotLeaderError,
    TaskError,
    TaskNotStorableError,
    UnknownTaskError,
)
from nanobot.heartbeat import HeartbeatMonitor, get_heartbeat_monitor
from nanobot.heartbeat.store import drop_components
from nanobot.lease import SchedulerLease, holder_id
from nanobot.loopwatch import FencedError, Stepper
from nanobot.models import MisfirePolicy, Task, TaskOutcome, error_text, utcnow
from nanobot.node import node_name
from nanobot.times import Clock, iso

log = structlog.get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)

FLUSH_RETRY_S: Final = 1.0
FLUSH_WINDOW_S: Final = 0.02
# How long a shutdown waits for outcomes to be written while the database does not answer.
SHUTDOWN_FLUSH_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class _Launch:
    """A claimed slot handed from the worker thread to the event loop, its task built.

    ``dispatched`` is False for a slot claimed well ahead of its instant: it is marked in the
    database just before it starts (see :mod:`nanobot.cron.history`).
    """

    name: str
    slot: datetime
    run_id: int
    manual: bool
    task: CronTask | None
    build_error: str | None = None
    dispatched: bool = True
    # 1: the slot's run; 2...: its retries (nanobot.cron.retries).
    attempt: int = 1
    kind: RunKind = RunKind.SCHEDULED


@dataclass(slots=True)
class _Running:
    """A run in flight (event loop): its asyncio task, slot, monotonic start and interval."""

    run: asyncio.Task[None]
    slot: datetime
    started: float
    interval: float
    kind: RunKind


@dataclass(frozen=True, slots=True)
class RunInFlight:
    """A run of this process in flight, as status and metrics show it."""

    task: str
    run_id: int
    scheduled_at: datetime
    age_s: float
    bound_s: float | None
    overrunning: bool


# Health updates and task.finished events of finished runs handled per loop iteration.
AFTER_RUNS_CHUNK: Final = 200
# Launches handed to the loop in one go are started this many per loop iteration, so that a burst
# of thousands of due tasks never holds the event loop for long.
LAUNCH_CHUNK: Final = 25
# The instant of launches that start at once whatever their slot (manual runs).
NOW_SLOT: Final = datetime.min.replace(tzinfo=UTC)
# Above this many changed tasks, the reconciliation reads the whole tasks table instead.
RECONCILE_IN_MAX: Final = 500
# How far ahead of its time a slot is claimed at least; the loop then starts it at its exact time.
SCHEDULE_LEAD: Final = 0.05
# ... and at most, for a burst of many slots at one instant.
MAX_LEAD: Final = 5.0
# A slot claimed at most this far ahead of its instant is dispatched at its claim; one claimed
# further ahead (a burst) is marked dispatched MARK_AHEAD seconds before its instant.
DISPATCH_AHEAD: Final = 2 * SCHEDULE_LEAD
MARK_AHEAD: Final = SCHEDULE_LEAD
# How long a shutdown waits for such marks in progress.
MARK_WAIT_S: Final = 5.0
# Longest period of the watch over runs in flight (overruns).
WATCH_PERIOD_S: Final = 1.0
# A pass's cost per due slot is learnt from passes with at least this many (first guess below).
COST_SAMPLE_MIN: Final = 50
INITIAL_COST_PER_JOB: Final = 0.0002


TASK_PREFIX: Final = "task:"


def task_component(name: str) -> str:
    """The heartbeat component that stands for a task."""
    return f"{TASK_PREFIX}{name}"


def _retry_policy(definition: TaskDefinition) -> RetryPolicy:
    return RetryPolicy(definition.retries, definition.retry_backoff or DEFAULT_BACKOFF)


@dataclass(frozen=True, slots=True)
class _DueRetries:
    """What a pass does with the pending retries that are due (worker thread)."""

    claims: list[PendingRetry]
    # Too late after a restart, by the task's misfire policy: recorded missed.
    missed: list[tuple[PendingRetry, float]]
    # The task's next slot came first: the slot's remaining attempts are given up.
    given_up: list[tuple[PendingRetry, datetime]]
    # Of a task removed, stopped or paused meanwhile: forgotten.
    dropped: list[PendingRetry]
    # The job of each retry to claim (its task class and arguments).
    jobs: dict[str, JobState] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.claims or self.missed or self.given_up or self.dropped)


def _misfire_and_window(policy: MisfirePolicy, window: float | None) -> tuple[MisfirePolicy, float]:
    """What the scheduler's due() needs of a task: its misfire policy and its catch-up window
    (0: none; the SKIP grace comes from the schedule)."""
    return policy, window or 0.0


class CronManager:
    """Registers, starts, stops and runs periodic tasks; their schedules survive restarts.

    ``engine`` defaults to the configured database, ``clock`` (an aware-UTC ``now``) to the
    real one, ``poll_interval`` to ``cron.poll_interval``: the longest time between two passes,
    which bounds how long a change written by another process takes to apply.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        node: str | None = None,
        clock: Clock | None = None,
        poll_interval: float | None = None,
        bus: MessageBus | None = None,
        monitor: HeartbeatMonitor | None = None,
        fence: Callable[[Connection], bool] | None = None,
    ) -> None:
        self._engine = engine
        self._node = node
        self._clock = clock or utcnow
        self._poll_interval = poll_interval
        self._bus = bus
        self._monitor = monitor
        # Called inside every transaction that claims slots: False means this process may no
        # longer schedule (it lost the scheduling lease), and nothing is claimed.
        self.fence = fence
        self._health_registered: set[str] = set()
        self._registered: dict[str, CronTask] = {}
        self._ephemeral: dict[str, TaskDefinition] = {}
        self._built: dict[str, tuple[str, str, CronTask]] = {}
        # The stored timeout and jitter of each task (cron add --timeout, the API): options that
        # a class path and its kwargs do not carry, applied to every instance built from them.
        self._stored_options: dict[str, tuple[float | None, float | None]] = {}
        # name -> run id -> run, for every run in flight (several under the overlap policy
        # allow, a forced run or a backfill).
        self._inflight: dict[str, dict[int, _Running]] = {}
        # The slot of each buffer_one task held to start when its run in flight ends.
        self._buffered: dict[str, _Launch] = {}
        # Each task's overlap policy (written by the worker thread, read by the loop).
        self._overlaps: dict[str, Overlap] = {}
        # Pending backfills (nanobot.cron.backfill) and the last slot each one claimed here;
        # worker thread only.
        self._backfills: dict[str, backfill.BackfillJob] = {}
        self._backfill_after: dict[str, datetime] = {}
        self._cancel_reasons: dict[int, str] = {}
        self._applied: dict[str, int] = {}
        self._policies: dict[str, tuple[MisfirePolicy, float]] = {}
        self._retry_policies: dict[str, RetryPolicy] = {}
        # Worker thread: each task's pending retry (a mirror of tasks.retry_*, loaded at
        # start), its next slot and latest claimed slot as the passes left them, and the
        # paused tasks (a paused task gets no retry).
        self._retries: dict[str, PendingRetry] = {}
        self._next_slots: dict[str, datetime | None] = {}
        self._claimed_slots: dict[str, datetime] = {}
        self._paused_names: set[str] = set()
        # Seconds between runs by each task's stored schedule (a cron task's longest gap, 0 for
        # a one-shot): the instance built from stored arguments may not know its schedule.
        self._periods: dict[str, float] = {}
        self._broken: dict[str, str | None] = {}
        self._known_broken: set[str] = set()
        self._scheduler: NanobotScheduler | None = None
        self._first_reconcile = True
        self._last_reconcile = 0.0
        self._pending: list[Finish] = []
        self._flusher: asyncio.Task[None] | None = None
        # Per-run bookkeeping of the event loop done once per burst, not once per run
        # (see _after_runs): health updates of task components and task.finished events.
        self._health_pending: list[tuple[str, float, TaskOutcome, str | None]] = []
        self._announce_pending: list[Finish] = []
        self._after_runs_task: asyncio.Task[None] | None = None
        self._trimmer: HistoryTrimmer | None = None
        # Next-run mirrors waiting for their run's outcome (see _pass); worker thread only.
        self._next_mirrors: dict[str, tuple[datetime | None, int]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._delayed: dict[datetime, tuple[asyncio.Handle, list[_Launch]]] = {}
        self._lead = SCHEDULE_LEAD
        self._cost_per_job = INITIAL_COST_PER_JOB
        self._default_timeout: float | None = None
        self._pause_default = 0
        # healthchecks.io-style pings of runs (event loop), and each stored task's URL.
        self._pings = Pinger()
        self._ping_urls: dict[str, str | None] = {}
        self._schema_ready = False
        self._lock = threading.RLock()
        self._start_lock: asyncio.Lock | None = None
        self._closing = False
        # The lease this manager schedules under: the service's (use_lease), or its own when
        # used as a library (then renewed by _keeper). None: not scheduling (yet), or a client.
        self._lease: SchedulerLease | None = None
        self._own_lease = False
        self._candidate: SchedulerLease | None = None
        self._keeper: asyncio.Task[None] | None = None
        # The holder of the lease while this manager is a client of the control plane.
        self._client: str | None = None
        # Names started here and not stopped since: kept across a lease lost and regained.
        self._started: set[str] = set()
        # Claimed slots handed to the loop and not yet seen by it (worker -> loop; _lock).
        self._handed: dict[int, _Launch] = {}
        # Slots that reached the loop while it was stopping: released, never started.
        self._held_back: list[_Launch] = []
        self._queued: dict[int, list[_Launch]] = {}
        self._marking: set[asyncio.Task[None]] = set()
        self._undispatch: list[int] = []
        # Run ids of the runs in flight past their bound (see _watch_runs).
        self._overrunning: set[int] = set()
        self._overrun_intervals = 0.0
        self._watch: asyncio.TimerHandle | None = None
        self._exit_hook = False

    # --- plumbing ------------------------------------------------------------------------------

    def use_lease(self, lease: SchedulerLease) -> None:
        """Schedule under ``lease``, which the caller (the service) holds and renews.

        Every claim is fenced by it in the claiming transaction, and every start and every
        step of a run by its remaining time on this process's monotonic clock.
        """
        self._lease = lease
        self._own_lease = False
        self.fence = lease.verify

    def _holds_lease(self) -> bool:
        lease = self._lease
        return lease is None or lease.seconds_left() > 0

    @property
    def client_of(self) -> str | None:
        """The lease holder that schedules for this manager, while it is a client."""
        return self._client

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = get_engine()
            if not self._schema_ready:
                upgrade_database(self._engine)
                self._schema_ready = True
            return self._engine

    @property
    def node(self) -> str:
        if self._node is None:
            self._node = node_name()
        return self._node

    @property
    def poll_interval(self) -> float:
        if self._poll_interval is None:
            self._poll_interval = float(get_config().get("cron.poll_interval", 1.0))
        return self._poll_interval

    @property
    def bus(self) -> MessageBus:
        if self._bus is None:
            self._bus = get_bus()
        return self._bus

    @property
    def monitor(self) -> HeartbeatMonitor:
        if self._monitor is None:
            self._monitor = get_heartbeat_monitor()
        return self._monitor

    def _health(self, name: str, interval: float, outcome: TaskOutcome, error: str | None) -> None:
        """Section 5.2.3 of the seed: a task is a component, ``task:<name>``; a failed run
        puts it in error and the next successful run clears it."""
        if interval <= 0:
            # A one-shot runs once: as a component it would go stale, then stay in error, for
            # ever after. Its outcome is in its history and in 'cron list'.
            return
        component = task_component(name)
        try:
            if component not in self._health_registered:
                # A task that runs hourly must not look stale after two heartbeat intervals.
                self.monitor.register_component(component, stale_after=2 * interval + 60)
                self._health_registered.add(component)
            if outcome is TaskOutcome.SUCCESS:
                self.monitor.update_component_heartbeat(component)
            elif outcome in (TaskOutcome.ERROR, TaskOutcome.TIMEOUT):
                self.monitor.mark_component_error(component, error or outcome.value)
        except Exception:
            # Health reporting must never break a run's bookkeeping.
            log.exception("cron.health_update_failed", task=name)

    def _forget_health(self, name: str) -> None:
        # A health update still waiting for _after_runs must not register the component again.
        self._health_pending = [h for h in self._health_pending if h[0] != name]
        # Whether or not this process registered it: a component left by an earlier process
        # (known to the monitor from the database) must go too.
        component = task_component(name)
        self._health_registered.discard(component)
        try:
            self.monitor.unregister_component(component)
        except Exception:
            log.exception("cron.health_update_failed", task=name)

    def _forget_task_components(self) -> None:
        for component in sorted(self._health_registered):
            self._forget_health(component[len(TASK_PREFIX) :])

    def _known(self, name: str) -> bool:
        if name in self._registered or name in self._ephemeral:
            return True
        with read_transaction(self.engine) as conn:
            return conn.execute(select(Task.id).where(Task.name == name)).first() is not None

    def _require(self, name: str) -> None:
        if not isinstance(name, str) or not self._known(name):
            raise UnknownTaskError(str(name))

    # --- the seed's interface ------------------------------------------------------------------

    def register_task(self, name: str, task: CronTask) -> None:
        """Define a task (it runs once started). Works with no event loop running.

        Registering the same definition again changes nothing, so the schedule keeps its
        phase; a different definition updates the stored task.
        """
        control.check_name(name)
        if not isinstance(task, CronTask):
            raise InvalidTaskError(f"task {name!r} must be a CronTask instance, got {task!r}")
        definition = definition_of(name, task)
        with self._lock:
            self._registered[name] = task
            self._built.pop(name, None)
            self._stored_options.pop(name, None)
        if definition.not_persistable is not None:
            with self._lock:
                self._ephemeral[name] = definition
                self._policies[name] = _misfire_and_window(
                    definition.misfire_policy, definition.catch_up_window
                )
                self._periods[name] = definition.interval
                self._ping_urls[name] = definition.ping_url
                self._retry_policies[name] = _retry_policy(definition)
                self._overlaps[name] = definition.overlap
            log.warning(
                "cron.task_not_persistent",
                task=name,
                reason=definition.not_persistable,
                consequence="it runs in this process only and will not survive a restart",
            )
            return
        outcome, info = control.upsert_definition(self.engine, definition)
        if outcome == "updated":
            log.info("cron.task_updated", task=name, interval_s=info.interval)
            self._wakeup()
        elif outcome == "created":
            log.info("cron.task_registered", task=name, interval_s=info.interval)
        else:
            log.info("cron.task_unchanged", task=name, interval_s=info.interval)

    def unregister_task(self, name: str) -> None:
        """Forget a task: its run in flight is cancelled (recorded ``cancelled``), its job and
        stored definition removed. Its history stays until retention prunes it."""
        self._require(name)
        self._cancel_run(name, "the task was unregistered")
        self._started.discard(name)
        with self._lock:
            task = self._registered.pop(name, None)
            ephemeral = self._ephemeral.pop(name, None)
            self._built.pop(name, None)
            self._stored_options.pop(name, None)
        if task is not None:
            task.set_running(False)
        self._forget_health(name)
        if ephemeral is not None:
            if self._scheduler is not None:
                self._scheduler.remove(name, EPHEMERAL)
        else:
            control.remove_task(self.engine, name)
            self._wakeup()
        log.info("cron.task_unregistered", task=name)

    def get_task(self, name: str) -> CronTask:
        """The task registered under ``name`` (built from its stored definition if need be)."""
        with self._lock:
            task = self._registered.get(name)
        if task is not None:
            return task
        info = control.get_task(self.engine, name)
        return self._instance(name, info.task_class, info.kwargs)

    def list_tasks(self) -> list[str]:
        """Names of every task: registered here first, then the others stored."""
        with self._lock:
            names = list(self._registered)
        with read_transaction(self.engine) as conn:
            stored = conn.execute(select(Task.name).order_by(Task.name)).scalars().all()
        return names + [n for n in stored if n not in names]

    async def start_task(self, name: str) -> None:
        """Schedule a task: its first run is now, unless it already has a persisted schedule."""
        await asyncio.to_thread(self._require, name)
        await self.start()
        if self._scheduler is None:
            # A client: the process that holds the lease schedules the stored task.
            self._refuse_unstorable(name)
            await asyncio.to_thread(control.start_task, self.engine, name)
            self._started.add(name)
            self._set_running(name, True)
            log.info("cron.task_started", task=name, scheduled_by=self._client)
            return
        scheduler = self._require_scheduler()
        if name in self._ephemeral:
            definition = self._ephemeral[name]
            now = self._clock()
            await scheduler.run_in_worker(self._add_ephemeral, scheduler, definition, now)
        else:
            await asyncio.to_thread(control.start_task, self.engine, name)
            await scheduler.run_in_worker(self._reconcile_now, scheduler)
        self._started.add(name)
        self._set_running(name, True)
        scheduler.wakeup()
        log.info("cron.task_started", task=name)

    def _refuse_unstorable(self, name: str) -> None:
        definition = self._ephemeral.get(name)
        if definition is None:
            return
        raise TaskNotStorableError(
            f"task {name!r} cannot be stored ({definition.not_persistable}), and the tasks are "
            f"scheduled by another process ({self._client}), which could not build it: define "
            "its class in an importable module with JSON arguments, or run it in that process"
        )

    async def stop_task(self, name: str) -> None:
        """Stop scheduling a task and cancel its run in flight (recorded ``cancelled``)."""
        await asyncio.to_thread(self._require, name)
        self._started.discard(name)
        if name in self._ephemeral:
            if self._scheduler is not None:
                await self._scheduler.run_in_worker(self._scheduler.remove, name, EPHEMERAL)
        else:
            await asyncio.to_thread(control.pause_task, self.engine, name)
            if self._scheduler is not None:
                await self._scheduler.run_in_worker(self._reconcile_now, self._scheduler)
        await self._cancel_and_wait(name, "the task was stopped")
        self._set_running(name, False)
        log.info("cron.task_stopped", task=name)

    async def start_all_tasks(self) -> None:
        """Start every task registered in this process (stored tasks run once the scheduler
        starts, whoever registered them). A task started before and not stopped since is left
        as it is: a pause from the command line since then stands."""
        await self.start()
        for name in list(self._registered):
            if name not in self._started:
                await self.start_task(name)

    async def stop_all_tasks(self) -> None:
        """Stop every task registered in this process, as in the seed. To stop the service
        while keeping every schedule for the next start, use :meth:`shutdown` instead."""
        for name in list(self._registered):
            await self.stop_task(name)

    # --- beyond the seed -----------------------------------------------------------------------

    async def pause_task(self, name: str) -> None:
        """Stop scheduling a task; a run in flight finishes. Resume keeps its phase."""
        await self._change_stored(name, control.pause_task, "stop it instead of pausing it")
        log.info("cron.task_paused", task=name)

    async def resume_task(self, name: str) -> None:
        """Schedule a paused task again at the next slot of its original grid."""
        await self._change_stored(name, control.resume_task, "start it instead")
        log.info("cron.task_resumed", task=name)

    async def _change_stored(
        self, name: str, change: Callable[[Engine, str], Any], instead: str
    ) -> None:
        """Apply a control-plane change to a stored task, and to the running scheduler now."""
        await asyncio.to_thread(self._require, name)
        if name in self._ephemeral:
            raise InvalidTaskError(f"task {name!r} is not stored; {instead}")
        await asyncio.to_thread(change, self.engine, name)
        if self._scheduler is not None:
            await self._scheduler.run_in_worker(self._reconcile_now, self._scheduler)

    async def run_task_now(self, name: str) -> None:
        """Run a task once now, outside its schedule (its schedule is unchanged)."""
        await asyncio.to_thread(self._require, name)
        if name in self._ephemeral:
            await self.start()
            if self._scheduler is None:
                self._refuse_unstorable(name)
            scheduler = self._require_scheduler()
            definition = self._ephemeral[name]
            await scheduler.run_in_worker(self._claim_manual_ephemeral, definition)
            return
        await asyncio.to_thread(control.request_run, self.engine, name)
        self._wakeup()

    async def history(self, name: str, limit: int = 20) -> list[control.RunInfo]:
        """The last ``limit`` runs (or missed and skipped slots) of a task, newest first."""
        return await asyncio.to_thread(control.task_history, self.engine, name, limit)

    def is_alive(self) -> bool:
        """True while the scheduler runs and its last pass is recent."""
        scheduler = self._scheduler
        if scheduler is None or not scheduler.dispatching or self._closing:
            return False
        last = scheduler.last_pass_at
        if last is None:
            return True
        return (self._clock() - last).total_seconds() < 3 * self.poll_interval + 5

    @property
    def last_wakeup_at(self) -> datetime | None:
        return self._scheduler.last_pass_at if self._scheduler is not None else None

    def running_tasks(self) -> list[str]:
        return [n for n in self._inflight if self._runs_of(n)]

    def _runs_of(self, name: str) -> dict[int, _Running]:
        """The runs of ``name`` in flight, by run id."""
        return {i: r for i, r in self._inflight.get(name, {}).items() if not r.run.done()}

    def runs_in_flight(self) -> list[RunInFlight]:
        """The runs of this process in flight, with their age and overrun bound: one per task,
        its oldest (a task may have several under the overlap policy allow)."""
        now = time.monotonic()
        result = []
        for name, runs in list(self._inflight.items()):
            if not runs:
                continue
            run_id, oldest = min(runs.items(), key=lambda item: item[1].started)
            bound = (
                self._overrun_intervals * oldest.interval if self._overrun_intervals > 0 else None
            )
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

    def cancel_runs(self, reason: str) -> None:
        """Cancel every run in flight now (each is recorded ``cancelled`` with ``reason``); a
        :meth:`shutdown` waiting for them then goes on at once. For a node that lost its lease
        while stopping: another node may start these tasks at any moment."""
        for name in list(self._inflight):
            for run_id, running in self._runs_of(name).items():
                self._cancel_reasons[run_id] = reason
                running.run.cancel()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, *, takeover: bool = False) -> None:
        """Start the scheduler: record runs a dead process left as interrupted, apply the stored
        tasks, and dispatch. Idempotent.

        A manager that was given a lease (:meth:`use_lease`) or a fence schedules under it. One
        used as a library takes the scheduling lease itself if it is free (and renews it until
        :meth:`shutdown`); if another process holds it, this manager schedules nothing and is
        a client of that process (see the module's docstring).

        By default only this node's runs left ``running`` are recorded interrupted (another
        process may be running its own). A service that has just taken the scheduling lease
        passes ``takeover=True``: every run left ``running`` belonged to a leader now gone.
        """
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._scheduler is not None and self._scheduler.dispatching:
                return
            if self._lease is None and self.fence is None:
                if not await self._take_own_lease():
                    return
                takeover = True
            self._closing = False
            config = get_config()
            # 0 in the configuration means no limit.
            self._default_timeout = float(config.get("cron.default_timeout", 0.0)) or None
            self._overrun_intervals = float(config.get("cron.overrun_intervals", 3.0))
            self._pause_default = int(config.get("cron.pause_after_failures", 0))
            engine = await asyncio.to_thread(lambda: self.engine)
            interrupted = await asyncio.to_thread(
                history.mark_interrupted,
                engine,
                node=None if takeover else self.node,
                now=self._clock(),
            )
            if interrupted:
                log.warning("cron.runs_interrupted", count=interrupted, node=self.node)
            scheduler = NanobotScheduler(
                engine, process=self._pass, poll_interval=self.poll_interval, clock=self._clock
            )
            self._first_reconcile = True
            self._last_reconcile = 0.0
            self._applied.clear()
            # Before the first pass, in the worker: a pass's own claims must not be mistaken
            # for a gone process's undispatched ones.
            try:
                orphans = await scheduler.run_in_worker(self._recover, scheduler, takeover)
            except Exception as exc:
                log.error("cron.recovery_failed", error=error_text(exc))
                orphans = []
            scheduler.start()
            self._scheduler = scheduler
            for component in orphans:
                self._forget_health(component[len(TASK_PREFIX) :])
            # Tasks only this process can build, started before a lease was lost and regained
            # (or a shutdown and a new start), are scheduled again: their first run is now.
            now = self._clock()
            for name in sorted(self._started):
                definition = self._ephemeral.get(name)
                if definition is not None:
                    await scheduler.run_in_worker(self._add_ephemeral, scheduler, definition, now)
            self._arm_watch()
            self._register_exit_hook()
            log.info("cron.scheduler_started", node=self.node, poll_interval_s=self.poll_interval)

    async def _take_own_lease(self) -> bool:
        """Library use: take the scheduling lease if it is free. False: another process holds
        it, and this manager is its client until the lease is free (see _keep_lease)."""
        lease = self._candidate
        if lease is None:
            engine = await asyncio.to_thread(lambda: self.engine)
            ttl = float(get_config().get("service.lease_ttl", 10.0))
            lease = self._candidate = SchedulerLease(engine, holder_id(self.node), ttl)
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep_lease(lease), name="nanobot-cron-lease"
            )
        if await asyncio.to_thread(lease.try_acquire):
            self._adopt(lease)
            return True
        info = await asyncio.to_thread(lease.holder)
        holder = (info.holder if info is not None else None) or "another process"
        if self._client != holder:
            log.info(
                "cron.client_of_scheduler",
                node=self.node,
                scheduler=holder,
                consequence="tasks started here are stored and scheduled by that process",
            )
        self._client = holder
        return False

    def _adopt(self, lease: SchedulerLease) -> None:
        self._lease, self._own_lease, self.fence = lease, True, lease.verify
        self._client = None

    async def _keep_lease(self, lease: SchedulerLease) -> None:
        """Renew this manager's own lease every ttl/3; when it is lost, stop dispatching at
        once. While it is not held (lost, or held by another process: a client), try to take
        it at the same rate, and schedule once it is taken (the tasks only this process can
        build included): like a standby service, so that a script restarted after a crash
        schedules again once the dead holder's lease has expired."""
        period = lease.ttl / 3
        while True:
            await asyncio.sleep(period)
            if self._lease is lease:
                renewed = False
                budget = lease.seconds_left() - period
                if budget > 0:
                    try:
                        renewed = await asyncio.wait_for(
                            asyncio.to_thread(lease.renew), timeout=budget
                        )
                    except Exception as exc:
                        log.warning("cron.lease_renew_failed", error=error_text(exc))
                if renewed and lease.seconds_left() > period:
                    continue
                log.warning("cron.lease_lost", holder=lease.holder_id, action="stop dispatching")
                await asyncio.shield(
                    self._stop_dispatching(0.0, "the node lost the scheduling lease")
                )
                self._forget_task_components()
                self._lease, self.fence, self._own_lease = None, None, False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.to_thread(lease.release), timeout=period)
                continue
            try:
                acquired = await asyncio.wait_for(
                    asyncio.to_thread(lease.try_acquire), timeout=period
                )
            except Exception as exc:
                log.warning("cron.lease_unavailable", error=error_text(exc))
                acquired = False
            if acquired:
                log.info("cron.lease_taken", holder=lease.holder_id, epoch=lease.epoch)
                self._adopt(lease)
                await asyncio.shield(self.start(takeover=True))

    async def shutdown(self, grace: float | None = None, *, standby: bool = False) -> None:
        """Stop dispatching, let runs in flight finish for up to ``grace`` seconds, cancel the
        rest (recorded ``cancelled``) and write all history; slots claimed ahead of their
        instant are released (caught up at the next start). Schedules stay stored. A lease this
        manager took itself is released. Idempotent.

        ``standby``: the process goes on as a standby (it lost the lead); the ``task:<name>``
        components it kept are unregistered, since a standby runs no task and they would go
        stale there (the leader's own components stand for the tasks)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await self._stop_dispatching(grace, "the scheduler shut down")
        if standby:
            self._forget_task_components()
        self._candidate = None
        if self._own_lease and self._lease is not None:
            lease, self._lease, self.fence, self._own_lease = self._lease, None, None, False
            try:
                await asyncio.to_thread(lease.release)
            except Exception as exc:
                log.warning("cron.lease_release_failed", error=error_text(exc))

    async def _stop_dispatching(self, grace: float | None, reason: str) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            scheduler = self._scheduler
            if scheduler is None or self._closing:
                return
            if grace is None:
                grace = float(get_config().get("service.shutdown_grace", 10.0))
            # Let the pass in progress hand over what it claimed before nothing more may start.
            await scheduler.quiesce()
            self._closing = True
            self._disarm_watch()
            if self._marking:
                await asyncio.wait(set(self._marking), timeout=MARK_WAIT_S)
            # Slots claimed ahead of their instant and not started: they were never due.
            unstarted = self._take_unstarted()
            if unstarted:
                await scheduler.run_in_worker(self._release_unstarted, scheduler, unstarted)
            running = [r.run for n in list(self._inflight) for r in self._runs_of(n).values()]
            if running and grace > 0:
                log.info("cron.waiting_for_runs", count=len(running), grace_s=grace)
                await asyncio.wait(running, timeout=grace)
            for name in list(self._inflight):
                await self._cancel_and_wait(name, reason)
            try:
                async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                    await self.flush()
            except TimeoutError:
                # The database does not answer: stop anyway. The claims of these runs stay
                # "running" and are recorded interrupted when a scheduler next starts.
                log.error("cron.history_unwritten", count=len(self._pending))
                if self._flusher is not None:
                    self._flusher.cancel()
                self._pending = []
            await asyncio.to_thread(scheduler.close)
            await self._pings.close()
            self._scheduler = None
            for task in self._registered.values():
                task.set_running(False)
            log.info("cron.scheduler_stopped", node=self.node, reason=reason)

    def _take_unstarted(self) -> list[_Launch]:
        """Every claimed slot this process has not started: timers cancelled, lists emptied."""
        unstarted: list[_Launch] = []
        for handle, launches in self._delayed.values():
            handle.cancel()
            unstarted.extend(launches)
        self._delayed.clear()
        unstarted.extend(self._held_back)
        self._held_back = []
        for launches in self._queued.values():
            unstarted.extend(launches)
        self._queued.clear()
        unstarted.extend(self._buffered.values())
        self._buffered.clear()
        with self._lock:
            unstarted.extend(self._handed.values())
            self._handed.clear()
        return unstarted

    def _release_unstarted(
        self, scheduler: NanobotScheduler | None, launches: list[_Launch]
    ) -> None:
        """Release claims that never started (worker thread, or the exiting main thread).

        Their rows go and their jobs move back to them, in one transaction fenced by the
        lease, so that each slot runs at its instant or is caught up at the next start. A node
        that no longer leads only says they never started, for the next leader to release.
        """
        ids = [launch.run_id for launch in launches]
        try:
            with write_transaction(self.engine) as conn:
                self._check_fence(conn)
                released = history.release_claims(conn, ids)
                # A backfill's slot released is claimed again by the backfill, not requested.
                backfilled = {(x.name, x.slot) for x in launches if x.kind is RunKind.BACKFILL}
                stored = [
                    r
                    for r in released
                    if r[0] not in self._ephemeral and (r[0], r[1]) not in backfilled
                ]
                self._rewind(conn, scheduler, stored)
        except NotLeaderError:
            log.warning("cron.claims_left", count=len(ids), reason="this node no longer leads")
            try:
                history.undispatch(self.engine, ids)
            except Exception as exc:
                log.error("cron.release_failed", count=len(ids), error=error_text(exc))
            return
        except Exception as exc:
            log.error("cron.release_failed", count=len(ids), error=error_text(exc))
            return
        if released:
            log.info(
                "cron.claims_released",
                count=len(released),
                reason="claimed ahead of an instant that had not come",
            )

    def _rewind(
        self,
        conn: Connection,
        scheduler: NanobotScheduler | None,
        released: list[tuple[str, datetime, bool]],
    ) -> None:
        earliest: dict[str, datetime] = {}
        for name, slot, manual in released:
            if not manual and (name not in earliest or slot < earliest[name]):
                earliest[name] = slot
        if scheduler is not None and earliest:
            scheduler.rewind(conn, earliest)
        history.restore_slots(conn, released)

    def _register_exit_hook(self) -> None:
        # A script may return from asyncio.run() right after start_task, without shutdown():
        # what this manager still holds is written when the interpreter exits.
        if not self._exit_hook:
            self._exit_hook = True
            atexit.register(_at_exit, weakref.ref(self))

    def _exit_flush(self) -> None:
        """At interpreter exit: write recorded outcomes, release unstarted claims and this
        manager's own lease. Synchronous: no event loop runs any more."""
        unstarted = self._take_unstarted()
        if unstarted:
            self._release_unstarted(self._scheduler, unstarted)
        pending, self._pending = self._pending, []
        if pending:
            try:
                fenced = history.write_finishes(self.engine, self._plan_retries(pending))
            except Exception as exc:
                log.error("cron.history_unwritten", count=len(pending), error=error_text(exc))
            else:
                self._log_fenced([f for f in fenced if f.recorded != f.finish.outcome.value])
        if self._own_lease and self._lease is not None:
            lease, self._lease, self._own_lease = self._lease, None, False
            with contextlib.suppress(Exception):
                lease.release()

    async def flush(self) -> None:
        """Wait until every recorded outcome is written to the database (and its health update
        and ``task.finished`` event are done)."""
        while self._pending or (self._flusher is not None and not self._flusher.done()):
            if self._flusher is None or self._flusher.done():
                self._start_flusher()
            assert self._flusher is not None
            await asyncio.shield(self._flusher)
        if self._after_runs_task is not None and not self._after_runs_task.done():
            await asyncio.shield(self._after_runs_task)

    # --- the pass (worker thread) --------------------------------------------------------------

    def _pass(self, scheduler: NanobotScheduler, now: datetime) -> float | None:
        engine = self.engine
        # The control plane is read at most once per poll interval: passes for due slots can
        # come many times a second, and changes made in this process apply at once anyway.
        manual: list[tuple[str, datetime, str, dict[str, Any], bool]] = []
        reconciled = time.monotonic() - self._last_reconcile >= self.poll_interval * 0.9
        if reconciled:
            manual = self._reconcile(scheduler, now)
        # Slots due within the lead are claimed now and started by the loop at their exact time,
        # so that the pass's own duration does not make every start late.
        horizon = now + timedelta(seconds=self._lead + SCHEDULE_LEAD)
        started = time.perf_counter()
        due = scheduler.due(now, horizon, dict(self._policies))
        claims: list[Claim] = []
        unrun: list[Finish] = []
        next_runs: dict[str, tuple[datetime | None, int]] = {}
        launches: dict[tuple[str, datetime], tuple[str, dict[str, Any], bool, bool]] = {}
        # A slot this close is dispatched by its claim; one further ahead is marked just
        # before its instant, so that a stop or a crash before then leaves it to catch up.
        dispatch_by = now + timedelta(seconds=DISPATCH_AHEAD)
        for job in due:
            version = self._applied.get(job.name)
            if job.store == PERSISTENT and version is not None:
                next_runs[job.name] = (job.next_run_at, version)
            self._next_slots[job.name] = job.next_run_at
            if job.missed_count and job.missed_first is not None:
                unrun.append(
                    Finish(
                        task=job.name,
                        run_id=None,
                        scheduled_at=job.missed_first,
                        outcome=TaskOutcome.MISSED,
                        started_at=None,
                        finished_at=now,
                        error=(
                            f"{'at least ' if job.missed_capped else ''}{job.missed_count} "
                            "slot(s) passed while nothing could run them"
                        ),
                        slots=job.missed_count,
                        node=self.node,
                    )
                )
            if job.run_slot is None:
                continue
            dispatched = job.run_slot <= dispatch_by
            claims.append(Claim(job.name, job.run_slot, dispatched=dispatched))
            launches[(job.name, job.run_slot)] = (job.task_class, job.kwargs, False, dispatched)
        kinds: dict[tuple[str, datetime], RunKind] = {}
        for name, slot, task_class, kwargs, forced in manual:
            claims.append(Claim(name, slot, manual=True))
            launches[(name, slot)] = (task_class, kwargs, True, True)
            kinds[(name, slot)] = RunKind.FORCED if forced else RunKind.MANUAL
        due_retries = self._due_retries(scheduler, due, now, horizon)
        unrun.extend(self._missed_retries(due_retries, now))
        claimed: dict[tuple[str, datetime], int] = {}
        retried: dict[tuple[str, datetime], int] = {}
        deferred: dict[str, tuple[datetime | None, int]] = {}
        if due or claims or unrun or due_retries:
            with write_transaction(engine) as conn:
                self._check_fence(conn)
                scheduler.advance_due(conn)
                history.record_unrun(conn, unrun)
                claimed = history.claim_slots(conn, claims, node=self.node)
                retried = self._settle_retries(conn, due_retries)
                # The next-run mirror of a task whose slot this pass claimed is written with
                # that run's outcome, in the same row write as its last-run mirror: one new
                # version of the tasks row per run instead of two (on PostgreSQL each one is a
                # dead row of the whole row's size). The others are written now.
                for name, _slot in claimed:
                    if name in next_runs:
                        deferred[name] = next_runs.pop(name)
                history.set_next_runs(conn, next_runs)
                # A run request is consumed in the transaction that claims its run, so a pass
                # that fails (a lost lease, a locked database) leaves it for the next one.
                for name, requested, *_ in manual:
                    conn.execute(
                        update(Task)
                        .where(Task.name == name, Task.run_requested_at == requested)
                        .values(run_requested_at=None, run_forced=False)
                    )
            scheduler.advance_memory()
            self._next_mirrors.update(deferred)
            for name, slot in claimed:
                if name not in self._claimed_slots or slot > self._claimed_slots[name]:
                    self._claimed_slots[name] = slot
            self._forget_retries(due_retries)
            # Rows inserted for each task, for the history trimmer (see _write_outcomes).
            self.trimmer.count(
                [name for name, _slot in claimed]
                + [f.task for f in unrun]
                + [name for name, _slot in retried]
            )
        # Grouped by instant here, in the worker, so that the loop only arms one timer per
        # instant: sorting thousands of launches there would hold it for tens of milliseconds.
        groups: dict[datetime, list[_Launch]] = {}
        for key, (task_class, kwargs, is_manual, dispatched) in launches.items():
            run_id = claimed.get(key)
            if run_id is None:
                log.info("cron.slot_already_claimed", task=key[0], scheduled_at=key[1].isoformat())
                continue
            launch = self._prepare(
                key[0], task_class, kwargs, key[1], run_id, is_manual, kinds.get(key)
            )
            if not dispatched:
                launch = replace(launch, dispatched=False)
            groups.setdefault(NOW_SLOT if is_manual else key[1], []).append(launch)
        for retry in due_retries.claims:
            run_id = retried.get((retry.task, retry.slot))
            if run_id is None:
                log.info(
                    "cron.retry_already_claimed",
                    task=retry.task,
                    scheduled_at=retry.slot.isoformat(),
                    attempt=retry.attempt,
                )
                continue
            job_state = due_retries.jobs[retry.task]
            launch = self._prepare(
                retry.task, job_state.task_class, job_state.kwargs, retry.slot, run_id, False
            )
            groups.setdefault(max(retry.at, now), []).append(replace(launch, attempt=retry.attempt))
        # A missed or given-up retry settled its slot as failed: auto-pause may apply.
        settled = {r.task for r, _ in due_retries.missed + due_retries.given_up}
        if settled:
            scheduler.call_soon(self._pause_soon, sorted(settled))
        if groups:
            with self._lock:
                for group in groups.values():
                    self._handed.update((launch.run_id, launch) for launch in group)
            scheduler.call_soon(self._launch_groups, groups)
        if unrun:
            scheduler.call_soon(self._announce_batch, unrun)
        if reconciled and self._backfills:
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
            self._cost_per_job = 0.5 * self._cost_per_job + 0.5 * per_job
        return self._next_wait(scheduler)

    # --- retries in the pass (worker thread) ------------------------------------------------

    def _due_retries(
        self, scheduler: NanobotScheduler, due: list[Any], now: datetime, horizon: datetime
    ) -> _DueRetries:
        """Sort the pending retries due by ``horizon``: to claim, missed (too late after a
        restart), given up (the task's next slot came first) or dropped (task gone or paused)."""
        result = _DueRetries([], [], [], [])
        if not self._retries:
            return result
        first_due: dict[str, datetime] = {}
        for job in due:
            slots = [s for s in (job.missed_first, job.run_slot) if s is not None]
            if slots:
                first_due[job.name] = min(slots)
        for name, retry in self._retries.items():
            if name not in self._policies or name in self._paused_names:
                result.dropped.append(retry)
                continue
            if retry.at > horizon:
                continue
            claimed = self._claimed_slots.get(name)
            later = first_due.get(name)
            if later is None or later > retry.at:
                # A slot after this one already claimed (a schedule changed meanwhile).
                later = claimed if claimed is not None and claimed > retry.slot else later
            # The retry would start at its instant, or now if that has passed (a restart).
            if later is not None and later <= max(retry.at, now):
                result.given_up.append((retry, later))
                continue
            policy, window = self._policies[name]
            late = retries.retry_is_late(retry, now, policy, window or None)
            if late is not None:
                result.missed.append((retry, late))
                continue
            job = scheduler.lookup(name, PERSISTENT) or scheduler.lookup(name, EPHEMERAL)
            if job is None:
                result.dropped.append(retry)  # a task stopped in this process only
                continue
            result.jobs[name] = job
            result.claims.append(retry)
        return result

    def _missed_retries(self, due_retries: _DueRetries, now: datetime) -> list[Finish]:
        return [
            Finish(
                task=retry.task,
                run_id=None,
                scheduled_at=retry.slot,
                outcome=TaskOutcome.MISSED,
                started_at=None,
                finished_at=now,
                error=retries.missed_text(retry.attempt, retry.at, late),
                node=self.node,
                attempt=retry.attempt,
            )
            for retry, late in due_retries.missed
        ]

    def _settle_retries(
        self, conn: Connection, due_retries: _DueRetries
    ) -> dict[tuple[str, datetime], int]:
        """In the pass's transaction: claim the due retries like slots (unique per attempt),
        note the given-up ones on their slot's last attempt, count the slots that a missed or
        given-up retry settled as failed, and clear every handled retry from the tasks rows."""
        claims = [
            Claim(r.task, r.slot, attempt=r.attempt, started_at=r.at) for r in due_retries.claims
        ]
        claimed = history.claim_slots(conn, claims, node=self.node)
        for retry, next_slot in due_retries.given_up:
            policy = self._retry_policies.get(retry.task, NO_RETRIES)
            text = retries.given_up_text(retry.attempt, policy.retries, retry.at, next_slot)
            history.note_given_up(conn, retry.task, retry.slot, retry.attempt - 1, text)
            log.warning(
                "task.retry_given_up",
                task=retry.task,
                scheduled_at=retry.slot.isoformat(),
                attempt=retry.attempt,
                next_slot=next_slot.isoformat(),
            )
        history.settle_failed_slots(
            conn,
            [r.task for r, _ in due_retries.missed] + [r.task for r, _ in due_retries.given_up],
        )
        history.clear_retries(
            conn,
            due_retries.claims
            + [r for r, _ in due_retries.missed]
            + [r for r, _ in due_retries.given_up]
            + due_retries.dropped,
        )
        return claimed

    def _forget_retries(self, due_retries: _DueRetries) -> None:
        handled = (
            due_retries.claims
            + [r for r, _ in due_retries.missed]
            + [r for r, _ in due_retries.given_up]
            + due_retries.dropped
        )
        for retry in handled:
            if self._retries.get(retry.task) == retry:
                del self._retries[retry.task]

    def _run_backfills(self, scheduler: NanobotScheduler) -> None:
        """Claim the next slots of each pending backfill and hand them to the loop (worker
        thread, at most once per poll interval; fenced by the lease like every claim)."""
        launches: list[_Launch] = []
        done: list[backfill.BackfillJob] = []
        with write_transaction(self.engine) as conn:
            self._check_fence(conn)
            for name, job in list(self._backfills.items()):
                if job.paused:
                    continue
                claimed, finished = backfill.claim_next(
                    conn, job, node=self.node, after=self._backfill_after.get(name)
                )
                if finished:
                    done.append(job)
                launches.extend(
                    self._prepare(
                        name, job.task_class, job.kwargs, slot, run_id, True, RunKind.BACKFILL
                    )
                    for slot, run_id in claimed
                )
        # Only once committed: a slot whose claim was rolled back is claimed again.
        for launch in launches:
            after = self._backfill_after.get(launch.name, launch.slot)
            self._backfill_after[launch.name] = max(after, launch.slot)
        for job in done:
            name = job.backfill.task
            self._backfills.pop(name, None)
            self._backfill_after.pop(name, None)
            log.info(
                "cron.backfill_done",
                task=name,
                start=job.backfill.start.isoformat(),
                end=job.backfill.end.isoformat(),
            )
        if launches:
            self.trimmer.count([launch.name for launch in launches])
            for launch in launches:
                log.info(
                    "cron.backfill_claimed",
                    task=launch.name,
                    run_id=launch.run_id,
                    scheduled_at=launch.slot.isoformat(),
                )
            with self._lock:
                self._handed.update((launch.run_id, launch) for launch in launches)
            scheduler.call_soon(self._launch_batch, launches)

    def _next_wait(self, scheduler: NanobotScheduler) -> float | None:
        """How long to sleep before the next pass, and the lead that pass will claim with.

        The lead grows with the number of slots due at the next instant, by what a pass has
        been measured to cost per slot, so that a burst of thousands is claimed before its
        instant and starts on time instead of after one long pass. A pending retry wakes the
        pass at its instant too.
        """
        next_run = scheduler.next_run_at()
        if self._retries:
            earliest = min(r.at for r in self._retries.values())
            next_run = earliest if next_run is None else min(next_run, earliest)
        if next_run is None:
            self._lead = SCHEDULE_LEAD
            return None
        count = scheduler.count_due(next_run + timedelta(seconds=SCHEDULE_LEAD))
        self._lead = min(MAX_LEAD, max(SCHEDULE_LEAD, 2 * count * self._cost_per_job))
        return max(0.0, (next_run - self._clock()).total_seconds() - self._lead)

    def _recover(self, scheduler: NanobotScheduler, takeover: bool) -> list[str]:
        """Before a scheduler's first pass: catch up the slots a gone process claimed but never
        dispatched, and drop the components of tasks that no longer exist (returned, for the
        monitor to forget too)."""
        with write_transaction(self.engine) as conn:
            self._check_fence(conn)
            released = history.release_undispatched(conn, node=None if takeover else self.node)
            self._rewind(conn, scheduler, released)
            # The retries a gone leader (or this process before a restart) left pending.
            self._retries = history.pending_retries(conn)
            names = set(conn.execute(select(Task.name)).scalars())
            with self._lock:
                names.update(self._ephemeral)
            orphans = drop_components(conn, TASK_PREFIX, names)
        if released:
            log.info(
                "cron.claims_released",
                count=len(released),
                reason="claimed but never dispatched by a process that is gone",
            )
        for component in orphans:
            log.info("cron.component_dropped", component=component, reason="its task is gone")
        return orphans

    def _check_fence(self, conn: Connection) -> None:
        if self.fence is not None and not self.fence(conn):
            raise NotLeaderError(
                f"node {self.node} no longer holds the scheduling lease: nothing claimed"
            )

    def _busy(self, name: str) -> bool:
        return bool(self._runs_of(name))

    def _reconcile_now(self, scheduler: NanobotScheduler) -> None:
        # Run requests are left to the next pass, which claims them with the due slots.
        self._reconcile(scheduler, self._clock(), take_requests=False)
        scheduler.wakeup()

    def _reconcile(
        self, scheduler: NanobotScheduler, now: datetime, *, take_requests: bool = True
    ) -> list[tuple[str, datetime, str, dict[str, Any], bool]]:
        """Apply changed ``tasks`` rows to the job store; return the run-now requests."""
        self._last_reconcile = time.monotonic()
        engine = self.engine
        with read_transaction(engine) as conn:
            versions = {
                row.name: (row.version, row.run_requested_at)
                for row in conn.execute(select(Task.name, Task.version, Task.run_requested_at))
            }
            changed = [
                n
                for n, (v, req) in versions.items()
                if self._applied.get(n) != v or (req is not None and take_requests)
            ]
            if len(changed) > RECONCILE_IN_MAX:
                # At start every row is new to this process: read them all in one go rather
                # than with an IN list longer than the database accepts.
                wanted = set(changed)
                rows = [row for row in conn.execute(select(Task.__table__)) if row.name in wanted]
            elif changed:
                rows = list(
                    conn.execute(select(Task.__table__).where(Task.name.in_(changed))).all()
                )
            else:
                rows = []
        manual: list[tuple[str, datetime, str, dict[str, Any], bool]] = []
        next_runs: dict[str, tuple[datetime | None, int]] = {}
        to_apply = [row for row in rows if self._applied.get(row.name) != row.version]
        jobs = scheduler.lookup_many(
            [row.name for row in to_apply], all_rows=len(to_apply) > RECONCILE_IN_MAX
        )
        to_add: list[JobSpec] = []
        for row in rows:
            definition = control.stored_definition(row)
            self._policies[row.name] = _misfire_and_window(
                definition.misfire_policy, definition.catch_up_window
            )
            self._periods[row.name] = definition.interval
            self._ping_urls[row.name] = definition.ping_url
            self._retry_policies[row.name] = _retry_policy(definition)
            if row.paused:
                self._paused_names.add(row.name)
            else:
                self._paused_names.discard(row.name)
            self._overlaps[row.name] = definition.overlap
            job = backfill.job_of(row)
            if job is None:
                self._backfills.pop(row.name, None)
                self._backfill_after.pop(row.name, None)
            else:
                before = self._backfills.get(row.name)
                self._backfills[row.name] = job
                if before is None or before.backfill != job.backfill:
                    self._backfill_after.pop(row.name, None)
            if self._applied.get(row.name) != row.version:
                next_run = self._apply_row(
                    scheduler, row, definition, now, jobs.get(row.name), to_add
                )
                self._next_slots[row.name] = next_run
                if next_run != row.next_run_at:
                    next_runs[row.name] = (next_run, row.version)
                self._applied[row.name] = row.version
            if row.run_requested_at is not None and take_requests:
                manual.append(
                    (
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
        removed = [n for n in self._applied if n not in versions]
        if self._first_reconcile:
            removed += [n for n in scheduler.persistent_job_ids() if n not in versions]
            self._first_reconcile = False
        for name in removed:
            self._applied.pop(name, None)
            self._policies.pop(name, None)
            self._periods.pop(name, None)
            self._retry_policies.pop(name, None)
            self._retries.pop(name, None)
            self._overlaps.pop(name, None)
            self._backfills.pop(name, None)
            if scheduler.remove(name, PERSISTENT):
                log.info("cron.job_removed", task=name)
            scheduler.call_soon(self._forget_health, name)
            if name not in self._ephemeral:
                scheduler.call_soon(self._cancel_run, name, "the task was removed")
        if next_runs:
            with write_transaction(engine) as conn:
                history.set_next_runs(conn, next_runs)
        return manual

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
        with self._lock:
            self._stored_options[row.name] = (definition.timeout, definition.jitter)
        if row.paused:
            if job is not None and job.next_run_at is not None:
                scheduler.change(row.name, store=PERSISTENT, next_run_at=None)
                log.info("cron.job_paused", task=row.name)
            return None
        anchor: datetime = row.anchor_at or now
        schedule = definition.the_schedule
        next_run: datetime | None
        if job is None:
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

    def _add_ephemeral(
        self, scheduler: NanobotScheduler, definition: TaskDefinition, now: datetime
    ) -> None:
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

    def _claim_manual_ephemeral(self, definition: TaskDefinition) -> None:
        scheduler = self._require_scheduler()
        now = self._clock()
        with write_transaction(self.engine) as conn:
            self._check_fence(conn)
            claimed = history.claim_slots(conn, [Claim(definition.name, now, True)], node=self.node)
        run_id = claimed.get((definition.name, now))
        if run_id is not None:
            launch = self._prepare(
                definition.name, definition.task_class, definition.kwargs, now, run_id, True
            )
            scheduler.call_soon(self._launch_batch, [launch])

    def _sync_unloadable(self, scheduler: NanobotScheduler) -> None:
        reasons: dict[str, str | None] = dict(scheduler.unloadable())
        with self._lock:
            reasons.update(self._broken)
            self._broken.clear()
        changes = {n: r for n, r in reasons.items() if (r is not None) != (n in self._known_broken)}
        if changes:
            history.set_broken(self.engine, changes)
            for name, reason in changes.items():
                if reason is None:
                    self._known_broken.discard(name)
                else:
                    self._known_broken.add(name)

    # --- runs (event loop) ---------------------------------------------------------------------

    def _instance(self, name: str, task_class: str, kwargs: dict[str, Any]) -> CronTask:
        with self._lock:
            task = self._registered.get(name)
            if task is not None:
                return task
            key = repr(sorted(kwargs.items()))
            cached = self._built.get(name)
            options = self._stored_options.get(name)
        if cached is not None and cached[0] == task_class and cached[1] == key:
            task = cached[2]
        else:
            task = control.build_task(task_class, kwargs)
            with self._lock:
                self._built[name] = (task_class, key, task)
        if options is not None:
            task.timeout, task.jitter = options
        return task

    def _prepare(
        self,
        name: str,
        task_class: str,
        kwargs: dict[str, Any],
        slot: datetime,
        run_id: int,
        manual: bool,
        kind: RunKind | None = None,
    ) -> _Launch:
        """Build (or find) the task of a claimed slot, in the worker thread: importing a class
        and constructing a task is no work for the event loop."""
        if kind is None:
            kind = RunKind.MANUAL if manual else RunKind.SCHEDULED
        try:
            task = self._instance(name, task_class, kwargs)
        except InvalidTaskError as exc:
            return _Launch(name, slot, run_id, manual, None, str(exc), kind=kind)
        return _Launch(name, slot, run_id, manual, task, kind=kind)

    def _launch_batch(self, batch: list[_Launch]) -> None:
        """Start claimed slots: those due now at once, later ones at their exact time."""
        groups: dict[datetime, list[_Launch]] = {}
        for launch in batch:
            groups.setdefault(NOW_SLOT if launch.manual else launch.slot, []).append(launch)
        self._launch_groups(groups)

    def _launch_groups(self, groups: dict[datetime, list[_Launch]]) -> None:
        """Start each instant's launches at that instant: one timer per instant, so that a
        burst of thousands at one instant costs the loop one timer, not thousands. A group
        with undispatched slots fires :data:`MARK_AHEAD` early, to mark them first."""
        loop = asyncio.get_running_loop()
        now = self._clock()
        with self._lock:
            for launches in groups.values():
                for launch in launches:
                    self._handed.pop(launch.run_id, None)
        for slot, launches in groups.items():
            if self._closing:
                self._held_back.extend(launches)
                continue
            early = (slot - now).total_seconds()
            marking = not all(launch.dispatched for launch in launches)
            if marking:
                early -= MARK_AHEAD
            if early <= 0:
                if marking:
                    self._delayed[slot] = (loop.call_soon(self._launch_delayed, slot), launches)
                else:
                    self._launch_chunks(launches)
                continue
            pending = self._delayed.get(slot)
            if pending is None:
                handle = loop.call_later(early, self._launch_delayed, slot)
                self._delayed[slot] = (handle, launches)
            else:
                pending[1].extend(launches)

    def _launch_chunks(self, launches: list[_Launch]) -> None:
        # A few per loop iteration, so that a burst never holds the event loop for long.
        for launch in launches[:LAUNCH_CHUNK]:
            self._launch(launch)
        rest = launches[LAUNCH_CHUNK:]
        if rest:
            # Kept where a stop finds them: a slot not started when the scheduler stops is
            # released, not left behind.
            self._queued[id(rest)] = rest
            asyncio.get_running_loop().call_soon(self._launch_queued, id(rest))

    def _launch_queued(self, key: int) -> None:
        rest = self._queued.pop(key, None)
        if rest is not None:  # else taken by a stop
            self._launch_chunks(rest)

    def _launch_delayed(self, slot: datetime) -> None:
        group = self._delayed.pop(slot, None)
        if group is None:
            return
        waiting = [launch for launch in group[1] if not launch.dispatched]
        ready = [launch for launch in group[1] if launch.dispatched]
        if waiting:
            task = asyncio.get_running_loop().create_task(self._mark_and_launch(slot, waiting))
            self._marking.add(task)
            task.add_done_callback(self._marking.discard)
        if ready:
            self._launch_groups({slot: ready})

    async def _mark_and_launch(self, slot: datetime, launches: list[_Launch]) -> None:
        """Mark slots claimed ahead as dispatched (fenced), then start them at their instant."""
        ids = [launch.run_id for launch in launches]
        try:
            marked = await asyncio.to_thread(history.mark_dispatched, self.engine, ids, self.fence)
        except Exception as exc:
            # Not marked, so not started: released (and caught up) rather than lost.
            log.error("cron.dispatch_failed", count=len(ids), error=error_text(exc))
            self._release_soon(launches)
            return
        if len(marked) < len(ids):
            log.warning(
                "cron.slots_not_dispatched",
                count=len(ids) - len(marked),
                reason="released by another node, or this node no longer leads",
            )
        ready = [replace(launch, dispatched=True) for launch in launches if launch.run_id in marked]
        if ready:
            self._launch_groups({slot: ready})

    def _release_soon(self, launches: list[_Launch]) -> None:
        scheduler = self._scheduler
        if scheduler is not None and not scheduler.closed:
            self._spawn(scheduler.run_in_worker(self._release_unstarted, scheduler, launches))
        else:
            self._held_back.extend(launches)

    def _cancel_delayed(self, name: str, reason: str) -> None:
        """Release the claimed slots of ``name`` that have not started yet (its job stopped,
        removed or unregistered: a slot that never came is not recorded as cancelled)."""
        del reason
        for slot, (handle, launches) in list(self._delayed.items()):
            mine = [launch for launch in launches if launch.name == name]
            if not mine:
                continue
            rest = [launch for launch in launches if launch.name != name]
            if rest:
                self._delayed[slot] = (handle, rest)
            else:
                handle.cancel()
                del self._delayed[slot]
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

        def write() -> None:
            try:
                history.undispatch(self.engine, ids)
            except Exception as exc:
                log.error("cron.undispatch_failed", count=len(ids), error=error_text(exc))

        self._spawn(asyncio.to_thread(write))

    def _announce_batch(self, finishes: list[Finish]) -> None:
        for finish in finishes:
            self._announce(finish)

    def _end_unstarted(self, launch: _Launch, outcome: TaskOutcome, error: str) -> None:
        """Record the end of a claimed slot whose task never started."""
        now = self._clock()
        self._record(
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

    def _launch(self, launch: _Launch) -> None:
        if self._closing:
            self._held_back.append(launch)
            return
        if not self._holds_lease():
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
        counted = {
            i: r for i, r in self._runs_of(launch.name).items() if r.kind is not RunKind.BACKFILL
        }
        overlap = self._overlaps.get(launch.name, DEFAULT_OVERLAP)
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
        task = launch.task
        if task is None:
            error = launch.build_error or "the task could not be built"
            log.error("task.unbuildable", task=launch.name, run_id=launch.run_id, error=error)
            with self._lock:
                self._broken[launch.name] = error
            self._end_unstarted(launch, TaskOutcome.ERROR, error)
            return
        if launch.name in self._known_broken:
            with self._lock:
                self._broken[launch.name] = None
        run = asyncio.get_running_loop().create_task(
            self._execute(launch, task, after), name=f"nanobot-task:{launch.name}"
        )
        self._inflight.setdefault(launch.name, {})[launch.run_id] = _Running(
            run, launch.slot, time.monotonic(), task.get_interval(), launch.kind
        )
        task.set_task(run)
        task.set_running(True)

    async def _execute(
        self, launch: _Launch, task: CronTask, after: list[asyncio.Task[None]] | None = None
    ) -> None:
        timeout = task.timeout if task.timeout is not None else self._default_timeout
        outcome = TaskOutcome.SUCCESS
        error: str | None = None
        started = self._clock()
        deadline = asyncio.timeout(timeout)
        with structlog.contextvars.bound_contextvars(task=launch.name, run_id=launch.run_id):
            try:
                if after:
                    # cancel_previous: the cancelled run really stops (a command's process is
                    # gone) before this one starts.
                    await asyncio.wait(after)
                if task.jitter:
                    await asyncio.sleep(random.uniform(0, task.jitter))
                started = self._clock()
                ping_url = self._ping_urls.get(launch.name) or task.ping_url
                self._pings.started(launch.name, ping_url)
                if _stdlib_log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "task.started",
                        scheduled_at=launch.slot.isoformat(),
                        lateness_s=round((started - launch.slot).total_seconds(), 6),
                        manual=launch.manual,
                    )
                async with deadline:
                    # Every step of the run is fenced by the lease and timed (a step that
                    # blocks the loop is named as the cause of the loop's lag).
                    await Stepper(task.run(), f"task {launch.name}", fence=self._step_fence())
            # A run that did not succeed is logged once, here, with its duration; a success is
            # only a debug line below (task_runs records every run with its times).
            except TimeoutError as exc:
                if deadline.expired():
                    outcome = TaskOutcome.TIMEOUT
                    error = f"the run took longer than its timeout of {timeout} s"
                    log.warning(
                        "task.timed_out", timeout_s=timeout, duration_s=self._since(started)
                    )
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
                finished = self._clock()
                runs = self._inflight.get(launch.name)
                if runs is not None:
                    runs.pop(launch.run_id, None)
                    if not runs:
                        del self._inflight[launch.name]
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
                period = self._periods.get(launch.name, task.get_interval())
                # The task's component is updated with the burst's other runs (_after_runs).
                self._health_pending.append((launch.name, period, outcome, error))
                self._pings.finished(
                    launch.name,
                    self._ping_urls.get(launch.name) or task.ping_url,
                    outcome,
                    error,
                )
                self._record(
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

    def _start_buffered(self, name: str) -> None:
        """Start the slot buffered behind a run that ended (buffer_one), once no counted run
        of its task is left; a stopping scheduler releases it instead (_take_unstarted)."""
        if self._closing or name not in self._buffered:
            return
        if any(r.kind is not RunKind.BACKFILL for r in self._runs_of(name).values()):
            return  # another run still goes (a forced one): the last to end starts it
        self._launch(self._buffered.pop(name))

    def _step_fence(self) -> Callable[[], bool] | None:
        return self._holds_lease if self._lease is not None else None

    # --- overruns (event loop) -----------------------------------------------------------------

    def _arm_watch(self) -> None:
        if self._overrun_intervals > 0 and self._watch is None:
            period = min(WATCH_PERIOD_S, self.poll_interval)
            self._watch = asyncio.get_running_loop().call_later(period, self._watch_runs)

    def _disarm_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _watch_runs(self) -> None:
        """Put a task whose run has been in flight longer than its bound in error, once per
        run; the run's end (a success) clears it."""
        self._watch = None
        if self._closing or self._scheduler is None:
            return
        now = time.monotonic()
        for name, runs in list(self._inflight.items()):
            for run_id, running in list(runs.items()):
                self._watch_run(name, run_id, running, now)
        self._arm_watch()

    def _watch_run(self, name: str, run_id: int, running: _Running, now: float) -> None:
        bound = self._overrun_intervals * running.interval
        age = now - running.started
        if run_id in self._overrunning or age <= bound:
            return
        self._overrunning.add(run_id)
        text = (
            f"a run in flight for {age:.1f}s, longer than its bound of {bound:g}s "
            f"({self._overrun_intervals:g} intervals)"
        )
        log.warning("task.overrunning", task=name, run_id=run_id, age_s=round(age, 3))
        self._health(name, running.interval, TaskOutcome.TIMEOUT, text)

    def _record(self, finish: Finish) -> None:
        self._pending.append(finish)
        if self._flusher is None or self._flusher.done():
            self._start_flusher()
        self._announce(finish)

    def _since(self, started: datetime) -> float:
        return round((self._clock() - started).total_seconds(), 6)

    def _announce(self, finish: Finish) -> None:
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
        while self._health_pending or self._announce_pending:
            while self._health_pending:
                health = self._health_pending[:AFTER_RUNS_CHUNK]
                del self._health_pending[:AFTER_RUNS_CHUNK]
                for name, interval, outcome, error in health:
                    self._health(name, interval, outcome, error)
                await asyncio.sleep(0)
            finishes = self._announce_pending[:AFTER_RUNS_CHUNK]
            del self._announce_pending[:AFTER_RUNS_CHUNK]
            if finishes and self.bus.subscribers("task.finished"):
                await self.bus.publish_many("task.finished", [self._payload(f) for f in finishes])
            await asyncio.sleep(0)

    @staticmethod
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_flusher(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        # Outcomes that come within a few milliseconds are written together: during a burst the
        # worker thread writes a few large batches instead of competing with the loop all along.
        await asyncio.sleep(FLUSH_WINDOW_S)
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                scheduler = self._scheduler
                if scheduler is not None and not scheduler.closed:
                    planned, fenced = await scheduler.run_in_worker(self._write_outcomes, batch)
                else:
                    planned, fenced = await asyncio.to_thread(self._write_outcomes, batch)
                self._log_fenced(fenced)
                self._announce_retries(planned)
                await self._auto_pause(planned)
            except asyncio.CancelledError:
                # The loop ends (a script returned without shutdown()): the exit hook writes it.
                self._pending = batch + self._pending
                raise
            except Exception:
                # Keep the outcomes and try again: history is never dropped for a passing fault.
                log.exception("cron.history_write_failed", pending=len(batch))
                self._pending = batch + self._pending
                await asyncio.sleep(FLUSH_RETRY_S)

    def _pause_soon(self, names: list[str]) -> None:
        """From a pass: slots settled as failed without a run (retries missed or given up)."""
        self._spawn(self._auto_pause_tasks(set(names)))

    async def _auto_pause(self, batch: list[Finish]) -> None:
        """Pause the tasks of ``batch`` whose failed slots in a row reached their threshold
        (:mod:`nanobot.cron.autopause`), and apply the pause to the scheduler at once. A failed
        attempt that a retry follows does not settle its slot: it is not counted."""
        await self._auto_pause_tasks(
            {
                f.task
                for f in batch
                if f.run_id is not None and f.final and f.outcome in autopause.FAILED
            }
        )

    async def _auto_pause_tasks(self, names: set[str]) -> None:
        if not names:
            return
        scheduler = self._scheduler
        in_worker = scheduler is not None and not scheduler.closed
        try:
            call = functools.partial(
                autopause.pause_failing,
                self.engine,
                names,
                default=self._pause_default,
                now=self._clock(),
            )
            if scheduler is not None and in_worker:
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
            self._spawn(self.bus.publish("task.auto_paused", payload))
        if paused and scheduler is not None and in_worker:
            await scheduler.run_in_worker(self._reconcile_now, scheduler)

    def _log_fenced(self, fenced: list[Fenced]) -> None:
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
                node=self.node,
                reason="another node settled this run first; its record stands",
            )

    def _write_outcomes(self, batch: list[Finish]) -> tuple[list[Finish], list[Fenced]]:
        """Write a batch of outcomes with the retries that follow failed attempts, then trim
        the history of the tasks that are due for it, so that no task's history outgrows its
        limit between two cleanups (worker thread; passes count the rows they insert). The
        batch as written (each failed attempt's retry planned), and the fenced finishes."""
        batch = self._plan_retries(batch)
        mirrors = {f.task: m for f in batch if (m := self._next_mirrors.pop(f.task, None))}
        fenced = history.write_finishes(self.engine, batch, next_runs=mirrors)
        lost = {item.finish.run_id for item in fenced}
        for f in batch:
            if f.retry_at is not None and f.run_id not in lost:
                self._retries[f.task] = PendingRetry(
                    f.task, f.scheduled_at, f.attempt + 1, f.retry_at
                )
        self.trimmer.trim(self.engine)
        return batch, fenced

    def _plan_retries(self, batch: list[Finish]) -> list[Finish]:
        """Each failed attempt of a task with retries either gets its retry (not final: its
        slot is not settled) or, when the task's next slot would come first, the note that the
        slot's remaining attempts are given up (:mod:`nanobot.cron.retries`)."""
        planned = []
        for f in batch:
            with self._lock:
                policy = self._retry_policies.get(f.task, NO_RETRIES)
            if f.run_id is None or policy.retries == 0 or f.task in self._paused_names:
                planned.append(f)
                continue
            next_slot = self._next_slots.get(f.task)
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
                planned.append(f)
            elif plan.retry is not None:
                planned.append(replace(f, final=False, retry_at=plan.retry.at))
            else:
                assert next_slot is not None
                assert plan.would_be_at is not None
                text = retries.given_up_text(
                    f.attempt + 1, policy.retries, plan.would_be_at, next_slot
                )
                error = f"{f.error}; {text}" if f.error else text
                planned.append(replace(f, error=error))
        return planned

    def _announce_retries(self, planned: list[Finish]) -> None:
        for f in planned:
            if f.retry_at is not None:
                log.info(
                    "task.retry_scheduled",
                    task=f.task,
                    scheduled_at=f.scheduled_at.isoformat(),
                    attempt=f.attempt + 1,
                    retry_at=f.retry_at.isoformat(),
                )

    @property
    def trimmer(self) -> HistoryTrimmer:
        """Counts the task_runs rows each pass inserts; trims with each batch of outcomes."""
        if self._trimmer is None:
            self._trimmer = HistoryTrimmer(int(get_config().get("cron.history_max_rows", 1000)))
        return self._trimmer

    def _cancel_run(self, name: str, reason: str) -> list[asyncio.Task[None]]:
        """Cancel every run of ``name`` in flight (and release its slots not started)."""
        self._cancel_delayed(name, reason)
        cancelled = []
        for run_id, running in self._runs_of(name).items():
            self._cancel_reasons[run_id] = reason
            running.run.cancel()
            cancelled.append(running.run)
        return cancelled

    async def _cancel_and_wait(self, name: str, reason: str) -> None:
        runs = self._cancel_run(name, reason)
        if runs:
            await asyncio.wait(runs)

    def _set_running(self, name: str, running: bool) -> None:
        with self._lock:
            task = self._registered.get(name) or (
                self._built[name][2] if name in self._built else None
            )
        if task is not None:
            task.set_running(running)

    def _require_scheduler(self) -> NanobotScheduler:
        if self._scheduler is None:
            raise RuntimeError("the scheduler is not running: call start() first")
        return self._scheduler

    def _wakeup(self) -> None:
        if self._scheduler is not None:
            self._scheduler.wakeup()


_manager: CronManager | None = None
_manager_lock = threading.Lock()


def _at_exit(ref: weakref.ref[CronManager]) -> None:
    manager = ref()
    if manager is not None:
        try:
            manager._exit_flush()
        except Exception:
            log.exception("cron.exit_flush_failed")


def runs_in_flight() -> list[RunInFlight]:
    """The runs in flight of the process-wide manager (none if there is no manager)."""
    manager = _manager
    return manager.runs_in_flight() if manager is not None else []


def get_cron_manager() -> CronManager:
    """The process-wide manager, on the configured database."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = CronManager()
        return _manager


def reset_cron_manager() -> None:
    """Forget the process-wide manager (for tests; it must be shut down first)."""
    global _manager
    with _manager_lock:
        _manager = None


def install_cron_manager(manager: CronManager) -> None:
    """Make ``manager`` the process-wide one (the service builds it from its configuration).
    Refused if another one exists already: its registered tasks would be lost."""
    global _manager
    with _manager_lock:
        if _manager is not None and _manager is not manager:
            raise TaskError(
                "a process-wide cron manager exists already: install yours before anything "
                "calls get_cron_manager(), or reset_cron_manager() first"
            )
        _manager = manager
