"""healthchecks.io-style pings of runs (nanobot.cron.pings), against a real HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from failure_tasks import Breaking
from sqlalchemy import Engine, select

from nanobot.bus import MessageBus
from nanobot.cli import cli
from nanobot.cron import CronManager, CronTask
from nanobot.cron.pings import check_ping_url
from nanobot.cron.taskfile import parse_task_file
from nanobot.db import get_engine
from nanobot.exceptions import InvalidTaskError, TaskFileError
from nanobot.models import Task

WAIT = 30.0


@dataclass
class Monitor:
    """A stand-in for healthchecks.io: records each ping as (method, path, body)."""

    url: str
    pings: list[tuple[str, str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.pings) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def monitor() -> AsyncIterator[Monitor]:
    found = Monitor(url="")

    async def record(request: web.Request) -> web.Response:
        found.pings.append((request.method, request.path, await request.text()))
        found.changed.set()
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}/ping/abc"
    try:
        yield found
    finally:
        await runner.cleanup()


class Quick(CronTask):
    async def run(self) -> None:
        return None


@pytest.fixture
async def manager(db_url: str) -> AsyncIterator[CronManager]:
    m = CronManager(poll_interval=0.05, bus=MessageBus())
    yield m
    await m.shutdown(grace=0)


async def test_success_pings_start_then_the_url(manager: CronManager, monitor: Monitor) -> None:
    """A successful run: GET <url>/start, then GET <url>."""
    manager.register_task("quick", Quick(60, ping_url=monitor.url))
    await manager.start_task("quick")
    await monitor.wait_for(2)
    assert [(m, p) for m, p, _ in monitor.pings] == [
        ("GET", "/ping/abc/start"),
        ("GET", "/ping/abc"),
    ]


async def test_failure_posts_fail_with_the_error(manager: CronManager, monitor: Monitor) -> None:
    """A failed run: /start, then POST <url>/fail whose body holds the outcome and error."""
    manager.register_task("bad", Breaking(60, message="disk full", ping_url=monitor.url))
    await manager.start_task("bad")
    await monitor.wait_for(2)
    method, path, body = monitor.pings[1]
    assert (method, path) == ("POST", "/ping/abc/fail")
    assert "outcome: error" in body
    assert "RuntimeError: disk full" in body


async def test_unreachable_monitor_never_fails_the_run(manager: CronManager) -> None:
    """Pings to a closed port fail quietly: the run is recorded success all the same."""
    finished: list[str] = []

    async def on(_topic: str, payload: dict[str, str]) -> None:
        finished.append(payload["outcome"])

    manager.bus.subscribe("task.finished", on)
    manager.register_task("quick", Quick(60, ping_url="http://127.0.0.1:9/nothing"))
    await manager.start_task("quick")
    async with asyncio.timeout(WAIT):
        while not finished:
            await asyncio.sleep(0.02)
    assert finished == ["success"]


def test_bad_ping_urls_are_refused() -> None:
    """Only absolute http(s) URLs; a trailing slash is dropped."""
    assert check_ping_url("https://hc-ping.com/x/") == "https://hc-ping.com/x"
    for bad in ("ftp://x/y", "hc-ping.com/x", "", 5):
        with pytest.raises(InvalidTaskError, match="ping_url"):
            check_ping_url(bad)


def test_cli_and_task_file_store_the_url(engine: Engine, tmp_path: Path) -> None:
    """cron add --ping-url stores it; a bad one is a usage error with nothing stored; the task
    file's ping_url is validated."""
    result = CliRunner().invoke(
        cli,
        ["cron", "add", "t", "--command", "true", "--every", "1h", "--ping-url", "ftp://x"],
    )
    assert result.exit_code == 2, result.output
    assert "ping_url" in result.output
    result = CliRunner().invoke(
        cli,
        ["cron", "add", "t", "--command", "true", "--every", "1h", "--ping-url", "https://h/x"],
    )
    assert result.exit_code == 0, result.output
    with get_engine().connect() as conn:
        assert conn.execute(select(Task.ping_url).where(Task.name == "t")).scalar() == "https://h/x"
    text = '[tasks.n]\ncommand = "true"\nevery = "1h"\nping_url = "https://h/y"\n'
    assert parse_task_file(text, tmp_path / "t.toml")["n"].definition.ping_url == "https://h/y"
    with pytest.raises(TaskFileError, match="ping_url"):
        parse_task_file(text.replace("https://h/y", "nope"), tmp_path / "t.toml")
