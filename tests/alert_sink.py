"""A webhook receiver on 127.0.0.1 for the alert tests: records what it receives.

It runs an aiohttp server on a loop of its own in a background thread, so that synchronous
tests (which drive real service processes) and asynchronous ones can both use it. It can answer
500 to the next ``fail_next`` requests, or to every request while ``failing`` is set, and it
keeps the idempotency keys it accepted, as a receiver that deduplicates would.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Received:
    key: str | None
    body: dict[str, Any]
    status: int


class Sink:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.failing = False
        self.fail_next = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the sink did not start")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = {"raw": text}
        with self._lock:
            fail = self.failing or self.fail_next > 0
            if self.fail_next > 0:
                self.fail_next -= 1
            status = 500 if fail else 200
            self.received.append(Received(request.headers.get("Idempotency-Key"), body, status))
        return web.Response(status=status, text="down" if fail else "ok")

    def url(self, path: str = "hook") -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    def accepted(self) -> list[Received]:
        """What was answered 200, one per idempotency key (a deduplicating receiver's view)."""
        with self._lock:
            seen: dict[str | None, Received] = {}
            for r in self.received:
                if r.status == 200:
                    seen.setdefault(r.key, r)
            return list(seen.values())

    def accepted_raw(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.status == 200]

    def kinds(self) -> list[str]:
        return [r.body.get("kind", "") for r in self.accepted_raw()]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until ``count`` requests were accepted (bounded); what was accepted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.accepted_raw()) >= count:
                return self.accepted_raw()
            time.sleep(0.05)
        raise AssertionError(f"the sink accepted {len(self.accepted_raw())} of {count} requests")

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
