"""This process's node name: which machine (or service) a row of state belongs to.

The default is ``<host name>:<id>``, where ``<id>`` is 8 hex digits drawn once and kept in
``$NANOBOT_HOME/node-id``. It is stable across restarts (a restarted service finds its own
components again) and differs between two services of one host that have their own
``NANOBOT_HOME``, so that several services on one host and one database need no configuration
to tell their heartbeats apart. ``service.node`` replaces it.

The id comes from the home folder rather than from the process id: a name with the pid in it
would change at every restart, and each restart would leave one more dead node in ``status``.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
from pathlib import Path
from typing import Final

import structlog

from nanobot.config import Config, get_config
from nanobot.models import error_text

log = structlog.get_logger(__name__)

NODE_ID_FILE: Final = "node-id"
_ID_PATTERN: Final = re.compile(r"^[0-9a-f]{8}$")

_ids: dict[Path, str | None] = {}
_ids_lock = threading.Lock()


def node_name(config: Config | None = None) -> str:
    """``service.node`` if configured, else ``<host name>:<id of NANOBOT_HOME>``.

    Falls back to the bare host name when the id can be neither read nor stored (a read-only
    home); that is logged once.
    """
    cfg = config or get_config()
    configured = cfg.get("service.node")
    if isinstance(configured, str) and configured:
        return configured
    host = socket.gethostname() or "localhost"
    node_id = home_node_id(cfg.home)
    return host if node_id is None else f"{host}:{node_id}"


def home_node_id(home: Path) -> str | None:
    """The id kept in ``home/node-id``, created on first use; None if it cannot be stored."""
    key = home.expanduser().absolute()
    with _ids_lock:
        if key not in _ids:
            _ids[key] = _load_or_create(key)
        return _ids[key]


def _read(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if _ID_PATTERN.match(value) else None


def _load_or_create(home: Path) -> str | None:
    path = home / NODE_ID_FILE
    existing = _read(path)
    if existing is not None:
        return existing
    candidate = secrets.token_hex(4)
    tmp = home / f".{NODE_ID_FILE}.{os.getpid()}.{candidate}"
    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp.write_text(candidate + "\n", encoding="ascii")
        try:
            # A hard link is created whole or not at all, and never replaces a file: two
            # processes starting at once agree on whichever id was linked first.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning(
            "node.id_unavailable",
            path=str(path),
            error=error_text(exc),
            consequence="the node is named after the host alone; set service.node",
        )
        return None
    stored = _read(path)
    if stored is None:
        log.warning(
            "node.id_unreadable",
            path=str(path),
            consequence="the node is named after the host alone; set service.node",
        )
    return stored


def reset_node_ids() -> None:
    """Forget the ids read so far (for tests that remove a home folder)."""
    with _ids_lock:
        _ids.clear()
