"""The heartbeat monitor of section 5.2 of the seed: component liveness and health, persisted.

Components register with an optional health check (a plain or an async callable; a truthy result
is healthy). Each cycle runs the checks concurrently under ``check_timeout``, marks components
whose last heartbeat is older than their stale limit (2 x interval unless the component says
otherwise), aggregates the system status, writes the cycle's state in one transaction and
publishes ``("heartbeat", {...})`` and, for every transition, ``("health.changed", {...})`` on
the message bus.

The synchronous API (``register_component``, ``update_component_heartbeat``,
``mark_component_error``) only changes memory: it is cheap enough to call from a task's hot path
and never does I/O on the caller's event loop. What it changes is queued and written by the next
cycle (or :meth:`HeartbeatMonitor.flush`, or :meth:`HeartbeatMonitor.stop`), so no transition
and no error is lost between cycles; ``health.changed`` is published then too, at most one
interval late.

"Heartbeat" here means the liveness of this process's components, not the periodic wake-up of
the agent that the wider nanobot world also calls a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import math
import reprlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import structlog
from sqlalchemy import Engine

from nanobot.config import get_config
from nanobot.exceptions import ComponentError, InvalidComponentError
from nanobot.heartbeat import store
from nanobot.heartbeat.runner import CheckSlot, HealthCheck, Outcome, error_text, run_checks
from nanobot.heartbeat.store import (
    ERRORS_SHOWN,
    SYSTEM_COMPONENT,
    Batch,
    ChangeRow,
    ComponentRow,
    ErrorRow,
    HeartbeatRow,
)
from nanobot.loopwatch import LagProbe, last_hold
from nanobot.models import NAME_MAX, ComponentStatus, utcnow

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

STALE_REASON: Final = "heartbeat timeout"
# A check never gets more than this share of the interval, so one cycle cannot run into the next.
CHECK_TIMEOUT_SHARE: Final = 0.8
# The component that stands for this process's event loop (see initialize_heartbeat).
EVENT_LOOP_COMPONENT: Final = "event_loop"
# A lag of the event loop this long (seconds) in a cycle puts ``event_loop`` in error: timers,
# lease renewals and task starts were that late.
LOOP_LAG_ERROR_S: Final = 1.0
# Errors and transitions queued while the database cannot be written are kept up to this many;
# past it the oldest are dropped, counted and logged, so a long outage cannot exhaust memory.
MAX_PENDING: Final = 10_000


class NoRunningLoopError(ComponentError, RuntimeError):
    """The heartbeat monitor needs a running event loop and none is running."""


@dataclass(eq=False, slots=True)
class _Component:
    name: str
    status: ComponentStatus
    last_heartbeat: datetime | None
    registered_at: datetime
    errors: deque[tuple[datetime, str]] = field(default_factory=lambda: deque(maxlen=ERRORS_SHOWN))
    last_error: str | None = None
    # False for a component known only from the database (registered by an earlier process).
    registered: bool = False
    slot: CheckSlot | None = None
    failure_threshold: int = 1
    success_threshold: int = 1
    stale_after: float | None = None
    failures: int = 0
    successes: int = 0
    stale: bool = False
    dirty: bool = False


def _positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _threshold(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidComponentError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _status(value: str) -> ComponentStatus:
    """A stored status; a value this version does not know reads as unknown."""
    try:
        return ComponentStatus(value)
    except ValueError:
        return ComponentStatus.UNKNOWN


def _epoch(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0


class HeartbeatMonitor:
    """Monitors the health of this process's components; see the module's docstring.

    ``HeartbeatMonitor(message_bus, interval=30)`` is the seed's constructor. The keyword-only
    arguments are for tests and embedding: ``engine`` (default: the configured database,
    resolved and migrated on first use, never in the constructor), ``node`` (default
    :func:`nanobot.node.node_name`), ``check_timeout`` (default ``heartbeat.check_timeout``;
    capped at 0.8 x interval either way) and ``clock`` (returns an aware UTC datetime).
    """

    def __init__(
        self,
        message_bus: Any,
        interval: float = 30,
        *,
        engine: Engine | None = None,
        node: str | None = None,
        check_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.message_bus = message_bus
        self.interval = _positive_seconds("interval", interval)
        if check_timeout is None:
            check_timeout = get_config().get("heartbeat.check_timeout", 5.0)
        self.check_timeout = min(
            _positive_seconds("check_timeout", check_timeout), CHECK_TIMEOUT_SHARE * self.interval
        )
        if node is None:
            from nanobot.node import node_name

            node = node_name()
        self.node = node
        self._clock: Clock = clock or utcnow
        self._engine = engine
        self._engine_lock = threading.Lock()
        # The seed's public attributes.
        self.last_heartbeat: float = 0
        self.monitor_task: asyncio.Task[None] | None = None
        self._running = False

        # In-memory state; the synchronous API may be called from worker threads.
        self._lock = threading.RLock()
        self._components: dict[str, _Component] = {}
        self._system_status: ComponentStatus | None = None
        self._loaded = False
        self._warned_unknown: set[str] = set()
        # Queued for the next write (and, for transitions, for the next publication).
        self._pending_deletes: list[str] = []
        self._pending_errors: list[ErrorRow] = []
        self._pending_changes: list[ChangeRow] = []
        self._pending_events: list[ChangeRow] = []
        self._dropped = 0
        # Created on first use, inside the loop that uses them.
        self._persist_lock: asyncio.Lock | None = None
        self._load_lock: asyncio.Lock | None = None
        self._cycle_lock: asyncio.Lock | None = None
        self._inflight: asyncio.Future[None] | None = None
        # The event loop's lag, measured on the loop while the monitor runs.
        self._probe = LagProbe()
        self.last_loop_lag = 0.0

    # --- time and the database ------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError(f"the heartbeat clock returned a naive datetime {now!r}")
        return now

    @property
    def engine(self) -> Engine:
        """The engine state is written to; the configured database, migrated, by default."""
        with self._engine_lock:
            if self._engine is None:
                from nanobot.db import get_engine, upgrade_database

                engine = get_engine()
                upgrade_database(engine)
                self._engine = engine
            return self._engine

    async def _get_engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        return await asyncio.to_thread(lambda: self.engine)

    # --- the seed's synchronous API ---------------------------------------------------------

    def register_component(
        self,
        component_name: str,
        health_check: HealthCheck | None = None,
        *,
        failure_threshold: int = 1,
        success_threshold: int = 1,
        stale_after: float | None = None,
    ) -> None:
        """Register a component, healthy and beating now, as in the seed.

        ``health_check`` is a plain or async callable; a truthy result is healthy and counts as
        a heartbeat. ``failure_threshold`` failures in a row put the component in error and
        ``success_threshold`` successes in a row make it healthy again (anti-flapping; 1 and 1
        as in the seed). ``stale_after`` seconds without a heartbeat make it stale (default
        2 x interval): a component beaten rarely, such as an hourly task, passes more.

        Registering a name again (in this process) replaces its check and options and keeps its
        status and history. A component known only from the database (an earlier process)
        becomes healthy: its registration is a sign of life.
        """
        if not isinstance(component_name, str) or not component_name.strip():
            raise InvalidComponentError(
                f"component name must be a non-empty string, got {component_name!r}"
            )
        if len(component_name) > NAME_MAX:
            raise InvalidComponentError(
                f"component name {component_name[:40]!r}... is {len(component_name)} characters; "
                f"at most {NAME_MAX} are allowed"
            )
        if component_name == SYSTEM_COMPONENT:
            raise InvalidComponentError(
                f"{SYSTEM_COMPONENT!r} is reserved for the system's own status"
            )
        if health_check is not None and not callable(health_check):
            raise InvalidComponentError(
                f"health check of component {component_name!r} is not callable: "
                f"{reprlib.repr(health_check)}"
            )
        failure_threshold = _threshold("failure_threshold", failure_threshold)
        success_threshold = _threshold("success_threshold", success_threshold)
        if stale_after is not None:
            try:
                stale_after = _positive_seconds("stale_after", stale_after)
            except ValueError as exc:
                raise InvalidComponentError(str(exc)) from None
        now = self._now()
        with self._lock:
            comp = self._components.get(component_name)
            fresh = comp is None or not comp.registered
            if comp is None:
                comp = _Component(
                    name=component_name,
                    status=ComponentStatus.UNKNOWN,
                    last_heartbeat=None,
                    registered_at=now,
                )
                self._components[component_name] = comp
                from_status: ComponentStatus | None = None
            else:
                from_status = comp.status
            comp.slot = None if health_check is None else CheckSlot(health_check, component_name)
            comp.failure_threshold = failure_threshold
            comp.success_threshold = success_threshold
            comp.stale_after = stale_after
            if fresh:
                comp.registered = True
                comp.registered_at = now
                comp.last_heartbeat = now
                comp.failures = comp.successes = 0
                comp.stale = False
                comp.dirty = True
                self._transition(comp, from_status, ComponentStatus.HEALTHY, "registered", now)
        # Debug: every task's first run registers its component; thousands of lines at a
        # burst's first run said nothing an operator needs (status and `components` show them).
        log.debug(
            "heartbeat.component_registered",
            component=component_name,
            node=self.node,
            has_check=health_check is not None,
            again=not fresh,
        )

    def unregister_component(self, component_name: str) -> None:
        """Forget a component; its ``components`` row goes, its history stays.

        Works for a component known only from the database too, which is how a component that
        no longer exists is cleared. An unknown name is ignored, as in the seed.
        """
        now = self._now()
        with self._lock:
            comp = self._components.pop(component_name, None)
            if comp is None:
                return
            self._pending_deletes.append(component_name)
            if comp.status is not ComponentStatus.UNKNOWN:
                self._queue_change(
                    ChangeRow(
                        component_name, now, comp.status, ComponentStatus.UNKNOWN, "unregistered"
                    )
                )
        log.info("heartbeat.component_unregistered", component=component_name, node=self.node)

    def update_component_heartbeat(self, component_name: str) -> None:
        """Record a sign of life of a registered component (a success, for the thresholds)."""
        now = self._now()
        with self._lock:
            comp = self._registered(component_name, action="heartbeat")
            if comp is not None:
                self._succeed(comp, now, "heartbeat")

    def mark_component_error(self, component_name: str, error: Any) -> None:
        """Record an error of a registered component (a failure, for the thresholds).

        ``error`` is a text or an exception; it is stored cut to a bounded length. An unknown
        name is ignored as in the seed, but logged with the error, so nothing is lost silently.
        """
        text = error_text(error)
        now = self._now()
        with self._lock:
            comp = self._registered(component_name, action="error", error=text)
            if comp is not None:
                self._fail(comp, now, text)

    def get_component_status(self, component_name: str) -> dict[str, Any]:
        """The seed's record of one component: ``status``, ``last_heartbeat`` (epoch seconds)
        and ``errors`` (the last 10, ``{"timestamp", "error"}``), plus ``registered`` and
        ``last_error``. A copy: changing it changes nothing.

        A component known only from the database shows its stored state with
        ``registered: False``; an unknown name gives the seed's ``{"status": "unknown",
        "last_heartbeat": 0, "errors": []}``.
        """
        now = self._now()
        with self._lock:
            comp = self._components.get(component_name)
            if comp is None:
                return {"status": ComponentStatus.UNKNOWN.value, "last_heartbeat": 0, "errors": []}
            self._mark_stale(comp, now)
            return {
                "status": comp.status.value,
                "last_heartbeat": _epoch(comp.last_heartbeat),
                "errors": [{"timestamp": at.timestamp(), "error": e} for at, e in comp.errors],
                "health_check": comp.slot.check if comp.slot else None,
                "registered": comp.registered,
                "last_error": comp.last_error,
            }

    def get_system_status(self) -> dict[str, Any]:
        """The seed's system summary, counted after stale components are marked.

        Only components registered in this process count; components known only from the
        database are visible through :meth:`get_component_status` and in the database.
        ``status`` is error if any component is in error, healthy if all are healthy (or none
        is registered), otherwise unknown. ``last_heartbeat`` is the start of the last cycle.
        """
        now = self._now()
        with self._lock:
            counts = dict.fromkeys(ComponentStatus, 0)
            for comp in self._components.values():
                if comp.registered:
                    self._mark_stale(comp, now)
                    counts[comp.status] += 1
            total = sum(counts.values())
            if counts[ComponentStatus.ERROR]:
                status = ComponentStatus.ERROR
            elif counts[ComponentStatus.HEALTHY] == total:
                status = ComponentStatus.HEALTHY
            else:
                status = ComponentStatus.UNKNOWN
            if status is not self._system_status:
                reason = self._system_reason(status)
                self._queue_change(
                    ChangeRow(SYSTEM_COMPONENT, now, self._system_status, status, reason)
                )
                self._system_status = status
        return {
            "status": status.value,
            "components": {
                "total": total,
                "healthy": counts[ComponentStatus.HEALTHY],
                "error": counts[ComponentStatus.ERROR],
                "unknown": counts[ComponentStatus.UNKNOWN],
            },
            "last_heartbeat": self.last_heartbeat,
            "timestamp": now.timestamp(),
            "node": self.node,
        }

    def is_running(self) -> bool:
        return self._running

    @property
    def running(self) -> bool:
        """The seed's attribute, read-only."""
        return self._running

    # --- state changes (called with the lock held) ----------------------------------------

    def _registered(self, name: str, *, action: str, error: str | None = None) -> _Component | None:
        comp = self._components.get(name)
        if comp is not None and comp.registered:
            return comp
        if error is not None:
            log.warning(
                "heartbeat.unknown_component",
                component=name,
                node=self.node,
                action=action,
                error=error,
            )
        elif name not in self._warned_unknown:
            # Warn once per name: a beat every few seconds must not flood the log.
            if len(self._warned_unknown) < 1000:
                self._warned_unknown.add(name)
            log.warning(
                "heartbeat.unknown_component", component=name, node=self.node, action=action
            )
        return None

    def _succeed(self, comp: _Component, now: datetime, reason: str) -> None:
        comp.last_heartbeat = now
        comp.stale = False
        comp.failures = 0
        comp.successes += 1
        comp.dirty = True
        if comp.status is not ComponentStatus.HEALTHY and comp.successes >= comp.success_threshold:
            self._transition(comp, comp.status, ComponentStatus.HEALTHY, reason, now)

    def _fail(self, comp: _Component, now: datetime, text: str, *, at_once: bool = False) -> None:
        comp.errors.append((now, text))
        comp.last_error = text
        comp.successes = 0
        comp.failures += 1
        comp.dirty = True
        self._queue(self._pending_errors, ErrorRow(comp.name, now, text))
        log.warning("heartbeat.component_error", component=comp.name, node=self.node, error=text)
        if comp.status is not ComponentStatus.ERROR and (
            at_once or comp.failures >= comp.failure_threshold
        ):
            self._transition(comp, comp.status, ComponentStatus.ERROR, text, now)

    def _mark_stale(self, comp: _Component, now: datetime) -> None:
        """Put a registered component whose heartbeat is too old in error, once per episode."""
        if not comp.registered or comp.stale or comp.last_heartbeat is None:
            return
        limit = comp.stale_after if comp.stale_after is not None else 2 * self.interval
        age = (now - comp.last_heartbeat).total_seconds()
        if age <= limit:
            return
        comp.stale = True
        log.warning(
            "heartbeat.component_stale",
            component=comp.name,
            node=self.node,
            age_s=round(age, 3),
            limit_s=limit,
        )
        self._fail(comp, now, STALE_REASON, at_once=True)

    def _transition(
        self,
        comp: _Component,
        old: ComponentStatus | None,
        new: ComponentStatus,
        reason: str,
        now: datetime,
    ) -> None:
        comp.status = new
        comp.dirty = True
        if old is not new:
            self._queue_change(ChangeRow(comp.name, now, old, new, reason))

    def _queue_change(self, change: ChangeRow) -> None:
        self._queue(self._pending_changes, change)
        self._queue(self._pending_events, change)
        if change.to_status == ComponentStatus.ERROR:
            level = log.warning
        elif change.from_status is None:
            # A new component's first status (healthy on registration): not a change worth a
            # line per task at a burst's first run; the change row is still written.
            level = log.debug
        else:
            level = log.info
        level(
            "heartbeat.status_changed",
            component=change.component,
            node=self.node,
            from_status=change.from_status,
            to_status=change.to_status,
            reason=change.reason,
        )

    def _queue(self, queue: list[Any], item: Any) -> None:
        queue.append(item)
        self._trim(queue)

    def _trim(self, queue: list[Any]) -> None:
        if len(queue) <= MAX_PENDING:
            return
        excess = len(queue) - MAX_PENDING
        del queue[:excess]
        before, self._dropped = self._dropped, self._dropped + excess
        if before == 0 or before // 1000 != self._dropped // 1000:  # not one line per drop
            log.error("heartbeat.pending_dropped", node=self.node, total=self._dropped)

    def _system_reason(self, status: ComponentStatus) -> str:
        if status is ComponentStatus.HEALTHY:
            return "all components healthy"
        names = sorted(
            c.name for c in self._components.values() if c.registered and c.status is status
        )
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        return f"{status.value}: {shown}"

    # --- restart ---------------------------------------------------------------------------

    async def load_state(self) -> None:
        """Learn this node's components, their status, heartbeat and last errors from the
        database, so that a restarted process knows them before they register again.

        Components registered before the load keep their fresh state; their stored errors are
        put before the new ones, and their first transition is corrected to start from the
        stored status.
        """
        engine = await self._get_engine()
        stored = await asyncio.to_thread(store.load_state, engine, self.node)
        with self._lock:
            deleted = set(self._pending_deletes)
            for sc in stored.components:
                if sc.name in deleted:
                    continue
                status = _status(sc.status)
                comp = self._components.get(sc.name)
                if comp is None:
                    comp = _Component(
                        name=sc.name,
                        status=status,
                        last_heartbeat=sc.last_heartbeat,
                        registered_at=sc.registered_at,
                        last_error=sc.last_error,
                    )
                    comp.errors.extend(sc.errors)
                    self._components[sc.name] = comp
                    continue
                merged = sorted([*sc.errors, *comp.errors], key=lambda item: item[0])
                comp.errors.clear()
                comp.errors.extend(merged)
                if comp.last_error is None:
                    comp.last_error = sc.last_error
                self._correct_first_change(sc.name, status)
            if stored.system_status is not None:
                system = _status(stored.system_status)
                if self._system_status is None:
                    self._system_status = system
                else:
                    self._correct_first_change(SYSTEM_COMPONENT, system)
            self._loaded = True
        log.info("heartbeat.state_loaded", node=self.node, components=len(stored.components))

    def _correct_first_change(self, name: str, stored: ComponentStatus) -> None:
        for queue in (self._pending_changes, self._pending_events):
            for i, change in enumerate(queue):
                if change.component != name:
                    continue
                if change.from_status is None:
                    if change.to_status == stored:
                        del queue[i]
                    else:
                        queue[i] = dataclasses.replace(change, from_status=stored)
                break

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:  # start() and a first cycle must not both merge the state
            if self._loaded:
                return
            try:
                await self.load_state()
            except Exception as exc:
                log.error("heartbeat.load_failed", node=self.node, error=error_text(exc))

    # --- the cycle ------------------------------------------------------------------------

    async def run_cycle(self) -> dict[str, Any]:
        """One cycle: checks, staleness, the system status, one transaction, publication.

        Returns the system status it published. A database that cannot be written is logged
        and the cycle goes on; what it could not write is kept for the next cycle.
        """
        if self._cycle_lock is None:
            self._cycle_lock = asyncio.Lock()
        async with self._cycle_lock:  # the loop's cycles and a caller's never overlap
            return await self._cycle()

    async def _cycle(self) -> dict[str, Any]:
        await self._ensure_loaded()
        started = self._now()
        stamp = self.last_heartbeat = started.timestamp()
        outcomes = await self._run_checks()
        now = self._now()
        with self._lock:
            for comp, outcome in outcomes:
                if self._components.get(comp.name) is not comp or not comp.registered:
                    continue  # unregistered or replaced while its check ran
                if outcome.ok:
                    self._succeed(comp, now, "health check passed")
                else:
                    self._fail(comp, now, outcome.reason or "health check failed")
        self._judge_loop(now)
        status = self.get_system_status()
        counts = status["components"]
        await self._persist(
            HeartbeatRow(
                at=started,
                status=status["status"],
                interval_s=self.interval,
                total=counts["total"],
                healthy=counts["healthy"],
                error=counts["error"],
                unknown=counts["unknown"],
            )
        )
        await self._publish_events()
        await self._publish("heartbeat", {"timestamp": stamp, "status": status})
        log.debug("heartbeat.cycle", node=self.node, status=status["status"], **counts)
        return status

    def _judge_loop(self, now: datetime) -> None:
        """Beat ``event_loop``, or put it in error naming what blocked the loop, if known."""
        if not self._running:
            return
        lag, since = self._probe.take()
        self.last_loop_lag = lag
        with self._lock:
            comp = self._components.get(EVENT_LOOP_COMPONENT)
            if comp is None or not comp.registered:
                return
            if lag < LOOP_LAG_ERROR_S:
                self._succeed(comp, now, "event loop lag below the limit")
                return
            hold = last_hold(since)
            cause = f" by the {hold.owner} ({hold.seconds:.2f}s in one step)" if hold else ""
            log.warning(
                "heartbeat.loop_blocked",
                node=self.node,
                lag_s=round(lag, 3),
                cause=hold.owner if hold else None,
            )
            self._fail(comp, now, f"the event loop was blocked for {lag:.2f}s{cause}")

    def loop_lag(self) -> float:
        """The event loop's worst lag over the last cycle (or since, if worse), in seconds."""
        return max(self.last_loop_lag, self._probe.worst)

    async def flush(self) -> None:
        """Write what changed since the last cycle and publish its transitions, now."""
        self.get_system_status()
        await self._persist(None)
        await self._publish_events()

    async def _run_checks(self) -> list[tuple[_Component, Outcome]]:
        with self._lock:
            slots = [
                (comp, slot)
                for comp in self._components.values()
                if comp.registered and (slot := comp.slot) is not None
            ]
        return await run_checks(slots, self.check_timeout)

    # --- persistence and publication -----------------------------------------------------

    def _take_batch(self, heartbeat: HeartbeatRow | None) -> Batch:
        with self._lock:
            batch = Batch(node=self.node, heartbeat=heartbeat)
            batch.deletes, self._pending_deletes = self._pending_deletes, []
            batch.errors, self._pending_errors = self._pending_errors, []
            batch.changes, self._pending_changes = self._pending_changes, []
            for comp in self._components.values():
                if comp.dirty and comp.registered:
                    comp.dirty = False
                    batch.components.append(
                        ComponentRow(
                            name=comp.name,
                            status=comp.status.value,
                            last_heartbeat=comp.last_heartbeat,
                            last_error=comp.last_error,
                            registered_at=comp.registered_at,
                            updated_at=heartbeat.at if heartbeat else self._now(),
                        )
                    )
            return batch

    def _restore_batch(self, batch: Batch) -> None:
        """Put back what a failed write took, before anything queued since."""
        with self._lock:
            self._pending_deletes[:0] = batch.deletes
            self._pending_errors[:0] = batch.errors
            self._pending_changes[:0] = batch.changes
            for row in batch.components:
                comp = self._components.get(row.name)
                if comp is not None:
                    comp.dirty = True
            self._trim(self._pending_errors)
            self._trim(self._pending_changes)

    def _written(self, batch: Batch, future: asyncio.Future[None]) -> None:
        if self._inflight is future:
            self._inflight = None
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            self._restore_batch(batch)
            log.error(
                "heartbeat.persist_failed",
                node=self.node,
                error=error_text(error) if error is not None else "cancelled",
                errors=len(batch.errors),
                changes=len(batch.changes),
            )

    async def _persist(self, heartbeat: HeartbeatRow | None) -> bool:
        """Write the queued state (and a heartbeats row) in one transaction, off the loop.

        The write is shielded: a caller cancelled meanwhile (``stop()``) does not abandon it,
        and the next caller waits for it, so a batch is written once, never twice.
        """
        if self._persist_lock is None:
            self._persist_lock = asyncio.Lock()
        async with self._persist_lock:
            inflight = self._inflight
            if inflight is not None and not inflight.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(inflight)
            try:
                engine = await self._get_engine()
            except Exception as exc:
                log.error("heartbeat.persist_failed", node=self.node, error=error_text(exc))
                return False
            batch = self._take_batch(heartbeat)
            if not batch:
                return True
            future = asyncio.ensure_future(asyncio.to_thread(store.write_batch, engine, batch))
            self._inflight = future
            future.add_done_callback(lambda f: self._written(batch, f))
            try:
                await asyncio.shield(future)
            except Exception:
                return False  # logged, and the batch put back, by _written
            return True

    async def _publish_events(self) -> None:
        with self._lock:
            events, self._pending_events = self._pending_events, []
        for change in events:
            await self._publish(
                "health.changed",
                {
                    "component": None if change.component == SYSTEM_COMPONENT else change.component,
                    "node": self.node,
                    "from": str(change.from_status) if change.from_status else None,
                    "to": str(change.to_status),
                    "reason": change.reason,
                    "timestamp": change.at.timestamp(),
                },
            )

    async def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.interval):
                result = self.message_bus.publish(topic, payload)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            log.error(
                "heartbeat.publish_failed", node=self.node, topic=topic, error=error_text(exc)
            )

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stored state and run cycles every ``interval`` seconds; idempotent."""
        if self._running:
            return
        self._running = True
        await self._ensure_loaded()
        if not self._running:  # stopped while loading
            return
        self._probe.start()
        self.monitor_task = asyncio.get_running_loop().create_task(
            self._monitor_loop(), name="heartbeat-monitor"
        )
        log.info(
            "heartbeat.started",
            node=self.node,
            interval_s=self.interval,
            check_timeout_s=self.check_timeout,
        )

    async def stop(self) -> None:
        """Stop the cycles, then write the final state and a last heartbeats row; idempotent."""
        if not self._running:
            return
        self._running = False
        self._probe.stop()
        task, self.monitor_task = self.monitor_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        status = self.get_system_status()
        counts = status["components"]
        await self._persist(
            HeartbeatRow(
                at=self._now(),
                status=status["status"],
                interval_s=self.interval,
                total=counts["total"],
                healthy=counts["healthy"],
                error=counts["error"],
                unknown=counts["unknown"],
            )
        )
        await self._publish_events()
        log.info("heartbeat.stopped", node=self.node, status=status["status"])

    async def _monitor_loop(self) -> None:
        """Cycles at a fixed rate (start + k x interval), whatever a cycle takes or raises."""
        loop = asyncio.get_running_loop()
        origin = loop.time()
        slot = 0
        while True:
            try:
                await self.run_cycle()
            except Exception:
                log.exception("heartbeat.cycle_failed", node=self.node)
            slot += 1
            now = loop.time()
            if origin + slot * self.interval < now:
                missed = math.ceil((now - origin) / self.interval) - slot
                log.warning("heartbeat.cycle_overran", node=self.node, missed_cycles=missed)
                slot += missed
            await asyncio.sleep(max(0.0, origin + slot * self.interval - now))

    def _abandon(self) -> None:
        """Drop the loop without I/O (tests' reset); the final state is not written."""
        self._running = False
        with contextlib.suppress(RuntimeError):  # its loop may be closed already
            self._probe.stop()
        task, self.monitor_task = self.monitor_task, None
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                task.cancel()


# --- the process-wide monitor (section 5.2.2 of the seed) ------------------------------------

_monitor: HeartbeatMonitor | None = None
_monitor_lock = threading.Lock()
_background: set[asyncio.Task[None]] = set()


def get_heartbeat_monitor() -> HeartbeatMonitor:
    """The process-wide monitor on the process-wide bus, every ``heartbeat.interval`` seconds."""
    global _monitor
    with _monitor_lock:
        if _monitor is None:
            from nanobot.bus import get_bus

            interval = get_config().get("heartbeat.interval", 30)
            _monitor = HeartbeatMonitor(get_bus(), interval)
        return _monitor


def reset_heartbeat_monitor() -> None:
    """Forget the process-wide monitor without I/O (for tests)."""
    global _monitor
    with _monitor_lock:
        monitor, _monitor = _monitor, None
    if monitor is not None:
        monitor._abandon()


def current_loop_lag() -> float | None:
    """The process-wide monitor's event-loop lag (seconds), or None if it does not run."""
    monitor = _monitor
    if monitor is None or not monitor.running:
        return None
    return monitor.loop_lag()


def initialize_heartbeat() -> HeartbeatMonitor:
    """Register the components this process runs and start the monitor in the running loop.

    The components are ``config``, ``bus``, ``session``, ``database`` (each with a real check,
    see :mod:`nanobot.heartbeat.checks`) and ``cron`` (beaten by the scheduler's heartbeat
    task). Other parts of nanobot register their own components when they are present.
    Must be called with an event loop running, from async code.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise NoRunningLoopError(
            "initialize_heartbeat() starts the monitor as a task of the running event loop, and "
            "no loop is running: call it from async code (inside asyncio.run(...)), or create "
            "the monitor with get_heartbeat_monitor() and `await monitor.start()` later"
        ) from None
    from nanobot.heartbeat.checks import register_builtin_components

    monitor = get_heartbeat_monitor()
    register_builtin_components(monitor)
    task = loop.create_task(monitor.start(), name="heartbeat-start")
    _background.add(task)
    task.add_done_callback(_background.discard)
    return monitor
