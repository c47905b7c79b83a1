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


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


_config: pytest.Config | None = None


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # A scenario rerun (`.ci/run`: --reruns) shows only as "R": say why it failed, on the
    # terminal, so that a CI log tells a missed time bound from anything else. A
    # SafetyViolation is never rerun (see faults.harness.SafetyViolation).
    outcome: str = report.outcome  # "rerun" is pytest-rerunfailures' own, not in pytest's type
    if outcome != "rerun" or _config is None:
        return
    reporter = _config.pluginmanager.get_plugin("terminalreporter")
    crash = getattr(report.longrepr, "reprcrash", None)
    reason = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"RERUN {report.nodeid}: {reason.splitlines()[0][:300]}")


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
