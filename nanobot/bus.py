"""In-process asynchronous publish/subscribe.

``await get_bus().publish(topic, payload)`` delivers to every subscriber of the topic
concurrently. A subscriber that raises is logged and does not stop the others; a slow one is
given ``handler_timeout`` seconds and then logged and abandoned, so that a stuck subscriber
can never stall the heartbeat monitor that publishes.

``await publish_many(topic, payloads)`` delivers many messages of one topic (the outcomes of a
burst of runs) in one task: each subscriber gets them in order, the subscribers concurrently,
and the event loop is yielded every :data:`YIELD_EVERY` messages so that thousands of them
never hold it for long.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog

from nanobot.times import positive_seconds

log = structlog.get_logger(__name__)

Handler = Callable[[str, Any], Awaitable[None] | None]

DEFAULT_HANDLER_TIMEOUT: Final = 5.0
# publish_many lets other callbacks of the event loop run after this many deliveries, or after
# this many seconds of them, whichever comes first: a subscriber's first message of a label set
# (a Prometheus child) costs ten times its next ones, and a machine under load stretches each.
YIELD_EVERY: Final = 200
SLICE_S: Final = 0.002


class MessageBus:
    """Topic-based publish/subscribe inside one process."""

    def __init__(self, *, handler_timeout: float = DEFAULT_HANDLER_TIMEOUT) -> None:
        positive_seconds(handler_timeout, "handler_timeout")
        self._handlers: dict[str, list[Handler]] = {}
        self._lock = threading.Lock()
        self.handler_timeout = handler_timeout

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Call ``handler(topic, payload)`` for every message published on ``topic``."""
        if not callable(handler):
            raise TypeError(f"handler for topic {topic!r} is not callable: {handler!r}")
        with self._lock:
            handlers = self._handlers.setdefault(topic, [])
            if handler not in handlers:
                handlers.append(handler)

    def unsubscribe(self, topic: str, handler: Handler) -> bool:
        """Stop calling ``handler`` for ``topic``; False if it was not subscribed."""
        with self._lock:
            handlers = self._handlers.get(topic, [])
            if handler not in handlers:
                return False
            handlers.remove(handler)
            return True

    def subscribers(self, topic: str) -> list[Handler]:
        with self._lock:
            return list(self._handlers.get(topic, []))

    async def publish(self, topic: str, payload: Any = None) -> int:
        """Deliver ``payload`` to every subscriber of ``topic``; the number that succeeded."""
        handlers = self.subscribers(topic)
        if not handlers:
            return 0
        results = await asyncio.gather(*(self._deliver(topic, h, payload) for h in handlers))
        return sum(results)

    async def publish_many(self, topic: str, payloads: list[Any]) -> int:
        """Deliver each of ``payloads``, in order, to every subscriber of ``topic``; the number
        of deliveries that succeeded. A subscriber that times out gets none of the rest of
        ``payloads`` (one stuck subscriber costs one timeout per call, not one per message)."""
        handlers = self.subscribers(topic)
        if not handlers or not payloads:
            return 0
        results = await asyncio.gather(*(self._deliver_all(topic, h, payloads) for h in handlers))
        return sum(results)

    async def _deliver_all(self, topic: str, handler: Handler, payloads: list[Any]) -> int:
        delivered = 0
        since = 0
        until = time.perf_counter() + SLICE_S
        for payload in payloads:
            try:
                delivered += await self._deliver(topic, handler, payload, abandon=True)
            except _Abandoned:
                break
            since += 1
            if since >= YIELD_EVERY or time.perf_counter() >= until:
                await asyncio.sleep(0)
                since = 0
                until = time.perf_counter() + SLICE_S
        return delivered

    async def _deliver(
        self, topic: str, handler: Handler, payload: Any, *, abandon: bool = False
    ) -> bool:
        try:
            result = handler(topic, payload)
            if inspect.isawaitable(result):
                # Only a coroutine can be given up on; a plain function has run already.
                async with asyncio.timeout(self.handler_timeout):
                    await result
        except TimeoutError:
            log.warning(
                "bus.subscriber_timeout",
                topic=topic,
                handler=_name(handler),
                timeout_s=self.handler_timeout,
            )
            if abandon:
                raise _Abandoned from None
            return False
        except Exception:
            log.exception("bus.subscriber_failed", topic=topic, handler=_name(handler))
            return False
        return True


class _Abandoned(Exception):
    """A subscriber timed out: publish_many gives it none of the remaining messages."""


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", repr(handler))


_bus: MessageBus | None = None
_bus_lock = threading.Lock()


def get_bus() -> MessageBus:
    """The process-wide message bus."""
    global _bus
    with _bus_lock:
        if _bus is None:
            _bus = MessageBus()
        return _bus


def reset_bus() -> None:
    global _bus
    with _bus_lock:
        _bus = None
