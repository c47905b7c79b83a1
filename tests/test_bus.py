"""The in-process message bus: delivery, isolation of failing and slow subscribers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from nanobot.bus import MessageBus, get_bus, reset_bus

# Every publish in these tests must finish well within this; a hang fails instead of blocking.
BOUND_S = 2.0


class Recorder:
    """A subscriber that remembers what it received."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []

    def __call__(self, topic: str, payload: Any) -> None:
        self.received.append((topic, payload))


async def _publish(bus: MessageBus, topic: str, payload: Any = None) -> int:
    async with asyncio.timeout(BOUND_S):
        return await bus.publish(topic, payload)


async def test_publish_reaches_every_subscriber_of_the_topic_only() -> None:
    """All subscribers of a topic receive the payload; subscribers of other topics do not."""
    bus = MessageBus()
    a, b, other = Recorder(), Recorder(), Recorder()
    bus.subscribe("component.status", a)
    bus.subscribe("component.status", b)
    bus.subscribe("task.finished", other)
    assert await _publish(bus, "component.status", {"name": "db"}) == 2
    assert a.received == [("component.status", {"name": "db"})]
    assert b.received == [("component.status", {"name": "db"})]
    assert other.received == []


async def test_publish_without_subscribers_delivers_nothing() -> None:
    """Publishing on a topic nobody listens to returns 0."""
    assert await _publish(MessageBus(), "nobody.listens", 1) == 0


async def test_sync_and_async_handlers_are_both_called() -> None:
    """A plain function and a coroutine function both receive the message."""
    bus = MessageBus()
    got: list[str] = []

    def sync_handler(topic: str, payload: Any) -> None:
        got.append(f"sync:{payload}")

    async def async_handler(topic: str, payload: Any) -> None:
        await asyncio.sleep(0)
        got.append(f"async:{payload}")

    bus.subscribe("t", sync_handler)
    bus.subscribe("t", async_handler)
    assert await _publish(bus, "t", "x") == 2
    assert sorted(got) == ["async:x", "sync:x"]


async def test_subscribing_twice_delivers_once() -> None:
    """The same handler subscribed twice to a topic is called once per message."""
    bus = MessageBus()
    rec = Recorder()
    bus.subscribe("t", rec)
    bus.subscribe("t", rec)
    await _publish(bus, "t", 1)
    assert rec.received == [("t", 1)]


async def test_a_raising_subscriber_does_not_stop_the_others() -> None:
    """A subscriber that raises is logged; publish returns normally and the others still run."""
    bus = MessageBus()
    rec = Recorder()

    def broken(topic: str, payload: Any) -> None:
        raise RuntimeError("subscriber bug")

    async def broken_async(topic: str, payload: Any) -> None:
        raise ValueError("async subscriber bug")

    bus.subscribe("t", broken)
    bus.subscribe("t", broken_async)
    bus.subscribe("t", rec)
    with structlog.testing.capture_logs() as logs:
        delivered = await _publish(bus, "t", "payload")
    assert delivered == 1
    assert rec.received == [("t", "payload")]
    failures = [e for e in logs if e["event"] == "bus.subscriber_failed"]
    assert len(failures) == 2
    assert {e["log_level"] for e in failures} == {"error"}
    assert all(e["topic"] == "t" for e in failures)
    assert any("broken_async" in e["handler"] for e in failures)


async def test_a_slow_subscriber_is_abandoned_after_the_timeout() -> None:
    """A subscriber that never finishes is given handler_timeout, logged and abandoned."""
    bus = MessageBus(handler_timeout=0.05)
    rec = Recorder()
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(topic: str, payload: Any) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    bus.subscribe("t", stuck)
    bus.subscribe("t", rec)
    with structlog.testing.capture_logs() as logs:
        delivered = await _publish(bus, "t", 1)
    assert delivered == 1
    assert rec.received == [("t", 1)]
    assert cancelled.is_set()
    (timeout,) = [e for e in logs if e["event"] == "bus.subscriber_timeout"]
    assert timeout["log_level"] == "warning"
    assert timeout["timeout_s"] == 0.05
    assert "stuck" in timeout["handler"]


async def test_unsubscribe_stops_delivery() -> None:
    """After unsubscribe a handler receives nothing; unsubscribing again returns False."""
    bus = MessageBus()
    rec = Recorder()
    bus.subscribe("t", rec)
    assert bus.unsubscribe("t", rec) is True
    assert bus.unsubscribe("t", rec) is False
    assert bus.unsubscribe("never.subscribed", rec) is False
    assert await _publish(bus, "t", 1) == 0
    assert rec.received == []
    assert bus.subscribers("t") == []


def test_non_callable_handler_is_refused() -> None:
    """subscribe raises TypeError for something that cannot be called."""
    bus = MessageBus()
    with pytest.raises(TypeError, match="not callable"):
        bus.subscribe("t", "not a function")  # type: ignore[arg-type]
    assert bus.subscribers("t") == []


@pytest.mark.parametrize("timeout", [0, -1])
def test_handler_timeout_must_be_positive(timeout: float) -> None:
    """A handler_timeout that is not positive is refused with ValueError."""
    with pytest.raises(ValueError, match="handler_timeout"):
        MessageBus(handler_timeout=timeout)


def test_get_bus_is_process_wide() -> None:
    """get_bus returns the same bus until reset_bus."""
    first = get_bus()
    assert get_bus() is first
    reset_bus()
    assert get_bus() is not first
