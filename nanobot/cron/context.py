"""What the scheduler's collaborators share: settings, the lease, the lifecycle and the tables
of each task's settings and retry bookkeeping.

One ``CronContext`` per :class:`~nanobot.cron.manager.CronManager`, handed to its
collaborators (:mod:`~nanobot.cron.reconcile`, :mod:`~nanobot.cron.dispatch`,
:mod:`~nanobot.cron.launcher`, :mod:`~nanobot.cron.recorder`). Each field below says which
thread writes it: *loop* (the event loop), *worker* (the scheduler's worker thread, which runs
the passes and writes the outcomes), or *lock* (either, holding :attr:`lock`). A field written
by one thread and read by the other is a whole value swapped in one assignment (a dict entry,
a set member), which the other side reads without a lock, as before the re-cut.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine

from nanobot.bus import MessageBus, get_bus
from nanobot.config import get_config
from nanobot.cron.aps_adapter import NanobotScheduler
from nanobot.cron.backfill import BackfillJob
from nanobot.cron.overlap import Overlap
from nanobot.cron.records import DuePolicy, Lifecycle
from nanobot.cron.retention import HistoryTrimmer
from nanobot.cron.retries import PendingRetry, RetryPolicy
from nanobot.db import get_engine, upgrade_database
from nanobot.exceptions import EngineNotOpenError, NotLeaderError
from nanobot.heartbeat import HeartbeatMonitor, get_heartbeat_monitor
from nanobot.heartbeat.store import TASK_COMPONENT_PREFIX
from nanobot.lease import SchedulerLease
from nanobot.node import node_name
from nanobot.times import Clock

TASK_PREFIX = TASK_COMPONENT_PREFIX


def task_component(name: str) -> str:
    """The heartbeat component that stands for a task."""
    return f"{TASK_PREFIX}{name}"


class CronContext:
    """Settings (resolved lazily), the lease, the lifecycle and the per-task tables."""

    def __init__(
        self,
        engine: Engine | None,
        *,
        node: str | None,
        clock: Clock,
        poll_interval: float | None,
        bus: MessageBus | None,
        monitor: HeartbeatMonitor | None,
        fence: Callable[[Connection], bool] | None,
    ) -> None:
        self._engine = engine
        # The engine once open_engine() opened and migrated it: the one value the collaborators
        # read (from the loop or the worker), assigned once.
        self._opened: Engine | None = None
        self._node = node
        self.clock = clock
        self._poll_interval = poll_interval
        self._bus = bus
        self._monitor = monitor
        self._trimmer: HistoryTrimmer | None = None
        # Guards the registrations (nanobot.cron.registry) and the fields marked *lock*.
        self.lock = threading.RLock()
        # loop: the lifecycle, the running scheduler (None unless started), the lease this
        # manager schedules under (the service's, or its own when used as a library; None:
        # not scheduling, or a client), and the fence every claiming transaction calls (False:
        # this process may no longer schedule, and nothing is claimed).
        self._state = Lifecycle.IDLE
        # state.closing, kept as a plain attribute: the loop reads it for every slot it starts.
        self.closing = False
        self.scheduler: NanobotScheduler | None = None
        self.lease: SchedulerLease | None = None
        self.fence = fence
        # loop: settings read at each start.
        self.default_timeout: float | None = None
        self.overrun_intervals = 0.0
        self.pause_default = 0
        # Each task's settings. worker (reconcile), or the registering thread with *lock* for
        # a task only this process can build.
        self.policies: dict[str, DuePolicy] = {}
        self.retry_policies: dict[str, RetryPolicy] = {}
        # Seconds between runs by each task's stored schedule (a cron task's longest gap, 0 for
        # a one-shot): the instance built from stored arguments may not know its schedule.
        self.periods: dict[str, float] = {}
        self.ping_urls: dict[str, str | None] = {}
        # Read by the loop when it starts a slot (its overlap policy).
        self.overlaps: dict[str, Overlap] = {}
        # worker: paused tasks (a paused task gets no retry).
        self.paused: set[str] = set()
        # worker: each task's pending retry (a mirror of tasks.retry_*, loaded at start), its
        # next slot and latest claimed slot as the passes left them; the next-run mirrors
        # waiting for their run's outcome (written with it, see dispatch).
        self.retries: dict[str, PendingRetry] = {}
        self.next_slots: dict[str, datetime | None] = {}
        self.claimed_slots: dict[str, datetime] = {}
        self.next_mirrors: dict[str, tuple[datetime | None, int]] = {}
        # worker: pending backfills (nanobot.cron.backfill) and the last slot each claimed here.
        self.backfills: dict[str, BackfillJob] = {}
        self.backfill_after: dict[str, datetime] = {}
        # lock: why a task could not be built (None: it builds again), for the next pass to
        # store; worker: the tasks stored as broken (read by the loop).
        self.broken: dict[str, str | None] = {}
        self.known_broken: set[str] = set()
        # loop: background tasks kept referenced until done.
        self._background: set[asyncio.Task[Any]] = set()

    # --- the lifecycle (event loop) ------------------------------------------------------------

    @property
    def state(self) -> Lifecycle:
        return self._state

    @state.setter
    def state(self, state: Lifecycle) -> None:
        self._state = state
        self.closing = state.closing

    # --- settings ------------------------------------------------------------------------------

    def open_engine(self) -> Engine:
        """Open the database (the engine given, else the configured one) and migrate it to the
        head, once; the engine. Blocking I/O: the manager calls it from its public methods,
        from a worker thread while an event loop runs."""
        with self.lock:
            if self._opened is None:
                engine = self._engine if self._engine is not None else get_engine()
                upgrade_database(engine)
                self._engine = self._opened = engine
            return self._opened

    @property
    def engine(self) -> Engine:
        """The database :meth:`open_engine` opened; :class:`EngineNotOpenError` before it."""
        engine = self._opened
        if engine is None:
            raise EngineNotOpenError(
                "the scheduler's database is not open yet: call open_engine() first "
                "(CronManager does at its first call that needs the database)"
            )
        return engine

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

    @property
    def trimmer(self) -> HistoryTrimmer:
        """Counts the task_runs rows each pass inserts; trims with each batch of outcomes
        (worker thread only)."""
        if self._trimmer is None:
            self._trimmer = HistoryTrimmer(int(get_config().get("cron.history_max_rows", 1000)))
        return self._trimmer

    # --- the lease -----------------------------------------------------------------------------

    def check_fence(self, conn: Connection) -> None:
        """In a claiming transaction: raise unless this process may still schedule."""
        if self.fence is not None and not self.fence(conn):
            raise NotLeaderError(
                f"node {self.node} no longer holds the scheduling lease: nothing claimed"
            )

    def holds_lease(self) -> bool:
        """By this process's monotonic clock, no database round trip."""
        lease = self.lease
        return lease is None or lease.seconds_left() > 0

    def step_fence(self) -> Callable[[], bool] | None:
        """What every step of a run is fenced by (None: no lease, nothing to check)."""
        return self.holds_lease if self.lease is not None else None

    # --- the event loop ------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the loop as a background task, kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def in_worker(self) -> NanobotScheduler | None:
        """The scheduler whose worker thread can run a call, or None (stopped or closing)."""
        scheduler = self.scheduler
        return scheduler if scheduler is not None and not scheduler.closed else None
