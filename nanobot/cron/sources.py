"""The service's side of user task sources: it records the task code it imported and keeps the
task file synced (at start, then whenever the file's content changes).

Every node syncs its own task file; the sync is idempotent, so nodes with the same file agree.
A file that fails validation changes nothing: the service keeps running with the last good set,
logs ``tasks.file_invalid`` and records the error, which ``status`` shows.

Thread ownership: :class:`TaskSources` lives on the service's event loop; reading the file and
writing the database run in worker threads, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import structlog
from sqlalchemy import Engine

from nanobot.config import Config
from nanobot.cron.taskcode import loaded_modules, record_modules, record_task_file
from nanobot.cron.taskfile import SyncResult, sync_task_file, task_file_path
from nanobot.exceptions import TaskFileError
from nanobot.models import error_text

log = structlog.get_logger(__name__)


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


class TaskSources:
    """Records the loaded task modules and watches the task file for one service."""

    def __init__(self, engine: Engine, node: str, config: Config) -> None:
        self.engine = engine
        self.node = node
        self.path = task_file_path(config)
        self.poll = float(config["cron.poll_interval"])
        self.default_tz = str(config.get("scheduler.timezone", "UTC"))
        self._digest: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Record the modules, sync the file once (before scheduling starts), then watch it."""
        await asyncio.to_thread(record_modules, self.engine, self.node, loaded_modules())
        await self.sync_if_changed(force=True)
        self._task = asyncio.create_task(self._watch(), name="nanobot-task-file")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.sync_if_changed()
            except Exception as exc:
                # The database may be away for a moment: the next poll tries again.
                log.warning("tasks.file_sync_failed", error=error_text(exc))
                self._digest = None

    async def sync_if_changed(self, *, force: bool = False) -> SyncResult | None:
        digest = await asyncio.to_thread(_digest, self.path)
        if not force and digest == self._digest:
            return None
        self._digest = digest
        if digest is None:
            if force:
                log.info("tasks.file_absent", path=str(self.path))
            return None
        return await asyncio.to_thread(self._sync)

    def _sync(self) -> SyncResult | None:
        error: str | None = None
        result: SyncResult | None = None
        try:
            result = sync_task_file(self.engine, self.path, default_tz=self.default_tz)
        except TaskFileError as exc:
            error = str(exc)
            log.error("tasks.file_invalid", path=str(self.path), error=error)
        if result is not None:
            error = result.clash_error(self.path)
            if error:
                log.error("tasks.file_clash", path=str(self.path), tasks=result.clashes)
            log.info(
                "tasks.file_synced",
                path=str(self.path),
                **{k: len(v) for k, v in result.to_json().items()},
            )
        with contextlib.suppress(FileNotFoundError):
            record_task_file(self.engine, self.node, self.path, error)
        return result
