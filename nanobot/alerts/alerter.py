"""The alerter: runs the rules and the delivery worker inside the service.

On the leader, every ``alerts.check_interval`` seconds (sooner after a ``health.changed`` or a
database event on the bus, or when alerts held for grouping are due) it evaluates the rules
(:class:`nanobot.alerts.rules.Rules`, one transaction that writes the outbox) and delivers what
is due (:class:`nanobot.alerts.worker.Deliverer`). Only the leader does either, so two nodes
never send the same alert; an alert that a leader wrote and could not send is sent by the next
leader, with the same idempotency key.

A standby does one thing: when no node has held the lease for longer than twice
``service.lease_ttl`` it writes a ``leader.none`` alert (one per lease epoch, whichever standby
writes it first) and delivers alerts of that kind itself, since there is no leader to do it.

Database events on the bus: ``database.recreated`` and ``database.replaced`` (published by the
service: a new, empty database after a restart where one with tasks had been; the database file
deleted or replaced under the running service), and the hooks ``database.unusable`` /
``database.usable`` for any other code; payloads are dicts (``database``, ``node``, ``reason``,
``problem``). Each becomes an alert that the node which received it writes at its next step
(any node: the key makes a second write a no-op) and the leader delivers. An alert that the
database is unusable or replaced is also sent directly by the node that received it, to each
destination once (kept in memory, at most the 100 alerts that
:class:`nanobot.alerts.rules.Rules` keeps raised): the outbox is in that database, which nobody
may read again. It is then written as already sent to those destinations.

Thread ownership: the alerter's attributes belong to the event loop; evaluations run in a
worker thread one at a time (never two at once), deliveries as the worker module says.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from nanobot.alerts import store
from nanobot.alerts.alert import Alert, AlertKind, Severity, alert_key
from nanobot.alerts.destinations import parse_destinations
from nanobot.alerts.metrics import AlertMetrics
from nanobot.alerts.rules import Rules, settings_from
from nanobot.alerts.worker import Deliverer, RetryPolicy
from nanobot.bus import MessageBus, get_bus
from nanobot.config import Config

# Published by the service's database guard: the database file was deleted or replaced under a
# running service; a new, empty database was found after a restart where one with tasks had been.
from nanobot.database_guard import DATABASE_RECREATED, DATABASE_REPLACED
from nanobot.models import error_text, utcnow
from nanobot.times import Clock

log = structlog.get_logger(__name__)


# DATABASE_REPLACED and DATABASE_RECREATED (nanobot.database_guard): the database file was deleted
# or replaced under a running service; a new, empty database was found after a restart where one
# with tasks had been. Hooks for any other code that finds the database unusable, and usable again.
DATABASE_UNUSABLE: Final = "database.unusable"
DATABASE_USABLE: Final = "database.usable"
# Events after which the rules are evaluated at once rather than at the next check_interval.
WAKE_TOPICS: Final = ("health.changed", "task.auto_paused", "task.overdue", "task.overdue_cleared")
DATABASE_TOPICS: Final = (DATABASE_REPLACED, DATABASE_RECREATED, DATABASE_UNUSABLE, DATABASE_USABLE)
# Alerts about the database that holds the outbox: sent directly as well, since the outbox may be
# in a file nobody will read again.
DIRECT_KINDS: Final = frozenset({AlertKind.DATABASE_UNUSABLE})
# The longest an evaluation or a pass may take before the loop logs it and goes on.
STEP_TIMEOUT: Final = 60.0


def policy_from(config: Config) -> RetryPolicy:
    return RetryPolicy(
        base=timedelta(seconds=float(config["alerts.retry_base"])),
        cap=timedelta(seconds=float(config["alerts.retry_max"])),
        give_up_after=timedelta(seconds=float(config["alerts.give_up_after"])),
        send_timeout=float(config["alerts.send_timeout"]),
    )


class Alerter:
    """The alerts of one service process."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        holder: str,
        is_leader: Callable[[], bool],
        registry: CollectorRegistry | None = None,
        clock: Clock = utcnow,
        bus: MessageBus | None = None,
    ) -> None:
        self.destinations = parse_destinations(config)
        self.engine = engine
        self.is_leader = is_leader
        self.clock = clock
        self.bus = bus or get_bus()
        self.interval = float(config["alerts.check_interval"])
        self.metrics = AlertMetrics(registry, engine, clock) if registry is not None else None
        self.rules = Rules(engine, self.destinations, settings_from(config), holder=holder)
        self.deliverer = Deliverer(
            engine, self.destinations, policy_from(config), clock=clock, metrics=self.metrics
        )
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._evaluating: asyncio.Future[list[Alert]] | None = None
        # Keys of raised alerts sent directly (the outbox could not be written) -> destinations;
        # at most as many keys as Rules keeps raised alerts.
        self._sent_directly: dict[str, set[str]] = {}
        # The loop's steps and a caller's never overlap: one evaluation at a time.
        self._step_lock = asyncio.Lock()

    @classmethod
    async def create(
        cls,
        config: Config,
        engine: Engine,
        *,
        holder: str,
        is_leader: Callable[[], bool],
        registry: CollectorRegistry | None = None,
        bus: MessageBus | None = None,
    ) -> Alerter:
        """Build (in a thread: checking destinations imports Apprise, a second of CPU that must
        not hold the loop) and start an alerter; database events published meanwhile are kept."""
        bus = bus or get_bus()
        early: list[tuple[str, Any]] = []

        def keep(topic: str, payload: Any) -> None:
            early.append((topic, payload))

        for topic in DATABASE_TOPICS:
            bus.subscribe(topic, keep)
        try:
            alerter = await asyncio.to_thread(
                functools.partial(
                    cls,
                    config,
                    engine,
                    holder=holder,
                    is_leader=is_leader,
                    registry=registry,
                    bus=bus,
                )
            )
        finally:
            for topic in DATABASE_TOPICS:
                bus.unsubscribe(topic, keep)
        # No await between the unsubscribe above and start()'s subscriptions: nothing is missed.
        await alerter.start(early=early)
        return alerter

    # --- bus subscribers (event loop) -----------------------------------------------------

    def _on_wake(self, _topic: str, _payload: Any) -> None:
        self._wake.set()

    def _on_database(self, topic: str, payload: Any) -> None:
        data = payload if isinstance(payload, dict) else {}
        now = self.clock()
        node = str(data.get("node") or "this node")
        database = str(data.get("database") or "the database")
        problem = str(data.get("problem") or data.get("error") or "").strip()
        reason = str(data.get("reason") or "").strip()
        at = str(data.get("at") or now.isoformat())
        kind, severity, title, body = {
            DATABASE_RECREATED: (
                AlertKind.DATABASE_CREATED,
                Severity.CRITICAL,
                "nanobot: a new, empty database was created",
                f"{node} found a new, empty database at {database} where one with tasks had "
                "been: stored tasks and their history are not in it. Check database.url and the "
                "volume that holds it.",
            ),
            DATABASE_REPLACED: (
                AlertKind.DATABASE_UNUSABLE,
                Severity.CRITICAL,
                "nanobot: the database was replaced under the service",
                f"The database {database} was {reason or 'replaced'} while {node} ran on it: "
                f"{node} stopped scheduling. Restore the database, then restart the service.",
            ),
            DATABASE_UNUSABLE: (
                AlertKind.DATABASE_UNUSABLE,
                Severity.CRITICAL,
                "nanobot: the database is unusable",
                f"{node} cannot use {database} since {at}: no run is recorded meanwhile.",
            ),
            DATABASE_USABLE: (
                AlertKind.DATABASE_RECOVERED,
                Severity.INFO,
                "nanobot: the database is usable again",
                f"{node} can use {database} again ({at}).",
            ),
        }[topic]
        if problem:
            body += f" Problem: {problem}"
        self.rules.raise_alert(
            Alert(
                key=alert_key(kind, node, at),
                kind=kind,
                subject="database",
                severity=severity,
                title=title,
                body=body,
                created_at=now,
            )
        )
        self._wake.set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, early: Sequence[tuple[str, Any]] = ()) -> None:
        """Subscribe, take the database events received before (``early``), start the loop."""
        for topic in WAKE_TOPICS:
            self.bus.subscribe(topic, self._on_wake)
        for topic in DATABASE_TOPICS:
            self.bus.subscribe(topic, self._on_database)
        for topic, payload in early:
            self._on_database(topic, payload)
        try:
            dropped = await asyncio.to_thread(
                store.drop_unconfigured, self.engine, [d.name for d in self.destinations]
            )
            if dropped:
                log.warning("alerts.dropped_unconfigured", deliveries=dropped)
        except Exception as exc:
            log.warning("alerts.start_failed", error=error_text(exc))
        self._task = asyncio.create_task(self._loop(), name="nanobot-alerts")
        log.info(
            "alerts.started",
            destinations=[d.name for d in self.destinations],
            interval_s=self.interval,
        )

    async def stop(self, *, released: bool = False) -> None:
        """Stop; ``released``: this process led and stops cleanly (a hand-over, not a failure)."""
        for topic in WAKE_TOPICS:
            self.bus.unsubscribe(topic, self._on_wake)
        for topic in DATABASE_TOPICS:
            self.bus.unsubscribe(topic, self._on_database)
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._evaluating is not None:
            # An evaluation in its thread finishes its transaction (committed or not) first.
            await asyncio.gather(self._evaluating, return_exceptions=True)
        if released:
            try:
                async with asyncio.timeout(5.0):
                    await asyncio.to_thread(self.rules.mark_released)
            except Exception as exc:
                log.warning("alerts.release_failed", error=error_text(exc))
        self.deliverer.close()
        if self.metrics is not None:
            self.metrics.unregister()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # A flag as well as the cancellation: a cancel that lands as a step finishes must still
        # end the loop.
        while not self._stopping:
            timeout = self.interval
            held = self.rules.held_until
            if held is not None:
                timeout = max(0.0, min(timeout, (held - self.clock()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            started = loop.time()
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await self.run_once()
            except TimeoutError:
                log.error("alerts.step_timeout", timeout_s=STEP_TIMEOUT)
            except Exception as exc:
                log.error("alerts.step_failed", error=error_text(exc))
            # Woken in a burst (a health cycle with many transitions): at most one step a second.
            await asyncio.sleep(max(0.0, min(1.0, self.interval) - (loop.time() - started)))

    async def _send_directly(self) -> None:
        """Send raised alerts about the database itself to each destination not yet sent them."""
        for alert in self.rules.raised():
            if alert.kind not in DIRECT_KINDS:
                continue
            done = self._sent_directly.setdefault(alert.key, set())
            for destination in self.destinations:
                if destination.name in done or not destination.accepts(alert):
                    continue
                if await self.deliverer.send_now(destination, alert):
                    done.add(destination.name)
        live = {a.key for a in self.rules.raised()}
        for key in list(self._sent_directly):
            if key not in live:
                del self._sent_directly[key]

    async def run_once(self) -> None:
        """One step: on the leader evaluate and deliver; on a standby watch for no leader."""
        async with self._step_lock:
            await self._step()

    async def _step(self) -> None:
        await self._send_directly()
        sent = {k: frozenset(v) for k, v in self._sent_directly.items()}
        if self.is_leader():
            self._evaluating = asyncio.ensure_future(
                asyncio.to_thread(functools.partial(self.rules.evaluate, self.clock(), sent=sent))
            )
            try:
                await asyncio.shield(self._evaluating)
            finally:
                self._evaluating = None
            self._forget_sent(sent)
            await self.deliverer.deliver_due()
            return
        if self.rules.raised():
            # Any node writes what it raised (the key makes a second write a no-op); the
            # leader delivers it.
            await asyncio.to_thread(
                functools.partial(self.rules.write_raised, self.clock(), sent=sent)
            )
            self._forget_sent(sent)
        alert = await asyncio.to_thread(self.rules.no_leader, self.clock())
        if alert is not None:
            log.error("alert.raised", kind=alert.kind.value, key=alert.key)
        await self.deliverer.deliver_due(kinds=(AlertKind.LEADER_NONE,))

    def _forget_sent(self, written: dict[str, frozenset[str]]) -> None:
        for key in written:
            self._sent_directly.pop(key, None)
