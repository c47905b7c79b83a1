"""Task code: the user's modules the service imports at start, and the record of what it runs.

Where task classes come from, in order:

1. ``tasks.path``: folders put at the front of ``sys.path``;
2. ``tasks.modules``: module names imported at start;
3. installed distributions that declare entry points in the group ``nanobot.tasks``
   (``[project.entry-points."nanobot.tasks"] myapp = "myapp.jobs"``); each is loaded.

A module that fails to import stops the start (:class:`TaskCodeError`, one line naming the
module and the error) unless ``tasks.on_import_error = "continue"``. The command line applies the
same path and imports the same modules before it checks a class, so that it sees what the
service sees.

Code is imported once per process: a change on disk needs a restart of the service. What each
node imported is kept in the table ``task_code`` with the modification time of its file, so that
``status`` can say which running code is older than the file on disk.

Everything here runs on the caller's thread; the database functions do blocking I/O (call them
from a thread when an event loop runs).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import structlog
from sqlalchemy import Connection, Engine, delete, insert, select

from nanobot.config import Config
from nanobot.db import read_transaction, write_transaction
from nanobot.exceptions import TaskCodeError
from nanobot.models import CodeKind, TaskCode, bound_error, error_text, utcnow

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP: Final = "nanobot.tasks"
# A package's files are looked at for their newest change up to this many (a huge package
# must not make every status call walk it).
_PACKAGE_FILES_MAX: Final = 500


@dataclass(frozen=True, slots=True)
class LoadedModule:
    """One task module as this process imported it (or failed to)."""

    name: str
    via: str  # "tasks.modules" or "entry point <name> (<distribution>)"
    origin: str | None = None
    mtime: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "via": self.via,
            "file": self.origin,
            "loaded": self.error is None,
            "error": self.error,
        }


_loaded: list[LoadedModule] = []


def loaded_modules() -> list[LoadedModule]:
    """The task modules of the last :func:`load_task_code` in this process."""
    return list(_loaded)


def apply_path(config: Config) -> list[str]:
    """Put ``tasks.path`` at the front of ``sys.path`` (each folder once); the folders."""
    folders = [str(Path(p).expanduser().resolve()) for p in (config.get("tasks.path") or ())]
    for folder in reversed(folders):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    if folders:
        importlib.invalidate_caches()
    return folders


def _wanted(config: Config) -> list[tuple[str, str, importlib.metadata.EntryPoint | None]]:
    wanted: list[tuple[str, str, importlib.metadata.EntryPoint | None]] = [
        (name, "tasks.modules", None) for name in (config.get("tasks.modules") or ())
    ]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        wanted.append((ep.module, f"entry point {ep.name} ({dist})", ep))
    return wanted


def code_mtime(module: ModuleType) -> tuple[str | None, float | None]:
    """The file of a module and the newest modification time of its code on disk.

    For a package: the newest of the ``.py`` files under its folder, since a change to any of
    them is a change of the code the service runs.
    """
    origin = getattr(module, "__file__", None)
    if not origin:
        return None, None
    return origin, newest_mtime(origin)


def newest_mtime(origin: str) -> float | None:
    path = Path(origin)
    try:
        if path.name != "__init__.py":
            return path.stat().st_mtime
        newest = path.stat().st_mtime
        for count, child in enumerate(path.parent.rglob("*.py")):
            if count >= _PACKAGE_FILES_MAX:
                break
            newest = max(newest, child.stat().st_mtime)
        return newest
    except OSError:
        return None


def load_task_code(config: Config, *, stop_on_error: bool | None = None) -> list[LoadedModule]:
    """Apply ``tasks.path`` and import every task module; what was loaded.

    Raises :class:`TaskCodeError` for the first module that fails, unless ``stop_on_error`` is
    false (default: ``tasks.on_import_error == "stop"``), in which case the failure is logged
    and kept in the result.
    """
    global _loaded
    if stop_on_error is None:
        stop_on_error = config.get("tasks.on_import_error", "stop") == "stop"
    apply_path(config)
    result: list[LoadedModule] = []
    seen: set[str] = set()
    for name, via, ep in _wanted(config):
        if name in seen:
            continue
        seen.add(name)
        try:
            module = importlib.import_module(name)
            if ep is not None:
                ep.load()  # the attribute it names, if any, must exist too
        except Exception as exc:
            error = error_text(exc)
            if stop_on_error:
                raise TaskCodeError(
                    f"cannot import task module {name!r} ({via}): {error}"
                    " (set tasks.on_import_error = 'continue' to start without it)"
                ) from exc
            log.error("tasks.module_failed", module=name, via=via, error=error)
            result.append(LoadedModule(name=name, via=via, error=error))
            continue
        origin, mtime = code_mtime(module)
        log.info("tasks.module_loaded", module=name, via=via, file=origin)
        result.append(LoadedModule(name=name, via=via, origin=origin, mtime=mtime))
    _loaded = result
    return list(result)


# --- the record in the database --------------------------------------------------------------


def record_modules(engine: Engine, node: str, modules: list[LoadedModule]) -> None:
    """Replace this node's record of its task modules."""
    now = utcnow()
    with write_transaction(engine) as conn:
        conn.execute(
            delete(TaskCode).where(TaskCode.node == node, TaskCode.kind == CodeKind.MODULE.value)
        )
        if modules:
            conn.execute(
                insert(TaskCode),
                [
                    {
                        "node": node,
                        "kind": CodeKind.MODULE.value,
                        "name": m.name,
                        "origin": m.origin,
                        "mtime": m.mtime,
                        "loaded_at": now,
                        "error": bound_error(m.error),
                    }
                    for m in modules
                ],
            )


def record_task_file(engine: Engine, node: str, path: Path, error: str | None) -> None:
    """Replace this node's record of its task file: when it was last synced, and its error."""
    now = utcnow()
    try:
        mtime: float | None = path.stat().st_mtime
    except OSError:
        mtime = None
    with write_transaction(engine) as conn:
        conn.execute(
            delete(TaskCode).where(TaskCode.node == node, TaskCode.kind == CodeKind.TASK_FILE.value)
        )
        conn.execute(
            insert(TaskCode).values(
                node=node,
                kind=CodeKind.TASK_FILE.value,
                name=str(path),
                origin=str(path),
                mtime=mtime,
                loaded_at=now,
                error=bound_error(error),
            )
        )


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """One row of ``task_code`` as ``status`` shows it."""

    node: str
    kind: CodeKind
    name: str
    origin: str | None
    loaded_at: str
    error: str | None
    # True when the file on disk changed after the node loaded it (a restart would load it).
    stale: bool

    def problem(self) -> str | None:
        """Why this record makes the system degraded, if it does."""
        if self.kind is CodeKind.TASK_FILE:
            return self.error
        if self.error:
            return f"task module {self.name} did not import on {self.node}: {self.error}"
        if self.stale:
            return (
                f"task module {self.name} changed on disk after {self.node} loaded it: "
                "restart the service to run the new code"
            )
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "kind": self.kind.value,
            "name": self.name,
            "file": self.origin,
            "loaded_at": self.loaded_at,
            "error": self.error,
            "newer_on_disk": self.stale,
        }


def read_task_code(engine: Engine, nodes: set[str] | None = None) -> list[CodeRecord]:
    """The task code each node (of ``nodes``, if given) recorded, with its staleness."""
    with read_transaction(engine) as conn:
        return code_records(conn, nodes)


def code_records(conn: Connection, nodes: set[str] | None = None) -> list[CodeRecord]:
    """:func:`read_task_code` inside the caller's transaction."""
    rows = conn.execute(
        select(TaskCode.__table__).order_by(TaskCode.node, TaskCode.kind, TaskCode.name)
    ).all()
    records = []
    for row in rows:
        if nodes is not None and row.node not in nodes:
            continue
        stale = False
        if row.kind == CodeKind.MODULE.value and row.origin and row.mtime is not None:
            on_disk = newest_mtime(row.origin) if os.path.exists(row.origin) else None
            stale = on_disk is not None and on_disk > row.mtime
        records.append(
            CodeRecord(
                node=row.node,
                kind=CodeKind(row.kind),
                name=row.name,
                origin=row.origin,
                loaded_at=row.loaded_at.isoformat(),
                error=row.error,
                stale=stale,
            )
        )
    return records
