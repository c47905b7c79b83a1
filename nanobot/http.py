"""The service's HTTP endpoint (aiohttp): liveness, readiness, status and metrics.

========  ===========================================================================  =========
path      answers                                                                      codes
========  ===========================================================================  =========
/healthz  liveness: the event loop answers and the scheduler loop (the lease loop on   200, 503
          a standby) woke up recently; JSON ``{"alive", "role", ...}``
/readyz   readiness: 503 while this process starts (its first lease round and, on the  200, 503
          leader, the scheduler's start are not done) or while the system status is
          ``error``; JSON ``{"ready", "status", "problems", "overdue"}``
/status   the JSON of ``nanobot status --json``                                        200, 503
/metrics  Prometheus text exposition                                                   200
========  ===========================================================================  =========

With ``http.dashboard`` (the default), the same endpoint serves the dashboard and the REST API
(:mod:`nanobot.web`). Other paths answer 404, other methods 405 (HEAD is allowed wherever GET
is). A handler that fails
answers 500 with a short JSON error and logs one line; nothing a client sends reaches a traceback
or stops the service. Database reads run in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar

import structlog
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from nanobot.models import error_text

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A read that takes longer than this answers 503: a stuck database must not pile up requests.
READ_TIMEOUT_S: Final = 10.0


class Probe(Protocol):
    """What the endpoint asks the service. ``liveness`` must not block; the others may."""

    def liveness(self) -> dict[str, Any]:
        """``{"alive": bool, ...}`` without I/O."""
        ...

    def status(self) -> dict[str, Any]:
        """The status document (reads the database)."""
        ...

    def readiness(self) -> dict[str, Any]:
        """What /readyz weighs (reads the database): the status document with its problems,
        without the rows that cannot add one; ``"starting": True`` while the process starts."""
        ...

    def metrics(self) -> bytes:
        """The Prometheus exposition (reads the database)."""
        ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise  # 404, 405 and friends: aiohttp answers them itself
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error(
            "http.handler_failed",
            path=request.path,
            method=request.method,
            error=error_text(exc),
        )
        return web.json_response({"error": "internal error"}, status=500)


async def read_in_thread(func: Callable[[], T]) -> T:
    """``func()`` (a database read) in a thread, within READ_TIMEOUT_S (TimeoutError past it):
    the one bound of every read an HTTP request makes, probes and dashboard alike."""
    async with asyncio.timeout(READ_TIMEOUT_S):
        return await asyncio.to_thread(func)


# Request bodies past this many bytes are refused with 413 (aiohttp's client_max_size).
MAX_BODY_BYTES: Final = 64 * 1024


def make_app(
    probe: Probe, configure: Callable[[web.Application], None] | None = None
) -> web.Application:
    """The aiohttp application of the endpoint, answering from ``probe``.

    ``configure`` adds more to it before it starts (the dashboard and its API).
    """

    async def healthz(_request: web.Request) -> web.Response:
        body = probe.liveness()
        return web.json_response(body, status=200 if body.get("alive") else 503)

    async def readyz(_request: web.Request) -> web.Response:
        try:
            status = await read_in_thread(probe.readiness)
        except Exception as exc:
            log.warning("http.status_unreadable", error=error_text(exc))
            return web.json_response(
                {"ready": False, "status": None, "problems": ["state could not be read"]},
                status=503,
            )
        ready = status["status"] != "error" and not status.get("starting", False)
        body = {"ready": ready, "status": status["status"], "problems": status["problems"]}
        # Overdue tasks (degraded, still ready): what should have run by now and has not.
        body["overdue"] = status.get("overdue", [])
        return web.json_response(body, status=200 if ready else 503)

    async def status(_request: web.Request) -> web.Response:
        try:
            body = await read_in_thread(probe.status)
        except Exception as exc:
            log.warning("http.status_unreadable", error=error_text(exc))
            return web.json_response({"error": "state could not be read"}, status=503)
        return web.json_response(body)

    async def metrics(_request: web.Request) -> web.Response:
        payload = await read_in_thread(probe.metrics)
        response = web.Response(body=payload)
        response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
        return response

    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    if configure is not None:
        configure(app)
    return app


class HttpServer:
    """The endpoint bound to a host and port; ``start`` raises OSError if it cannot bind."""

    def __init__(
        self,
        probe: Probe,
        host: str,
        port: int,
        configure: Callable[[web.Application], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._runner = web.AppRunner(make_app(probe, configure), handle_signals=False)
        self._started = False

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self._started = True
        # The port actually bound (port 0 asks the system for a free one).
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("http.started", host=self.host, port=self.port)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self._runner.cleanup()
        log.info("http.stopped")
