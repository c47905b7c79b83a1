"""The delivery worker: sends due deliveries of the outbox, records every attempt.

One pass (:meth:`Deliverer.deliver_due`) reads the pending deliveries whose next attempt is due
(at most ``batch`` per destination), sends each destination's oldest first and records each
attempt: sent, or failed with the error and the next attempt at
``now + min(retry_max, retry_base * 2**n)`` (``n`` the attempts so far), or given up once the
alert is older than ``give_up_after``.

A destination that fails stops its own pass and waits out its backoff; the other destinations go
on. Apprise blocks, so sends run in a thread pool of ``max_workers`` threads, with at most one
send per destination in flight: a destination that hangs holds one thread, never all of them,
and nothing about it is kept in memory but its backoff time. Memory does not grow with the
outbox: a pass holds at most ``batch`` rows per destination.

Thread ownership: a :class:`Deliverer` lives on the event loop (its attributes are touched only
there); the pool's threads run :func:`nanobot.alerts.destinations.send` and the outbox writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import structlog
from sqlalchemy import Engine

from nanobot.alerts import store
from nanobot.alerts.alert import Alert, AlertKind, DeliveryState
from nanobot.alerts.destinations import Destination, SendResult, send
from nanobot.alerts.metrics import AlertMetrics
from nanobot.alerts.store import Due
from nanobot.times import Clock

log = structlog.get_logger(__name__)

DEFAULT_BATCH: Final = 100
DEFAULT_WORKERS: Final = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    base: timedelta = timedelta(seconds=5)
    cap: timedelta = timedelta(minutes=10)
    give_up_after: timedelta = timedelta(days=1)
    send_timeout: float = 30.0

    def retry_at(self, *, now: datetime, attempts: int, created_at: datetime) -> datetime | None:
        """When to try again after ``attempts`` failed attempts; None to give up."""
        if now - created_at >= self.give_up_after:
            return None
        # 2**attempts overflows nothing here: the exponent is capped long before.
        delay: timedelta = min(self.cap, self.base * (2 ** min(attempts, 30)))
        return now + delay


class Deliverer:
    """Delivers the outbox of one database to the configured destinations."""

    def __init__(
        self,
        engine: Engine,
        destinations: Sequence[Destination],
        policy: RetryPolicy,
        *,
        clock: Clock,
        metrics: AlertMetrics | None = None,
        batch: int = DEFAULT_BATCH,
        max_workers: int = DEFAULT_WORKERS,
    ) -> None:
        self.engine = engine
        self.destinations = {d.name: d for d in destinations}
        self.policy = policy
        self.clock = clock
        self.metrics = metrics
        self.batch = batch
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="nanobot-alerts"
        )
        self._blocked_until: dict[str, datetime] = {}
        self._inflight: dict[str, asyncio.Future[SendResult]] = {}

    async def deliver_due(self, kinds: Iterable[AlertKind] = ()) -> int:
        """One pass over the due deliveries; how many were sent."""
        loop = asyncio.get_running_loop()
        now = self.clock()
        ready = [name for name in self.destinations if self._ready(name, now)]
        if not ready:
            return 0
        rows = await loop.run_in_executor(
            self._pool,
            functools.partial(
                store.due,
                self.engine,
                now=now,
                destinations=ready,
                limit=self.batch,
                kinds=tuple(kinds),
            ),
        )
        by_destination: dict[str, list[Due]] = {}
        for row in rows:
            by_destination.setdefault(row.destination, []).append(row)
        passes = [self._deliver_to(name, due) for name, due in by_destination.items()]
        sent = await asyncio.gather(*passes)
        return sum(sent)

    def _ready(self, name: str, now: datetime) -> bool:
        inflight = self._inflight.get(name)
        if inflight is not None and not inflight.done():
            return False  # a send that outlived its timeout still holds a thread
        blocked = self._blocked_until.get(name)
        return blocked is None or blocked <= now

    async def _deliver_to(self, name: str, rows: list[Due]) -> int:
        destination = self.destinations[name]
        loop = asyncio.get_running_loop()
        sent = 0
        for row in rows:
            future = asyncio.wrap_future(
                self._pool.submit(send, destination, row.alert, timeout=self.policy.send_timeout),
                loop=loop,
            )
            self._inflight[name] = future
            try:
                # Shielded: a timed-out send goes on in its thread, and _ready sees it running.
                async with asyncio.timeout(self.policy.send_timeout * 2 + 1):
                    result = await asyncio.shield(future)
            except TimeoutError:
                result = SendResult(False, "no answer within the send timeout")
            now = self.clock()
            retry_at = (
                None
                if result.ok
                else self.policy.retry_at(
                    now=now, attempts=row.attempts, created_at=row.alert.created_at
                )
            )
            state = await loop.run_in_executor(
                self._pool,
                functools.partial(
                    store.record_attempt,
                    self.engine,
                    row.delivery_id,
                    now=now,
                    ok=result.ok,
                    error=result.error,
                    retry_at=retry_at,
                ),
            )
            outcome = {
                DeliveryState.SENT: "sent",
                DeliveryState.PENDING: "failed",
                DeliveryState.FAILED: "given_up",
            }.get(state, state.value)
            if self.metrics is not None:
                self.metrics.count(row.alert.kind, outcome)
            if result.ok:
                sent += 1
                self._blocked_until.pop(name, None)
                log.info(
                    "alert.sent",
                    destination=name,
                    kind=row.alert.kind.value,
                    key=row.alert.key,
                    attempt=row.attempts + 1,
                )
                continue
            log.warning(
                "alert.send_failed",
                destination=name,
                kind=row.alert.kind.value,
                key=row.alert.key,
                attempt=row.attempts + 1,
                error=result.error,
                retry_at=retry_at.isoformat() if retry_at else None,
            )
            if retry_at is not None:
                self._blocked_until[name] = retry_at
            # This destination's other alerts wait for its next attempt; the others go on.
            break
        return sent

    async def send_now(self, destination: Destination, alert: Alert) -> bool:
        """Send one alert outside the outbox (the database cannot be written); True if sent."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._pool,
            functools.partial(send, destination, alert, timeout=self.policy.send_timeout),
        )
        try:
            async with asyncio.timeout(self.policy.send_timeout * 2 + 1):
                result = await future
        except TimeoutError:
            result = SendResult(False, "no answer within the send timeout")
        if self.metrics is not None:
            self.metrics.count(alert.kind, "sent" if result.ok else "failed")
        emit = log.info if result.ok else log.warning
        emit(
            "alert.sent_directly",
            destination=destination.name,
            kind=alert.kind.value,
            key=alert.key,
            ok=result.ok,
            error=result.error,
        )
        return result.ok

    def close(self) -> None:
        """Stop the pool without waiting for a send that hangs (its thread ends with its
        request timeout; the delivery stays pending and is sent again after a restart)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
