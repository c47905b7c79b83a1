"""Fixtures of the fault suite: a cluster of real services on the test's database, a ledger,
a TCP proxy in front of PostgreSQL. Everything a test starts is stopped afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from faults.harness import Cluster, Ledger, TcpProxy, pg_target
from nanobot.db import create_db_engine


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test under tests/faults/ is a fault scenario, whatever its module says.
    for item in items:
        if "/faults/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def cluster(db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Nodes on ``db_url``; whatever still runs is killed (thawed first) afterwards."""
    c = Cluster(tmp_path, db_url)
    try:
        yield c
    finally:
        c.kill_all()


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    """An engine on the test's database, for reading what the services recorded."""
    eng = create_db_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.jsonl")


@pytest.fixture
def proxy(db_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the PostgreSQL server of ``db_url``."""
    with TcpProxy(pg_target(db_url)) as p:
        yield p
