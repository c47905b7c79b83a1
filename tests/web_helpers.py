"""Helpers of the dashboard's tests: the endpoint with the dashboard on a real database, tokens,
and rows written as the scheduler writes them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import Engine, func, insert, select

from nanobot.cron import control
from nanobot.db import write_transaction
from nanobot.http import HttpServer
from nanobot.models import Component, Heartbeat, Task, TaskRun, utcnow
from nanobot.status import build_status
from nanobot.web.app import setup_dashboard
from nanobot.web.tokens import TokenEntry, TokenStore, hash_token

OPERATOR = "nbt_operator-secret-0123456789abcdefghijklmnopq"
READER = "nbt_reader-secret-0123456789abcdefghijklmnopqrs"
TOKENS = TokenStore(
    [
        TokenEntry("ops", hash_token(OPERATOR)),
        TokenEntry("viewer", hash_token(READER), read_only=True),
    ]
)


class Probe:
    """The service's side of the endpoint, answering from the database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def liveness(self) -> dict[str, Any]:
        return {"alive": True, "role": "leader"}

    def status(self) -> dict[str, Any]:
        return build_status(self.engine)

    def readiness(self) -> dict[str, Any]:
        return build_status(self.engine, problems_only=True)

    def metrics(self) -> bytes:
        return b""


@dataclass
class Served:
    base: str
    app: web.Application


@asynccontextmanager
async def serve(
    engine: Engine, *, host: str = "127.0.0.1", tokens: TokenStore = TOKENS
) -> AsyncIterator[Served]:
    """The endpoint with the dashboard on 127.0.0.1 (a free port); ``host`` is the address the
    access policy believes it is bound to."""
    apps: list[web.Application] = []

    def configure(app: web.Application) -> None:
        setup_dashboard(app, engine, host=host, tokens=tokens)
        apps.append(app)

    server = HttpServer(Probe(engine), "127.0.0.1", 0, configure=configure)
    await server.start()
    try:
        yield Served(f"http://127.0.0.1:{server.port}", apps[0])
    finally:
        await server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def add_task_row(engine: Engine, name: str, **values: Any) -> None:
    now = utcnow()
    row = {
        "name": name,
        "task_class": "cron_tasks:Counter",
        "interval_s": 60.0,
        "kwargs": {"interval": 60},
        "paused": False,
        "misfire_policy": "catch_up_once",
        "anchor_at": now,
        "next_run_at": now + timedelta(seconds=60),
        "consecutive_failures": 0,
        "version": 1,
        "created_at": now,
        "updated_at": now,
    } | values
    with write_transaction(engine) as conn:
        control.insert_task(conn, row)


def add_run(engine: Engine, name: str, ago_s: float, outcome: str, **values: Any) -> None:
    at = utcnow() - timedelta(seconds=ago_s)
    row = {
        "task_name": name,
        "scheduled_at": at,
        "started_at": at,
        "finished_at": at + timedelta(seconds=0.5),
        "duration_s": 0.5,
        "outcome": outcome,
        "slots": 1,
        "manual": False,
        "node": "n1",
    } | values
    with write_transaction(engine) as conn:
        conn.execute(insert(TaskRun).values(**row))


def add_node(engine: Engine, node: str = "n1") -> None:
    now = utcnow()
    with write_transaction(engine) as conn:
        conn.execute(
            insert(Heartbeat).values(
                at=now,
                node=node,
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
                node=node,
                status="healthy",
                last_heartbeat=now,
                registered_at=now,
                updated_at=now,
            )
        )


def snapshot(engine: Engine) -> list[tuple[Any, ...]]:
    """Every task row as stored: equal snapshots mean nothing changed."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(control.TASK_ROWS.order_by(Task.name))]


def task_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Task)).scalar_one())
