"""What the dashboard and the API read, beyond :mod:`nanobot.status` and
:mod:`nanobot.cron.control`: a page of tasks, the count of tasks in each state, the latest
failed runs and a task's next slots.

Every function is synchronous and bounded (a page, a ``LIMIT``, one grouped count), so that a
database of 10,000 tasks answers as fast as one of ten; the web handlers call them in a thread.
Rows become :class:`nanobot.cron.control.TaskInfo` and ``RunInfo`` records through the control
plane's own converters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Final

from sqlalchemy import ColumnElement, Engine, and_, case, func, or_, select

from nanobot.cron import control, schedules
from nanobot.cron.control import RunInfo, TaskInfo
from nanobot.db import read_transaction
from nanobot.models import FAILED_OUTCOMES, Component, Task, TaskOutcome, TaskRun, utcnow

# A started task whose next slot is this far in the past is overdue: no scheduler ran it.
OVERDUE_AFTER: Final = timedelta(seconds=60)
PAGE_SIZE_MAX: Final = 200
NEXT_RUNS: Final = 5


class TaskState(enum.StrEnum):
    """The filters of the tasks page and of ``GET /api/v1/tasks?state=``; a task may be in
    several (a paused task can be failing too)."""

    ACTIVE = "active"  # scheduled: not paused, not broken
    PAUSED = "paused"
    BROKEN = "broken"  # its class cannot be imported or built
    FAILING = "failing"  # its last slot failed (error, timeout, interrupted)
    OVERDUE = "overdue"  # scheduled, but its next slot passed more than a minute ago
    RUNNING = "running"
    DONE = "done"  # a one-shot task that has run


def _condition(state: TaskState, now: datetime) -> ColumnElement[bool]:
    match state:
        case TaskState.ACTIVE:
            return and_(Task.paused.is_(False), Task.broken_reason.is_(None))
        case TaskState.PAUSED:
            return Task.paused.is_(True)
        case TaskState.BROKEN:
            return Task.broken_reason.is_not(None)
        case TaskState.FAILING:
            return or_(Task.consecutive_failures > 0, Task.last_outcome.in_(FAILED_OUTCOMES))
        case TaskState.OVERDUE:
            return and_(
                Task.paused.is_(False),
                Task.broken_reason.is_(None),
                Task.next_run_at < now - OVERDUE_AFTER,
            )
        case TaskState.RUNNING:
            return Task.last_outcome == TaskOutcome.RUNNING.value
        case TaskState.DONE:
            return and_(
                Task.schedule_kind == schedules.ScheduleKind.AT.value,
                Task.next_run_at.is_(None),
                Task.last_run_at.is_not(None),
            )


def state_of(info: TaskInfo, now: datetime) -> TaskState:
    """The one state a task is shown in, the most urgent first."""
    if info.error is not None:
        return TaskState.BROKEN
    if info.done:
        return TaskState.DONE
    if info.paused:
        return TaskState.PAUSED
    if info.last_outcome == TaskOutcome.RUNNING:
        return TaskState.RUNNING
    if info.consecutive_failures > 0 or info.last_outcome in FAILED_OUTCOMES:
        return TaskState.FAILING
    if info.next_run_at is not None and info.next_run_at < now - OVERDUE_AFTER:
        return TaskState.OVERDUE
    return TaskState.ACTIVE


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of the filtered task list, and how many tasks match in all."""

    items: list[TaskInfo]
    total: int
    offset: int
    limit: int


def page_tasks(
    engine: Engine,
    *,
    search: str = "",
    state: TaskState | None = None,
    offset: int = 0,
    limit: int = 50,
    now: datetime | None = None,
) -> TaskPage:
    """Tasks whose name or class contains ``search`` (any case) and in ``state``, by name."""
    now = now or utcnow()
    limit = max(1, min(limit, PAGE_SIZE_MAX))
    offset = max(0, offset)
    conditions: list[ColumnElement[bool]] = []
    if search:
        needle = search.lower()
        conditions.append(
            or_(
                func.lower(Task.name).contains(needle, autoescape=True),
                func.lower(Task.task_class).contains(needle, autoescape=True),
            )
        )
    if state is not None:
        conditions.append(_condition(state, now))
    with read_transaction(engine) as conn:
        total = conn.execute(select(func.count()).select_from(Task).where(*conditions)).scalar()
        rows = conn.execute(
            select(Task.__table__)
            .where(*conditions)
            .order_by(Task.name)
            .offset(offset)
            .limit(limit)
        ).all()
    return TaskPage(
        items=[control._info(row) for row in rows],
        total=int(total or 0),
        offset=offset,
        limit=limit,
    )


def count_by_state(engine: Engine, *, now: datetime | None = None) -> dict[str, int]:
    """``{"total": n, "active": n, "paused": n, ...}`` in one grouped statement."""
    now = now or utcnow()
    columns = [func.count().label("total")] + [
        func.coalesce(func.sum(case((_condition(s, now), 1), else_=0)), 0).label(s.value)
        for s in TaskState
    ]
    with read_transaction(engine) as conn:
        row = conn.execute(select(*columns).select_from(Task)).one()
    return {key: int(value) for key, value in row._mapping.items()}


def overdue_tasks(
    engine: Engine, *, limit: int = 10, now: datetime | None = None
) -> list[TaskInfo]:
    """The started tasks whose next slot is longest overdue, first."""
    now = now or utcnow()
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(Task.__table__)
            .where(_condition(TaskState.OVERDUE, now))
            .order_by(Task.next_run_at)
            .limit(limit)
        ).all()
    return [control._info(row) for row in rows]


@dataclass(frozen=True, slots=True)
class Failure:
    """A task's newest failed run, and how many of the recent failed runs are its."""

    run: RunInfo
    count: int
    removed: bool


FAILURE_WINDOW: Final = 500


def upcoming(engine: Engine, *, limit: int = 5) -> list[TaskInfo]:
    """The started tasks that run next, soonest first."""
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(Task.__table__)
            .where(and_(Task.paused.is_(False), Task.next_run_at.is_not(None)))
            .order_by(Task.next_run_at, Task.name)
            .limit(limit)
        ).all()
    return [control._info(row) for row in rows]


def recent_failures(engine: Engine, *, limit: int = 10) -> list[Failure]:
    """The newest failed run (error, timeout, interrupted) of each of the ``limit`` tasks that
    failed last, newest first, with its share of the last :data:`FAILURE_WINDOW` failed runs:
    one task failing every second does not hide the others."""
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(TaskRun.__table__)
            .where(TaskRun.outcome.in_(FAILED_OUTCOMES))
            .order_by(TaskRun.scheduled_at.desc())
            .limit(FAILURE_WINDOW)
        ).all()
        newest: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.task_name] = counts.get(row.task_name, 0) + 1
            if row.task_name not in newest and len(newest) < limit:
                newest[row.task_name] = row
        existing = set(conn.execute(select(Task.name).where(Task.name.in_(list(newest)))).scalars())
    return [
        Failure(run=control.run_info(row), count=counts[name], removed=name not in existing)
        for name, row in newest.items()
    ]


def next_runs(info: TaskInfo, count: int = NEXT_RUNS) -> list[datetime]:
    """The next ``count`` slots of a started task (none while paused, broken or done): its
    stored next run, then what its schedule gives after it (an interval on that grid)."""
    if info.paused or info.error is not None or info.next_run_at is None:
        return []
    first = info.next_run_at
    later = schedules.fire_times(info.schedule, first, count - 1, anchor=first)
    return [first, *later]


def describe_schedule(info: TaskInfo) -> str:
    """The schedule in words: ``every 5 minutes``, ``At 09:00 on Monday (Europe/Berlin)``."""
    return schedules.describe(info.schedule)


def task_zone(info: TaskInfo) -> tzinfo:
    """The zone a task's schedule is read in (an interval has none: UTC)."""
    zone_name = getattr(info.schedule, "timezone", None)
    return schedules.zone(zone_name) if zone_name else UTC


def count_task_components(engine: Engine) -> dict[str, int]:
    """How many ``task:<name>`` components are in each status, on every node."""
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(Component.status, func.count())
            .where(Component.name.startswith("task:"))
            .group_by(Component.status)
        ).all()
    counts = {"total": 0, "healthy": 0, "error": 0, "unknown": 0}
    for status, n in rows:
        counts[status] = int(n)
        counts["total"] += int(n)
    return counts
