"""The catch-up window: a missed slot later than the window is recorded missed, not run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from failure_tasks import Quiet
from sqlalchemy import Engine, select

from nanobot.bus import MessageBus
from nanobot.cli import cli
from nanobot.cron import CronManager
from nanobot.cron.schedules import IntervalSchedule, due_slots, resolve_schedule
from nanobot.cron.task import CronTask
from nanobot.cron.taskfile import parse_task_file
from nanobot.db import get_engine
from nanobot.exceptions import InvalidTaskError, TaskFileError
from nanobot.models import MisfirePolicy, Task, TaskRun

T0 = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
CATCH_UP = MisfirePolicy.CATCH_UP_ONCE
HOURLY = resolve_schedule(cron="0 * * * *", tz="UTC", now=T0)


@pytest.mark.parametrize(
    ("schedule", "outage", "window", "runs", "missed"),
    [
        # The examples: a 10-minute window, an hourly task whose 02:00 slot came
        # during a 60-minute outage (the scheduler is back at 02:55): no run, one missed row.
        (HOURLY, timedelta(minutes=55), 600.0, None, 1),
        # ... a 5-minute outage: the 02:00 slot is caught up once.
        (HOURLY, timedelta(minutes=5), 600.0, T0, 0),
        # No window (today's default): caught up however late.
        (HOURLY, timedelta(minutes=55), None, T0, 0),
        # Every 5 minutes, back at 02:57: twelve slots passed; the latest (02:55) is 2 minutes
        # late, within the window: it runs, the eleven before are one missed row.
        (
            IntervalSchedule(seconds=300),
            timedelta(minutes=57),
            600.0,
            T0 + timedelta(minutes=55),
            11,
        ),
        # ... with a 1-minute window even the latest is too late: twelve missed, no run.
        (IntervalSchedule(seconds=300), timedelta(minutes=59), 60.0, None, 12),
    ],
)
def test_window_table(
    schedule: object, outage: timedelta, window: float | None, runs: datetime | None, missed: int
) -> None:
    """Which slot runs and how many are missed, by outage and window."""
    slots = due_slots(schedule, T0, T0 + outage, CATCH_UP, window=window)  # type: ignore[arg-type]
    assert slots.run_slot == runs
    assert slots.missed_count == missed
    assert slots.missed_first == (T0 if missed else None)


def test_window_also_bounds_skip() -> None:
    """Under SKIP the window can only make the grace shorter."""
    every = IntervalSchedule(seconds=3600)
    late = T0 + timedelta(seconds=30)
    assert due_slots(every, T0, late, MisfirePolicy.SKIP).run_slot == T0
    assert due_slots(every, T0, late, MisfirePolicy.SKIP, window=10.0).run_slot is None


class Windowed(CronTask):
    catch_up_window = 600.0

    async def run(self) -> None:
        return None


def test_attribute_keyword_and_bad_values() -> None:
    """The class attribute is read, a keyword wins; a bad window is refused."""
    assert Windowed(60).catch_up_window == 600.0
    assert Windowed(60, catch_up_window=30).catch_up_window == 30.0
    with pytest.raises(InvalidTaskError, match="catch_up_window"):
        Windowed(60, catch_up_window=-1)


def test_cli_and_task_file_store_the_window(engine: Engine, tmp_path: Path) -> None:
    """cron add --catch-up-window 10m stores 600 s; a bad one changes nothing (exit 2); the task
    file's catch_up_window takes the same durations."""
    args = ["cron", "add", "t", "--command", "true", "--every", "1h", "--catch-up-window"]
    bad = CliRunner().invoke(cli, [*args, "soon"])
    assert bad.exit_code == 2, bad.output
    assert "--catch-up-window" in bad.output
    ok = CliRunner().invoke(cli, [*args, "10m", "--json"])
    assert ok.exit_code == 0, ok.output
    with get_engine().connect() as conn:
        stored = conn.execute(select(Task.catch_up_window_s).where(Task.name == "t")).scalar()
    assert stored == 600.0
    text = '[tasks.n]\ncommand = "true"\nevery = "1h"\ncatch_up_window = "10m"\n'
    assert parse_task_file(text, tmp_path / "t.toml")["n"].definition.catch_up_window == 600.0
    with pytest.raises(TaskFileError, match="catch_up_window"):
        parse_task_file(text.replace('"10m"', "-5"), tmp_path / "t.toml")


@pytest.mark.parametrize(("down_s", "caught_up"), [(150.0, False), (110.0, True)])
async def test_restart_after_an_outage_obeys_the_window(
    db_url: str, down_s: float, caught_up: bool
) -> None:
    """Every 100 s with a 30 s window: back 150 s later, the slot at +100 is 50 s late and
    recorded missed with no run; back 110 s later, it is 10 s late and caught up once."""
    bus = MessageBus()
    seen: list[str] = []
    changed = asyncio.Event()

    async def on(_topic: str, payload: dict[str, str]) -> None:
        seen.append(payload["outcome"])
        changed.set()

    bus.subscribe("task.finished", on)

    async def until(count: int) -> None:
        async with asyncio.timeout(30):
            while len(seen) < count:
                changed.clear()
                await changed.wait()

    first = CronManager(poll_interval=0.05, bus=bus)
    first.register_task("w", Quiet(100, catch_up_window=30))
    await first.start_task("w")
    await until(1)
    await first.shutdown(grace=1)
    offset = timedelta(seconds=down_s)
    second = CronManager(poll_interval=0.05, bus=bus, clock=lambda: datetime.now(UTC) + offset)
    second.register_task("w", Quiet(100, catch_up_window=30))
    await second.start_all_tasks()
    try:
        await until(2)
        await second.flush()
    finally:
        await second.shutdown(grace=1)
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(TaskRun.outcome, TaskRun.slots)
            .where(TaskRun.task_name == "w")
            .order_by(TaskRun.scheduled_at)
        ).all()
    if caught_up:
        assert [tuple(r) for r in rows] == [("success", 1), ("success", 1)]
    else:
        assert [tuple(r) for r in rows] == [("success", 1), ("missed", 1)]
