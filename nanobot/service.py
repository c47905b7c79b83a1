"""The service: ``python -m nanobot`` runs the scheduler, the heartbeat monitor and the endpoint.

Lifecycle (``Service.run``):

1. apply pending migrations; log where the database and the log file are;
2. bind the HTTP endpoint (if ``http.enabled``); a port in use ends the start with exit code 1;
3. try to take the scheduling lease (:mod:`nanobot.lease`): the winner is the *leader* and
   starts the scheduler with the built-in tasks; any other process is a *standby* that tries
   again every ``service.lease_ttl / 3`` seconds and takes over when the leader stops (at once
   after a clean stop, which releases the lease; within ``lease_ttl`` after a crash);
4. start the heartbeat monitor with this process's components;
5. run until SIGINT or SIGTERM. The first signal stops gracefully: no new runs, runs in flight
   get ``service.shutdown_grace`` seconds and are then cancelled (recorded ``cancelled``), the
   monitor records a last heartbeat, the lease is released, exit code 0. A second signal exits
   at once with code 1. Until its last run has ended (or been cancelled) and been recorded, a
   stopping leader keeps renewing its lease and checking its lock, so that no standby starts a
   task whose run still goes; if it loses the lease meanwhile, it cancels its runs at once.

Before all this (:mod:`nanobot.preflight`): every path must be usable and no other service may
run as this node from the same home; the start ends with one line and the documented exit code
otherwise (also when the database cannot be opened or written: exit 3).

Each lease period the service's database guard (:mod:`nanobot.database_guard`) checks that the
SQLite file at the configured path is still the one it opened; a deleted or replaced file stops
scheduling, puts status in error (and /readyz down), logs ``service.database_replaced`` and
publishes ``database.replaced`` on the bus. On the leader it checkpoints and truncates SQLite's
write-ahead log every ``CHECKPOINT_EVERY_S``, so that a burst does not leave it tens of
megabytes long.

The leader renews the lease every ``lease_ttl / 3`` seconds; when a renewal fails, or cannot
finish before less than ``lease_ttl / 3`` seconds of the lease are left, it stops dispatching at
once and becomes a standby: two processes never schedule at the same time.

On PostgreSQL the leader also holds an advisory lock on a connection of its own
(:class:`nanobot.lease.AdvisoryLock`), taken before the lease row and checked every
``service.lock_check_interval`` seconds (at most ``lease_ttl / 3``): when the check fails or does
not answer within ``lease_ttl / 3``, the leader stops dispatching at once, releases the row and
becomes a standby. It holds the row until then, so no standby can lead before it has stopped.
A node that lost the lead waits two polls (``2 * lease_ttl / 3``) before it competes again, so
that a standby, which polls every ``lease_ttl / 3``, takes over first; no longer, so that two
nodes losing the lead one after the other do not leave nobody competing.

Node names: heartbeats and components belong to :func:`nanobot.node.node_name` (stable across
restarts); the lease holder is ``<node>:<pid>``, unique per process.

Nothing here does blocking database I/O on the event loop: it runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, NoReturn

import structlog
from sqlalchemy.exc import SQLAlchemyError

# Everything the service runs is imported with this module, the scheduler and the monitor too:
# never between taking the lease and starting the scheduler, where on a loaded machine the import
# took seconds of the lease.
from nanobot.alerts.alerter import Alerter
from nanobot.bus import get_bus
from nanobot.config import Config
from nanobot.cron import register_builtin_tasks
from nanobot.cron.manager import CronManager, install_cron_manager
from nanobot.cron.overdue import OverdueWatch
from nanobot.cron.sources import TaskSources
from nanobot.database_guard import DatabaseGuard
from nanobot.db import dispose_engines, get_engine, upgrade_database
from nanobot.exceptions import ConfigError, NotLeaderError
from nanobot.gcsteward import GcSteward
from nanobot.heartbeat import HeartbeatMonitor, initialize_heartbeat, install_heartbeat_monitor
from nanobot.http import HttpServer
from nanobot.lease import AdvisoryLock, SchedulerLease, holder_id
from nanobot.logging import configured_log_file, flush_logging
from nanobot.metrics import Metrics
from nanobot.models import error_text, utcnow
from nanobot.node import node_name
from nanobot.preflight import (
    EXIT_UNREADABLE,
    EXIT_USAGE,
    NodeClaim,
    StartupError,
    claim_node,
    sqlite_file,
)
from nanobot.status import build_status, nanobot_version
from nanobot.switching import SwitchInterval
from nanobot.web.app import setup_dashboard
from nanobot.web.tokens import TokenStore

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
# Liveness: the lease loop must have come round within this many of its periods.
_LOOP_STALE_PERIODS: Final = 2.5
# A renewal that failed at once is tried again this much later, while the lease lasts.
RENEW_RETRY_S: Final = 0.2


class Role(enum.StrEnum):
    STARTING = "starting"
    STANDBY = "standby"
    LEADER = "leader"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Service:
    """One service process. ``await Service(config).run()`` returns the exit code.

    The composition root: the database engine, the lease, the heartbeat monitor and the
    scheduler are built here from ``config`` (the monitor and the scheduler are then installed
    as the process-wide ones, which the built-in tasks and task code reach).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = node_name(config)
        self.holder = holder_id(self.node)
        self.ttl = float(config["service.lease_ttl"])
        self.period = self.ttl / 3
        self.grace = float(config["service.shutdown_grace"])
        self.engine = get_engine(config)
        self.lease = SchedulerLease(self.engine, self.holder, self.ttl)
        # PostgreSQL: the leader holds the advisory lock as well as the row.
        self.lock = (
            AdvisoryLock(self.engine, self.holder, self.ttl)
            if self.engine.dialect.name == "postgresql"
            else None
        )
        self.lock_check = min(float(config["service.lock_check_interval"]), self.period)
        self.role = Role.STARTING
        self.metrics = Metrics(self.engine, self.node, is_leader=self.is_leader)
        self.http: HttpServer | None = None
        # The scheduler while leading, and the one it leads with (built at the first promotion).
        self._manager: CronManager | None = None
        self._scheduler: CronManager | None = None
        self._sources: TaskSources | None = None
        self._overdue: OverdueWatch | None = None
        self._monitor: HeartbeatMonitor | None = None
        self._alerter: Alerter | None = None
        self._stop: asyncio.Event | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._lock_task: asyncio.Task[None] | None = None
        self._last_lease_poll = time.monotonic()
        self._stepping_down: asyncio.Task[None] | None = None
        # time.monotonic() before which this node does not compete for the lead (set when it
        # loses the lead, so that a healthy standby takes over first).
        self._compete_after = 0.0
        self._signals = 0
        # The exit code when the run ends for a reason of its own (a port in use).
        self._exit_code = EXIT_OK
        # Set by _shutdown: the lease loop and the lock loop run until then, also while a
        # stopping leader waits for its runs.
        self._lease_done: asyncio.Event | None = None
        self._draining = False
        # The one lease call (acquire) in flight in a thread, if any: a call that outlives its
        # timeout is waited for, never doubled, so that a silent database cannot pile up threads.
        self._lease_call: asyncio.Future[bool] | None = None
        # Problems of this process that the database cannot tell (it is the problem), shown
        # first in status (degraded); the guard's ``fatal`` one puts it in error and stops
        # scheduling.
        self._warnings: dict[str, str] = {}
        # What status() shows of them: rebuilt whole on each change, so that a reader thread
        # (the endpoint's) never iterates a dict that the loop changes.
        self._warning_list: tuple[str, ...] = ()
        self._guard = DatabaseGuard(
            self.engine,
            home=config.home,
            sqlite_path=sqlite_file(config),
            node=self.node,
            period=self.period,
            warn=self._warn,
        )
        self._step_lock = asyncio.Lock()
        self._claim: NodeClaim | None = None
        # Full garbage collections at quiet moments of the scheduler, never during a burst.
        self._gc = GcSteward(self._gc_quiet)
        # A short switch interval while the scheduler has a burst in hand.
        self._switching = SwitchInterval(self._backlog)

    # --- probes (the HTTP endpoint) -------------------------------------------------------------

    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def liveness(self) -> dict[str, Any]:
        lease_loop_age = time.monotonic() - self._last_lease_poll
        lease_loop_alive = lease_loop_age < _LOOP_STALE_PERIODS * self.period + 1.0
        if self.role is Role.LEADER:
            scheduler_alive = bool(self._manager is not None and self._manager.is_alive())
        else:
            # A standby's scheduling loop is its lease poll.
            scheduler_alive = self.role is Role.STANDBY
        alive = lease_loop_alive and scheduler_alive
        return {
            "alive": alive,
            "role": self.role.value,
            "node": self.node,
            "holder": self.holder,
            "scheduler_alive": scheduler_alive,
            "lease_loop_age_s": round(lease_loop_age, 3),
            "version": nanobot_version(),
        }

    def status(self) -> dict[str, Any]:
        return self._status(problems_only=False)

    def readiness(self) -> dict[str, Any]:
        """What /readyz weighs: whether this process still starts, then the status (problems
        only: the same verdict without reading a row per task, which took seconds per probe
        with 100,000 tasks).

        Until its first lease round is done (and, when it won the lease, its scheduler started
        and made its first pass), the database may already say that a leader holds the lease
        and a node beats (this one, or the same node before a restart), while nothing is
        scheduled yet. The database is not read then: the answer is known, and probes every few
        milliseconds slowed the start they wait for."""
        if self.role is Role.STARTING:
            return {
                "status": None,
                "starting": True,
                "problems": ["this node is starting: it does not schedule yet"],
                "overdue": [],
            }
        return self._status(problems_only=True)

    def _status(self, *, problems_only: bool) -> dict[str, Any]:
        fatal = self._guard.fatal
        if fatal is not None:
            # The database at the path is not the one in use: reading it would show (or create)
            # another database's state. Say what is wrong, without touching it.
            return {
                "status": "error",
                "problems": [fatal],
                "checked_at": utcnow().isoformat(),
                "version": nanobot_version(),
                "service": {"running": True, "node": self.node, "role": self.role.value},
                "components": [],
                "tasks": [],
            }
        data = build_status(self.engine, problems_only=problems_only)
        warnings = self._warning_list
        if warnings:
            data["problems"] = [*warnings, *data.get("problems", [])]
            if data.get("status") == "healthy":
                data["status"] = "degraded"
        return data

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def _dashboard_setup(self) -> Callable[[web.Application], None] | None:
        """What adds the dashboard and the API to the endpoint (None with http.dashboard off).

        The tokens are read here, before the endpoint binds: a bad token file stops the start.
        """
        if not self.config["http.dashboard"]:
            return None
        tokens = TokenStore.from_config(
            self.config.get("http.tokens", ()), self.config.get("http.token_file")
        )
        host = self.config["http.host"]

        def configure(app: web.Application) -> None:
            setup_dashboard(app, self.engine, host=host, tokens=tokens)

        return configure

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until a signal (or :meth:`request_stop`); the process exit code."""
        self._stop = asyncio.Event()
        self._lease_done = asyncio.Event()
        self._install_signal_handlers()
        self._claim = claim_node(self.config, self.node, self._port())
        try:
            try:
                await asyncio.to_thread(upgrade_database, self.engine)
                await asyncio.to_thread(self.check_database_at_start)
            except StartupError:
                raise
            except Exception as exc:
                error = error_text(exc).splitlines()[0]
                log.error("service.database_unusable", error=error, exit_code=EXIT_UNREADABLE)
                raise StartupError(
                    f"database {self.engine.url.render_as_string(hide_password=True)} "
                    f"is not usable: {error}",
                    EXIT_UNREADABLE,
                ) from None
            return await self._run_started()
        finally:
            self._claim.release()

    async def _start_sources(self, sources: TaskSources) -> None:
        """Start the task file's watch, whose first sync writes: a database that cannot be
        written (a PostgreSQL hot standby, a read-only role) ends the start in one line, exit 3,
        rather than in a traceback."""
        try:
            await sources.start()
        except SQLAlchemyError as exc:
            error = error_text(exc).splitlines()[0]
            problem = "is read-only" if _is_read_only(error) else "is not usable"
            log.error("service.database_unusable", error=error, exit_code=EXIT_UNREADABLE)
            self._exit_code = EXIT_UNREADABLE
            url = self.engine.url.render_as_string(hide_password=True)
            raise StartupError(f"database {url} {problem}: {error}", EXIT_UNREADABLE) from None

    async def _start_http(self) -> None:
        """Bind the endpoint. A bad dashboard configuration (an unreadable token file) or a
        port in use raises :class:`StartupError` with its exit code, which the stop logs too
        (the shutdown still runs; the command line prints the one line)."""
        try:
            configure = self._dashboard_setup()
        except ConfigError as exc:
            log.error("service.config_invalid", error=str(exc), exit_code=EXIT_USAGE)
            self._exit_code = EXIT_USAGE
            raise StartupError(str(exc), EXIT_USAGE) from None
        host, port = self.config["http.host"], self.config["http.port"]
        self.http = HttpServer(_ProbeAdapter(self), host, port, configure=configure)
        try:
            await self.http.start()
        except OSError as exc:
            log.error("service.http_bind_failed", host=host, port=port, error=str(exc))
            self.http = None
            self._exit_code = EXIT_FAILED
            raise StartupError(
                f"cannot listen on {host}:{port}"
                f": {os.strerror(exc.errno) if exc.errno else exc}"
                " (set http.port, or http.enabled = false)",
                EXIT_FAILED,
            ) from None

    def _port(self) -> int | None:
        return int(self.config["http.port"]) if self.config["http.enabled"] else None

    async def _run_started(self) -> int:
        assert self._stop is not None
        if self._stop.is_set():
            log.info("service.stopped", exit_code=EXIT_OK, reason="signal during start")
            return EXIT_OK
        log.info(
            "service.starting",
            version=nanobot_version(),
            pid=os.getpid(),
            node=self.node,
            holder=self.holder,
            database=self.engine.url.render_as_string(hide_password=True),
            log_file=str(configured_log_file()) if configured_log_file() else None,
        )
        get_bus().subscribe("task.finished", self.metrics.on_task_finished)
        # What the imports allocated is collected and frozen once, before the scheduler loads
        # its tasks; from then on the steward freezes the long-lived objects at quiet moments
        # and makes the full collections (a full collection scans every tracked object with the
        # interpreter lock held: during a burst, 40-240 ms in which neither the event loop nor
        # the scheduler's worker ran).
        self._gc.collect(everything=True)
        self._gc.start()
        self._switching.start()
        try:
            # Built from this configuration and installed before anything asks for the
            # process-wide monitor (the scheduler registers task components on it).
            self._monitor = self._build_monitor()
            install_heartbeat_monitor(self._monitor)

            # Before the lease: the scheduler's first pass already sees the task file's tasks.
            self._sources = TaskSources(self.engine, self.node, self.config)
            await self._start_sources(self._sources)
            if self.config["http.enabled"]:
                await self._start_http()
            await self._lease_step()
            initialize_heartbeat(self._monitor)
            # On every node: a frozen leader cannot say that its tasks are overdue.
            self._overdue = OverdueWatch(
                self.engine,
                get_bus(),
                self.config,
                node=self.node,
                period=max(1.0, float(self.config["cron.poll_interval"])),
            )
            self._overdue.start()
            self._sync_cron_component()
            self._lease_task = asyncio.create_task(self._lease_loop(), name="nanobot-lease")
            if self.lock is not None:
                self._lock_task = asyncio.create_task(self._lock_loop(), name="nanobot-lock")
            # After the first lease step (a node starting up is not "a standby without a
            # leader") and once the lease loop runs (the start must not eat the lease's margin).
            await self._start_alerts()
            log.info("service.started", role=self.role.value, node=self.node, holder=self.holder)
            await self._stop.wait()
        finally:
            code = await self._shutdown()
        return code

    def request_stop(self) -> None:
        """Begin a graceful stop (what the first SIGINT or SIGTERM does)."""
        if self._stop is not None:
            self._stop.set()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("service.signal", signal=sig.name, action="stop", grace_s=self.grace)
            self.request_stop()
            return
        _exit_now(sig)  # pragma: no cover (os._exit: see _exit_now)

    # --- the lease ------------------------------------------------------------------------------

    def _next_lease_step_in(self) -> float:
        """Seconds until the next round: a period for a standby; for the leader, until a period
        after its last renewal began (a slow start or a slow renewal must not eat the margin)."""
        if self.role is not Role.LEADER:
            # A lease that runs out before the next poll (its holder stopped renewing): try
            # again just after it expires rather than up to a period later.
            left = self.lease.refused_for
            if left is not None and left < self.period:
                return max(0.05, left + 0.05)
            return self.period
        since_renewal = self.ttl - self.lease.seconds_left()
        return max(0.0, min(self.period, self.period - since_renewal))

    async def _lease_loop(self) -> None:
        """Until the lease is given up at the end of :meth:`_shutdown` (not at the signal: a
        stopping leader renews while its runs finish)."""
        done = self._lease_done
        assert done is not None
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_lease_step_in()):
                    await done.wait()
            if done.is_set():
                return
            await self._lease_step()
            await self.health_cycle()

    async def _lease_step(self) -> None:
        """One round: a standby tries to take the lease, the leader renews it.

        Under ``_step_lock``: a stop waits for a round in progress (a take-over that is starting
        the scheduler) before it decides whether it stops a leader.
        """
        async with self._step_lock:
            try:
                if self._stepping_down is not None:
                    return
                if self.role is Role.LEADER or self._draining:
                    await self._renew()
                elif self.role in (Role.STANDBY, Role.STARTING):
                    await self._try_acquire()
            finally:
                self._last_lease_poll = time.monotonic()

    def _acquire(self) -> bool:
        """Take the lock (PostgreSQL), then the row; both or neither. In a thread."""
        if self.lock is not None and not self.lock.try_acquire():
            return False
        try:
            acquired = self.lease.try_acquire()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        if not acquired and self.lock is not None:
            # The row is still held: by a leader that lost its lock session but has not yet
            # stepped down (it releases the row when it has), or that died (the row expires).
            self.lock.release()
        return acquired

    async def _try_acquire(self) -> None:
        assert self._stop is not None
        if self._stop.is_set():
            return  # stopping: a standby does not take the lead any more
        if time.monotonic() < self._compete_after or self._guard.fatal is not None:
            acquired = False
        elif self._lease_call is not None and not self._lease_call.done():
            # The last attempt still waits on the database: never a second thread beside it.
            log.warning("service.lease_call_pending", action="skip_round")
            acquired = False
        else:
            call = asyncio.ensure_future(asyncio.to_thread(self._acquire))
            self._lease_call = call
            try:
                async with asyncio.timeout(self.period):
                    acquired = await asyncio.shield(call)
            except Exception as exc:
                error = error_text(exc).splitlines()[0]
                log.warning("service.lease_unavailable", error=error)
                acquired = False
                if _is_read_only(error):
                    self._warn(
                        "read_only",
                        "the database is read-only: this node cannot lead until it can write "
                        f"({error})",
                    )
                    if self.role is Role.STARTING:
                        self._exit_code = EXIT_UNREADABLE
                        raise StartupError(
                            f"database {self.engine.url.render_as_string(hide_password=True)} "
                            f"is read-only: {error}",
                            EXIT_UNREADABLE,
                        ) from None
            else:
                self._warn("read_only", None)
        if not acquired:
            if self.role is not Role.STANDBY:
                holder = await self._holder_name()
                log.info("service.standby", holder=self.holder, leader=holder)
                self.role = Role.STANDBY
            return
        try:
            await self._renewing_while(self._start_scheduling())
        except Exception as exc:
            log.error("service.scheduler_start_failed", error=error_text(exc))
            await self._stop_scheduling(reason="start_failed")
            await self._release()
            self.role = Role.STANDBY
            return
        self.role = Role.LEADER
        self._sync_cron_component()
        log.info("service.leader", holder=self.holder, epoch=self.lease.epoch, node=self.node)

    async def _renewing_while(self, starting: Coroutine[Any, Any, None]) -> None:
        """Start the scheduler while renewing the lease every period: on a loaded machine a
        start took longer than the lease's margin, and the new leader lost the lease it had
        just taken. A renewal that fails fails the start."""
        task = asyncio.ensure_future(starting)
        lost = False
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.period)
            if done:
                break
            if lost:
                continue
            try:
                # Nothing is dispatched before the start ends, and every claim is fenced by the
                # lease: the renewal may use what is left of it (a loaded machine's start holds
                # the event loop for a second at a time).
                async with asyncio.timeout(max(0.1, self.lease.seconds_left() * 0.9)):
                    renewed = await asyncio.to_thread(self._renew_and_check)
            except Exception as exc:
                log.warning("service.lease_renew_failed", error=error_text(exc))
                renewed = False
            lost = not renewed
        task.result()
        if lost:
            raise NotLeaderError("the lease was lost while the scheduler started")

    def _renew_and_check(self) -> bool:
        """In a thread: renew the row and, on PostgreSQL, check the lock (which also keeps its
        session from ending through idle_session_timeout before the lock loop takes over)."""
        if not self.lease.renew():
            return False
        return self.lock is None or self.lock.check()

    async def _renew(self) -> None:
        """Renew the lease, trying again while it lasts longer than a period: a renewal that
        failed at once (a lock timeout behind a long transaction, a dropped connection) is not
        a lost lease. Steps down when the row says the lease is lost, or when no renewal has
        succeeded with a period left."""
        renewed = False
        while (budget := self.lease.seconds_left() - self.period) > 0:
            deadline = asyncio.timeout(budget)
            try:
                async with deadline:
                    renewed = await asyncio.to_thread(self.lease.renew)
            except Exception as exc:
                log.warning("service.lease_renew_failed", error=error_text(exc))
                if deadline.expired():
                    break  # its thread still waits on the database: never a second one
                await asyncio.sleep(min(RENEW_RETRY_S, budget))
                continue
            break
        if renewed and self.lease.seconds_left() > self.period:
            return
        if self._draining:
            self._lost_while_draining("lease_lost")
            return
        await self._step_down(reason="lease_lost")

    def _lost_while_draining(self, reason: str) -> None:
        """A stopping leader lost its lease (or lock) while runs were still going: another node
        may lead at any moment, so they are cancelled now rather than at the end of the grace."""
        if not self._draining:
            return
        self._draining = False
        manager = self._manager
        running = manager.running_tasks() if manager is not None else []
        log.warning(
            "service.leadership_lost",
            holder=self.holder,
            reason=reason,
            action="cancel_runs",
            running=running,
        )
        if manager is not None:
            manager.cancel_runs(f"the node lost the lease while stopping ({reason})")

    async def _lock_loop(self) -> None:
        """The leader (a stopping one too, until its runs have ended) checks its lock
        connection every ``lock_check`` seconds."""
        done = self._lease_done
        assert done is not None
        assert self.lock is not None
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lock_check):
                    await done.wait()
            if done.is_set():
                return
            if not (self.role is Role.LEADER or self._draining) or self._stepping_down is not None:
                continue
            try:
                async with asyncio.timeout(self.period):
                    held = await asyncio.to_thread(self.lock.check)
            except Exception as exc:
                log.warning("service.lock_check_failed", error=error_text(exc))
                held = False
            if held:
                continue
            if self._draining:
                self._lost_while_draining("lock_lost")
            elif self.role is Role.LEADER:
                await self._step_down(reason="lock_lost")

    async def _step_down(self, *, reason: str) -> None:
        """Stop dispatching at once, release what is still held, become a standby.

        The row is released only after the scheduler has stopped, so that no standby can lead
        while this node still dispatches.
        """
        if self.role is not Role.LEADER or self._stepping_down is not None:
            return
        self.role = Role.STANDBY
        self._compete_after = time.monotonic() + 2 * self.period
        log.warning("service.leadership_lost", holder=self.holder, reason=reason, action="standby")
        # A task of its own, so that a stop of the service waits for it instead of cancelling
        # the scheduler's shutdown halfway.
        self._stepping_down = asyncio.create_task(self._finish_step_down(reason))
        await asyncio.shield(self._stepping_down)

    async def _finish_step_down(self, reason: str) -> None:
        try:
            await self._stop_scheduling(reason=reason)
            self._sync_cron_component()
            await self._release()
            log.info("service.standby", holder=self.holder, leader=None, after=reason)
        finally:
            self._stepping_down = None

    def _sync_cron_component(self) -> None:
        """The ``cron`` component exists on the leader only.

        The scheduler's heartbeat task beats it; a standby runs no scheduler, so the component
        would go stale there and put the whole system in error while the leader is fine.
        """
        monitor = self._monitor
        if monitor is None:
            return
        if self.role is Role.LEADER:
            monitor.register_component("cron")
        else:
            monitor.unregister_component("cron")

    async def _holder_name(self) -> str | None:
        try:
            info = await asyncio.to_thread(self.lease.holder)
        except Exception:
            return None
        return info.holder if info is not None else None

    async def _release(self) -> None:
        """Release the row, then the lock (the row guards the hand-over; see the module)."""
        try:
            async with asyncio.timeout(self.period):
                await asyncio.to_thread(self.lease.release)
        except Exception as exc:
            # The row expires on its own: a standby then waits for the expiry.
            log.warning("service.lease_release_failed", error=error_text(exc))
        if self.lock is not None:
            await asyncio.to_thread(self.lock.release, self.period)

    # --- alerts --------------------------------------------------------------------------------

    async def _start_alerts(self) -> None:
        """Rules and delivery of alerts (:mod:`nanobot.alerts`); they act on the leader only."""
        self._alerter = await Alerter.create(
            self.config,
            self.engine,
            holder=self.holder,
            is_leader=self.is_leader,
            registry=self.metrics.registry,
        )

    # --- the scheduler --------------------------------------------------------------------------

    def _build_monitor(self) -> HeartbeatMonitor:
        """The heartbeat monitor of this service: its configuration, database, node and bus."""
        return HeartbeatMonitor(
            get_bus(),
            float(self.config["heartbeat.interval"]),
            engine=self.engine,
            node=self.node,
            check_timeout=float(self.config["heartbeat.check_timeout"]),
        )

    def _build_scheduler(self) -> CronManager:
        """The scheduler of this service, installed as the process-wide one (the built-in tasks
        and task code registered through get_cron_manager() reach it)."""
        manager = CronManager(
            self.engine,
            node=self.node,
            poll_interval=float(self.config["cron.poll_interval"]),
            bus=get_bus(),
            monitor=self._monitor,
        )
        install_cron_manager(manager)
        return manager

    async def _start_scheduling(self) -> None:
        if self._scheduler is None:
            self._scheduler = self._build_scheduler()
        manager = self._scheduler
        # Every claim is fenced by the lease, every start and step of a run by its remaining
        # time: a leader frozen past its lease claims, starts and runs nothing.
        manager.use_lease(self.lease)
        self._manager = manager
        register_builtin_tasks()
        # This process holds the lease: runs still marked running belong to a leader now gone.
        await manager.start(takeover=True)
        await manager.start_all_tasks()

    async def _stop_scheduling(self, *, reason: str, grace: float = 0.0) -> None:
        manager, self._manager = self._manager, None
        if manager is None:
            return
        try:
            # Losing the lead (not stopping): the task components go, a standby runs no task.
            await manager.shutdown(grace=grace, standby=reason != "shutdown")
        except Exception as exc:
            log.error(
                "service.scheduler_shutdown_failed",
                reason=reason,
                error=error_text(exc),
            )
        # The same manager leads again at a later promotion: the tasks registered in this
        # process, those it cannot store included, are scheduled again then.

    async def _shutdown(self) -> int:
        # A take-over in progress finishes first (no new one starts: _stop is set).
        async with self._step_lock:
            pass
        was_leader = self.role is Role.LEADER
        # A leader keeps renewing its lease (and checking its lock) while its runs finish: a
        # standby must not start a task whose run still goes here.
        self._draining = was_leader and self._lease_task is not None
        self.role = Role.STOPPING
        log.info("service.stopping", grace_s=self.grace, leader=was_leader)
        code = self._exit_code
        await self._stop_watchers()
        if was_leader or self._manager is not None:
            await self._stop_scheduling(reason="shutdown", grace=self.grace)
        self._draining = False
        await self._stop_lease_loops()
        if not await self._stop_monitor():
            code = EXIT_FAILED
        if self._alerter is not None:
            # Before the lease goes: a clean stop of the leader is a hand-over, not a fail-over.
            await self._alerter.stop(released=was_leader)
        if self.lease.epoch is not None or (self.lock is not None and self.lock.held):
            await self._release()
        if self.lock is not None:
            await asyncio.to_thread(self.lock.dispose)
        if self.http is not None:
            await self.http.stop()
        get_bus().unsubscribe("task.finished", self.metrics.on_task_finished)
        self._gc.stop()
        self._switching.stop()
        await asyncio.to_thread(dispose_engines)
        self.role = Role.STOPPED
        log.info("service.stopped", exit_code=code)
        return code

    async def _stop_watchers(self) -> None:
        """A step-down under way, the task file's watch and the overdue watch (in that order)."""
        if self._stepping_down is not None:
            await asyncio.gather(self._stepping_down, return_exceptions=True)
        if self._sources is not None:
            await self._sources.stop()
        if self._overdue is not None:
            await self._overdue.stop()

    async def _stop_lease_loops(self) -> None:
        """The loops that renew the lease and check the lock (the lease itself is kept)."""
        if self._lease_done is not None:
            self._lease_done.set()
        for task in (self._lease_task, self._lock_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _stop_monitor(self) -> bool:
        """Stop the heartbeat monitor; False (logged) when its last write failed."""
        if self._monitor is None:
            return True
        try:
            await self._monitor.stop()
        except Exception as exc:
            log.error("service.monitor_stop_failed", error=error_text(exc))
            return False
        return True

    # --- the database under the service -------------------------------------------------------

    def check_database_at_start(self) -> None:
        """In a thread, after the migrations: the database guard's check of the database the
        service opened (:meth:`DatabaseGuard.check_at_start`).

        :meth:`run` calls it; public so that a test can drive the database checks without the
        lease loop (with :meth:`health_cycle`)."""
        self._guard.check_at_start()

    def _gc_quiet(self) -> bool:
        """Whether a full garbage collection would find little but long-lived state alive: no
        scheduler, or one between bursts (:meth:`CronManager.quiet`)."""
        manager = self._manager
        return manager is None or manager.quiet()

    def _backlog(self) -> int:
        """The scheduler's backlog (:meth:`CronManager.backlog`); 0 on a standby."""
        manager = self._manager
        return 0 if manager is None else manager.backlog()

    def _warn(self, key: str, problem: str | None) -> None:
        """Show ``problem`` in status (degraded) under ``key``; None clears it."""
        if problem is None:
            if self._warnings.pop(key, None) is None:
                return
        else:
            self._warnings[key] = problem
        self._warning_list = tuple(self._warnings.values())

    async def health_cycle(self) -> None:
        """Each lease period, the database guard's cycle: a database file lost stops the
        scheduling of a leader (it steps down; no node of this file leads again).

        The lease loop calls it after each lease step; public for the same reason as
        :meth:`check_database_at_start`."""
        lost = await self._guard.cycle(leader=self.role is Role.LEADER)
        if lost is not None and self.role is Role.LEADER:
            await self._step_down(reason=f"database_{lost}")


def _exit_now(sig: signal.Signals) -> NoReturn:  # pragma: no cover
    """A second signal: exit at once, the runs in flight left to the next start's catch-up.

    Run by tests/test_service.py::test_a_second_signal_exits_at_once; coverage.py cannot record
    it, because ``os._exit`` skips the exit hooks that save its data.
    """
    log.warning("service.signal", signal=sig.name, action="exit_now", exit_code=EXIT_FAILED)
    # Lines are written by the logging thread: give it a moment to write this one, not more
    # (a second signal means now, even if that thread is stuck on a full disk).
    flusher = threading.Thread(target=flush_logging, name="nanobot-exit-flush", daemon=True)
    flusher.start()
    flusher.join(timeout=1.0)
    sys.stderr.flush()
    os._exit(EXIT_FAILED)


def _is_read_only(error: str) -> bool:
    """A write refused because the database (or PostgreSQL server: a hot standby) is read-only."""
    text = error.lower()
    return "readonly database" in text or "read-only" in text


class _ProbeAdapter:
    """The service as the endpoint's :class:`nanobot.http.Probe`."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def liveness(self) -> dict[str, Any]:
        return self._service.liveness()

    def status(self) -> dict[str, Any]:
        return self._service.status()

    def readiness(self) -> dict[str, Any]:
        return self._service.readiness()

    def metrics(self) -> bytes:
        return self._service.metrics_text()


def run_service(config: Config) -> int:
    """Run the service in a new event loop until it stops; the exit code."""
    try:
        return asyncio.run(Service(config).run())
    except StartupError:
        raise  # one line and its exit code, from the command line
    except Exception:
        # A bug, not an input: the traceback goes to the log, the exit code says it failed.
        log.exception("service.crashed")
        return EXIT_FAILED
