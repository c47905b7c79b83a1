"""build_status: the verdict an operator and a monitoring script get, read from the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert

from nanobot.cron import control
from nanobot.cron.control import get_task
from nanobot.db import write_transaction
from nanobot.lease import SchedulerLease
from nanobot.models import Component, ComponentErrorRecord, ComponentStatusChange, Heartbeat
from nanobot.status import build_heartbeat_status, build_status, exit_code

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def add_heartbeat(engine: Engine, node: str, at: datetime, interval: float = 10.0) -> None:
    with write_transaction(engine) as conn:
        conn.execute(
            insert(Heartbeat).values(
                at=at,
                node=node,
                status="healthy",
                interval_s=interval,
                total=1,
                healthy=1,
                error=0,
                unknown=0,
            )
        )


def add_component(
    engine: Engine, name: str, node: str, status: str = "healthy", error: str | None = None
) -> None:
    with write_transaction(engine) as conn:
        conn.execute(
            insert(Component).values(
                name=name,
                node=node,
                status=status,
                last_heartbeat=ago(1),
                last_error=error,
                registered_at=ago(100),
                updated_at=ago(1),
            )
        )


def add_task(engine: Engine, name: str, **values: Any) -> None:
    row: dict[str, Any] = {
        "name": name,
        "task_class": "m:C",
        "interval_s": 60.0,
        "kwargs": {},
        "paused": False,
        "misfire_policy": "catch_up_once",
        "next_run_at": NOW + timedelta(seconds=30),
        "consecutive_failures": 0,
        "version": 1,
        "created_at": ago(100),
        "updated_at": ago(100),
    }
    row.update(values)
    with write_transaction(engine) as conn:
        control.insert_task(conn, row)


def lead(engine: Engine, holder: str = "n1:1") -> SchedulerLease:
    lease = SchedulerLease(engine, holder, 30, clock=lambda: ago(1))
    assert lease.try_acquire()
    return lease


def running_service(engine: Engine) -> None:
    add_heartbeat(engine, "n1", ago(2))
    add_component(engine, "database", "n1")
    lead(engine)


def test_empty_database_is_unknown_and_down(engine: Engine) -> None:
    """No heartbeat ever: status unknown, service not running, exit code 2."""
    status = build_status(engine, now=NOW)
    assert status["status"] == "unknown"
    assert status["service"]["running"] is False
    assert status["service"]["last_heartbeat"] is None
    assert status["components"] == []
    assert status["tasks"] == []
    assert exit_code(status) == 2


def test_fresh_heartbeat_and_leader_is_healthy(engine: Engine) -> None:
    """A recent heartbeat, a lease holder and healthy components make a healthy system."""
    running_service(engine)
    add_task(engine, "ok", last_outcome="success", last_run_at=ago(30))
    status = build_status(engine, now=NOW)
    assert status["status"] == "healthy", status["problems"]
    assert status["service"]["running"] is True
    assert status["service"]["leader"]["holder"] == "n1:1"
    assert status["service"]["last_heartbeat"] == ago(2).isoformat()
    assert status["system"]["components"]["total"] == 1
    assert status["tasks"][0]["next_run_at"].endswith("+00:00")
    assert exit_code(status) == 0


@pytest.mark.parametrize(
    ("age", "running"),
    [(20.0, True), (25.9, True), (26.1, False), (300.0, False)],
)
def test_service_is_down_once_its_heartbeat_is_older_than_2_5_intervals(
    engine: Engine, age: float, running: bool
) -> None:
    """Up while the newest heartbeat is younger than 2.5 x its interval (+1 s slack)."""
    add_heartbeat(engine, "n1", ago(age), interval=10.0)
    add_component(engine, "database", "n1")
    lead(engine)
    status = build_status(engine, now=NOW)
    assert status["service"]["running"] is running
    assert exit_code(status) == (0 if running else 2)


def test_released_lease_reads_as_stopped_at_once(engine: Engine) -> None:
    """A cleanly stopped service (lease released) is down even with a fresh last heartbeat."""
    add_heartbeat(engine, "n1", ago(1))
    add_component(engine, "database", "n1")
    lease = lead(engine)
    lease.release()
    status = build_status(engine, now=NOW)
    assert status["service"]["running"] is False
    assert status["status"] == "error"
    assert any("stopped" in p for p in status["problems"])


def test_every_node_is_shown_with_the_one_that_leads(engine: Engine) -> None:
    """Several nodes: each is listed, alive or not, and only the lease holder's node leads."""
    add_heartbeat(engine, "host:a1", ago(1))
    add_component(engine, "database", "host:a1")
    add_heartbeat(engine, "host:b2", ago(2))
    add_component(engine, "database", "host:b2")
    add_heartbeat(engine, "gone", ago(3600))
    add_component(engine, "database", "gone")
    lead(engine, holder="host:b2:4242")
    status = build_status(engine, now=NOW)
    nodes = {n["node"]: n for n in status["service"]["nodes"]}
    assert sorted(nodes) == ["gone", "host:a1", "host:b2"]
    assert {name: (n["fresh"], n["leader"]) for name, n in nodes.items()} == {
        "gone": (False, False),
        "host:a1": (True, False),
        "host:b2": (True, True),
    }
    assert status["service"]["leader"]["node"] == "host:b2"
    assert exit_code(status) == 0


def test_no_node_leads_is_an_error_with_exit_2(engine: Engine) -> None:
    """Nodes beating but none holding the lease (a fail-over in progress): error, exit 2."""
    add_heartbeat(engine, "a", ago(1))
    add_component(engine, "database", "a")
    add_heartbeat(engine, "b", ago(1))
    add_component(engine, "database", "b")
    SchedulerLease(engine, "a:1", 30, clock=lambda: ago(60)).try_acquire()  # long expired
    status = build_status(engine, now=NOW)
    assert not any(n["leader"] for n in status["service"]["nodes"])
    assert status["service"]["leader"]["held"] is False
    assert any("no node holds the scheduling lease" in p for p in status["problems"])
    assert exit_code(status) == 2


def test_component_in_error_makes_error(engine: Engine) -> None:
    running_service(engine)
    add_component(engine, "bus", "n1", status="error", error="probe lost")
    status = build_status(engine, now=NOW)
    assert status["status"] == "error"
    assert any("probe lost" in p for p in status["problems"])
    assert exit_code(status) == 2


def test_components_of_a_dead_node_do_not_count(engine: Engine) -> None:
    """A component left in error by a node that stopped beating is shown, not judged."""
    running_service(engine)
    add_heartbeat(engine, "old", ago(3600))
    add_component(engine, "bus", "old", status="error", error="gone")
    status = build_status(engine, now=NOW)
    assert status["status"] == "healthy"
    old = [c for c in status["components"] if c["node"] == "old"]
    assert old[0]["current"] is False


def test_unknown_component_makes_unknown(engine: Engine) -> None:
    running_service(engine)
    add_component(engine, "bus", "n1", status="unknown")
    status = build_status(engine, now=NOW)
    assert status["status"] == "unknown"
    assert exit_code(status) == 1


@pytest.mark.parametrize(
    "values",
    [
        {"last_outcome": "error", "consecutive_failures": 2},
        {"last_outcome": "timeout"},
        {"last_outcome": "interrupted"},
        {"broken_reason": "cannot import module 'gone'"},
    ],
)
def test_failing_or_broken_task_makes_degraded(engine: Engine, values: dict[str, Any]) -> None:
    running_service(engine)
    add_task(engine, "bad", **values)
    status = build_status(engine, now=NOW)
    assert status["status"] == "degraded"
    assert exit_code(status) == 1
    assert status["problems"]
    assert "bad" in status["problems"][0]


def test_heartbeat_status_shows_last_ten_errors_and_changes(engine: Engine) -> None:
    """Each component comes with at most its 10 newest errors and status changes."""
    running_service(engine)
    with write_transaction(engine) as conn:
        for i in range(15):
            conn.execute(
                insert(ComponentErrorRecord).values(
                    component="database", node="n1", at=ago(100 - i), error=f"e{i}"
                )
            )
            conn.execute(
                insert(ComponentStatusChange).values(
                    component="database",
                    node="n1",
                    at=ago(100 - i),
                    from_status="healthy",
                    to_status="error",
                    reason=f"r{i}",
                )
            )
    status = build_heartbeat_status(engine, now=NOW)
    (database,) = status["components"]
    assert [e["error"] for e in database["errors"]] == [f"e{i}" for i in range(14, 4, -1)]
    assert len(database["status_changes"]) == 10
    assert database["status_changes"][0] == {
        "at": ago(86).isoformat(),
        "from": "healthy",
        "to": "error",
        "reason": "r14",
    }
    assert "tasks" not in status


def test_a_task_is_shown_with_the_keys_of_cron_list_without_its_kwargs(engine: Engine) -> None:
    """status's entry of a task is cron list --json's entry without the constructor arguments
    and the other definition keys: both are built by one function."""
    running_service(engine)
    add_task(engine, "job", kwargs={"secret": "x"}, last_outcome="success", last_run_at=ago(5))
    (shown,) = build_status(engine, now=NOW)["tasks"]
    listed = get_task(engine, "job").to_json()
    assert "kwargs" not in shown
    assert {key: listed[key] for key in shown} == shown
    assert shown["schedule"] == "every minute"
    assert shown["broken"] is False


def test_a_task_whose_schedule_cannot_be_read_still_shows(engine: Engine) -> None:
    """A row edited by hand into a schedule nanobot cannot read does not break status: the
    task is shown with its stored columns and no schedule in words."""
    running_service(engine)
    add_task(engine, "odd", schedule_kind="cron", cron="not a cron", timezone="UTC")
    status = build_status(engine, now=NOW)
    (shown,) = status["tasks"]
    assert (shown["schedule_kind"], shown["cron"], shown["schedule"]) == (
        "cron",
        "not a cron",
        None,
    )
    assert status["status"] == "healthy"


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.lower())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_status_reads_are_bounded(engine: Engine) -> None:
    """Heartbeats are read newest-first with LIMIT; task_runs only by the overdue check's
    probe of each late task's slot, on the unique key (on SQLite: searched, never scanned)."""
    running_service(engine)
    for i in range(50):
        add_heartbeat(engine, "n1", ago(10 + i))
    with statements(engine) as seen:
        build_status(engine, now=NOW)
    history_reads = [s for s in seen if "task_runs" in s]
    assert len(history_reads) == 1
    assert "(select max(task_runs.scheduled_at)" in history_reads[0]
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            plan = [
                row[3]
                for row in conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + history_reads[0], (NOW.isoformat(),)
                )
            ]
        probe = [p for p in plan if "task_runs" in p]
        assert probe, plan
        assert all(p.startswith("SEARCH task_runs USING") for p in probe), plan
    heartbeat_reads = [s for s in seen if "from heartbeats" in s]
    assert heartbeat_reads
    assert all("limit" in s for s in heartbeat_reads)


def test_failing_task_component_makes_degraded_not_error(engine: Engine) -> None:
    """A task's own component in error (a failed or overrunning run) is the task's problem: the
    service is degraded, not in error (so /readyz stays ready and status does not say down)."""
    running_service(engine)
    add_task(engine, "disk", last_outcome="error", consecutive_failures=1)
    add_component(engine, "task:disk", "n1", status="error", error="CommandFailed: exit code 3")
    add_component(engine, "task:slow", "n1", status="error", error="a run in flight for 95.0s")
    status = build_status(engine, now=NOW)
    assert status["status"] == "degraded"
    assert exit_code(status) == 1
    assert any("task:slow" in p for p in status["problems"])


def test_service_component_in_error_still_makes_error_next_to_a_failing_task(
    engine: Engine,
) -> None:
    running_service(engine)
    add_component(engine, "task:disk", "n1", status="error", error="exit code 3")
    add_component(engine, "bus", "n1", status="error", error="probe lost")
    status = build_status(engine, now=NOW)
    assert status["status"] == "error"
    assert [p for p in status["problems"] if "task:disk" in p] == []
