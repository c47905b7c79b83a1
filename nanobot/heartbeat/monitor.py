"""The heartbeat monitor of section 5.2 of the seed: component liveness and health, persisted.

Components register with an optional health check (a plain or an async callable; a truthy result
is healthy). Each cycle runs the checks concurrently under ``check_timeout``, records components
whose last heartbeat is older than their stale limit (2 x interval unless the component says
otherwise) stale, aggregates the system status, writes the cycle's state in one transaction and
publishes ``("heartbeat", {...})`` and, for every transition, ``("health.changed", {...})`` on
the message bus.

The synchronous API (``register_component``, ``update_component_heartbeat``,
``mark_component_error``) only changes memory: it is cheap enough to call from a task's hot path
and never does I/O on the caller's event loop. What it records waits in the
:class:`~nanobot.heartbeat.outbox.Outbox` and is written by the next cycle (or
:meth:`HeartbeatMonitor.flush`, or :meth:`HeartbeatMonitor.stop`), so no transition and no error
is lost between cycles; ``health.changed`` is published then too, at most one interval late.
The reads (``get_component_status``, ``get_system_status``) change nothing: a component past its
stale limit reads in error at once, and the next cycle records it so.

The state machine of one component is :mod:`nanobot.heartbeat.component`; the process-wide
monitor is :mod:`nanobot.heartbeat.process`.

Threads: the components and the outbox belong to whoever holds ``_lock`` (the synchronous API
may be called from any thread; the cycle takes it on the event loop). Everything else (the
cycle, the writes, publication, start and stop) belongs to the event loop the monitor runs on;
the database is written from a worker thread, one batch at a time.

"Heartbeat" here means the liveness of this process's components, not the periodic wake-up of
the agent that the wider nanobot world also calls a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

import structlog
from sqlalchemy import Engine

from nanobot.config import get_config
from nanobot.db import get_engine, upgrade_database
from nanobot.exceptions import InvalidDurationError
from nanobot.heartbeat import component, store
from nanobot.heartbeat.component import ComponentState, Recorded, Summary
from nanobot.heartbeat.outbox import BatchWriter, Outbox, merge_stored
from nanobot.heartbeat.runner import HealthCheck, Outcome, run_checks
from nanobot.heartbeat.store import SYSTEM_COMPONENT, ChangeRow, ErrorRow, HeartbeatRow
from nanobot.loopwatch import LagProbe, last_hold
from nanobot.models import ComponentStatus, error_text, utcnow
from nanobot.node import node_name
from nanobot.times import Clock, positive_seconds

log = structlog.get_logger(__name__)

# A check never gets more than this share of the interval, so one cycle cannot run into the next.
CHECK_TIMEOUT_SHARE: Final = 0.8
# The components named in the one line of unregister_components.
UNREGISTERED_NAMED: Final = 5
# The component that stands for this process's event loop (see nanobot.heartbeat.checks).
EVENT_LOOP_COMPONENT: Final = "event_loop"
# A lag of the event loop this long (seconds) in a cycle puts ``event_loop`` in error: timers,
# lease renewals and task starts were that late.
LOOP_LAG_ERROR_S: Final = 1.0
# Changed components whose rows a cycle takes per loop iteration (see _take_rows).
ROWS_SLICE: Final = 1000
# Unknown names warned about once each, up to this many (a beat every few seconds must not
# flood the log, and a flood of names must not grow memory).
_WARNED_MAX: Final = 1000


def _epoch(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0


class HeartbeatMonitor:
    """Monitors the health of this process's components; see the module's docstring.

    ``HeartbeatMonitor(message_bus, interval=30)`` is the seed's constructor. The keyword-only
    arguments are for tests and embedding: ``engine`` (default: the configured database, opened
    and migrated by the first load or write, never in the constructor), ``node`` (default
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
        self.interval = positive_seconds(interval, "interval", InvalidDurationError)
        if check_timeout is None:
            check_timeout = get_config().get("heartbeat.check_timeout", 5.0)
        self.check_timeout = min(
            positive_seconds(check_timeout, "check_timeout", InvalidDurationError),
            CHECK_TIMEOUT_SHARE * self.interval,
        )
        self.node = node if node is not None else node_name()
        self._clock: Clock = clock or utcnow
        self._engine = engine
        self._engine_lock = threading.Lock()
        # The seed's public attributes.
        self.last_heartbeat: float = 0
        self.monitor_task: asyncio.Task[None] | None = None
        self._running = False

        # Guarded by _lock: the synchronous API may be called from worker threads.
        self._lock = threading.RLock()
        self._components: dict[str, ComponentState] = {}
        self._outbox = Outbox(self.node)
        self._writer = BatchWriter(self.node)
        # The system status last recorded (None until the first cycle or the stored one).
        self._system_status: ComponentStatus | None = None
        self._loaded = False
        self._warned_unknown: set[str] = set()
        # The event loop's; created on first use, inside the loop that uses them.
        self._load_lock: asyncio.Lock | None = None
        self._cycle_lock: asyncio.Lock | None = None
        # The event loop's lag, measured on the loop while the monitor runs.
        self._probe = LagProbe()
        self.last_loop_lag = 0.0

    # --- time and the database ------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError(f"the heartbeat clock returned a naive datetime {now!r}")
        return now

    def open_engine(self) -> Engine:
        """The engine state is written to: the one given, else the configured database, opened
        and migrated by the first call. Blocking I/O: call it from a worker thread."""
        with self._engine_lock:
            if self._engine is None:
                engine = get_engine()
                upgrade_database(engine)
                self._engine = engine
            return self._engine

    async def _get_engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        return await asyncio.to_thread(self.open_engine)

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
        options = component.Options.checked(
            component_name,
            health_check,
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            stale_after=stale_after,
        )
        now = self._now()
        with self._lock:
            known = self._components.get(component_name)
            again = known is not None and known.registered
            comp, recorded = component.register(known, component_name, now, options)
            self._components[component_name] = comp
            self._record(recorded)
        # Debug: every task's first run registers its component; thousands of lines at a
        # burst's first run said nothing an operator needs (status and `components` show them).
        log.debug(
            "heartbeat.component_registered",
            component=component_name,
            node=self.node,
            has_check=health_check is not None,
            again=again,
        )

    def unregister_component(self, component_name: str) -> None:
        """Forget a component; its ``components`` row goes, its history stays.

        Works for a component known only from the database too, which is how a component that
        no longer exists is cleared. An unknown name is ignored, as in the seed.
        """
        now = self._now()
        with self._lock:
            recorded = self._drop(component_name, now)
            if recorded is None:
                return
            self._record(recorded)
        log.info("heartbeat.component_unregistered", component=component_name, node=self.node)

    def unregister_components(self, names: Iterable[str]) -> int:
        """Forget many components at once, as :meth:`unregister_component` each; how many were
        known. One log line says how many went: a leader with 20,000 tasks that stepped down
        wrote two lines per task component (40,000) when they were unregistered one by one."""
        now = self._now()
        gone: list[str] = []
        with self._lock:
            for name in names:
                recorded = self._drop(name, now)
                if recorded is not None:
                    self._outbox.add(recorded)  # written, not logged one by one
                    gone.append(name)
        if gone:
            log.info(
                "heartbeat.components_unregistered",
                count=len(gone),
                first=gone[:UNREGISTERED_NAMED],
                node=self.node,
            )
        return len(gone)

    def _drop(self, name: str, now: datetime) -> list[Recorded] | None:
        """Under the lock: forget a component (its pending row write too); what its going
        records, None if it was not known."""
        comp = self._components.pop(name, None)
        if comp is None:
            return None
        self._outbox.delete(name)
        return component.unregister(comp, now)

    def update_component_heartbeat(self, component_name: str) -> None:
        """Record a sign of life of a registered component (a success, for the thresholds)."""
        now = self._now()
        with self._lock:
            comp = self._registered(component_name, action="heartbeat")
            if comp is not None:
                self._record(component.succeed(comp, now, "heartbeat"))

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
                self._record(component.fail(comp, now, text))

    # --- the seed's reads: they change nothing ----------------------------------------------

    def get_component_status(self, component_name: str) -> dict[str, Any]:
        """The seed's record of one component: ``status``, ``last_heartbeat`` (epoch seconds)
        and ``errors`` (the last 10, ``{"timestamp", "error"}``), plus ``registered`` and
        ``last_error``, and ``stale_after``: the seconds without a heartbeat after which it
        reads in error. A copy: changing it changes nothing.

        A component past its stale limit reads in error with the stale reason (the next cycle
        records it so). A component known only from the database shows its stored state with
        ``registered: False``; an unknown name gives the seed's ``{"status": "unknown",
        "last_heartbeat": 0, "errors": []}``.
        """
        now = self._now()
        with self._lock:
            comp = self._components.get(component_name)
            if comp is None:
                return {"status": ComponentStatus.UNKNOWN.value, "last_heartbeat": 0, "errors": []}
            seen = component.view(comp, now, 2 * self.interval)
            limit = component.stale_limit(comp, 2 * self.interval)
        return {
            "status": seen.status.value,
            "last_heartbeat": _epoch(seen.last_heartbeat),
            "errors": [{"timestamp": at.timestamp(), "error": e} for at, e in seen.errors],
            "health_check": seen.health_check,
            "registered": seen.registered,
            "last_error": seen.last_error,
            "stale_after": limit,
        }

    def get_system_status(self) -> dict[str, Any]:
        """The seed's system summary, stale components counted in error.

        Only components registered in this process count; components known only from the
        database are visible through :meth:`get_component_status` and in the database.
        ``status`` is error if any component is in error, healthy if all are healthy (or none
        is registered), otherwise unknown. ``last_heartbeat`` is the start of the last cycle.
        """
        now = self._now()
        limit = 2 * self.interval
        with self._lock:
            summary = component.summarize(
                component.status_at(comp, now, limit)
                for comp in self._components.values()
                if comp.registered
            )
        return self._status_dict(summary, now)

    def _status_dict(self, summary: Summary, now: datetime) -> dict[str, Any]:
        return {
            "status": summary.status.value,
            "components": summary.counts(),
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

    # --- recording (called with the lock held) ----------------------------------------------

    def _registered(
        self, name: str, *, action: str, error: str | None = None
    ) -> ComponentState | None:
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
            if len(self._warned_unknown) < _WARNED_MAX:
                self._warned_unknown.add(name)
            log.warning(
                "heartbeat.unknown_component", component=name, node=self.node, action=action
            )
        return None

    def _record(self, recorded: list[Recorded]) -> None:
        """Queue what a state change recorded, and log it."""
        self._outbox.add(recorded)
        for record in recorded:
            if isinstance(record, ErrorRow):
                log.warning(
                    "heartbeat.component_error",
                    component=record.component,
                    node=self.node,
                    error=record.error,
                )
            else:
                self._log_change(record)

    def _log_change(self, change: ChangeRow) -> None:
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

    def _settle(self, now: datetime) -> Summary:
        """Record stale components and the system's transition, if any; the system summary.

        The cycle, :meth:`flush` and :meth:`stop` call it; the reads only compute the same.
        """
        limit = 2 * self.interval
        with self._lock:
            for comp in self._components.values():
                age = component.overdue(comp, now, limit)
                if age is None:
                    continue
                log.warning(
                    "heartbeat.component_stale",
                    component=comp.name,
                    node=self.node,
                    age_s=round(age, 3),
                    limit_s=component.stale_limit(comp, limit),
                )
                self._record(component.mark_stale(comp, now, limit))
            registered = [c for c in self._components.values() if c.registered]
            summary = component.summarize(c.status for c in registered)
            if summary.status is not self._system_status:
                reason = component.system_reason(summary.status, registered)
                self._record(
                    [ChangeRow(SYSTEM_COMPONENT, now, self._system_status, summary.status, reason)]
                )
                self._system_status = summary.status
        return summary

    def _heartbeat_row(self, summary: Summary, at: datetime) -> HeartbeatRow:
        return HeartbeatRow(
            at=at,
            status=summary.status.value,
            interval_s=self.interval,
            total=summary.total,
            healthy=summary.healthy,
            error=summary.error,
            unknown=summary.unknown,
        )

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
            self._system_status = merge_stored(
                self._components, self._outbox, stored, self._system_status
            )
            self._loaded = True
        log.info("heartbeat.state_loaded", node=self.node, components=len(stored.components))

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
                    self._record(component.succeed(comp, now, "health check passed"))
                else:
                    self._record(component.fail(comp, now, outcome.reason or "health check failed"))
        self._judge_loop(now)
        summary = self._settle(now)
        await self._persist(self._heartbeat_row(summary, started))
        await self._publish_events()
        status = self._status_dict(summary, now)
        await self._publish("heartbeat", {"timestamp": stamp, "status": status})
        log.debug("heartbeat.cycle", node=self.node, status=status["status"], **summary.counts())
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
                self._record(component.succeed(comp, now, "event loop lag below the limit"))
                return
            hold = last_hold(since)
            cause = f" by the {hold.owner} ({hold.seconds:.2f}s in one step)" if hold else ""
            log.warning(
                "heartbeat.loop_blocked",
                node=self.node,
                lag_s=round(lag, 3),
                cause=hold.owner if hold else None,
            )
            text = f"the event loop was blocked for {lag:.2f}s{cause}"
            self._record(component.fail(comp, now, text))

    def loop_lag(self) -> float:
        """The event loop's worst lag over the last cycle (or since, if worse), in seconds."""
        return max(self.last_loop_lag, self._probe.worst)

    async def flush(self) -> None:
        """Write what changed since the last cycle and publish its transitions, now."""
        self._settle(self._now())
        await self._persist(None)
        await self._publish_events()

    async def _run_checks(self) -> list[tuple[ComponentState, Outcome]]:
        with self._lock:
            slots = [
                (comp, slot)
                for comp in self._components.values()
                if comp.registered and (slot := comp.slot) is not None
            ]
        return await run_checks(slots, self.check_timeout)

    # --- persistence and publication -----------------------------------------------------

    async def _persist(self, heartbeat: HeartbeatRow | None) -> bool:
        """Write the queued state (and a heartbeats row) in one transaction, off the loop."""
        await self._take_rows(heartbeat.at if heartbeat is not None else self._now())
        return await self._writer.write(
            self._get_engine, lambda: self._take(heartbeat), self._put_back
        )

    async def _take_rows(self, updated_at: datetime) -> None:
        """Take the changed components' rows :data:`ROWS_SLICE` per loop iteration: after a
        burst every task's component changed, and 20,000 rows at once held the loop for tens
        of milliseconds."""
        with self._lock:
            components = list(self._components.values())
        if len(components) <= ROWS_SLICE:
            return  # take() does it
        for start in range(0, len(components), ROWS_SLICE):
            with self._lock:
                current = self._components
                # Not one unregistered (or replaced) since the list was made: its row is gone.
                self._outbox.take_rows(
                    (c for c in components[start : start + ROWS_SLICE] if current.get(c.name) is c),
                    updated_at,
                )
            await asyncio.sleep(0)

    def _take(self, heartbeat: HeartbeatRow | None) -> store.Batch:
        with self._lock:
            return self._outbox.take(self._components.values(), heartbeat, self._now())

    def _put_back(self, batch: store.Batch) -> None:
        with self._lock:
            self._outbox.put_back(batch, self._components)

    async def _publish_events(self) -> None:
        with self._lock:
            events = self._outbox.take_events()
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
        now = self._now()
        summary = self._settle(now)
        await self._persist(self._heartbeat_row(summary, now))
        await self._publish_events()
        log.info("heartbeat.stopped", node=self.node, status=summary.status.value)

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

    def abandon(self) -> None:
        """Drop the loop without I/O (tests' reset); the final state is not written."""
        self._running = False
        with contextlib.suppress(RuntimeError):  # its loop may be closed already
            self._probe.stop()
        task, self.monitor_task = self.monitor_task, None
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                task.cancel()
