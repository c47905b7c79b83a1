"""The service's watch over its database: still the one it started on, and kept in shape.

Each lease period (the service's health cycle) the guard checks that the SQLite file at the
configured path is still the one the service opened (:class:`nanobot.database_file.
DatabaseFileWatch`); a deleted or replaced file is *fatal*: the service stops scheduling, status
is in error, ``service.database_replaced`` is logged and ``database.replaced`` published on the
bus. At start it compares the database with what the marker remembers (a new empty database
where the last one had tasks is shown in status until tasks exist again, and published as
``database.recreated``). On the leader, it remembers the stored task count in the marker and
checkpoints SQLite's write-ahead log every :data:`CHECKPOINT_EVERY_S`, so that a burst does not
leave it tens of megabytes long.

Threads: the guard belongs to the service's event loop; :meth:`DatabaseGuard.check_at_start`
runs in the start-up thread before the loops, and the file system and database work of a
cycle runs in threads, one at a time and bounded by the lease period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import structlog
from sqlalchemy import Engine

from nanobot.bus import get_bus
from nanobot.database_file import DatabaseFileWatch, DatabaseMarker
from nanobot.db import checkpoint, count_tasks, database_id
from nanobot.models import error_text

log = structlog.get_logger(__name__)

# The leader folds SQLite's write-ahead log into the database and truncates it this often.
CHECKPOINT_EVERY_S: Final = 10.0
# Topics published on the bus when the database is lost (payload: database, reason, node).
DATABASE_REPLACED: Final = "database.replaced"
DATABASE_RECREATED: Final = "database.recreated"
# The key of the recreated database's problem in the service's warnings.
RECREATED: Final = "database_recreated"

# Shows a problem in status under a key (None clears it): the service's warnings.
Warn = Callable[[str, str | None], None]


class DatabaseGuard:
    """Is the database still the one the service started on; the marker; the checkpoint."""

    def __init__(
        self,
        engine: Engine,
        *,
        home: Path,
        sqlite_path: Path | None,
        node: str,
        period: float,
        warn: Warn,
    ) -> None:
        self._engine = engine
        self._sqlite_path = sqlite_path
        self._node = node
        self._period = period
        self._warn = warn
        self._marker = DatabaseMarker(
            home, engine.url.render_as_string(hide_password=True), sqlite_path
        )
        self._file_watch: DatabaseFileWatch | None = None
        # The database the service runs on is not the one it opened: why (None while it is).
        self.fatal: str | None = None
        self._recreated = False
        self._last_checkpoint = time.monotonic()
        self._maintenance: asyncio.Future[int] | None = None
        self._pending_events: list[tuple[str, dict[str, Any]]] = []
        # The random id of the database opened (read at the start; a file replaced later is
        # the file watch's to notice).
        self._database_id: str | None = None

    def check_at_start(self) -> None:
        """In a thread, after the migrations: remember which file is open, and say so loudly
        when the database is new and empty where the last one had tasks."""
        if self._sqlite_path is not None:
            self._file_watch = DatabaseFileWatch(self._sqlite_path)
        tasks = count_tasks(self._engine)
        self._database_id = database_id(self._engine)
        lost = self._marker.lost_database(tasks, self._database_id)
        if lost is None:
            self._marker.write(tasks, self._database_id)
            return
        # In the start-up thread, before the loops run: nothing reads or writes it meanwhile.
        self._recreated = True
        self._warn(RECREATED, lost)
        log.error(
            "service.database_recreated",
            database=self._marker.url,
            problem=lost,
            marker=str(self._marker.file),
        )
        # Published by the first cycle, when the bus's subscribers (the alerter) are running.
        self._pending_events.append(
            (DATABASE_RECREATED, {"reason": "empty_after_restart", "problem": lost})
        )

    async def cycle(self, *, leader: bool) -> str | None:
        """One health cycle: the reason (``deleted``, ``replaced``) when this cycle found the
        database file lost, which stops the service's scheduling; None otherwise."""
        for topic, payload in self._pending_events:
            await self._publish(topic, payload)
        self._pending_events.clear()
        watch = self._file_watch
        if watch is not None and self.fatal is None:
            problem = await asyncio.to_thread(watch.problem)
            if problem is not None:
                reason = watch.reason() or "replaced"
                await self._lost(problem, reason)
                return reason
        if self.fatal is None and leader:
            await self._maintain()
        return None

    async def _lost(self, problem: str, reason: str) -> None:
        self.fatal = problem
        log.critical(
            "service.database_replaced",
            database=self._marker.url,
            reason=reason,
            problem=problem,
            action="scheduling_stopped",
        )
        await self._publish(DATABASE_REPLACED, {"reason": reason, "problem": problem})

    async def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        try:
            await get_bus().publish(
                topic, {"database": self._marker.url, "node": self._node, **payload}
            )
        except Exception as exc:
            log.error("service.publish_failed", topic=topic, error=f"{exc.__class__.__name__}")

    async def _maintain(self) -> None:
        """The leader's share of keeping the database healthy: the marker (stored task count)
        while nothing is wrong, and the write-ahead log's checkpoint. Bounded, in threads, one
        at a time."""
        call = self._maintenance
        if call is not None and not call.done():
            return
        due = time.monotonic() - self._last_checkpoint >= CHECKPOINT_EVERY_S
        if due:
            self._last_checkpoint = time.monotonic()
        recreated = self._recreated
        call = asyncio.ensure_future(asyncio.to_thread(self._maintain_in_thread, due, recreated))
        self._maintenance = call
        try:
            async with asyncio.timeout(self._period):
                tasks = await asyncio.shield(call)
        except Exception as exc:
            error = error_text(exc).splitlines()[0]
            log.warning("service.database_maintenance_failed", error=error)
            return
        if recreated and tasks > 0:
            # Tasks again: the operator has restored or re-created what matters.
            self._recreated = False
            self._warn(RECREATED, None)

    def _maintain_in_thread(self, checkpoint_due: bool, recreated: bool) -> int:
        """In a thread: the stored task count (remembered in the marker unless the database
        was found recreated), and the checkpoint."""
        tasks = count_tasks(self._engine)
        if not recreated:
            self._marker.write(tasks, self._database_id)
        if checkpoint_due:
            checkpoint(self._engine)
        return tasks
