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
   at once with code 1.

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
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from nanobot.bus import get_bus
from nanobot.config import Config
from nanobot.db import dispose_engines, get_engine, upgrade_database
from nanobot.exceptions import ConfigError
from nanobot.http import HttpServer
from nanobot.lease import AdvisoryLock, SchedulerLease, holder_id
from nanobot.metrics import Metrics
from nanobot.node import node_name
from nanobot.status import build_status, nanobot_version

log = structlog.get_logger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
# Liveness: the lease loop must have come round within this many of its periods.
_LOOP_STALE_PERIODS: Final = 2.5


class Role(enum.StrEnum):
    STARTING = "starting"
    STANDBY = "standby"
    LEADER = "leader"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Service:
    """One service process. ``await Service(config).run()`` returns the exit code."""

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
        self._manager: Any = None
        self._monitor: Any = None
        self._stop: asyncio.Event | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._lock_task: asyncio.Task[None] | None = None
        self._last_lease_poll = time.monotonic()
        self._stepping_down: asyncio.Task[None] | None = None
        # time.monotonic() before which this node does not compete for the lead (set when it
        # loses the lead, so that a healthy standby takes over first).
        self._compete_after = 0.0
        self._signals = 0

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
        return build_status(self.engine)

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def _dashboard_setup(self) -> Callable[[Any], None] | None:
        """What adds the dashboard and the API to the endpoint (None with http.dashboard off).

        The tokens are read here, before the endpoint binds: a bad token file stops the start.
        """
        if not self.config["http.dashboard"]:
            return None
        from nanobot.web.app import setup_dashboard
        from nanobot.web.tokens import TokenStore

        tokens = TokenStore.from_config(
            self.config.get("http.tokens", ()), self.config.get("http.token_file")
        )
        host = self.config["http.host"]

        def configure(app: Any) -> None:
            setup_dashboard(app, self.engine, host=host, tokens=tokens)

        return configure

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until a signal (or :meth:`request_stop`); the process exit code."""
        self._stop = asyncio.Event()
        self._install_signal_handlers()
        try:
            await asyncio.to_thread(upgrade_database, self.engine)
        except Exception as exc:
            log.error("service.database_unusable", error=f"{exc.__class__.__name__}: {exc}")
            return EXIT_FAILED
        if self._stop.is_set():
            log.info("service.stopped", exit_code=EXIT_OK, reason="signal during start")
            return EXIT_OK
        from nanobot.logging import configured_log_file

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
        try:
            if self.config["http.enabled"]:
                try:
                    configure = self._dashboard_setup()
                except ConfigError as exc:
                    log.error("service.config_invalid", error=str(exc))
                    return EXIT_FAILED
                self.http = HttpServer(
                    _ProbeAdapter(self),
                    self.config["http.host"],
                    self.config["http.port"],
                    configure=configure,
                )
                try:
                    await self.http.start()
                except OSError as exc:
                    log.error(
                        "service.http_bind_failed",
                        host=self.config["http.host"],
                        port=self.config["http.port"],
                        error=str(exc),
                    )
                    self.http = None
                    return EXIT_FAILED
            await self._lease_step()
            from nanobot.heartbeat import initialize_heartbeat

            self._monitor = initialize_heartbeat()
            self._sync_cron_component()
            self._lease_task = asyncio.create_task(self._lease_loop(), name="nanobot-lease")
            if self.lock is not None:
                self._lock_task = asyncio.create_task(self._lock_loop(), name="nanobot-lock")
            settle_after_start()
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
        log.warning("service.signal", signal=sig.name, action="exit_now", exit_code=EXIT_FAILED)
        sys.stderr.flush()
        os._exit(EXIT_FAILED)

    # --- the lease ------------------------------------------------------------------------------

    def _next_lease_step_in(self) -> float:
        """Seconds until the next round: a period for a standby; for the leader, until a period
        after its last renewal began (a slow start or a slow renewal must not eat the margin)."""
        if self.role is not Role.LEADER:
            return self.period
        since_renewal = self.ttl - self.lease.seconds_left()
        return max(0.0, min(self.period, self.period - since_renewal))

    async def _lease_loop(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._next_lease_step_in())
            if self._stop.is_set():
                return
            await self._lease_step()

    async def _lease_step(self) -> None:
        """One round: a standby tries to take the lease, the leader renews it."""
        try:
            if self._stepping_down is not None:
                return
            if self.role is Role.LEADER:
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
        if time.monotonic() < self._compete_after:
            acquired = False
        else:
            try:
                acquired = await asyncio.wait_for(
                    asyncio.to_thread(self._acquire), timeout=self.period
                )
            except Exception as exc:
                log.warning("service.lease_unavailable", error=f"{exc.__class__.__name__}: {exc}")
                acquired = False
        if not acquired:
            if self.role is not Role.STANDBY:
                holder = await self._holder_name()
                log.info("service.standby", holder=self.holder, leader=holder)
                self.role = Role.STANDBY
            return
        try:
            await self._start_scheduling()
        except Exception as exc:
            log.error("service.scheduler_start_failed", error=f"{exc.__class__.__name__}: {exc}")
            await self._stop_scheduling(reason="start_failed")
            await self._release()
            self.role = Role.STANDBY
            return
        self.role = Role.LEADER
        self._sync_cron_component()
        log.info("service.leader", holder=self.holder, epoch=self.lease.epoch, node=self.node)

    async def _renew(self) -> None:
        budget = self.lease.seconds_left() - self.period
        renewed = False
        if budget > 0:
            try:
                renewed = await asyncio.wait_for(
                    asyncio.to_thread(self.lease.renew), timeout=budget
                )
            except Exception as exc:
                log.warning("service.lease_renew_failed", error=f"{exc.__class__.__name__}: {exc}")
        if renewed and self.lease.seconds_left() > self.period:
            return
        await self._step_down(reason="lease_lost")

    async def _lock_loop(self) -> None:
        """The leader checks its lock connection every ``lock_check`` seconds."""
        assert self._stop is not None
        assert self.lock is not None
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.lock_check)
            if self._stop.is_set():
                return
            if self.role is not Role.LEADER or self._stepping_down is not None:
                continue
            try:
                held = await asyncio.wait_for(
                    asyncio.to_thread(self.lock.check), timeout=self.period
                )
            except Exception as exc:
                log.warning("service.lock_check_failed", error=f"{exc.__class__.__name__}: {exc}")
                held = False
            if not held and self.role is Role.LEADER:
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
            await asyncio.wait_for(asyncio.to_thread(self.lease.release), timeout=self.period)
        except Exception as exc:
            # The row expires on its own: a standby then waits for the expiry.
            log.warning("service.lease_release_failed", error=f"{exc.__class__.__name__}: {exc}")
        if self.lock is not None:
            await asyncio.to_thread(self.lock.release, self.period)

    # --- the scheduler --------------------------------------------------------------------------

    async def _start_scheduling(self) -> None:
        from nanobot.cron import get_cron_manager, register_builtin_tasks

        manager = get_cron_manager()
        # Every claim is fenced by the lease: a leader frozen past its lease claims nothing.
        manager.fence = self.lease.verify
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
            await manager.shutdown(grace=grace)
        except Exception as exc:
            log.error(
                "service.scheduler_shutdown_failed",
                reason=reason,
                error=f"{exc.__class__.__name__}: {exc}",
            )
        from nanobot.cron import reset_cron_manager

        # A later promotion starts a fresh manager.
        reset_cron_manager()

    async def _shutdown(self) -> int:
        was_leader = self.role is Role.LEADER
        self.role = Role.STOPPING
        log.info("service.stopping", grace_s=self.grace, leader=was_leader)
        code = EXIT_OK
        for task in (self._lease_task, self._lock_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._stepping_down is not None:
            await asyncio.gather(self._stepping_down, return_exceptions=True)
        if was_leader or self._manager is not None:
            await self._stop_scheduling(reason="shutdown", grace=self.grace)
        if self._monitor is not None:
            try:
                await self._monitor.stop()
            except Exception as exc:
                log.error("service.monitor_stop_failed", error=f"{exc.__class__.__name__}: {exc}")
                code = EXIT_FAILED
        if self.lease.epoch is not None or (self.lock is not None and self.lock.held):
            await self._release()
        if self.lock is not None:
            await asyncio.to_thread(self.lock.dispose)
        if self.http is not None:
            await self.http.stop()
        get_bus().unsubscribe("task.finished", self.metrics.on_task_finished)
        await asyncio.to_thread(dispose_engines)
        self.role = Role.STOPPED
        log.info("service.stopped", exit_code=code)
        return code


def settle_after_start() -> None:
    """Move what start-up allocated out of the garbage collector's way.

    A full collection scans every tracked object (SQLAlchemy's and APScheduler's included) with
    the GIL held: tens of milliseconds during which neither the event loop nor the scheduler's
    worker runs, measured as 60-75 ms loop holds in a burst of 1000-5000 runs. ``gc.freeze()``
    moves the objects alive after start-up into a generation that collections skip; they live
    as long as the process anyway.
    """
    gc.collect()
    gc.freeze()


class _ProbeAdapter:
    """The service as the endpoint's :class:`nanobot.http.Probe`."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def liveness(self) -> dict[str, Any]:
        return self._service.liveness()

    def status(self) -> dict[str, Any]:
        return self._service.status()

    def metrics(self) -> bytes:
        return self._service.metrics_text()


def run_service(config: Config) -> int:
    """Run the service in a new event loop until it stops; the exit code."""
    try:
        return asyncio.run(Service(config).run())
    except Exception:
        # A bug, not an input: the traceback goes to the log, the exit code says it failed.
        log.exception("service.crashed")
        return EXIT_FAILED
