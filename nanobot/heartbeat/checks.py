"""The built-in health checks of the components this process runs.

Each check is cheap, answers truthy when its component works and raises with the reason when it
does not (the monitor records the reason). Each plain check runs in a thread of its own (see
:mod:`nanobot.heartbeat.runner`), so blocking I/O is fine in them; the bus check is async
because the bus lives on the event loop.

``cron`` has no check: the scheduler's heartbeat task beats it every ``heartbeat.interval``
seconds from the scheduler's own loop, so a scheduler that never started, or whose loop is
stuck, goes stale, which is the truth. ``event_loop`` has no check either: the monitor beats it
from each cycle while the loop's lag stays low. Other parts of nanobot register their own
components when they are present.

Threads: nothing here holds state; each check runs where the runner puts it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Engine

from nanobot.config import load_config
from nanobot.db import ping
from nanobot.heartbeat.monitor import EVENT_LOOP_COMPONENT, HeartbeatMonitor
from nanobot.session import probe_sessions

PROBE_TOPIC_PREFIX = "heartbeat.probe."


def check_config() -> bool:
    """The configuration still loads from its file and the environment.

    It reads them again rather than the cached copy: a config.json broken since the start
    would make the next restart fail, and the operator should learn it now.
    """
    load_config()
    return True


def make_bus_check(bus: Any) -> Callable[[], Awaitable[bool]]:
    """A round trip on a private topic of ``bus``: subscribe, publish, receive, unsubscribe."""

    async def check_bus() -> bool:
        topic = PROBE_TOPIC_PREFIX + uuid.uuid4().hex
        token = object()
        received = asyncio.Event()

        def on_probe(_topic: str, payload: Any) -> None:
            if payload is token:
                received.set()

        bus.subscribe(topic, on_probe)
        try:
            delivered = await bus.publish(topic, token)
        finally:
            bus.unsubscribe(topic, on_probe)
        if not received.is_set():
            raise RuntimeError(f"probe message not delivered (publish returned {delivered!r})")
        return True

    return check_bus


def make_database_check(engine: Callable[[], Engine]) -> Callable[[], bool]:
    """``SELECT 1`` on the engine ``engine()`` returns."""

    def check_database() -> bool:
        return ping(engine())

    return check_database


def make_session_check(engine: Callable[[], Engine]) -> Callable[[], bool]:
    """The sessions table answers a query (one row at most, by its primary key)."""

    def check_session() -> bool:
        probe_sessions(engine())
        return True

    return check_session


def register_builtin_components(monitor: HeartbeatMonitor) -> None:
    """Register the components every nanobot process runs, with their checks."""

    monitor.register_component("config", check_config)
    monitor.register_component("bus", make_bus_check(monitor.message_bus))
    monitor.register_component("session", make_session_check(monitor.open_engine))
    monitor.register_component("database", make_database_check(monitor.open_engine))
    monitor.register_component("cron")
    # Beaten by each cycle while the loop's lag stays low; in error, naming the cause, when
    # something blocked the loop (see nanobot.loopwatch).
    monitor.register_component(EVENT_LOOP_COMPONENT)
