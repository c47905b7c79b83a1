"""Outbound pings, healthchecks.io style: an outside monitor notices when runs stop coming.

A task with a ``ping_url`` gets, for each run: a GET of ``<url>/start`` when the run starts,
and at its end a GET of ``<url>`` (success) or a POST of ``<url>/fail`` whose body is the
outcome and the error (bounded). A monitor such as healthchecks.io then alerts when the pings
stop, which no check inside nanobot can do when the whole machine is gone.

A ping never fails, delays or blocks a run: each is sent by a background task on the event
loop with a short timeout, and a failure is only logged (``task.ping_failed``). Pings are not
retried and not queued across restarts: the monitor's own grace absorbs one lost ping.

Threads: the event loop only (``Pinger`` owns one aiohttp session, opened at the first ping).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import structlog

from nanobot.exceptions import InvalidTaskError
from nanobot.models import TaskOutcome

log = structlog.get_logger(__name__)

PING_TIMEOUT_S: Final = 10.0
# The body of a /fail ping carries at most this many characters of the error.
BODY_MAX: Final = 10_000
URL_MAX: Final = 2000


def check_ping_url(value: Any) -> str | None:
    """None, or an absolute http(s) URL without a trailing slash; else InvalidTaskError."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > URL_MAX:
        raise InvalidTaskError(f"ping_url must be an http(s) URL, got {value!r}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidTaskError(
            f"ping_url must be an http(s) URL such as https://hc-ping.com/<uuid>, got {value!r}"
        )
    return value.strip().rstrip("/")


def fail_body(outcome: TaskOutcome, error: str | None) -> str:
    text = f"outcome: {outcome.value}\n{error or ''}"
    return text if len(text) <= BODY_MAX else text[-BODY_MAX:]


class Pinger:
    """Sends the pings of runs, in the background; :meth:`close` waits for those in flight."""

    def __init__(self, timeout: float = PING_TIMEOUT_S) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def started(self, task: str, url: str | None) -> None:
        if url:
            self._send(task, "GET", f"{url}/start", None)

    def finished(self, task: str, url: str | None, outcome: TaskOutcome, error: str | None) -> None:
        if not url:
            return
        if outcome is TaskOutcome.SUCCESS:
            self._send(task, "GET", url, None)
        else:
            self._send(task, "POST", f"{url}/fail", fail_body(outcome, error))

    def _send(self, task: str, method: str, url: str, body: str | None) -> None:
        sending = asyncio.get_running_loop().create_task(self._ping(task, method, url, body))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)

    async def _ping(self, task: str, method: str, url: str, body: str | None) -> None:
        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._timeout)
                )
            async with self._session.request(method, url, data=body) as response:
                if response.status >= 400:
                    log.warning("task.ping_failed", task=task, url=url, status=response.status)
        except Exception as exc:
            # Never the run's problem: the outside monitor notices missing pings by itself.
            log.warning("task.ping_failed", task=task, url=url, error=f"{type(exc).__name__}")

    async def close(self) -> None:
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=self._timeout)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
