"""The HTTP endpoint over a real socket, and the metrics it serves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, event, insert, select

from nanobot.cron import control
from nanobot.db import create_db_engine, read_transaction, write_transaction
from nanobot.http import HttpServer
from nanobot.metrics import Metrics
from nanobot.models import Component, Heartbeat, TaskRun, utcnow
from nanobot.status import build_status


class FakeProbe:
    """The service's side of the endpoint: real status and metrics, settable liveness."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics_ = metrics
        self.alive = True
        self.fail_status = False
        self.starting = False

    def liveness(self) -> dict[str, Any]:
        return {"alive": self.alive, "role": "leader"}

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("boom with a secret traceback")
        return build_status(self.engine)

    def readiness(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("boom with a secret traceback")
        return build_status(self.engine, problems_only=True) | {"starting": self.starting}

    def metrics(self) -> bytes:
        return self.metrics_.render()


@pytest.fixture
async def served(engine: Engine) -> AsyncIterator[tuple[FakeProbe, str]]:
    probe = FakeProbe(engine, Metrics(engine, "n1", is_leader=lambda: True))
    server = HttpServer(probe, "127.0.0.1", 0)
    await server.start()
    try:
        yield probe, f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


def seed_state(engine: Engine) -> None:
    now = utcnow()
    with write_transaction(engine) as conn:
        conn.execute(
            insert(Heartbeat).values(
                at=now,
                node="n1",
                status="healthy",
                interval_s=10.0,
                total=1,
                healthy=1,
                error=0,
                unknown=0,
            )
        )
        conn.execute(
            insert(Component).values(
                name="database",
                node="n1",
                status="healthy",
                last_heartbeat=now,
                registered_at=now,
                updated_at=now,
            )
        )
        control.insert_task(
            conn,
            dict(
                name="job",
                task_class="m:C",
                interval_s=60.0,
                kwargs={},
                paused=False,
                misfire_policy="catch_up_once",
                next_run_at=now + timedelta(seconds=60),
                consecutive_failures=0,
                version=1,
                created_at=now,
                updated_at=now,
            ),
        )
        conn.execute(
            insert(TaskRun).values(
                task_name="job",
                scheduled_at=now - timedelta(seconds=60),
                started_at=now - timedelta(seconds=60),
                finished_at=now - timedelta(seconds=59),
                duration_s=1.0,
                outcome="success",
                slots=1,
                manual=False,
                node="n1",
            )
        )


async def test_healthz_follows_liveness(served: tuple[FakeProbe, str]) -> None:
    """200 while alive, 503 once the scheduler loop is reported dead."""
    probe, base = served
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["alive"] is True
        probe.alive = False
        async with session.get(base + "/healthz") as r:
            assert r.status == 503


async def test_readyz_is_503_while_status_is_error(
    served: tuple[FakeProbe, str], engine: Engine
) -> None:
    """No heartbeat at all is unknown (ready); a component in error is not ready."""
    probe, base = served
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "unknown"
        seed_state(engine)  # fresh heartbeat, no lease holder: error
        async with session.get(base + "/readyz") as r:
            assert r.status == 503
            body = await r.json()
            assert body["ready"] is False
            assert body["problems"]
        probe.fail_status = True
        async with session.get(base + "/readyz") as r:
            assert r.status == 503
            assert "secret" not in await r.text()


async def test_readyz_is_503_while_the_process_starts(served: tuple[FakeProbe, str]) -> None:
    """A process that is still starting is not ready, whatever the database says; once started,
    the status decides again."""
    probe, base = served
    probe.starting = True
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["ready"] is False
        probe.starting = False
        async with session.get(base + "/readyz") as r:
            assert r.status == 200


async def test_status_serves_the_status_json(served: tuple[FakeProbe, str], engine: Engine) -> None:
    _probe, base = served
    seed_state(engine)
    async with aiohttp.ClientSession() as session, session.get(base + "/status") as r:
        assert r.status == 200
        body = await r.json()
    assert set(body) >= {"status", "service", "components", "tasks"}
    assert body["tasks"][0]["name"] == "job"
    assert body["service"]["last_heartbeat"].endswith("+00:00")


async def test_metrics_parse_with_prometheus_parser(
    served: tuple[FakeProbe, str], engine: Engine
) -> None:
    """Every documented family is present and parses; labels carry no run ids nor errors."""
    probe, base = served
    seed_state(engine)
    probe.metrics_.on_task_finished(
        "task.finished", {"task": "job", "outcome": "success", "duration": 0.25}
    )
    probe.metrics_.on_task_finished(
        "task.finished", {"task": "job", "outcome": "error", "duration": 1.5, "error": "x" * 50}
    )
    probe.metrics_.on_task_finished("task.finished", {"task": "job", "outcome": "nonsense"})
    probe.metrics_.on_task_finished("task.finished", "not a dict")
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "nanobot_task_runs",
        "nanobot_task_duration_seconds",
        "nanobot_task_last_success_timestamp_seconds",
        "nanobot_task_next_run_timestamp_seconds",
        "nanobot_component_up",
        "nanobot_heartbeat_timestamp_seconds",
        "nanobot_build_info",
        "nanobot_leader",
    ):
        assert name in families, name
    runs = {
        s.labels["outcome"]: s.value
        for s in families["nanobot_task_runs"].samples
        if s.name == "nanobot_task_runs_total"
    }
    assert runs == {"success": 1.0, "error": 1.0}
    count = [
        s for s in families["nanobot_task_duration_seconds"].samples if s.name.endswith("_count")
    ]
    assert count[0].value == 2.0
    up = families["nanobot_component_up"].samples[0]
    assert (up.labels, up.value) == ({"component": "database"}, 1.0)
    assert families["nanobot_leader"].samples[0].labels == {"node": "n1"}
    allowed = {"task", "outcome", "component", "node", "le", "version", "python"}
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= allowed, sample


async def test_unknown_paths_404_wrong_methods_405_and_garbage_survives(
    served: tuple[FakeProbe, str],
) -> None:
    """Nothing a client sends breaks the endpoint or shows a traceback."""
    probe, base = served
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/nope") as r:
            assert r.status == 404
        async with session.post(base + "/status", data=b"\x00" * 1000) as r:
            assert r.status == 405
        async with session.delete(base + "/metrics") as r:
            assert r.status == 405
        async with session.get(base + "/status?x=%ff%00", headers={"X-Long": "a" * 4000}) as r:
            assert r.status == 200
        probe.fail_status = True
        async with session.get(base + "/status") as r:
            assert r.status == 503
            assert "Traceback" not in await r.text()
        probe.fail_status = False
    # A malformed request line straight on the socket.
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x16\x03\x01 garbage\r\n\r\n")
    await writer.drain()
    reply = await reader.read(200)
    writer.close()
    assert b" 400 " in reply.split(b"\r\n", 1)[0]
    assert b"Traceback" not in reply
    async with aiohttp.ClientSession() as session, session.get(base + "/healthz") as r:
        assert r.status == 200


def test_metrics_read_every_task_in_one_statement(engine: Engine) -> None:
    """A scrape issues as many statements for 30 tasks as for one (no statement per task),
    and still gives each task the finish of its newest success."""
    seed_state(engine)
    metrics = Metrics(engine, "n1")

    def scrape() -> tuple[int, bytes]:
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        try:
            text = metrics.render()
        finally:
            event.remove(engine, "before_cursor_execute", record)
        return len(seen), text

    one, text = scrape()
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    (success,) = families["nanobot_task_last_success_timestamp_seconds"].samples
    with read_transaction(engine) as conn:
        finished = conn.execute(select(TaskRun.finished_at)).scalar_one()
    assert finished is not None
    assert (success.labels, success.value) == ({"task": "job"}, finished.timestamp())
    now = utcnow()
    with write_transaction(engine) as conn:
        for i in range(29):
            control.insert_task(
                conn,
                dict(
                    name=f"more{i}",
                    task_class="m:C",
                    interval_s=60.0,
                    kwargs={},
                    paused=False,
                    misfire_policy="catch_up_once",
                    consecutive_failures=0,
                    version=1,
                    created_at=now,
                    updated_at=now,
                ),
            )
    many, text = scrape()
    assert many == one
    assert b'nanobot_task_paused{task="more28"} 0.0' in text


def test_metrics_survive_an_unreadable_database() -> None:
    """A scrape answers even when the database does not: nanobot_database_up is 0."""
    # Port 1 on the loopback: connection refused at once.
    unreachable = create_db_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    metrics = Metrics(unreachable, "n1")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["nanobot_database_up"].samples[0].value == 0.0
    assert "nanobot_build_info" in families


async def test_a_port_in_use_raises_oserror(served: tuple[FakeProbe, str]) -> None:
    probe, base = served
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="address already in use"):
        await HttpServer(probe, "127.0.0.1", port).start()
