"""What the monitor has recorded and not yet written or published, and its merge with the
state an earlier process stored.

The synchronous API only changes memory; its records wait here for the next write (one
:class:`Batch`, one transaction) and, for transitions, for the next publication on the bus.
A write that fails puts its batch back in front of what was queued since, so nothing is lost
or reordered; while the database cannot be written the queues are bounded
(:data:`MAX_PENDING`), the oldest records dropped and counted.

:class:`BatchWriter` writes one batch at a time in a worker thread, shielded from its caller's
cancellation, and hands a batch that failed back to be put in the outbox again.

Threads: an :class:`Outbox` has no lock of its own; the monitor calls it only while holding its
lock (from the event loop or from a thread calling its synchronous API), and
:func:`merge_stored` likewise. A :class:`BatchWriter` belongs to the event loop; only the write
itself runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Final, TypeVar

import structlog
from sqlalchemy import Engine

from nanobot.heartbeat.component import ComponentState, Recorded
from nanobot.heartbeat.store import (
    SYSTEM_COMPONENT,
    Batch,
    ChangeRow,
    ComponentRow,
    ErrorRow,
    HeartbeatRow,
    StoredState,
    write_batch,
)
from nanobot.models import ComponentStatus, error_text

log = structlog.get_logger(__name__)

# Errors and transitions queued while the database cannot be written are kept up to this many;
# past it the oldest are dropped, counted and logged, so a long outage cannot exhaust memory.
# Well above what one cycle queues when all is well: the first runs of a burst of 20,000 tasks
# register 20,000 components, each with its first transition (10,000 dropped them, with an
# error line, on a healthy database). About 200 bytes a row: 100,000 is about 20 MB.
MAX_PENDING: Final = 100_000

_Row = TypeVar("_Row", ErrorRow, ChangeRow)


class Outbox:
    """The rows waiting for the next write and the transitions waiting to be published."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._deletes: list[str] = []
        self._errors: list[ErrorRow] = []
        self._changes: list[ChangeRow] = []
        self._events: list[ChangeRow] = []
        # Rows of changed components taken ahead of the next take(), by name (take_rows).
        self._rows: dict[str, ComponentRow] = {}
        self.dropped = 0

    def add(self, recorded: Iterable[Recorded]) -> None:
        """Queue records: errors to be written, transitions to be written and published."""
        for record in recorded:
            if isinstance(record, ErrorRow):
                self._queue(self._errors, record)
            else:
                self._queue(self._changes, record)
                self._queue(self._events, record)

    def delete(self, name: str) -> None:
        """Queue the deletion of a component's ``components`` row."""
        self._rows.pop(name, None)
        self._deletes.append(name)

    def deleted(self) -> set[str]:
        return set(self._deletes)

    def take(
        self,
        components: Iterable[ComponentState],
        heartbeat: HeartbeatRow | None,
        now: datetime,
    ) -> Batch:
        """Everything to write now: the queues, and the row of every registered component that
        changed since it was last taken (stamped with the heartbeat's time, else ``now``)."""
        batch = Batch(node=self.node, heartbeat=heartbeat)
        batch.deletes, self._deletes = self._deletes, []
        batch.errors, self._errors = self._errors, []
        batch.changes, self._changes = self._changes, []
        updated_at = heartbeat.at if heartbeat is not None else now
        self.take_rows(components, updated_at)
        batch.components, self._rows = list(self._rows.values()), {}
        return batch

    def take_rows(self, components: Iterable[ComponentState], updated_at: datetime) -> None:
        """Take the rows of those of ``components`` that changed, for the next :meth:`take`:
        the monitor takes thousands of them a slice per loop iteration before it."""
        rows = self._rows
        for comp in components:
            if comp.dirty and comp.registered:
                comp.dirty = False
                rows[comp.name] = comp.row(updated_at)

    def put_back(self, batch: Batch, components: Mapping[str, ComponentState]) -> None:
        """Put back what a failed write took, before anything queued since."""
        self._deletes[:0] = batch.deletes
        self._errors[:0] = batch.errors
        self._changes[:0] = batch.changes
        for row in batch.components:
            comp = components.get(row.name)
            if comp is not None:
                comp.dirty = True
        self._trim(self._errors)
        self._trim(self._changes)

    def take_events(self) -> list[ChangeRow]:
        """The transitions to publish, oldest first."""
        events, self._events = self._events, []
        return events

    def correct_first_change(self, name: str, stored: ComponentStatus) -> None:
        """Make the first queued transition of ``name`` start from its stored status (or drop
        it if it goes nowhere): it was queued before the stored state was known."""
        for queue in (self._changes, self._events):
            for i, change in enumerate(queue):
                if change.component != name:
                    continue
                if change.from_status is None:
                    if change.to_status == stored:
                        del queue[i]
                    else:
                        queue[i] = dataclasses.replace(change, from_status=stored)
                break

    def _queue(self, queue: list[_Row], item: _Row) -> None:
        queue.append(item)
        self._trim(queue)

    def _trim(self, queue: list[_Row]) -> None:
        if len(queue) <= MAX_PENDING:
            return
        excess = len(queue) - MAX_PENDING
        del queue[:excess]
        before, self.dropped = self.dropped, self.dropped + excess
        if before == 0 or before // 1000 != self.dropped // 1000:  # not one line per drop
            log.error("heartbeat.pending_dropped", node=self.node, total=self.dropped)


class BatchWriter:
    """Writes batches one at a time, each in one transaction in a worker thread.

    A write is shielded: a caller cancelled meanwhile (the monitor's ``stop()``) does not
    abandon it, and the next caller waits for it, so a batch is written once, never twice.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._lock: asyncio.Lock | None = None  # created in the loop that uses it
        self._inflight: asyncio.Future[None] | None = None

    async def write(
        self,
        engine: Callable[[], Awaitable[Engine]],
        take: Callable[[], Batch],
        put_back: Callable[[Batch], None],
    ) -> bool:
        """Write what ``take()`` gives; False if it could not be written (logged, and handed to
        ``put_back``) or the engine could not be had (logged; nothing was taken)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            inflight = self._inflight
            if inflight is not None and not inflight.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(inflight)
            try:
                target = await engine()
            except Exception as exc:
                log.error("heartbeat.persist_failed", node=self.node, error=error_text(exc))
                return False
            batch = take()
            if not batch:
                return True
            future = asyncio.ensure_future(asyncio.to_thread(write_batch, target, batch))
            self._inflight = future
            future.add_done_callback(lambda f: self._written(batch, f, put_back))
            try:
                await asyncio.shield(future)
            except Exception:
                return False  # logged, and the batch put back, by _written
            return True

    def _written(
        self, batch: Batch, future: asyncio.Future[None], put_back: Callable[[Batch], None]
    ) -> None:
        if self._inflight is future:
            self._inflight = None
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            put_back(batch)
            log.error(
                "heartbeat.persist_failed",
                node=self.node,
                error=error_text(error) if error is not None else "cancelled",
                errors=len(batch.errors),
                changes=len(batch.changes),
            )


def stored_status(value: str) -> ComponentStatus:
    """A stored status; a value this version does not know reads as unknown."""
    try:
        return ComponentStatus(value)
    except ValueError:
        return ComponentStatus.UNKNOWN


def merge_stored(
    components: dict[str, ComponentState],
    outbox: Outbox,
    stored: StoredState,
    system: ComponentStatus | None,
) -> ComponentStatus | None:
    """Merge the state an earlier process stored into ``components``; the system status to
    keep (``system``, or the stored one if there is none yet).

    A component known only from the database is added unregistered, with its stored state.
    One registered before the load keeps its fresh state: its stored errors go before its new
    ones, and its first transition is corrected to start from the stored status. Components
    whose deletion is queued stay deleted.
    """
    deleted = outbox.deleted()
    for sc in stored.components:
        if sc.name in deleted:
            continue
        status = stored_status(sc.status)
        comp = components.get(sc.name)
        if comp is None:
            comp = ComponentState(
                name=sc.name,
                status=status,
                last_heartbeat=sc.last_heartbeat,
                registered_at=sc.registered_at,
                last_error=sc.last_error,
            )
            comp.errors.extend(sc.errors)
            components[sc.name] = comp
            continue
        merged = sorted([*sc.errors, *comp.errors], key=lambda item: item[0])
        comp.errors.clear()
        comp.errors.extend(merged)
        if comp.last_error is None:
            comp.last_error = sc.last_error
        outbox.correct_first_change(sc.name, status)
    if stored.system_status is None:
        return system
    previous = stored_status(stored.system_status)
    if system is None:
        return previous
    outbox.correct_first_change(SYSTEM_COMPONENT, previous)
    return system
