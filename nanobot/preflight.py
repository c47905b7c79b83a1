"""What the service checks before it starts: the paths it needs are usable, and no other service
runs as this node.

Each failure is one line naming the path (or the other process) and the problem, with the exit
code the README documents: 2 for a folder of the configuration that cannot be used (the home,
the log folder), 3 for a database that cannot be opened for writing (its folder, the file
itself, a read-only file system), 1 for another service already running as this node from the
same home. Nothing here logs: logging is not set up yet (its folder may be the problem), so the
command line prints the line.

Runs in the main thread before the event loop starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from sqlalchemy.engine import make_url

from nanobot.config import Config
from nanobot.exceptions import NanobotError

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREADABLE: Final = 3
# The claim of a node name lives in the home, next to node-id (see :func:`claim_node`).
NODE_LOCK_PREFIX: Final = ".service-"


class StartupError(NanobotError):
    """The service cannot start; ``exit_code`` is the documented code of the reason."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def sqlite_file(config: Config) -> Path | None:
    """The SQLite database file of ``config``, or None (PostgreSQL, memory, URI filenames)."""
    url = make_url(config.database_url)
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


def check_paths(config: Config) -> None:
    """Every path the service writes is usable, or :class:`StartupError` naming it."""
    ensure_folder(config.home, "NANOBOT_HOME", EXIT_USAGE)
    ensure_folder(config.log_dir, "log folder (logging.dir)", EXIT_USAGE)
    database = sqlite_file(config)
    if database is not None:
        check_database_file(database)


def ensure_folder(path: Path, what: str, exit_code: int) -> None:
    """``path`` is (or is now made) a folder this process can create files in."""
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise StartupError(f"{what} {path} is not a folder", exit_code)
    if not path.exists():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"{what} {path} cannot be created: {_reason(exc)}", exit_code
            ) from None
    # A real file rather than os.access: access() says yes to root whatever the mode bits, and
    # knows nothing of quotas or a full disk.
    try:
        fd, probe = tempfile.mkstemp(prefix=".nanobot-probe-", dir=path)
    except OSError as exc:
        raise StartupError(f"{what} {path} is not writable: {_reason(exc)}", exit_code) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_database_file(path: Path) -> None:
    """The SQLite file (and its folder, where its -wal and -shm files go) can be written."""
    ensure_folder(path.parent, "database folder", EXIT_UNREADABLE)
    if not path.exists():
        return
    if not path.is_file():
        raise StartupError(f"database {path} is not a file", EXIT_UNREADABLE)
    try:
        # Opened for writing, not written: a read-only file or file system fails here.
        with path.open("r+b"):
            pass
    except OSError as exc:
        raise StartupError(
            f"database {path} cannot be opened for writing: {_reason(exc)}", EXIT_UNREADABLE
        ) from None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or exc.__class__.__name__


@dataclass
class NodeClaim:
    """This process's claim of its node name in its home; held until :meth:`release` or exit."""

    path: Path
    handle: TextIO | None

    def release(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def claim_node(config: Config, node: str, port: int | None) -> NodeClaim:
    """Refuse a second service running as ``node`` from the same NANOBOT_HOME.

    Two such services would share one identity: one node's heartbeats and components written
    by two processes (one of them a standby that removes the leader's ``cron`` component). The
    claim is an exclusive ``flock`` on a small file in the home that names the holder; the
    system drops it when the process ends, however it ends, so a crash never leaves a stale
    claim. Services with their own home, or their own ``service.node``, do not meet here.
    """
    digest = hashlib.sha256(node.encode()).hexdigest()[:12]
    path = config.home.expanduser() / f"{NODE_LOCK_PREFIX}{digest}.lock"
    try:
        handle = path.open("a+", encoding="utf-8")
    except OSError as exc:
        raise StartupError(f"NANOBOT_HOME lock {path}: {_reason(exc)}", EXIT_USAGE) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StartupError(
            f"another service already runs as node {node!r} from NANOBOT_HOME "
            f"{config.home} ({holder}): give this one its own NANOBOT_HOME or service.node",
            EXIT_FAILED,
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}" + (f", port {port}" if port else "") + "\n")
    handle.flush()
    return NodeClaim(path, handle)
