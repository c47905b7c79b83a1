"""nanobot cron backfill: the past slots of a task that never ran, run once each by the leader."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from faults.harness import Cluster, lines, run_cli, wait_for
from sqlalchemy import Engine, insert, select, update
from test_cli import APPEND, assert_one_line_error, invoke

from nanobot.bus import MessageBus
from nanobot.cron import CronManager, backfill, control, definitions
from nanobot.cron.schedules import IntervalSchedule, parse_cron
from nanobot.db import get_engine, write_transaction
from nanobot.exceptions import InvalidTaskError, UnknownTaskError
from nanobot.models import Task, TaskRun, utcnow

WAIT = 20.0
BUSY = "cron_tasks:Busy"


def _minute(dt: datetime) -> datetime:
    return dt.replace(second=0, microsecond=0)


def _add_cron(engine: Engine, name: str, seconds: float = 0.1, *, paused: bool = False) -> None:
    """A task that runs every minute and takes ``seconds`` (its own runs, at the next minutes,
    are after any backfilled range)."""
    definition = definitions.definition_from_class(
        name,
        BUSY,
        kwargs={"seconds": seconds},
        schedule=parse_cron("* * * * *", "UTC"),
    )
    control.add_task(engine, definition, paused=paused)


def _rows(
    engine: Engine, name: str, start: datetime | None = None, end: datetime | None = None
) -> list[Any]:
    """The task's rows (those scheduled in ``[start, end]`` when given), in slot order."""
    query = select(TaskRun.__table__).where(TaskRun.task_name == name)
    if start is not None and end is not None:
        query = query.where(TaskRun.scheduled_at >= start, TaskRun.scheduled_at <= end)
    with engine.connect() as conn:
        return list(conn.execute(query.order_by(TaskRun.scheduled_at)).all())


def _pending(engine: Engine, name: str) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(select(Task.backfill_from).where(Task.name == name)).scalar() is not None
        )


def _request(engine: Engine, name: str, start: datetime, end: datetime, **kw: Any) -> Any:
    options: dict[str, Any] = {"concurrency": 1, "max_slots": 100, "confirmed": False}
    options.update(kw)
    return backfill.request_backfill(engine, name, start, end, now=utcnow(), **options)


async def _until_done(engine: Engine, name: str) -> None:
    async with asyncio.timeout(WAIT):
        while _pending(engine, name) or any(r.outcome == "running" for r in _rows(engine, name)):
            await asyncio.sleep(0.05)


# --- the slots of a range ---------------------------------------------------------------------


def test_range_slots_follow_the_schedule() -> None:
    """Slots come from the schedule's own arithmetic: an interval's grid from its anchor (none
    before it), a cron expression's fire times, a one-shot's instant; ends included."""
    anchor = datetime(2026, 11, 1, 0, 0, 10, tzinfo=UTC)
    every_10 = IntervalSchedule(seconds=10)
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 1, 0, 0, 40, tzinfo=UTC)
    assert backfill.range_slots(every_10, start, end, anchor=anchor) == [
        anchor + timedelta(seconds=s) for s in (0, 10, 20, 30)
    ]
    assert backfill.range_slots(every_10, start, end, anchor=None) == []
    hourly = parse_cron("0 * * * *", "Europe/Berlin")
    day = datetime(2026, 3, 29, tzinfo=UTC)  # Berlin springs forward: still 24 real hours
    assert len(backfill.range_slots(hourly, day, day + timedelta(hours=23), anchor=None)) == 24


def test_times_are_read_like_at_and_zone_aware() -> None:
    at = backfill.parse_time("2026-11-29T03:00", "Europe/Berlin", "--from")
    assert at == datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    with pytest.raises(InvalidTaskError, match="--from '03:00': give a date and time"):
        backfill.parse_time("03:00", "UTC", "--from")
    with pytest.raises(InvalidTaskError, match="--to: invalid time"):
        backfill.parse_time("yesterday", "UTC", "--to")


# --- requests: refused or stored, never half ----------------------------------------------------


def test_bad_requests_change_nothing(engine: Engine) -> None:
    _add_cron(engine, "bf")
    now = _minute(utcnow())
    with pytest.raises(UnknownTaskError):
        _request(engine, "ghost", now - timedelta(hours=1), now)
    with pytest.raises(InvalidTaskError, match="is after --to"):
        _request(engine, "bf", now, now - timedelta(hours=1))
    with pytest.raises(InvalidTaskError, match="is in the future"):
        _request(engine, "bf", now - timedelta(hours=1), now + timedelta(hours=1))
    with pytest.raises(InvalidTaskError, match="holds 180 slots to run, more than"):
        _request(engine, "bf", now - timedelta(hours=3), now - timedelta(minutes=1))
    assert not _pending(engine, "bf")
    assert _rows(engine, "bf") == []
    plan = _request(
        engine, "bf", now - timedelta(hours=3), now - timedelta(minutes=1), confirmed=True
    )
    assert (plan.stored, len(plan.to_run)) == (True, 180)
    with pytest.raises(InvalidTaskError, match="has a backfill pending"):
        _request(engine, "bf", now - timedelta(minutes=5), now - timedelta(minutes=1))


def test_cli_backfill_errors_are_one_line(engine: Engine, tmp_path: Path) -> None:
    """Unknown task, reversed or future range, too many slots: exit 2, one line, nothing
    stored; the count is said."""
    assert (
        invoke(
            "cron",
            "add",
            "job",
            "--task",
            APPEND,
            "--cron",
            "* * * * *",
            "--paused",
            "--kwargs",
            json.dumps({"path": str(tmp_path / "x.txt")}),
        ).exit_code
        == 0
    )
    now = _minute(utcnow())
    past = (now - timedelta(hours=5)).isoformat()
    soon = (now - timedelta(minutes=2)).isoformat()
    future = (now + timedelta(days=1)).isoformat()
    assert_one_line_error(
        invoke("cron", "backfill", "ghost", "--from", past, "--to", soon), 2, "unknown task"
    )
    assert_one_line_error(
        invoke("cron", "backfill", "job", "--from", "03:00", "--to", soon), 2, "a date and time"
    )
    assert_one_line_error(
        invoke("cron", "backfill", "job", "--from", soon, "--to", past), 2, "is after --to"
    )
    assert_one_line_error(
        invoke("cron", "backfill", "job", "--from", past, "--to", future), 2, "in the future"
    )
    assert_one_line_error(
        invoke("cron", "backfill", "job", "--from", past, "--to", soon),
        2,
        "299 slots to run",
        "scheduler.backfill_max_slots (100)",
        "--yes",
    )
    assert not _pending(engine, "job")
    result = invoke(
        "cron",
        "backfill",
        "job",
        "--from",
        "2026-11-29T03:00",
        "--to",
        soon,
        "--tz",
        "Europe/Berlin",
        "--yes",
    )
    assert result.exit_code == 0, result.stderr
    assert "from 2026-11-29T03:00:00+01:00 to " in result.stdout
    assert _pending(engine, "job")


def test_cli_backfill_of_a_range_with_no_slot_says_so_and_stores_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    """An interval task never started has no slot yet: a backfill says there is none in the
    range (not that every one has run) and stores no request."""
    assert (
        invoke(
            "cron", "add", "idle", "--task", APPEND, "--every", "1m", "--paused",
            "--kwargs", json.dumps({"path": str(tmp_path / "x.txt")}),
        ).exit_code
        == 0
    )  # fmt: skip
    now = _minute(utcnow())
    result = invoke(
        "cron", "backfill", "idle",
        "--from", (now - timedelta(hours=1)).isoformat(),
        "--to", (now - timedelta(minutes=1)).isoformat(),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "has no slot from " in result.stdout
    assert "every one has run" not in result.stdout
    assert not _pending(engine, "idle")


# --- the leader runs them ---------------------------------------------------------------------


async def test_backfill_runs_each_slot_once_with_its_time(db_url: str) -> None:
    """Each slot of the range without a row runs once, one at a time, recorded with its own
    scheduled_at; a missed row is taken over by its first slot's run; a second backfill of the
    same range adds nothing, and a request stored again is cleared with nothing run."""
    manager = CronManager(poll_interval=0.05, bus=MessageBus())
    engine = manager.open_engine()
    _add_cron(engine, "bf")
    end = _minute(utcnow()) - timedelta(minutes=1)
    start = end - timedelta(minutes=5)
    slots = [start + timedelta(minutes=k) for k in range(6)]
    with write_transaction(engine) as conn:
        # Slot 1 ran already; slots 3 and 4 were missed in one row.
        conn.execute(
            insert(TaskRun).values(
                task_name="bf",
                scheduled_at=slots[1],
                started_at=slots[1],
                finished_at=slots[1],
                outcome="success",
                node="old",
            )
        )
        conn.execute(
            insert(TaskRun).values(
                task_name="bf",
                scheduled_at=slots[3],
                finished_at=slots[3],
                outcome="missed",
                slots=2,
                node="old",
            )
        )
    plan = _request(engine, "bf", start, end)
    assert plan.to_run == [slots[0], slots[2], slots[3], slots[4], slots[5]]
    try:
        await manager.start()
        await _until_done(engine, "bf")
        rows = _rows(engine, "bf", start, end)
        assert [(r.scheduled_at, r.outcome) for r in rows] == [(s, "success") for s in slots]
        ran = [r for r in rows if r.node != "old"]
        assert len(ran) == 5
        assert all(r.manual for r in ran)
        spans = sorted((r.started_at, r.finished_at) for r in ran)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # one at a time
        again = _request(engine, "bf", start - timedelta(minutes=1), end)
        assert (again.stored, len(again.to_run)) == (True, 1)  # only the slot before the range
        await _until_done(engine, "bf")
        assert _request(engine, "bf", start - timedelta(minutes=1), end).stored is False
        count = len(_rows(engine, "bf", start, end))
        control.set_backfill(engine, "bf", start, end, 2)  # as if requested twice
        await _until_done(engine, "bf")
        assert len(_rows(engine, "bf", start, end)) == count
    finally:
        await manager.shutdown(grace=WAIT)


async def test_backfill_with_concurrency_runs_side_by_side(db_url: str) -> None:
    """--concurrency 3 runs up to three slots at once, never more."""
    manager = CronManager(poll_interval=0.05, bus=MessageBus())
    engine = manager.open_engine()
    _add_cron(engine, "par", seconds=0.5)
    end = _minute(utcnow()) - timedelta(minutes=1)
    start = end - timedelta(minutes=5)
    _request(engine, "par", start, end, concurrency=3)
    try:
        await manager.start()
        await _until_done(engine, "par")
    finally:
        await manager.shutdown(grace=WAIT)
    rows = _rows(engine, "par", start, end)
    assert [r.outcome for r in rows] == ["success"] * 6
    most = max(sum(1 for o in rows if o.started_at <= r.started_at < o.finished_at) for r in rows)
    assert 2 <= most <= 3


# --- on real services -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_backfill_on_two_services_runs_on_the_leader_and_survives_its_kill(
    db_url: str, tmp_path: Path
) -> None:
    """Two services: the backfill requested from the command line runs on the leader only;
    killed (-9) in the middle, the new leader goes on with the slots that have no row, so each
    slot of the range has exactly one row and started at most once; a second backfill of the
    range finds nothing to run."""

    cluster = Cluster(tmp_path, db_url, NANOBOT_SERVICE__SHUTDOWN_GRACE="2")
    out = tmp_path / "slow.txt"
    try:
        nodes = cluster.start(2)
        leader = cluster.wait_leader(10)
        code, added = run_cli(
            "cron", "add", "bf", "--task", "e2e_tasks:SlowTask", "--cron", "* * * * *",
            "--kwargs", json.dumps({"path": str(out), "seconds": 0.4}), "--json",
        )  # fmt: skip
        assert code == 0, added
        end = _minute(utcnow()) - timedelta(minutes=1)
        start = end - timedelta(minutes=11)
        code, plan = run_cli(
            "cron", "backfill", "bf", "--from", start.isoformat(), "--to", end.isoformat(),
            "--json",
        )  # fmt: skip
        assert code == 0, plan
        assert (plan["requested"], plan["to_run"]) == (True, 12)
        wait_for("three backfilled runs", lambda: len(lines(out, "start")) >= 3 or None, 20)
        leader.kill()
        successor = cluster.wait_leader(15, among=[n for n in nodes if n is not leader])

        def finished() -> bool | None:
            _code, tasks = run_cli("cron", "list", "--json")
            return tasks[0]["backfill"] is None or None

        wait_for("the backfill to end on the new leader", finished, 40)
    finally:
        cluster.kill_all()
    engine = get_engine()
    rows = _rows(engine, "bf", start, end)
    slots = [start + timedelta(minutes=k) for k in range(12)]
    assert [r.scheduled_at for r in rows] == slots
    assert {r.outcome for r in rows} <= {"success", "interrupted"}
    assert sum(r.outcome == "interrupted" for r in rows) <= 1
    # The schedule's own runs (at the minutes after the range) started too.
    started = [r for r in _rows(engine, "bf") if r.outcome not in ("missed", "skipped")]
    starts = lines(out, "start")
    assert len(starts) == len(started), "each slot started once"
    assert {int(s[2]) for s in starts} <= {leader.pid, successor.pid}
    assert any(int(s[2]) == successor.pid for s in starts)
    code, again = run_cli(
        "cron", "backfill", "bf", "--from", start.isoformat(), "--to", end.isoformat(), "--json"
    )
    assert (code, again["requested"], again["to_run"]) == (0, False, 0)


def test_interval_slots_match_rows_the_scheduler_stepped(engine: Engine) -> None:
    """An interval task's slots are its grid from its anchor; rows the scheduler wrote a few
    microseconds off the grid (it steps from slot to slot) count as those slots' rows."""
    definition = definitions.definition_from_class(
        "tick", BUSY, kwargs={"seconds": 0.1}, schedule=IntervalSchedule(seconds=10)
    )
    control.add_task(engine, definition, paused=True)
    anchor = _minute(utcnow()) - timedelta(minutes=10)
    with write_transaction(engine) as conn:
        conn.execute(update(Task).where(Task.name == "tick").values(anchor_at=anchor))
        for k in (0, 1, 5):
            at = anchor + timedelta(seconds=10 * k, microseconds=3 * k)
            conn.execute(
                insert(TaskRun).values(
                    task_name="tick", scheduled_at=at, started_at=at, outcome="success"
                )
            )
    plan = _request(engine, "tick", anchor - timedelta(minutes=5), anchor + timedelta(seconds=59))
    assert plan.slots == 6  # none before the anchor
    assert plan.to_run == [anchor + timedelta(seconds=10 * k) for k in (2, 3, 4)]


async def test_a_paused_task_s_backfill_waits_for_its_resume(db_url: str) -> None:
    """The leader claims nothing of a paused task's backfill (a pause is its brake); once the
    task is resumed, the backfill runs."""
    manager = CronManager(poll_interval=0.05, bus=MessageBus())
    engine = manager.open_engine()
    _add_cron(engine, "held", paused=True)
    end = _minute(utcnow()) - timedelta(minutes=1)
    start = end - timedelta(minutes=2)
    assert _request(engine, "held", start, end).stored
    try:
        await manager.start()
        # Ten passes that read the control plane: none claims a slot of the paused task.
        await asyncio.sleep(10 * 0.05)
        assert _rows(engine, "held") == []
        assert _pending(engine, "held")
        control.resume_task(engine, "held")
        await _until_done(engine, "held")
    finally:
        await manager.shutdown(grace=WAIT)
    assert [r.outcome for r in _rows(engine, "held", start, end)] == ["success"] * 3
