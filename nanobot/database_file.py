"""Is the database still the one the service started on? A lost database is noticed, not hidden.

Two faults made the service present an empty database as a healthy system:

- the SQLite file was deleted or replaced while the service ran: SQLite keeps writing into the
  file it opened (deleted, or no longer at the path), and every probe stayed healthy;
- after a restart, a new empty database was created where one with tasks had been.

:class:`DatabaseFileWatch` compares the device and inode of the file at the configured path with
those of the file the service opened, once per lease period (the service's health cycle); a
difference is a fault that stops scheduling. :class:`DatabaseMarker` keeps, in
``$NANOBOT_HOME/database.json``, what the last database looked like (its URL, its file's
identity, how many stored tasks it had); a start that finds the same URL with no tasks where
the marker remembers some says so until tasks exist again (or the operator deletes the marker).

The functions are synchronous and touch the file system only (the task count is passed in):
the service calls them from a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import structlog

log = structlog.get_logger(__name__)

MARKER_FILE: Final = "database.json"


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file a path names: the device and inode numbers of ``stat``."""

    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        """The identity of the file at ``path``, None if there is none."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_dev, st.st_ino)


class DatabaseFileWatch:
    """Notices that the SQLite file at ``path`` is no longer the one opened at start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened = FileIdentity.of(path)

    def problem(self) -> str | None:
        """Why the file at the path is not the one in use, or None while it is."""
        if self.opened is None:
            return None
        try:
            now = FileIdentity.of(self.path)
        except OSError as exc:
            return f"database file {self.path} cannot be examined: {exc.strerror or exc}"
        if now is None:
            return (
                f"database file {self.path} was deleted while the service ran: what it records "
                "now is lost at exit; restore the file and restart the service"
            )
        if now != self.opened:
            return (
                f"database file {self.path} was replaced while the service ran (another file is "
                "at the path now); restart the service to use it, or restore the original"
            )
        return None

    def reason(self) -> str | None:
        """``deleted`` or ``replaced`` while :meth:`problem` reports one, else None."""
        if self.opened is None:
            return None
        now = FileIdentity.of(self.path)
        if now is None:
            return "deleted"
        return "replaced" if now != self.opened else None


@dataclass(frozen=True, slots=True)
class MarkerRecord:
    """What the marker remembers of the last database."""

    url: str
    tasks: int
    device: int | None = None
    inode: int | None = None
    # The database's own random id (models.DatabaseIdentity); None in a marker written before
    # it existed, where the file's device and inode numbers are compared instead.
    database_id: str | None = None


class DatabaseMarker:
    """``$NANOBOT_HOME/database.json``: the last database's URL, file identity and task count."""

    def __init__(self, home: Path, url: str, path: Path | None) -> None:
        self.file = home / MARKER_FILE
        self.url = url
        self.path = path

    def read(self) -> MarkerRecord | None:
        try:
            data: Any = json.loads(self.file.read_text(encoding="utf-8"))
            return MarkerRecord(
                url=str(data["url"]),
                tasks=int(data["tasks"]),
                device=data.get("device"),
                inode=data.get("inode"),
                database_id=data.get("database_id"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def lost_database(self, tasks: int, database_id: str | None = None) -> str | None:
        """A problem if this database (of id ``database_id``) is empty where the marker
        remembers one with tasks."""
        record = self.read()
        if record is None or record.url != self.url or record.tasks == 0 or tasks > 0:
            return None
        if record.database_id is not None and database_id is not None:
            if record.database_id == database_id:
                # The same database, emptied by someone on purpose (cron remove): not a lost one.
                return None
            what = (
                f"a new database file was created at {self.path}"
                if self.path is not None
                else "a new, empty database was created under the same URL"
            )
        elif (
            self.path is not None
            and record.inode is not None
            and (identity := FileIdentity.of(self.path)) is not None
        ):
            if (identity.device, identity.inode) == (record.device, record.inode):
                # The same file, emptied by someone on purpose (cron remove): not a lost one.
                return None
            what = f"a new database file was created at {self.path}"
        else:
            what = "the database is empty"
        return (
            f"{what}: the one this node used before had {record.tasks} stored task(s), and "
            f"this one has none; restore the old database, or delete {self.file} to accept "
            "the new one"
        )

    def write(self, tasks: int, database_id: str | None = None) -> None:
        """Remember this database (best effort: a marker that cannot be written only weakens
        the check at the next start)."""
        identity = FileIdentity.of(self.path) if self.path is not None else None
        record = MarkerRecord(
            url=self.url,
            tasks=tasks,
            device=identity.device if identity else None,
            inode=identity.inode if identity else None,
            database_id=database_id,
        )
        if record == self.read():
            return
        tmp = self.file.with_name(f".{MARKER_FILE}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(asdict(record)) + "\n", encoding="utf-8")
            os.replace(tmp, self.file)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.debug("database.marker_unwritten", path=str(self.file), error=str(exc))
