"""This process's node name: which machine (or service) a row of state belongs to."""

from __future__ import annotations

import socket

from nanobot.config import Config, get_config


def node_name(config: Config | None = None) -> str:
    """``service.node`` if configured, else the host name.

    The host name is stable across restarts, so a restarted service finds its own components
    again. Several services on one host and one database need distinct ``service.node`` values.
    """
    cfg = config or get_config()
    configured = cfg.get("service.node")
    if isinstance(configured, str) and configured:
        return configured
    return socket.gethostname() or "localhost"
