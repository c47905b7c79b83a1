"""Component health: the heartbeat monitor of the seed's section 5.2, with persisted state.

``from nanobot.heartbeat import HeartbeatMonitor, get_heartbeat_monitor, initialize_heartbeat``
works as in the seed. See :mod:`nanobot.heartbeat.monitor` for the monitor,
:mod:`nanobot.heartbeat.store` for the tables it writes and :mod:`nanobot.heartbeat.checks` for
the built-in health checks.
"""

from __future__ import annotations

from nanobot.heartbeat.monitor import (
    STALE_REASON,
    HeartbeatMonitor,
    NoRunningLoopError,
    get_heartbeat_monitor,
    initialize_heartbeat,
    reset_heartbeat_monitor,
)
from nanobot.heartbeat.runner import CHECK_BUSY_REASON, HealthCheck
from nanobot.heartbeat.store import ERRORS_SHOWN, SYSTEM_COMPONENT, prune

__all__ = [
    "CHECK_BUSY_REASON",
    "ERRORS_SHOWN",
    "STALE_REASON",
    "SYSTEM_COMPONENT",
    "HealthCheck",
    "HeartbeatMonitor",
    "NoRunningLoopError",
    "get_heartbeat_monitor",
    "initialize_heartbeat",
    "prune",
    "reset_heartbeat_monitor",
]
