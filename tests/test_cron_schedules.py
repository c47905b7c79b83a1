"""The scheduler with wall-clock schedules, on an injected clock, on SQLite and PostgreSQL.

Cron and one-shot tasks run at the slots their schedule gives, catch up and count missed slots
by the schedule, never fire twice in a repeated hour (not even across a restart), and a
one-shot runs once and is then done. Also: the Python interface's schedule attributes and the
upgrade of a database made at revision 0001.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.interval import IntervalTrigger
from cron_tasks import Counter, counted
from sqlalchemy import Engine, insert, select, text, update
from test_cron import Outcomes

from nanobot.bus import MessageBus
from nanobot.cron import CronManager, CronTask, control, definitions
from nanobot.cron.schedules import AtSchedule, CronSchedule, IntervalSchedule, next_after
from nanobot.cron.task import definition_of
from nanobot.db import create_db_engine, upgrade_database, write_transaction
from nanobot.exceptions import InvalidScheduleError, InvalidTaskError
from nanobot.heartbeat import HeartbeatMonitor
from nanobot.models import Task, TaskRun, TaskStateRecord, apscheduler_jobs, utcnow

POLL = 0.05
WAIT = 10.0


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


class Clock:
    """An injected ``now`` that moves only when told; counts how often it is read (each pass
    of the scheduler reads it, so a test can wait for passes without sleeping)."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> datetime:
        self.reads += 1
        return self.now

    async def passes(self, count: int = 5) -> None:
        """Wait (bounded) until the scheduler has read the clock ``count`` more times."""
        target = self.reads + 2 * count
        async with asyncio.timeout(WAIT):
            while self.reads < target:
                await asyncio.sleep(POLL / 2)


class NineOnWeekdays(CronTask):
    cron = "0 9 * * 1-5"
    tz = "Europe/Berlin"

    async def run(self) -> None:
        pass


class Plain(CronTask):
    async def run(self) -> None:
        pass


class Reminder(CronTask):
    at = datetime(2030, 5, 17, 17, 30, tzinfo=UTC)

    async def run(self) -> None:
        pass


def rows(engine: Engine, name: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(TaskRun.__table__)
                .where(TaskRun.task_name == name)
                .order_by(TaskRun.scheduled_at)
            ).all()
        )


def task(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(control.TASK_ROWS.where(Task.name == name)).one()


def store_task(
    engine: Engine,
    name: str,
    schedule: Any,
    next_run_at: datetime,
    label: str,
    path: Path | None = None,
) -> None:
    """A started task whose next slot is ``next_run_at`` (as a running scheduler left it); a
    Counter that notes its runs in ``path`` if given."""
    kwargs = {"label": label} | ({"path": str(path)} if path is not None else {})
    definition = definitions.definition_from_class(
        name, "cron_tasks:Counter", kwargs=kwargs, schedule=schedule
    )
    control.add_task(engine, definition)
    with write_transaction(engine) as conn:
        conn.execute(update(Task).where(Task.name == name).values(anchor_at=next_run_at))
        conn.execute(
            update(TaskStateRecord)
            .where(TaskStateRecord.task_name == name)
            .values(next_run_at=next_run_at)
        )


async def run_manager(
    bus: MessageBus,
    clock: Clock,
    body: Callable[[CronManager], Any],
    monitor: HeartbeatMonitor | None = None,
) -> None:
    manager = CronManager(poll_interval=POLL, bus=bus, clock=clock, monitor=monitor)
    await manager.start()
    try:
        await body(manager)
    finally:
        await manager.shutdown(grace=0)


@pytest.fixture
def bus() -> MessageBus:
    return MessageBus()


# --- DST in the running scheduler -------------------------------------------------------------


async def test_restart_inside_the_repeated_hour_does_not_fire_again(
    engine: Engine, bus: MessageBus, tmp_path: Path
) -> None:
    """`30 1 * * *` in New York runs at 05:30 UTC on 2026-11-01 (01:30 EDT); a scheduler
    restarted at 06:30:05 UTC (01:30:05 EST, the same wall time again) runs nothing and keeps
    the next run on 2026-11-02 at 06:30 UTC."""
    schedule = CronSchedule(expression="30 1 * * *", timezone="America/New_York")
    ran = tmp_path / "runs"
    store_task(engine, "wake", schedule, utc(2026, 11, 1, 5, 30), "wake", ran)
    outcomes = Outcomes(bus)
    clock = Clock(utc(2026, 11, 1, 5, 30, micro=200_000))

    async def first(manager: CronManager) -> None:
        await outcomes.wait(lambda: bool(outcomes.of("wake", "success")))
        await manager.flush()

    await run_manager(bus, clock, first)
    assert task(engine, "wake").next_run_at == utc(2026, 11, 2, 6, 30)

    clock.now = utc(2026, 11, 1, 6, 30, 5)

    async def second(manager: CronManager) -> None:
        await clock.passes()
        await manager.flush()

    await run_manager(bus, clock, second)
    assert [(r.scheduled_at, r.outcome) for r in rows(engine, "wake")] == [
        (utc(2026, 11, 1, 5, 30), "success")
    ]
    assert counted(ran) == ["wake"]
    assert task(engine, "wake").next_run_at == utc(2026, 11, 2, 6, 30)


async def test_down_before_the_first_occurrence_up_in_the_second_runs_once(
    engine: Engine, bus: MessageBus
) -> None:
    """A scheduler down at 05:30 UTC and started in the repeated hour (06:40 UTC) runs the
    05:30 slot once, late, and its next slot is the next day's, not 06:30."""
    schedule = CronSchedule(expression="30 1 * * *", timezone="America/New_York")
    store_task(engine, "late", schedule, utc(2026, 11, 1, 5, 30), "late")
    outcomes = Outcomes(bus)
    clock = Clock(utc(2026, 11, 1, 6, 40))

    async def body(manager: CronManager) -> None:
        await outcomes.wait(lambda: bool(outcomes.of("late", "success")))
        await clock.passes()
        await manager.flush()

    await run_manager(bus, clock, body)
    assert [(r.scheduled_at, r.outcome) for r in rows(engine, "late")] == [
        (utc(2026, 11, 1, 5, 30), "success")
    ]
    assert task(engine, "late").next_run_at == utc(2026, 11, 2, 6, 30)


async def test_catch_up_counts_missed_slots_by_the_schedule(
    engine: Engine, bus: MessageBus
) -> None:
    """Hourly in New York, down from 00:00 EST on 2026-03-08 to just after 00:00 EDT on the
    9th: the latest slot runs once and the 23 real hours before it are one missed row."""
    schedule = CronSchedule(expression="0 * * * *", timezone="America/New_York")
    store_task(engine, "hourly", schedule, utc(2026, 3, 8, 5), "hourly")
    outcomes = Outcomes(bus)
    clock = Clock(utc(2026, 3, 9, 4, 0, 10))

    async def body(manager: CronManager) -> None:
        await outcomes.wait(lambda: bool(outcomes.of("hourly", "success")))
        await manager.flush()

    monitor = HeartbeatMonitor(bus, interval=30)
    await run_manager(bus, clock, body, monitor)
    recorded = [(r.scheduled_at, r.outcome, r.slots) for r in rows(engine, "hourly")]
    assert recorded == [
        (utc(2026, 3, 8, 5), "missed", 23),
        (utc(2026, 3, 9, 4), "success", 1),
    ]
    assert task(engine, "hourly").next_run_at == utc(2026, 3, 9, 5)
    # Its health component goes stale only after two of its periods (the instance built from
    # its arguments has the class's default interval of 1 s, which must not be used).
    assert monitor.get_component_status("task:hourly")["stale_after"] == 2 * 3600 + 60


# --- one-shot ---------------------------------------------------------------------------------


async def test_one_shot_runs_once_then_is_done_across_restarts(
    engine: Engine, bus: MessageBus, tmp_path: Path
) -> None:
    """A one-shot due while nothing ran runs once at start; afterwards it has no next run, is
    shown done, and a restart (even with its job gone) never runs it again."""
    at = utc(2026, 5, 1, 12)
    ran = tmp_path / "runs"
    definition = definitions.definition_from_class(
        "remind",
        "cron_tasks:Counter",
        kwargs={"label": "remind", "path": str(ran)},
        schedule=AtSchedule(at=at),
    )
    control.add_task(engine, definition)
    assert task(engine, "remind").next_run_at == at
    outcomes = Outcomes(bus)
    clock = Clock(utc(2026, 5, 1, 13))

    async def body(manager: CronManager) -> None:
        await outcomes.wait(lambda: bool(outcomes.of("remind", "success")))
        await clock.passes()
        await manager.flush()

    monitor = HeartbeatMonitor(bus, interval=30)
    await run_manager(bus, clock, body, monitor)
    # Not a health component: it would go stale, then stay in error, after its one run.
    assert monitor.get_component_status("task:remind")["status"] == "unknown"
    info = control.get_task(engine, "remind")
    assert info.next_run_at is None
    assert info.done
    assert info.upcoming(3, clock.now) == []

    # Restart, and again with the job store row lost: never again.
    await run_manager(bus, clock, lambda m: clock.passes())
    with write_transaction(engine) as conn:
        conn.execute(text("DELETE FROM apscheduler_jobs"))
        conn.execute(update(Task).values(version=Task.version + 1))
    await run_manager(bus, clock, lambda m: clock.passes())
    assert [(r.scheduled_at, r.outcome) for r in rows(engine, "remind")] == [(at, "success")]
    assert counted(ran) == ["remind"]


async def test_one_shot_skip_policy_records_it_missed(
    engine: Engine, bus: MessageBus, tmp_path: Path
) -> None:
    """Under the SKIP policy a one-shot reached more than a minute late is recorded missed and
    is done; it does not run."""
    at = utc(2026, 5, 1, 12)
    definition = definitions.definition_from_class(
        "skipped",
        "cron_tasks:Counter",
        kwargs={"label": "skipped", "path": str(tmp_path / "runs")},
        schedule=AtSchedule(at=at),
        misfire_policy="skip",
    )
    control.add_task(engine, definition)
    outcomes = Outcomes(bus)
    clock = Clock(utc(2026, 5, 1, 12, 5))

    async def body(manager: CronManager) -> None:
        await outcomes.wait(lambda: bool(outcomes.of("skipped", "missed")))
        await manager.flush()

    await run_manager(bus, clock, body)
    assert [(r.scheduled_at, r.outcome) for r in rows(engine, "skipped")] == [(at, "missed")]
    assert task(engine, "skipped").next_run_at is None
    assert counted(tmp_path / "runs") == []


# --- the Python interface ---------------------------------------------------------------------


async def test_class_attributes_declare_a_cron_schedule(engine: Engine, bus: MessageBus) -> None:
    """A task class with ``cron`` and ``tz`` is stored as a cron task; started, its next run is
    the next 09:00 in Berlin on a weekday (Saturday 2026-01-03 -> Monday 08:00 UTC)."""
    clock = Clock(utc(2026, 1, 3, 12))

    async def body(manager: CronManager) -> None:
        manager.register_task("nine", NineOnWeekdays())
        row = task(engine, "nine")
        assert (row.schedule_kind, row.cron, row.timezone) == (
            "cron",
            "0 9 * * 1-5",
            "Europe/Berlin",
        )
        await manager.start_task("nine")
        await clock.passes()

    await run_manager(bus, clock, body)
    # The control plane computes a new task's first run from the real clock; the scheduler
    # keeps it (a slot of the schedule): a weekday at 09:00 Berlin time.
    first = task(engine, "nine").next_run_at.astimezone(ZoneInfo("Europe/Berlin"))
    assert (first.hour, first.minute) == (9, 0)
    assert first.weekday() < 5


def test_constructor_keywords_win_over_class_attributes() -> None:
    """Keywords override class attributes; the schedule is a typed record."""
    task_ = NineOnWeekdays(cron="30 7 * * *", tz="Asia/Tokyo")
    assert task_.schedule == CronSchedule(expression="30 7 * * *", timezone="Asia/Tokyo")
    assert Counter(5).schedule == IntervalSchedule(seconds=5)
    assert Reminder().schedule == AtSchedule(at=utc(2030, 5, 17, 17, 30))
    naive = Plain(at=datetime(2030, 11, 3, 1, 30), tz="America/New_York")
    assert naive.schedule == AtSchedule(at=utc(2030, 11, 3, 5, 30), timezone="America/New_York")
    assert NineOnWeekdays().get_interval() == 3 * 86400  # Friday 09:00 to Monday 09:00


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: NineOnWeekdays(at=datetime(2030, 1, 1, tzinfo=UTC)), "both cron"),
        (lambda: NineOnWeekdays(60), "interval 60 and cron"),
        (lambda: Reminder(interval=5), "interval 5 and at"),
        (lambda: Plain(5, tz="Europe/Berlin"), "no cron or at"),
        (lambda: NineOnWeekdays(cron="0 25 * * *"), "bad hour field"),
        (lambda: NineOnWeekdays(tz="Europe/Nowhere"), "unknown time zone 'Europe/Nowhere'"),
        (lambda: Reminder(at="2030-03-10T02:30", tz="America/New_York"), "does not exist"),
        (lambda: Reminder(at="17:30"), "give a date and time"),
        (lambda: Reminder(at="soon"), "invalid time 'soon'"),
    ],
)
def test_bad_schedules_in_python_are_refused(build: Callable[[], Any], message: str) -> None:
    """Contradictions and bad values raise InvalidTaskError with one line naming them."""
    with pytest.raises(InvalidTaskError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def test_a_one_shot_stores_its_resolved_instant() -> None:
    """A naive ``at`` is stored as the instant it means, so a rebuild elsewhere agrees."""
    task_ = Reminder(at="2030-06-01T09:00", tz="Europe/Paris")
    definition = definition_of("r", task_)
    assert definition.kwargs == {"at": "2030-06-01T07:00:00+00:00", "tz": "Europe/Paris"}
    assert definition.not_persistable is None
    rebuilt = definitions.build_task(definition.task_class, definition.kwargs)
    assert rebuilt.schedule == AtSchedule(at=utc(2030, 6, 1, 7), timezone="Europe/Paris")


def test_schedule_errors_are_task_errors() -> None:
    assert issubclass(InvalidScheduleError, InvalidTaskError)
    assert issubclass(InvalidScheduleError, ValueError)


# --- the upgrade from revision 0001 -----------------------------------------------------------


# What revision 0001's code stored as a job's function: the trampoline's textual reference.
TRAMPOLINE = "nanobot.cron._aps:run_stored_task"


async def test_database_made_at_0001_upgrades_and_keeps_every_phase(
    db_url: str, bus: MessageBus
) -> None:
    """A database at revision 0001 with an interval task, its job and its history upgrades in
    place; restarted, the task becomes an interval task that runs its next slot on the same
    grid (anchor + k x interval) and keeps its history."""
    engine = create_db_engine(db_url)
    try:
        upgrade_database(engine, "0001")
        anchor = utc(2026, 6, 1, 12, 0, 0, micro=250_000)
        interval = 10.0
        next_slot = anchor + timedelta(seconds=10 * interval)
        trigger = IntervalTrigger(seconds=interval, start_date=anchor, timezone=UTC)
        state = {
            "version": 1,
            "id": "legacy",
            "func": TRAMPOLINE,
            "trigger": trigger,
            "executor": "default",
            "args": ("cron_tasks:Counter", {"interval": 10, "label": "legacy"}),
            "kwargs": {},
            "name": "legacy",
            "misfire_grace_time": None,
            "coalesce": True,
            "max_instances": 1,
            "next_run_time": next_slot,
        }
        with write_transaction(engine) as conn:
            conn.execute(
                text(
                    "INSERT INTO tasks (name, task_class, interval_s, kwargs, misfire_policy, "
                    "paused, anchor_at, next_run_at, consecutive_failures, version, created_at, "
                    "updated_at) VALUES (:n, :c, :i, :k, 'catch_up_once', :p, :a, :nx, 0, 3, "
                    ":a, :a)"
                ),
                {
                    "n": "legacy",
                    "c": "cron_tasks:Counter",
                    "i": interval,
                    "k": '{"interval": 10, "label": "legacy"}',
                    "p": False,
                    "a": anchor,
                    "nx": next_slot,
                },
            )
            conn.execute(
                text(
                    "INSERT INTO apscheduler_jobs (id, next_run_time, job_state) "
                    "VALUES (:id, :t, :s)"
                ),
                {
                    "id": "legacy",
                    "t": next_slot.timestamp(),
                    "s": pickle.dumps(state, pickle.HIGHEST_PROTOCOL),
                },
            )
            for k in range(10):
                conn.execute(
                    insert(TaskRun).values(
                        task_name="legacy",
                        scheduled_at=anchor + timedelta(seconds=k * interval),
                        started_at=anchor + timedelta(seconds=k * interval),
                        finished_at=anchor + timedelta(seconds=k * interval + 1),
                        duration_s=1.0,
                        outcome="success",
                        slots=1,
                        manual=False,
                        node="old",
                    )
                )

        upgrade_database(engine)
        row = task(engine, "legacy")
        assert (row.schedule_kind, row.cron, row.timezone, row.run_at) == (
            "interval",
            None,
            None,
            None,
        )
        assert (row.anchor_at, row.next_run_at, row.interval_s) == (anchor, next_slot, interval)

        outcomes = Outcomes(bus)
        clock = Clock(next_slot + timedelta(seconds=0.3))

        async def body(manager: CronManager) -> None:
            await outcomes.wait(lambda: bool(outcomes.of("legacy", "success")))
            await manager.flush()

        await run_manager(bus, clock, body)
        history = rows(engine, "legacy")
        assert len(history) == 11
        assert history[-1].scheduled_at == next_slot
        assert history[-1].outcome == "success"
        assert task(engine, "legacy").next_run_at == next_slot + timedelta(seconds=interval)
        assert task(engine, "legacy").anchor_at == anchor
        info = control.get_task(engine, "legacy")
        assert info.schedule == IntervalSchedule(seconds=interval)
    finally:
        engine.dispose()


async def test_changing_a_registered_schedule_moves_its_job(
    engine: Engine, bus: MessageBus
) -> None:
    """Registering a task again with another schedule (interval -> cron -> another zone) moves
    its job to the new schedule's next slot; the job store and the tasks row agree."""
    clock = Clock(utcnow())

    def stored() -> tuple[Any, Any]:
        with engine.connect() as conn:
            job = conn.execute(select(apscheduler_jobs.c.next_run_time)).scalar()
        return task(engine, "t"), job

    async def settled(expected: datetime) -> None:
        async with asyncio.timeout(WAIT):
            while True:
                row, job = stored()
                if row.next_run_at == expected and job == expected.timestamp():
                    return
                await asyncio.sleep(POLL)

    async def body(manager: CronManager) -> None:
        manager.register_task("t", Plain(interval=3600))
        await manager.start_task("t")
        for zone_name in ("Asia/Tokyo", "America/Los_Angeles"):
            manager.register_task("t", Plain(cron="0 9 * * *", tz=zone_name))
            expected = next_after(
                CronSchedule(expression="0 9 * * *", timezone=zone_name), utcnow()
            )
            assert expected is not None
            await settled(expected)
            row, _ = stored()
            assert (row.schedule_kind, row.cron, row.timezone) == ("cron", "0 9 * * *", zone_name)

    await run_manager(bus, clock, body)
