"""What the dashboard and the API read beyond :mod:`nanobot.status` and the pages and counts
of :mod:`nanobot.cron.control`: the latest failed runs, a task's next slots and zone, and the
count of task components.

The statements are those of the modules that own the tables (``tasks``:
:mod:`nanobot.cron.control`; ``task_runs``: :mod:`nanobot.cron.history`; ``components``:
:mod:`nanobot.heartbeat.store`), which return records. Every function is synchronous and
bounded (a ``LIMIT``, one grouped count), so that a database of 10,000 tasks answers as fast as
one of ten; the web handlers call them in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Final

from sqlalchemy import Engine

from nanobot.cron import control, history, schedules
from nanobot.cron.control import RunInfo, TaskInfo
from nanobot.db import read_transaction
from nanobot.heartbeat import store

NEXT_RUNS: Final = 5


@dataclass(frozen=True, slots=True)
class Failure:
    """A task's newest failed run, and how many of the recent failed runs are its."""

    run: RunInfo
    count: int
    removed: bool


FAILURE_WINDOW: Final = 500


def recent_failures(engine: Engine, *, limit: int = 10) -> list[Failure]:
    """The newest failed run (error, timeout, interrupted) of each of the ``limit`` tasks that
    failed last, newest first, with its share of the last :data:`FAILURE_WINDOW` failed runs:
    one task failing every second does not hide the others."""
    newest: dict[str, RunInfo] = {}
    counts: dict[str, int] = {}
    with read_transaction(engine) as conn:
        for run in history.recent_failed_runs(conn, FAILURE_WINDOW):
            counts[run.task_name] = counts.get(run.task_name, 0) + 1
            if run.task_name not in newest and len(newest) < limit:
                newest[run.task_name] = run
        existing = control.existing_names(conn, newest)
    return [
        Failure(run=run, count=counts[name], removed=name not in existing)
        for name, run in newest.items()
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
        by_status = store.count_task_components(conn)
    counts = {"total": 0, "healthy": 0, "error": 0, "unknown": 0}
    for status, n in by_status.items():
        counts[status] = n
        counts["total"] += n
    return counts
