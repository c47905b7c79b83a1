"""``CronManager``: the seed's interface on a persistent APScheduler scheduler.

This module is the front door: the public API, the lifecycle (start, stop, the exit hook) and
the scheduling lease. The work is done by collaborators, one module per concept, which share a
:class:`~nanobot.cron.context.CronContext` (each of its fields names its owning thread):

- :mod:`nanobot.cron.registry`: the tasks registered here, and those built from stored rows;
- :mod:`nanobot.cron.reconcile` (worker thread): ``tasks`` rows become jobs;
- :mod:`nanobot.cron.dispatch` (worker thread): the pass that claims slots, retries and
  backfill steps, in one transaction fenced by the lease, and hands them to the loop;
- :mod:`nanobot.cron.launcher` (event loop): delayed launches, overlap decisions, running,
  the overrun watch, cancelling;
- :mod:`nanobot.cron.recorder` (event loop; writes in the worker thread): outcomes written
  in batches, retries planned, announcements, health components, auto-pause;
- :mod:`nanobot.cron.claims`: claims that never started, released;
- :mod:`nanobot.cron.own_lease` (event loop): the lease of a manager used as a library.

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

Threads: the public methods are called on the event loop (``register_task``,
``unregister_task``, ``get_task`` and ``list_tasks`` from any thread); the lifecycle
(:attr:`CronContext.state <nanobot.cron.context.CronContext.state>`) and the lease are the
loop's.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import threading
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Connection, Engine

from nanobot.bus import MessageBus
from nanobot.config import get_config
from nanobot.cron import claims, control, definitions, history
from nanobot.cron.aps_adapter import EPHEMERAL, NanobotScheduler
from nanobot.cron.context import TASK_PREFIX, CronContext, task_component
from nanobot.cron.dispatch import DISPATCH_AHEAD, MAX_LEAD, Dispatcher
from nanobot.cron.launcher import MARK_AHEAD, QUIET_LEAD_S, Launcher
from nanobot.cron.own_lease import OwnLease
from nanobot.cron.reconcile import Reconciler, note_definition
from nanobot.cron.recorder import Recorder
from nanobot.cron.records import Lifecycle, RunInFlight
from nanobot.cron.registry import Registry
from nanobot.cron.task import CronTask, definition_of
from nanobot.exceptions import InvalidTaskError, TaskError, TaskNotStorableError, UnknownTaskError
from nanobot.heartbeat import HeartbeatMonitor
from nanobot.lease import SchedulerLease
from nanobot.models import error_text, utcnow
from nanobot.times import Clock

__all__ = [
    "MARK_AHEAD",
    "PASS_STUCK_S",
    "TASK_PREFIX",
    "CronManager",
    "RunInFlight",
    "get_cron_manager",
    "reset_cron_manager",
    "runs_in_flight",
    "task_component",
]

log = structlog.get_logger(__name__)

# How long a shutdown waits for outcomes to be written while the database does not answer.
SHUTDOWN_FLUSH_S: Final = 10.0
# The slots of the next pass count in the backlog this long before their instant: the pass that
# claims a burst begins at most MAX_LEAD before it.
BACKLOG_AHEAD: Final = timedelta(seconds=MAX_LEAD + 1.0)
# A pass in progress is alive (/healthz) until it has taken this long. On a saturated machine
# one pass of a 20,000-task burst took more than the 8 s that the last pass may be old, and
# /healthz said 503 in the middle of the burst: an orchestrator would have restarted the service
# then. A pass stuck longer (a database that does not answer) is not alive.
PASS_STUCK_S: Final = 60.0


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
        ctx = self._ctx = CronContext(
            engine,
            node=node,
            clock=clock or utcnow,
            poll_interval=poll_interval,
            bus=bus,
            monitor=monitor,
            fence=fence,
        )
        self._registry = Registry(ctx)
        # Set by the launcher while no burst's launches wait to be started; the recorder holds
        # a burst's health updates and events until it is (both on the event loop).
        launched = asyncio.Event()
        launched.set()
        self._recorder = Recorder(ctx, apply_pauses=self._apply_now, launched=launched)
        self._launcher = Launcher(ctx, self._registry, self._recorder, launched=launched)
        self._recorder.gate = self._launcher.gate
        self._reconciler = Reconciler(ctx, self._registry, on_removed=self._on_removed)
        self._dispatcher = Dispatcher(
            ctx, self._registry, self._reconciler, self._launcher, self._recorder
        )
        self._own_lease = OwnLease(
            ctx, start=functools.partial(self.start, takeover=True), lost=self._lease_lost
        )
        self._start_lock: asyncio.Lock | None = None
        # Names started here and not stopped since: kept across a lease lost and regained.
        self._started: set[str] = set()
        self._exit_hook = False

    # --- plumbing ------------------------------------------------------------------------------

    def use_lease(self, lease: SchedulerLease) -> None:
        """Schedule under ``lease``, which the caller (the service) holds and renews.

        Every claim is fenced by it in the claiming transaction, and every start and every
        step of a run by its remaining time on this process's monotonic clock.
        """
        self._own_lease.use(lease)

    @property
    def fence(self) -> Callable[[Connection], bool] | None:
        """Called inside every transaction that claims slots: False means this process may no
        longer schedule (it lost the scheduling lease), and nothing is claimed."""
        return self._ctx.fence

    @fence.setter
    def fence(self, fence: Callable[[Connection], bool] | None) -> None:
        self._ctx.fence = fence

    @property
    def state(self) -> Lifecycle:
        return self._ctx.state

    @property
    def client_of(self) -> str | None:
        """The lease holder that schedules for this manager, while it is a client."""
        return self._own_lease.client

    def open_engine(self) -> Engine:
        """Open the manager's database and migrate it to the head, once; the engine.

        Every method of the seed's interface that reads or writes tasks calls it first, so a
        manager used as a library (``CronManager()`` then ``register_task``) opens its
        database at its first such call; the collaborators only read
        :attr:`CronContext.engine <nanobot.cron.context.CronContext.engine>`, which is set
        from then on. Blocking I/O.
        """
        return self._ctx.open_engine()

    @property
    def engine(self) -> Engine:
        """The manager's database once open (any of the methods that read or store tasks opens
        it, as :meth:`open_engine` does); :class:`EngineNotOpenError` before that."""
        return self._ctx.engine

    @property
    def node(self) -> str:
        return self._ctx.node

    @property
    def poll_interval(self) -> float:
        return self._ctx.poll_interval

    @property
    def bus(self) -> MessageBus:
        return self._ctx.bus

    @property
    def monitor(self) -> HeartbeatMonitor:
        return self._ctx.monitor

    def _known(self, name: str) -> bool:
        if name in self._registry.registered or name in self._registry.ephemeral:
            return True
        return control.task_exists(self.open_engine(), name)

    def _require(self, name: str) -> None:
        """Open the database (blocking: the async methods call this in a thread first) and
        check that ``name`` is a task registered here or stored."""
        self.open_engine()
        if not isinstance(name, str) or not self._known(name):
            raise UnknownTaskError(str(name))

    # --- the seed's interface ------------------------------------------------------------------

    def register_task(self, name: str, task: CronTask) -> None:
        """Define a task (it runs once started). Works with no event loop running.

        Registering the same definition again changes nothing, so the schedule keeps its
        phase; a different definition updates the stored task.
        """
        definitions.check_name(name)
        if not isinstance(task, CronTask):
            raise InvalidTaskError(f"task {name!r} must be a CronTask instance, got {task!r}")
        definition = definition_of(name, task)
        self._registry.register(name, task)
        if definition.not_persistable is not None:
            with self._ctx.lock:
                self._registry.register_ephemeral(definition)
                note_definition(self._ctx, definition)
            log.warning(
                "cron.task_not_persistent",
                task=name,
                reason=definition.not_persistable,
                consequence="it runs in this process only and will not survive a restart",
            )
            return
        outcome, info = control.upsert_definition(self.open_engine(), definition)
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
        self._launcher.cancel_run(name, "the task was unregistered")
        self._started.discard(name)
        task, ephemeral = self._registry.unregister(name)
        if task is not None:
            task.set_running(False)
        self._recorder.forget_health(name)
        if ephemeral is not None:
            if self._ctx.scheduler is not None:
                self._ctx.scheduler.remove(name, EPHEMERAL)
        else:
            control.remove_task(self.open_engine(), name)
            self._wakeup()
        log.info("cron.task_unregistered", task=name)

    def get_task(self, name: str) -> CronTask:
        """The task registered under ``name`` (built from its stored definition if need be)."""
        task = self._registry.get(name)
        if task is not None:
            return task
        info = control.get_task(self.open_engine(), name)
        return self._registry.instance(name, info.task_class, info.kwargs)

    def list_tasks(self) -> list[str]:
        """Names of every task: registered here first, then the others stored."""
        names = self._registry.names()
        stored = control.task_names(self.open_engine())
        return names + [n for n in stored if n not in names]

    async def start_task(self, name: str) -> None:
        """Schedule a task: its first run is now, unless it already has a persisted schedule."""
        await asyncio.to_thread(self._require, name)
        await self.start()
        if self._ctx.scheduler is None:
            # A client: the process that holds the lease schedules the stored task.
            self._refuse_unstorable(name)
            await asyncio.to_thread(control.start_task, self._ctx.engine, name)
            self._started.add(name)
            self._registry.set_running(name, True)
            log.info("cron.task_started", task=name, scheduled_by=self._own_lease.client)
            return
        scheduler = self._require_scheduler()
        definition = self._registry.ephemeral.get(name)
        if definition is not None:
            now = self._ctx.clock()
            await scheduler.run_in_worker(
                self._reconciler.add_ephemeral, scheduler, definition, now
            )
        else:
            await asyncio.to_thread(control.start_task, self._ctx.engine, name)
            await scheduler.run_in_worker(self._reconciler.reconcile_now, scheduler, name)
        self._started.add(name)
        self._registry.set_running(name, True)
        scheduler.wakeup()
        log.info("cron.task_started", task=name)

    def _refuse_unstorable(self, name: str) -> None:
        definition = self._registry.ephemeral.get(name)
        if definition is None:
            return
        holder = self._own_lease.client
        raise TaskNotStorableError(
            f"task {name!r} cannot be stored ({definition.not_persistable}), and the tasks are "
            f"scheduled by another process ({holder}), which could not build it: define "
            "its class in an importable module with JSON arguments, or run it in that process"
        )

    async def stop_task(self, name: str) -> None:
        """Stop scheduling a task and cancel its run in flight (recorded ``cancelled``)."""
        await asyncio.to_thread(self._require, name)
        self._started.discard(name)
        scheduler = self._ctx.scheduler
        if name in self._registry.ephemeral:
            if scheduler is not None:
                await scheduler.run_in_worker(scheduler.remove, name, EPHEMERAL)
        else:
            await asyncio.to_thread(control.pause_task, self._ctx.engine, name)
            if scheduler is not None:
                await scheduler.run_in_worker(self._reconciler.reconcile_now, scheduler, name)
        await self._launcher.cancel_and_wait(name, "the task was stopped")
        self._registry.set_running(name, False)
        log.info("cron.task_stopped", task=name)

    async def start_all_tasks(self) -> None:
        """Start every task registered in this process (stored tasks run once the scheduler
        starts, whoever registered them). A task started before and not stopped since is left
        as it is: a pause from the command line since then stands."""
        await self.start()
        for name in self._registry.names():
            if name not in self._started:
                await self.start_task(name)

    async def stop_all_tasks(self) -> None:
        """Stop every task registered in this process, as in the seed. To stop the service
        while keeping every schedule for the next start, use :meth:`shutdown` instead."""
        for name in self._registry.names():
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
        if name in self._registry.ephemeral:
            raise InvalidTaskError(f"task {name!r} is not stored; {instead}")
        await asyncio.to_thread(change, self._ctx.engine, name)
        scheduler = self._ctx.scheduler
        if scheduler is not None:
            await scheduler.run_in_worker(self._reconciler.reconcile_now, scheduler, name)

    async def run_task_now(self, name: str) -> None:
        """Run a task once now, outside its schedule (its schedule is unchanged)."""
        await asyncio.to_thread(self._require, name)
        definition = self._registry.ephemeral.get(name)
        if definition is not None:
            await self.start()
            if self._ctx.scheduler is None:
                self._refuse_unstorable(name)
            scheduler = self._require_scheduler()
            await scheduler.run_in_worker(
                self._dispatcher.claim_manual_ephemeral, scheduler, definition
            )
            return
        await asyncio.to_thread(control.request_run, self._ctx.engine, name)
        self._wakeup()

    async def history(self, name: str, limit: int = 20) -> list[control.RunInfo]:
        """The last ``limit`` runs (or missed and skipped slots) of a task, newest first."""
        engine = await asyncio.to_thread(self.open_engine)
        return await asyncio.to_thread(control.task_history, engine, name, limit)

    def is_alive(self) -> bool:
        """True while the scheduler runs and its last pass is recent, or its pass in progress
        began less than :data:`PASS_STUCK_S` ago."""
        scheduler = self._ctx.scheduler
        if scheduler is None or not scheduler.dispatching or self._ctx.closing:
            return False
        started = scheduler.pass_started_at
        if scheduler.passing and started is not None:
            return (self._ctx.clock() - started).total_seconds() < PASS_STUCK_S
        last = scheduler.last_pass_at
        if last is None:
            return True
        return (self._ctx.clock() - last).total_seconds() < 3 * self.poll_interval + 5

    def quiet(self) -> bool:
        """Whether the scheduler is between bursts (event loop): no pass in progress or due
        soon, nothing being launched, marked or recorded, no launch due soon and few runs in
        flight. What is alive then is mostly long-lived state, which the garbage-collection
        steward freezes (:mod:`nanobot.gcsteward`)."""
        scheduler = self._ctx.scheduler
        # A freeze just before a pass would delay the pass, and the burst it claims.
        if scheduler is not None and scheduler.pass_within(QUIET_LEAD_S):
            return False
        return self._launcher.quiet() and self._recorder.idle()

    def backlog(self) -> int:
        """How many slots the scheduler has in hand (event loop): claimed and not finished,
        outcomes not yet written and announced, and the slots due at its next pass if their
        instant is at most :data:`BACKLOG_AHEAD` away. What makes a burst for
        :mod:`nanobot.switching`."""
        count = self._launcher.in_hand() + self._recorder.backlog()
        next_at, due = self._dispatcher.upcoming
        if next_at is not None and next_at - self._ctx.clock() <= BACKLOG_AHEAD:
            count += due
        return count

    @property
    def last_wakeup_at(self) -> datetime | None:
        scheduler = self._ctx.scheduler
        return scheduler.last_pass_at if scheduler is not None else None

    def running_tasks(self) -> list[str]:
        return self._launcher.running_tasks()

    def runs_in_flight(self) -> list[RunInFlight]:
        """The runs of this process in flight, with their age and overrun bound: one per task,
        its oldest (a task may have several under the overlap policy allow)."""
        return self._launcher.runs_in_flight()

    def cancel_runs(self, reason: str) -> None:
        """Cancel every run in flight now (each is recorded ``cancelled`` with ``reason``); a
        :meth:`shutdown` waiting for them then goes on at once. For a node that lost its lease
        while stopping: another node may start these tasks at any moment."""
        self._launcher.cancel_all(reason)

    async def flush(self) -> None:
        """Wait until every recorded outcome is written to the database (and its health update
        and ``task.finished`` event are done)."""
        await self._recorder.flush()

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
        ctx = self._ctx
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if ctx.scheduler is not None and ctx.scheduler.dispatching:
                return
            if ctx.lease is None and ctx.fence is None:
                if not await self._own_lease.take():
                    return
                takeover = True
            ctx.state = Lifecycle.STARTING
            config = get_config()
            # 0 in the configuration means no limit.
            ctx.default_timeout = float(config.get("cron.default_timeout", 0.0)) or None
            ctx.overrun_intervals = float(config.get("cron.overrun_intervals", 3.0))
            ctx.pause_default = int(config.get("cron.pause_after_failures", 0))
            self._dispatcher.dispatch_ahead = float(
                config.get("cron.dispatch_ahead", DISPATCH_AHEAD)
            )
            engine = await asyncio.to_thread(self.open_engine)
            interrupted = await asyncio.to_thread(
                history.mark_interrupted,
                engine,
                node=None if takeover else self.node,
                now=ctx.clock(),
            )
            if interrupted:
                log.warning("cron.runs_interrupted", count=interrupted, node=self.node)
            scheduler = NanobotScheduler(
                engine,
                process=self._dispatcher.run_pass,
                poll_interval=self.poll_interval,
                clock=ctx.clock,
            )
            scheduler.gate = self._launcher.gate.then
            self._reconciler.reset()
            await self._dispatch_on(scheduler, takeover)
            log.info("cron.scheduler_started", node=self.node, poll_interval_s=self.poll_interval)

    async def _dispatch_on(self, scheduler: NanobotScheduler, takeover: bool) -> None:
        """Recover what a gone process left, then dispatch on ``scheduler``."""
        ctx = self._ctx
        # Before the first pass, in the worker: a pass's own claims must not be mistaken
        # for a gone process's undispatched ones.
        try:
            orphans = await scheduler.run_in_worker(
                claims.recover, ctx, self._registry, scheduler, takeover
            )
        except Exception as exc:
            log.error("cron.recovery_failed", error=error_text(exc))
            orphans = []
        scheduler.start()
        ctx.scheduler = scheduler
        ctx.state = Lifecycle.RUNNING
        for component in orphans:
            self._recorder.forget_health(component[len(TASK_PREFIX) :])
        # Tasks only this process can build, started before a lease was lost and regained
        # (or a shutdown and a new start), are scheduled again: their first run is now.
        now = ctx.clock()
        for name in sorted(self._started):
            definition = self._registry.ephemeral.get(name)
            if definition is not None:
                await scheduler.run_in_worker(
                    self._reconciler.add_ephemeral, scheduler, definition, now
                )
        self._launcher.arm_watch()
        self._register_exit_hook()

    async def _lease_lost(self) -> None:
        """The own lease was lost: stop dispatching at once (another node may lead now)."""
        await asyncio.shield(self._stop_dispatching(0.0, "the node lost the scheduling lease"))
        self._recorder.forget_task_components()

    async def shutdown(self, grace: float | None = None, *, standby: bool = False) -> None:
        """Stop dispatching, let runs in flight finish for up to ``grace`` seconds, cancel the
        rest (recorded ``cancelled``) and write all history; slots claimed ahead of their
        instant are released (caught up at the next start). Schedules stay stored. A lease this
        manager took itself is released. Idempotent.

        ``standby``: the process goes on as a standby (it lost the lead); the ``task:<name>``
        components it kept are unregistered, since a standby runs no task and they would go
        stale there (the leader's own components stand for the tasks)."""
        await self._own_lease.stop_keeping()
        await self._stop_dispatching(grace, "the scheduler shut down")
        if standby:
            self._recorder.forget_task_components()
        await self._own_lease.release()

    async def _stop_dispatching(self, grace: float | None, reason: str) -> None:
        ctx = self._ctx
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            scheduler = ctx.scheduler
            if scheduler is None or ctx.closing:
                return
            if grace is None:
                grace = float(get_config().get("service.shutdown_grace", 10.0))
            # Let the pass in progress hand over what it claimed before nothing more may start.
            await scheduler.quiesce()
            ctx.state = Lifecycle.STOPPING
            launcher = self._launcher
            launcher.disarm_watch()
            await launcher.wait_marking()
            # Slots claimed ahead of their instant and not started: they were never due.
            unstarted = launcher.take_unstarted()
            if unstarted:
                await scheduler.run_in_worker(
                    claims.release_unstarted, ctx, self._registry, scheduler, unstarted
                )
            running = launcher.all_runs()
            if running and grace > 0:
                log.info("cron.waiting_for_runs", count=len(running), grace_s=grace)
                await asyncio.wait(running, timeout=grace)
            await launcher.cancel_every_task(reason)
            try:
                async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                    await self.flush()
            except TimeoutError:
                # The database does not answer: stop anyway. The claims of these runs stay
                # "running" and are recorded interrupted when a scheduler next starts.
                self._recorder.drop_pending()
            await asyncio.to_thread(scheduler.close)
            await launcher.pings.close()
            ctx.scheduler = None
            ctx.state = Lifecycle.STOPPED
            self._registry.stop_all()
            log.info("cron.scheduler_stopped", node=self.node, reason=reason)

    def _register_exit_hook(self) -> None:
        # A script may return from asyncio.run() right after start_task, without shutdown():
        # what this manager still holds is written when the interpreter exits.
        if not self._exit_hook:
            self._exit_hook = True
            atexit.register(_at_exit, weakref.ref(self))

    def _exit_flush(self) -> None:
        """At interpreter exit: write recorded outcomes, release unstarted claims and this
        manager's own lease. Synchronous: no event loop runs any more."""
        unstarted = self._launcher.take_unstarted()
        if unstarted:
            claims.release_unstarted(self._ctx, self._registry, self._ctx.scheduler, unstarted)
        self._recorder.write_at_exit()
        self._own_lease.release_at_exit()

    # --- between the collaborators -------------------------------------------------------------

    def _apply_now(self, scheduler: NanobotScheduler) -> None:
        """Worker thread: apply the tasks auto-pause just paused."""
        self._reconciler.reconcile_now(scheduler)

    def _on_removed(self, scheduler: NanobotScheduler, name: str) -> None:
        """Worker thread: a task gone from the table; its component and runs go on the loop."""
        scheduler.call_soon(self._recorder.forget_health, name)
        if name not in self._registry.ephemeral:
            scheduler.call_soon(self._launcher.cancel_run, name, "the task was removed")

    def _require_scheduler(self) -> NanobotScheduler:
        if self._ctx.scheduler is None:
            raise RuntimeError("the scheduler is not running: call start() first")
        return self._ctx.scheduler

    def _wakeup(self) -> None:
        if self._ctx.scheduler is not None:
            self._ctx.scheduler.wakeup()


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
