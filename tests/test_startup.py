"""A scheduler's start with many stored tasks (issue 17): the tasks due soon are applied by the
first pass, the others by the passes after it, and nothing runs before its row is applied."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, MutableMapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from cron_tasks import counted
from sqlalchemy import Engine, event, func, insert, select

from nanobot.bus import MessageBus
from nanobot.config import load_config
from nanobot.cron import CronManager, control
from nanobot.cron.aps_adapter import PERSISTENT, NanobotScheduler
from nanobot.cron.reconcile import DEFER_MIN
from nanobot.db import write_transaction
from nanobot.models import MisfirePolicy, Task, TaskStateRecord, apscheduler_jobs, utcnow
from nanobot.service import Role, Service

POLL = 0.05
WAIT = 30.0  # the bound of every wait below
LATER = 3600.0
COUNT = DEFER_MIN + 500


def store_tasks(engine: Engine, names: list[str], path: Path, first_at: datetime) -> None:
    """Store Counter tasks as ``cron add`` stores them (a row and its run state), their first
    slot at ``first_at``, in one statement each (a task at a time through control.add_task
    would make this test slow)."""
    now = utcnow()
    values = [
        {
            "name": name,
            "task_class": "cron_tasks:Counter",
            "interval_s": LATER,
            "kwargs": {"interval": LATER, "label": name, "path": str(path)},
            "misfire_policy": MisfirePolicy.CATCH_UP_ONCE.value,
            "paused": False,
            "anchor_at": first_at,
            "created_at": now,
            "updated_at": now,
            "version": 1,
        }
        for name in names
    ]
    states = [
        {"task_name": name, "next_run_at": first_at, "consecutive_failures": 0} for name in names
    ]
    with write_transaction(engine) as conn:
        conn.execute(insert(Task), values)
        conn.execute(insert(TaskStateRecord), states)


def job_times(engine: Engine) -> dict[str, float | None]:
    with engine.connect() as conn:
        rows = conn.execute(select(apscheduler_jobs.c.id, apscheduler_jobs.c.next_run_time))
        return {row.id: row.next_run_time for row in rows}


async def wait_for(what: str, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(POLL)
    assert predicate(), what


@pytest.fixture
async def manager(engine: Engine) -> AsyncIterator[CronManager]:
    m = CronManager(engine, poll_interval=POLL, bus=MessageBus())
    yield m
    await m.shutdown(grace=0)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_a_start_runs_the_due_task_first_and_applies_the_others_after(
    engine: Engine, manager: CronManager, tmp_path: Path
) -> None:
    """With more than DEFER_MIN tasks due in an hour, the first pass applies only the task due
    now, which runs; the passes after it make the job of every other task, on its stored slot."""
    path = tmp_path / "runs.txt"
    later = utcnow() + timedelta(seconds=LATER)
    names = [f"t{i:05d}" for i in range(COUNT)]
    store_tasks(engine, names, path, later)
    store_tasks(engine, ["due"], path, utcnow())
    with structlog.testing.capture_logs() as logs:
        await manager.start()
        await wait_for("the due task ran", lambda: counted(path) == ["due"])
        await wait_for("every row applied", lambda: bool(events(logs, "cron.deferred_applied")))
    deferred = events(logs, "cron.tasks_deferred")
    assert [(e["count"], e["applied_now"]) for e in deferred] == [(COUNT, 1)]
    jobs = job_times(engine)
    assert set(names) <= set(jobs)
    assert {jobs[name] for name in names} == {later.timestamp()}
    assert counted(path) == ["due"]


async def test_a_warm_start_changes_no_job_and_applies_a_row_changed_while_stopped(
    engine: Engine, tmp_path: Path
) -> None:
    """Started again on the same database, the scheduler defers the unchanged tasks and leaves
    their jobs as they are; a deferred task paused while no scheduler ran is paused once its row
    is applied, and one paused while its row waits is paused at once."""
    path = tmp_path / "runs.txt"
    later = utcnow() + timedelta(seconds=LATER)
    names = [f"t{i:05d}" for i in range(COUNT)]
    store_tasks(engine, names, path, later)
    first = CronManager(engine, poll_interval=POLL, bus=MessageBus())
    with structlog.testing.capture_logs() as logs:
        await first.start()
        await wait_for("every row applied", lambda: bool(events(logs, "cron.deferred_applied")))
    await first.shutdown(grace=0)
    before = job_times(engine)
    control.pause_task(engine, names[-1])  # while stopped: its row changed, its job did not

    second = CronManager(engine, poll_interval=POLL, bus=MessageBus())
    try:
        with structlog.testing.capture_logs() as logs:
            await second.start()
            await wait_for("first pass", lambda: bool(events(logs, "cron.tasks_deferred")))
            # Paused through the manager while its row may still wait: applied at once.
            await second.pause_task(names[-2])
            assert job_times(engine)[names[-2]] is None
            await wait_for("all applied", lambda: bool(events(logs, "cron.deferred_applied")))
    finally:
        await second.shutdown(grace=0)
    after = job_times(engine)
    assert after[names[-1]] is None
    assert after[names[-2]] is None
    assert {n: t for n, t in after.items() if n not in names[-2:]} == {
        n: t for n, t in before.items() if n not in names[-2:]
    }
    assert not events(logs, "cron.jobs_added")
    assert counted(path) == []


async def test_a_task_removed_while_its_row_waits_loses_its_job(
    engine: Engine, tmp_path: Path
) -> None:
    """A deferred task removed from the table before its row is applied has its job removed
    (by the next reconciliation or by the pass that would have applied it), and never runs."""
    path = tmp_path / "runs.txt"
    names = [f"t{i:05d}" for i in range(COUNT)]
    store_tasks(engine, names, path, utcnow() + timedelta(seconds=LATER))
    first = CronManager(engine, poll_interval=POLL, bus=MessageBus())
    with structlog.testing.capture_logs() as logs:
        await first.start()
        await wait_for("every row applied", lambda: bool(events(logs, "cron.deferred_applied")))
    await first.shutdown(grace=0)

    second = CronManager(engine, poll_interval=POLL, bus=MessageBus())
    try:
        with structlog.testing.capture_logs() as logs:
            await second.start()
            await wait_for("first pass", lambda: bool(events(logs, "cron.tasks_deferred")))
            control.remove_task(engine, names[-1])  # the last to be applied
            await wait_for("all applied", lambda: bool(events(logs, "cron.deferred_applied")))
            await wait_for("its job removed", lambda: names[-1] not in job_times(engine))
    finally:
        await second.shutdown(grace=0)
    assert set(job_times(engine)) >= set(names[:-1])
    assert counted(path) == []


def test_due_leaves_held_jobs_as_they_are(engine: Engine) -> None:
    """A job named in ``held`` is not found due (nor moved later), whatever its next run."""
    scheduler = NanobotScheduler(engine, process=lambda *_: None, poll_interval=1.0, clock=utcnow)
    try:
        now = utcnow()
        for name in ("free", "held"):
            scheduler.add(
                name,
                store=PERSISTENT,
                task_class="cron_tasks:Counter",
                kwargs={},
                interval=60.0,
                anchor=now - timedelta(seconds=30),
                next_run_at=now - timedelta(seconds=30),
            )
        found = scheduler.due(now, now, {}, held={"held"})
        assert [job.name for job in found] == ["free"]
        assert {job.name for job in scheduler.due(now, now, {})} == {"free", "held"}
    finally:
        scheduler.close()


def test_task_versions_say_whether_a_run_is_requested(engine: Engine, tmp_path: Path) -> None:
    """The versions the reconciliation reads every poll carry the run request as a flag."""
    store_tasks(engine, ["a", "b"], tmp_path / "runs.txt", utcnow())
    control.request_run(engine, "b")
    with engine.connect() as conn:
        versions = control.task_versions(conn)
        count = conn.execute(select(func.count()).select_from(Task)).scalar_one()
    assert len(versions) == count
    assert versions["a"].requested is False
    assert versions["b"].requested is True


def test_readiness_says_starting_without_reading_the_database(tmp_path: Path) -> None:
    """A service that has not made its first lease round is not ready, whatever the database
    says (a fresh heartbeat and a held lease may be those of the same node before a restart),
    and its readiness reads no row: probes every few milliseconds slowed the start."""
    service = Service(load_config({"NANOBOT_HOME": str(tmp_path)}))
    statements: list[str] = []
    event.listen(service.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        assert service.role is Role.STARTING
        ready = service.readiness()
        assert ready["starting"] is True
        assert ready["status"] is None
        assert ready["problems"] == ["this node is starting: it does not schedule yet"]
        assert statements == []
    finally:
        service.engine.dispose()
