"""The harness itself: the proxy cuts and holds connections, the ledger checker catches what it
names. A checker that cannot fail proves nothing, so each check is shown failing once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.exc import OperationalError

from faults.harness import Ledger, SafetyViolation, TcpProxy, check_ledger, pg_target
from nanobot.cron import control
from nanobot.models import TaskRun, utcnow

postgres_only = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@postgres_only
def test_proxy_cut_resets_connections_and_refuses_new_ones_until_restored(db_url: str) -> None:
    """Through the proxy a query answers; after ``cut`` the open connection fails at once and a
    new one is refused; after ``restore`` a new connection answers again."""
    with TcpProxy(pg_target(db_url)) as proxy:
        engine = create_engine(proxy.url(db_url), connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
                proxy.cut()
                started = time.monotonic()
                with pytest.raises(OperationalError):
                    conn.execute(text("SELECT 1"))
                assert time.monotonic() - started < 2
            with pytest.raises(OperationalError), engine.connect():
                pass
            proxy.restore()
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        finally:
            engine.dispose()


@postgres_only
def test_proxy_hold_keeps_connections_silent_until_restored(db_url: str) -> None:
    """``hold``: a query neither answers nor fails; ``restore`` lets its answer through."""
    with TcpProxy(pg_target(db_url)) as proxy:
        engine = create_engine(proxy.url(db_url))
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                proxy.hold()
                answered = threading.Event()

                def query() -> None:
                    conn.execute(text("SELECT 1"))
                    answered.set()

                thread = threading.Thread(target=query, daemon=True)
                thread.start()
                assert not answered.wait(1.0), "a held connection must not answer"
                proxy.restore()
                assert answered.wait(5.0)
                thread.join(5)
        finally:
            engine.dispose()


def _write(path: Path, *records: dict[str, object]) -> None:
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def test_ledger_checker_names_overlaps_and_double_runs(tmp_path: Path, engine: object) -> None:
    """Two processes running one task at once, and one run id executed twice, are reported."""
    assert isinstance(engine, Engine)
    now = utcnow()
    with engine.begin() as conn:
        control.insert_task(
            conn,
            dict(name="t", task_class="x:Y", interval_s=60, kwargs={}, paused=False, anchor_at=now),
        )
        conn.execute(
            insert(TaskRun).values(
                id=1, task_name="t", scheduled_at=now, outcome="success", slots=1, node="a"
            )
        )
    ledger = Ledger(tmp_path / "ledger.jsonl")
    _write(
        ledger.path,
        {"event": "start", "task": "t", "run_id": 1, "pid": 10, "start": 1.0, "at": 1.0},
        {"event": "start", "task": "t", "run_id": 1, "pid": 11, "start": 2.0, "at": 2.0},
        {"event": "end", "task": "t", "run_id": 1, "pid": 10, "start": 1.0, "at": 3.0},
        {"event": "end", "task": "t", "run_id": 1, "pid": 11, "start": 2.0, "at": 4.0},
    )
    with pytest.raises(SafetyViolation) as failure:
        check_ledger(engine, ledger, ["t"])
    message = str(failure.value)
    assert "executed twice" in message
    assert "overlaps" in message
