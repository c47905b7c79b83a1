"""The process-wide monitor of section 5.2.2 of the seed: one per process, on the process's bus.

``get_heartbeat_monitor()`` makes it on first use, from the configuration (``heartbeat.interval``)
and the process-wide bus, unless a composition root (the service) installed one it built from
its own configuration (:func:`install_heartbeat_monitor`); ``initialize_heartbeat()`` registers
this process's built-in components (:mod:`nanobot.heartbeat.checks`) and starts it in the
running event loop.

Threads: ``_monitor`` is set and reset under ``_monitor_lock``, so any thread may ask for it;
``initialize_heartbeat`` must be called on the event loop the monitor will run on, which then
owns it (see :mod:`nanobot.heartbeat.monitor`).
"""

from __future__ import annotations

import asyncio
import threading

from nanobot.bus import get_bus
from nanobot.config import get_config
from nanobot.exceptions import ComponentError, NoRunningLoopError
from nanobot.heartbeat.checks import register_builtin_components
from nanobot.heartbeat.monitor import HeartbeatMonitor

_monitor: HeartbeatMonitor | None = None
_monitor_lock = threading.Lock()
# The start tasks initialize_heartbeat created: referenced until done, so none is collected.
_background: set[asyncio.Task[None]] = set()


def get_heartbeat_monitor() -> HeartbeatMonitor:
    """The process-wide monitor on the process-wide bus, every ``heartbeat.interval`` seconds."""
    global _monitor
    with _monitor_lock:
        if _monitor is None:
            interval = get_config().get("heartbeat.interval", 30)
            _monitor = HeartbeatMonitor(get_bus(), interval)
        return _monitor


def install_heartbeat_monitor(monitor: HeartbeatMonitor) -> None:
    """Make ``monitor`` the process-wide one: what the scheduler's heartbeat task beats and
    metrics read. Refused if another one exists already (its components would be lost)."""
    global _monitor
    with _monitor_lock:
        if _monitor is not None and _monitor is not monitor:
            raise ComponentError(
                "a process-wide heartbeat monitor exists already: install yours before anything "
                "calls get_heartbeat_monitor(), or reset_heartbeat_monitor() first"
            )
        _monitor = monitor


def reset_heartbeat_monitor() -> None:
    """Forget the process-wide monitor without I/O (for tests)."""
    global _monitor
    with _monitor_lock:
        monitor, _monitor = _monitor, None
    if monitor is not None:
        monitor.abandon()


def current_loop_lag() -> float | None:
    """The process-wide monitor's event-loop lag (seconds), or None if it does not run."""
    monitor = _monitor
    if monitor is None or not monitor.running:
        return None
    return monitor.loop_lag()


def initialize_heartbeat(monitor: HeartbeatMonitor | None = None) -> HeartbeatMonitor:
    """Register the components this process runs and start the monitor in the running loop.

    ``monitor`` is the process-wide one (:func:`get_heartbeat_monitor`) unless given; one given
    is installed as the process-wide one (:func:`install_heartbeat_monitor`).

    The components are ``config``, ``bus``, ``session``, ``database`` (each with a real check,
    see :mod:`nanobot.heartbeat.checks`), ``cron`` (beaten by the scheduler's heartbeat task)
    and ``event_loop``. Other parts of nanobot register their own components when they are
    present. Must be called with an event loop running, from async code.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise NoRunningLoopError(
            "initialize_heartbeat() starts the monitor as a task of the running event loop, and "
            "no loop is running: call it from async code (inside asyncio.run(...)), or create "
            "the monitor with get_heartbeat_monitor() and `await monitor.start()` later"
        ) from None
    if monitor is None:
        monitor = get_heartbeat_monitor()
    else:
        install_heartbeat_monitor(monitor)
    register_builtin_components(monitor)
    task = loop.create_task(monitor.start(), name="heartbeat-start")
    _background.add(task)
    task.add_done_callback(_background.discard)
    return monitor
