"""Alerts of the task policies (docs/alerts.md): a task auto-paused and resumed, a task overdue
and on time again; the same cooldown and idempotency as the other task alerts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, update
from test_alerts import T0, Clock, add_tasks, kinds, rules

from nanobot.alerts.alert import AlertKind
from nanobot.cron import autopause, control
from nanobot.db import write_transaction
from nanobot.models import Task, TaskStateRecord


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


def fail_slots(engine: Engine, name: str, count: int) -> None:
    """The mirror of ``count`` failed slots of a started task, as the scheduler leaves it."""
    with write_transaction(engine) as conn:
        conn.execute(update(Task).where(Task.name == name).values(paused=False))
        conn.execute(
            update(TaskStateRecord)
            .where(TaskStateRecord.task_name == name)
            .values(consecutive_failures=count, last_outcome="error")
        )


def schedule_at(engine: Engine, name: str, when: object) -> None:
    with write_transaction(engine) as conn:
        conn.execute(update(Task).where(Task.name == name).values(paused=False))
        conn.execute(
            update(TaskStateRecord)
            .where(TaskStateRecord.task_name == name)
            .values(next_run_at=when)
        )


async def test_auto_paused_then_resumed(engine: Engine, clock: Clock) -> None:
    """A task paused for its failures raises task.auto_paused with the stored reason, once;
    cron resume raises task.resumed (after the cooldown), also once."""
    r = rules(engine, [], after=5)
    add_tasks(engine, "nightly")
    fail_slots(engine, "nightly", 3)
    assert r.evaluate(clock()) == []  # three failed slots, below alerts.after
    with write_transaction(engine) as conn:
        conn.execute(update(Task).where(Task.name == "nightly").values(pause_after_failures=3))
    [paused] = autopause.pause_failing(engine, ["nightly"], default=0, now=clock())
    [alert] = r.evaluate(clock.advance(1))
    assert alert.kind is AlertKind.TASK_AUTO_PAUSED
    assert alert.subject == "task:nightly"
    assert paused.reason in alert.body
    assert "nanobot cron resume nightly" in alert.body
    assert r.evaluate(clock.advance(1)) == []
    control.resume_task(engine, "nightly")
    assert r.evaluate(clock.advance(10)) == []  # inside the cooldown: held
    [resumed] = r.evaluate(clock.advance(400))
    assert resumed.kind is AlertKind.TASK_RESUMED
    assert r.evaluate(clock.advance(400)) == []
    assert kinds(engine) == ["task.auto_paused", "task.resumed"]


async def test_a_failing_task_then_auto_paused_is_two_alerts(engine: Engine, clock: Clock) -> None:
    """after=1: failing first; the auto-pause that follows (outside the cooldown) is its own
    alert; the resumed task still failing is told as resumed."""
    r = rules(engine, [], after=1)
    add_tasks(engine, "t")
    fail_slots(engine, "t", 1)
    [failing] = r.evaluate(clock())
    assert failing.kind is AlertKind.TASK_FAILING
    fail_slots(engine, "t", 2)
    with write_transaction(engine) as conn:
        conn.execute(update(Task).where(Task.name == "t").values(pause_after_failures=2))
    autopause.pause_failing(engine, ["t"], default=0, now=clock())
    [paused] = r.evaluate(clock.advance(400))
    assert paused.kind is AlertKind.TASK_AUTO_PAUSED
    control.resume_task(engine, "t")
    [resumed] = r.evaluate(clock.advance(400))
    assert resumed.kind is AlertKind.TASK_RESUMED


async def test_overdue_then_on_time(engine: Engine, clock: Clock) -> None:
    """A started task whose slot nobody claimed raises task.overdue saying how late it is;
    once its slot is claimed (next_run_at moves on) task.on_time, each once."""
    r = rules(engine, [])
    add_tasks(engine, "tick")
    schedule_at(engine, "tick", clock() - timedelta(seconds=100))
    [alert] = r.evaluate(clock())
    assert alert.kind is AlertKind.TASK_OVERDUE
    assert "100s late and no scheduler claimed it" in alert.body
    assert r.evaluate(clock.advance(30)) == []
    schedule_at(engine, "tick", clock() + timedelta(hours=1))
    [back] = r.evaluate(clock.advance(400))
    assert back.kind is AlertKind.TASK_ON_TIME
    assert kinds(engine) == ["task.overdue", "task.on_time"]


async def test_overdue_that_clears_within_the_cooldown_is_told_at_its_end(
    engine: Engine, clock: Clock
) -> None:
    """Overdue, on time 20 s later, overdue again and on time again within the cooldown: one
    task.overdue, then one task.on_time when the cooldown ends, counting the changes."""
    r = rules(engine, [])
    add_tasks(engine, "tick")
    schedule_at(engine, "tick", clock() - timedelta(seconds=100))
    assert [a.kind for a in r.evaluate(clock())] == [AlertKind.TASK_OVERDUE]
    for offset in (3600, -100, 3600):
        schedule_at(engine, "tick", clock() + timedelta(seconds=offset))
        assert r.evaluate(clock.advance(20)) == []
    [back] = r.evaluate(clock.advance(400))
    assert back.kind is AlertKind.TASK_ON_TIME
    assert back.count == 3


async def test_a_paused_or_broken_task_is_not_overdue(engine: Engine, clock: Clock) -> None:
    """Auto-paused and broken take precedence: an auto-paused task has no next slot, and a
    broken one past its slot is told as broken, not overdue."""
    r = rules(engine, [])
    add_tasks(engine, "gone")
    schedule_at(engine, "gone", clock() - timedelta(seconds=100))
    with write_transaction(engine) as conn:
        conn.execute(update(Task).where(Task.name == "gone").values(broken_reason="no module x"))
    [alert] = r.evaluate(clock())
    assert alert.kind is AlertKind.TASK_BROKEN
