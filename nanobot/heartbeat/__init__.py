"""Component health: the heartbeat monitor of the seed's section 5.2, with persisted state.

``from nanobot.heartbeat import HeartbeatMonitor, get_heartbeat_monitor, initialize_heartbeat``
works as in the seed. The modules, one concept each:

- :mod:`~nanobot.heartbeat.component`: one component's state machine (succeed, fail, go stale);
- :mod:`~nanobot.heartbeat.outbox`: what waits to be written and published, and the merge with
  the state an earlier process stored;
- :mod:`~nanobot.heartbeat.monitor`: the monitor (the seed's API, the cycle, start and stop);
- :mod:`~nanobot.heartbeat.process`: the process-wide monitor;
- :mod:`~nanobot.heartbeat.runner`: running health checks; :mod:`~nanobot.heartbeat.checks`:
  the built-in ones;
- :mod:`~nanobot.heartbeat.store`: the tables, plain records in and out.
"""

from __future__ import annotations

from nanobot.exceptions import NoRunningLoopError
from nanobot.heartbeat.component import STALE_REASON
from nanobot.heartbeat.monitor import HeartbeatMonitor
from nanobot.heartbeat.process import (
    get_heartbeat_monitor,
    initialize_heartbeat,
    install_heartbeat_monitor,
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
    "install_heartbeat_monitor",
    "prune",
    "reset_heartbeat_monitor",
]
