"""Shared helpers of the heartbeat tests (no tests here): a clock, a bus recorder, table readers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from nanobot.bus import MessageBus
from nanobot.heartbeat import HeartbeatMonitor
from nanobot.models import Component, ComponentErrorRecord, ComponentStatusChange, Heartbeat
from nanobot.times import Clock

NODE = "test-node"
START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Recorder:
    """Subscribes to topics of a real bus and keeps what it receives."""

    def __init__(self, bus: MessageBus, *topics: str) -> None:
        self.messages: list[tuple[str, Any]] = []
        for topic in topics:
            bus.subscribe(topic, self)

    def __call__(self, topic: str, payload: Any) -> None:
        self.messages.append((topic, payload))

    def of(self, topic: str) -> list[Any]:
        return [payload for t, payload in self.messages if t == topic]


def make_monitor(
    engine: Engine,
    bus: Any,
    clock: Clock,
    *,
    interval: float = 10,
    check_timeout: float = 1,
    node: str = NODE,
) -> HeartbeatMonitor:
    return HeartbeatMonitor(
        bus, interval, engine=engine, node=node, check_timeout=check_timeout, clock=clock
    )


def component_rows(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(select(Component.__table__)).all()
    return {row.name: row for row in rows}


def error_rows(engine: Engine, component: str | None = None) -> list[Any]:
    table = ComponentErrorRecord.__table__
    query = select(table).order_by(table.c.id)
    if component is not None:
        query = query.where(table.c.component == component)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def change_rows(engine: Engine, component: str | None = None) -> list[Any]:
    table = ComponentStatusChange.__table__
    query = select(table).order_by(table.c.id)
    if component is not None:
        query = query.where(table.c.component == component)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def heartbeat_rows(engine: Engine) -> list[Any]:
    table = Heartbeat.__table__
    with engine.connect() as conn:
        return list(conn.execute(select(table).order_by(table.c.id)).all())
