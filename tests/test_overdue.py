"""Overdue tasks (nanobot.cron.overdue): a slot nobody claimed, a run past its bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from faults.harness import BASE_ENV, ServiceProcess, add_append, run_cli, runs_file, wait_for
from sqlalchemy import Engine, insert, text, update

from nanobot.bus import MessageBus
from nanobot.config import get_config
from nanobot.cron import control
from nanobot.cron.overdue import (
    CHECK_PACE,
    LOG_EACH_MAX,
    OVERDUE,
    OVERDUE_CLEARED,
    Grace,
    Overdue,
    OverdueKind,
    OverdueWatch,
    read_overdue,
)
from nanobot.db import read_transaction, write_transaction
from nanobot.models import TaskRun, TaskStateRecord, utcnow
from nanobot.status import SystemStatus, verdict

NOW = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)


def _task(name: str, interval: float, next_run_at: datetime | None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "task_class": "x:Y",
        "interval_s": interval,
        "kwargs": {},
        "paused": extra.get("paused", False),
        "next_run_at": next_run_at,
        "timeout_s": extra.get("timeout_s"),
        "created_at": NOW,
        "updated_at": NOW,
        "version": 1,
        "consecutive_failures": 0,
    }


def _running(name: str, started: datetime) -> dict[str, Any]:
    return {
        "task_name": name,
        "scheduled_at": started,
        "started_at": started,
        "outcome": "running",
        "slots": 1,
        "manual": False,
    }


def _overdue(engine: Engine, now: datetime, grace: Grace | None = None) -> list[Overdue]:
    with read_transaction(engine) as conn:
        return read_overdue(conn, now=now, grace=grace or Grace(), overrun_intervals=3.0)


def test_grace_is_a_share_of_the_interval_and_at_least_the_minimum() -> None:
    """Default grace: a tenth of the interval, at least 5 s."""
    assert Grace().of(1.0) == 5.0
    assert Grace().of(3600.0) == 360.0
    assert Grace(share=0.5, minimum=2.0).of(10.0) == 5.0


def test_unclaimed_slots_past_their_grace_are_overdue(engine: Engine) -> None:
    """A started task whose slot is past its grace is overdue (not_claimed), with how late;
    one within its grace, a paused one and a done one are not."""
    with write_transaction(engine) as conn:
        control.insert_tasks(
            conn,
            [
                _task("late", 60.0, NOW - timedelta(seconds=20)),  # grace 6 s
                _task("hourly", 3600.0, NOW - timedelta(seconds=300)),  # grace 360 s
                _task("fresh", 1.0, NOW - timedelta(seconds=3)),  # grace 5 s
                _task("held", 60.0, NOW - timedelta(hours=1), paused=True),
                _task("done", 0.0, None),
            ],
        )
    found = _overdue(engine, NOW)
    assert [(o.task, o.kind) for o in found] == [("late", OverdueKind.NOT_CLAIMED)]
    assert found[0].late_s == pytest.approx(20.0)
    assert found[0].grace_s == 6.0
    assert found[0].expected_at == NOW - timedelta(seconds=20)
    # The hourly task becomes overdue once past its own, longer grace.
    later = [o.task for o in _overdue(engine, NOW + timedelta(seconds=61))]
    assert later == ["fresh", "hourly", "late"]


def test_a_claimed_slot_waiting_for_its_mirror_is_not_overdue(engine: Engine) -> None:
    """next_run_at is advanced with the claimed run's outcome: while that slot is claimed (a
    long run, the end of a large burst), the task is not overdue until one interval and its
    grace after the latest slot claimed; a manual run in the meantime claims nothing; a claimed
    one-shot is left to its run's bound."""
    slot = NOW - timedelta(seconds=20)
    with write_transaction(engine) as conn:
        control.insert_tasks(
            conn,
            [
                _task("long", 60.0, slot),  # grace 6 s: the next slot at most 60 s later
                _task("manual", 60.0, slot),
                _task("once", 0.0, slot),
                _task("skipped", 10.0, slot - timedelta(seconds=40)),
            ],
        )
        manual = _running("manual", NOW - timedelta(seconds=1)) | {"manual": True}
        missed = _running("skipped", slot - timedelta(seconds=40)) | {"outcome": "missed"}
        conn.execute(
            insert(TaskRun), [_running("long", slot), _running("once", slot), manual, missed]
        )
    found = _overdue(engine, NOW)
    assert [(o.task, o.kind) for o in found] == [
        ("manual", OverdueKind.NOT_CLAIMED),
        ("skipped", OverdueKind.NOT_CLAIMED),
    ]
    # "skipped": its slot settled (recorded missed), the next one 10 s later, 50 s ago.
    assert found[1].expected_at == slot - timedelta(seconds=30)
    assert found[1].late_s == pytest.approx(50.0)
    # "long": overdue once its next slot (slot + 60 s) is past its grace, nobody claiming it.
    later = _overdue(engine, slot + timedelta(seconds=67))
    long = next(o for o in later if o.task == "long")
    assert long.expected_at == slot + timedelta(seconds=60)
    assert long.late_s == pytest.approx(7.0)
    assert "once" not in [o.task for o in later]
    # The scheduler claimed that next slot too, its outcomes not written yet: not overdue.
    with write_transaction(engine) as conn:
        conn.execute(insert(TaskRun), [_running("long", slot + timedelta(seconds=60))])
    assert "long" not in [o.task for o in _overdue(engine, slot + timedelta(seconds=67))]


def test_runs_past_their_bound_are_overdue(engine: Engine) -> None:
    """A run going longer than its timeout (or 3 intervals without one) plus the grace is
    overdue (run_too_long); a shorter one is not."""
    with write_transaction(engine) as conn:
        control.insert_tasks(
            conn,
            [
                _task("stuck", 60.0, NOW + timedelta(seconds=30)),  # bound 180 s, grace 6 s
                _task("timed", 60.0, NOW + timedelta(seconds=30), timeout_s=10.0),
                _task("busy", 60.0, NOW + timedelta(seconds=30)),
            ],
        )
        conn.execute(
            insert(TaskRun),
            [
                _running("stuck", NOW - timedelta(seconds=200)),
                _running("timed", NOW - timedelta(seconds=30)),
                _running("busy", NOW - timedelta(seconds=100)),
            ],
        )
    found = _overdue(engine, NOW)
    assert [(o.task, o.kind) for o in found] == [
        ("stuck", OverdueKind.RUN_TOO_LONG),
        ("timed", OverdueKind.RUN_TOO_LONG),
    ]
    assert found[0].late_s == pytest.approx(20.0)
    assert found[1].late_s == pytest.approx(20.0)


async def test_watch_publishes_overdue_then_cleared(engine: Engine) -> None:
    """task.overdue when a task becomes overdue (once, not at every check), and
    task.overdue_cleared when its slot is claimed."""
    bus = MessageBus()
    events: list[tuple[str, dict[str, Any]]] = []

    async def on(topic: str, payload: dict[str, Any]) -> None:
        events.append((topic, payload))

    bus.subscribe(OVERDUE, on)
    bus.subscribe(OVERDUE_CLEARED, on)
    now = utcnow()
    with write_transaction(engine) as conn:
        control.insert_tasks(conn, [_task("late", 1.0, now - timedelta(seconds=30))])
    watch = OverdueWatch(engine, bus, get_config(), node="n1", period=1.0)
    await watch.check()
    await watch.check()
    assert [(t, p["task"], p["kind"]) for t, p in events] == [(OVERDUE, "late", "not_claimed")]
    assert events[0][1]["node"] == "n1"
    assert events[0][1]["late_s"] >= 30
    with write_transaction(engine) as conn:
        conn.execute(
            update(TaskStateRecord)
            .where(TaskStateRecord.task_name == "late")
            .values(next_run_at=utcnow() + timedelta(1))
        )
    assert await watch.check() == []
    assert [t for t, _ in events] == [OVERDUE, OVERDUE_CLEARED]


async def test_many_tasks_overdue_at_once_are_logged_in_a_few_lines(engine: Engine) -> None:
    """30 tasks overdue at one check (a frozen leader): LOG_EACH_MAX lines name one each, one
    more line counts the rest; every one is published; so when they clear."""
    bus = MessageBus()
    events: list[tuple[str, str]] = []

    async def on(topic: str, payload: dict[str, Any]) -> None:
        events.append((topic, payload["task"]))

    bus.subscribe(OVERDUE, on)
    bus.subscribe(OVERDUE_CLEARED, on)
    now = utcnow()
    names = [f"late{i:02d}" for i in range(30)]
    with write_transaction(engine) as conn:
        control.insert_tasks(conn, [_task(n, 1.0, now - timedelta(seconds=30)) for n in names])
    watch = OverdueWatch(engine, bus, get_config(), node="n1", period=1.0)
    with structlog.testing.capture_logs() as logs:
        await watch.check()
    assert len([e for e in logs if e["event"] == "task.overdue"]) == LOG_EACH_MAX
    more = [e for e in logs if e["event"] == "task.overdue_more"]
    assert [(e["count"], e["overdue"]) for e in more] == [(30 - LOG_EACH_MAX, 30)]
    assert sorted(t for topic, t in events if topic == OVERDUE) == names
    with write_transaction(engine) as conn:
        conn.execute(update(TaskStateRecord).values(next_run_at=utcnow() + timedelta(1)))
    with structlog.testing.capture_logs() as logs:
        assert await watch.check() == []
    assert len([e for e in logs if e["event"] == "task.overdue_cleared"]) == LOG_EACH_MAX
    more = [e for e in logs if e["event"] == "task.overdue_cleared_more"]
    assert [(e["count"], e["overdue"]) for e in more] == [(30 - LOG_EACH_MAX, 0)]
    assert sorted(t for topic, t in events if topic == OVERDUE_CLEARED) == names


async def test_watch_keeps_going_when_the_database_fails(engine: Engine) -> None:
    """A failed read is logged and retried at the next period; the loop stops cleanly."""
    watch = OverdueWatch(engine, MessageBus(), get_config(), node="n1", period=0.01)
    with write_transaction(engine) as conn:  # every read of the watch now fails
        conn.execute(text("ALTER TABLE tasks RENAME TO tasks_gone"))

    def failures() -> list[MutableMapping[str, Any]]:
        return [e for e in logs if e["event"] == "cron.overdue_check_failed"]

    with structlog.testing.capture_logs() as logs:
        watch.start()
        try:
            async with asyncio.timeout(5):
                while len(failures()) < 2:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pytest.fail(f"the failed read was not tried again within 5 s: {failures()}")
        await asyncio.wait_for(watch.stop(), 5)
    assert "tasks" in failures()[0]["error"]


def test_a_slow_check_waits_longer_before_the_next(engine: Engine) -> None:
    """Checks come every period while they are quick; one that took long is followed by a
    pause of CHECK_PACE times its duration, so the watch takes a bounded share of the process
    while a burst of thousands is late."""
    watch = OverdueWatch(engine, MessageBus(), get_config(), node="n1", period=1.0)
    assert watch.next_check_in(0.01) == 1.0
    assert watch.next_check_in(2.0) == pytest.approx(2.0 * CHECK_PACE)
    assert 2.0 / (2.0 + watch.next_check_in(2.0)) <= 0.1


def test_status_is_degraded_by_an_overdue_task() -> None:
    """status lists an overdue task and is degraded; with an error, the error wins and the
    overdue task is listed too."""
    item = Overdue("nightly", OverdueKind.NOT_CLAIMED, NOW, 42.0, 6.0)
    state: dict[str, Any] = {
        "components": [],
        "newest": object(),
        "running_nodes": {"n"},
        "lease": None,
        "leader_held": True,
        "code": [],
        "tasks": [],
        "overdue": [item],
    }
    found, problems = verdict(state)
    assert found is SystemStatus.DEGRADED
    assert problems == [item.describe()]
    assert "42s late and no scheduler claimed it" in problems[0]
    state["leader_held"] = False
    found, problems = verdict(state)
    assert found is SystemStatus.ERROR
    assert problems[-1] == item.describe()


# --- the real service -----------------------------------------------------------------------


@pytest.fixture
def services(
    nanobot_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Any]]:
    for name, value in BASE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NANOBOT_CRON__OVERDUE_GRACE_MIN", "2")
    started: list[ServiceProcess] = []

    def start(**env: str) -> ServiceProcess:
        service = ServiceProcess(
            home=nanobot_home, logs=tmp_path, label=f"service{len(started)}", env=env
        )
        started.append(service)
        return service.start()

    try:
        yield start
    finally:
        for service in started:
            service.close()


@pytest.mark.slow
def test_frozen_leader_shows_overdue_to_another_process(
    services: Callable[..., Any], tmp_path: Path
) -> None:
    """The leader SIGSTOPped: another process's status lists the every-second task overdue
    (and its metrics count it); thawed, the leader claims again and the overdue clears."""
    service = services()
    service.wait_up()
    path = tmp_path / "runs.txt"
    add_append("tick", path, 1)
    wait_for("a first run", lambda: len(runs_file(path)) >= 1, timeout=20)
    service.freeze()
    try:

        def overdue() -> dict[str, Any] | None:
            code, data = run_cli("status", "--json")
            assert code in (0, 1, 2), data
            late = [o for o in data["overdue"] if o["task"] == "tick"]
            return data if late else None

        data = wait_for("tick overdue", overdue, timeout=30)
        tick = next(o for o in data["overdue"] if o["task"] == "tick")
        assert tick["kind"] == "not_claimed"
        assert tick["late_s"] > 2
        assert any("task tick is overdue" in p for p in data["problems"])
        assert data["status"] in ("degraded", "unknown", "error")
    finally:
        service.thaw()
    wait_for(
        "tick no longer overdue",
        lambda: not [o for o in run_cli("status", "--json")[1]["overdue"] if o["task"] == "tick"],
        timeout=30,
    )
    status, body = service.get("/readyz")
    assert status in (200, 503)
    assert "overdue" in body


@pytest.mark.slow
def test_a_run_longer_than_its_grace_is_not_reported_unclaimed(
    services: Callable[..., Any], tmp_path: Path
) -> None:
    """A run that goes on past its task's grace (3 s here) holds a claimed slot, whose
    next_run_at is written with its outcome: status must not call it a slot nobody claimed."""
    service = services()
    service.wait_up()
    code, out = run_cli(
        "cron", "add", "slow", "--shell", "--command", "touch started; sleep 20; touch done",
        "--cwd", str(tmp_path), "--every", "30s", "--json",
    )  # fmt: skip
    assert code == 0, out
    wait_for("the run to start", lambda: (tmp_path / "started").exists(), timeout=20)
    started = time.monotonic()
    checks = 0
    while time.monotonic() - started < 6.0:
        code, data = run_cli("status", "--json")
        assert code in (0, 1, 2), data
        assert [o for o in data["overdue"] if o["task"] == "slow"] == []
        checks += 1
    # The run was still going at the last check, past its grace: the checks meant something.
    assert not (tmp_path / "done").exists()
    assert checks >= 2
