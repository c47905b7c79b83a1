"""The command line's schedules: cron add with --every, --cron, --at and --tz, cron list, cron
next; every bad input refused with one line, exit 2, nothing stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select
from test_cli import APPEND, assert_one_line_error, invoke, task_count

from nanobot import config as config_module
from nanobot.cron import control
from nanobot.models import Task, TaskStateRecord, utcnow


def _add(name: str, *args: str) -> dict[str, object]:
    result = invoke("cron", "add", name, "--task", APPEND, *args, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_add_cron_in_a_zone_and_list_it_in_words(engine: Engine) -> None:
    """A cron task is stored with its expression and zone; cron list shows it in words and its
    next run on the zone's clock and in UTC."""
    data = _add("standup", "--cron", "0 9 * * 1-5", "--tz", "Europe/Berlin")
    assert data["schedule_kind"] == "cron"
    assert data["cron"] == "0 9 * * 1-5"
    assert data["timezone"] == "Europe/Berlin"
    assert data["schedule"] == "at 09:00 on Monday through Friday (Europe/Berlin)"
    next_utc = datetime.fromisoformat(str(data["next_run_at"]))
    next_local = datetime.fromisoformat(str(data["next_run_local"]))
    assert next_utc == next_local
    assert (next_local.hour, next_local.minute) == (9, 0)
    assert next_local.weekday() < 5

    listing = invoke("cron", "list")
    assert listing.exit_code == 0
    line = next(x for x in listing.stdout.splitlines() if x.startswith("standup"))
    assert "at 09:00 on Monday through Friday (Europe/Berlin)" in line
    assert "09:00:00 CE" in line  # CET or CEST, with its offset
    assert f"{next_utc:%Y-%m-%d %H:%M:%S} UTC" in line
    with engine.connect() as conn:
        row = conn.execute(select(Task.schedule_kind, Task.cron, Task.timezone)).one()
    assert tuple(row) == ("cron", "0 9 * * 1-5", "Europe/Berlin")


def test_add_every_and_interval(engine: Engine) -> None:
    """--every takes units; --interval keeps working; both are interval tasks."""
    assert _add("a", "--every", "1h30m")["interval"] == 5400
    b = _add("b", "--interval", "5")
    assert (b["interval"], b["schedule"], b["schedule_kind"]) == (5, "every 5 seconds", "interval")
    assert task_count(engine) == 2


def test_add_at_echoes_the_offset_and_notes_an_ambiguous_time(engine: Engine) -> None:
    """A naive --at is read in --tz and echoed back with its offset; an ambiguous time is
    read as its first occurrence and the command says so."""
    result = invoke(
        "cron", "add", "remind", "--task", APPEND, "--at", "2030-11-03T01:30",
        "--tz", "America/New_York",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "once at 2030-11-03 01:30:00 EDT (-04:00) (America/New_York)" in result.stdout
    assert "2030-11-03 05:30:00 UTC" in result.stdout
    assert "first occurrence" in result.stderr
    with engine.connect() as conn:
        row = conn.execute(
            select(Task.schedule_kind, Task.run_at, TaskStateRecord.next_run_at).join(
                TaskStateRecord, TaskStateRecord.task_name == Task.name
            )
        ).one()
    assert row.schedule_kind == "at"
    assert row.run_at == datetime(2030, 11, 3, 5, 30, tzinfo=UTC)
    assert row.next_run_at == row.run_at


def test_default_zone_is_the_setting(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --tz, cron expressions and naive --at times are read in scheduler.timezone."""
    monkeypatch.setenv("NANOBOT_SCHEDULER__TIMEZONE", "Asia/Kolkata")
    config_module.reset_config()
    data = _add("x", "--at", "2030-01-01T09:00")
    assert data["timezone"] == "Asia/Kolkata"
    assert data["run_at"] == "2030-01-01T03:30:00+00:00"
    assert _add("y", "--cron", "@daily")["timezone"] == "Asia/Kolkata"


def test_timeout_jitter_and_misfire_options(engine: Engine) -> None:
    """--timeout, --jitter and --misfire are stored."""
    _add("opts", "--every", "10m", "--timeout", "30", "--jitter", "2.5", "--misfire", "skip")
    with engine.connect() as conn:
        row = conn.execute(select(Task.timeout_s, Task.jitter_s, Task.misfire_policy)).one()
    assert tuple(row) == (30.0, 2.5, "skip")


def test_next_prints_fire_times_and_changes_nothing(engine: Engine) -> None:
    """cron next NAME -n 3 prints three fire times, local and UTC; the task is unchanged."""
    _add("nightly", "--cron", "30 2 * * *", "--tz", "America/New_York")
    with engine.connect() as conn:
        before = conn.execute(control.TASK_ROWS).one()
    result = invoke("cron", "next", "nightly", "-n", "3")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "task 'nightly' runs at 02:30 every day (America/New_York)"
    assert len(lines) == 4
    assert all(" = " in line and line.endswith("UTC") for line in lines[1:])
    as_json = json.loads(invoke("cron", "next", "nightly", "-n", "3", "--json").stdout)
    times = [datetime.fromisoformat(t["utc"]) for t in as_json["next"]]
    assert times == sorted(times)
    assert len(times) == 3
    assert times[0] == before.next_run_at
    assert all(datetime.fromisoformat(t["local"]).hour == 2 for t in as_json["next"])
    with engine.connect() as conn:
        after = conn.execute(control.TASK_ROWS).one()
    assert after == before


def test_next_of_a_paused_interval_task_follows_its_grid(engine: Engine) -> None:
    """A paused task shows the runs it would have if resumed now."""
    _add("p", "--every", "1h", "--paused")
    result = invoke("cron", "next", "p", "-n", "2")
    assert result.exit_code == 0
    assert "paused" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 3


FUTURE = (utcnow() + timedelta(days=400)).strftime("%Y-%m-%dT%H:%M")
BAD = [
    (["--cron", "61 * * * *"], "invalid cron expression '61 * * * *': bad minute field"),
    (["--cron", "* * *"], "has 3 field"),
    (["--cron", "@reboot"], "no reboot schedule"),
    (["--cron", "0 9 * * *", "--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    (["--at", "2020-01-01T09:00"], "is in the past"),
    (["--at", "2030-03-10T02:30", "--tz", "America/New_York"], "does not exist in America"),
    (["--at", "next tuesday"], "invalid time 'next tuesday'"),
    (["--at", FUTURE, "--tz", "Nowhere/City"], "unknown time zone 'Nowhere/City'"),
    (["--every", "5x"], "invalid interval '5x'"),
    (["--every", "0s"], "positive number"),
    (["--every", "5m", "--cron", "* * * * *"], "one schedule, not --every and --cron"),
    (["--cron", "* * * * *", "--at", FUTURE], "one schedule, not --cron and --at"),
    (["--every", "5m", "--interval", "5"], "one schedule, not --every and --interval"),
    (["--every", "5m", "--tz", "Europe/Berlin"], "--tz applies to --cron and --at"),
    (["--tz", "Europe/Berlin"], "give a schedule"),
    (["--every", "5m", "--timeout", "-1"], "timeout must be a positive number"),
    (["--every", "5m", "--jitter", "nan"], "jitter must be a positive number"),
    (["--every", "5m", "--misfire", "later"], "'later' is not one of"),
    (["--cron", "0 9 * * *", "--kwargs", '{"interval": 5}'], "kwargs give interval 5"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD)
def test_add_refuses_bad_schedules(engine: Engine, args: list[str], fragment: str) -> None:
    """Exit 2, one line naming the problem, nothing stored."""
    result = invoke("cron", "add", "job", "--task", APPEND, *args)
    assert_one_line_error(result, 2, fragment)
    assert task_count(engine) == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["cron", "next", "ghost"], "unknown task 'ghost'"),
        (["cron", "next", "x", "-n", "0"], "-n"),
        (["cron", "next", "x", "-n", "many"], "-n"),
    ],
)
def test_next_bad_input(engine: Engine, args: list[str], fragment: str) -> None:
    assert_one_line_error(invoke(*args), 2, fragment)


def test_status_shows_each_schedule(engine: Engine) -> None:
    """status --json carries each task's schedule; the text shows it in words."""
    _add("standup", "--cron", "0 9 * * 1-5", "--tz", "Europe/Berlin")
    result = invoke("status", "--json")
    data = json.loads(result.stdout)
    (standup,) = [t for t in data["tasks"] if t["name"] == "standup"]
    assert standup["schedule_kind"] == "cron"
    assert standup["schedule"] == "at 09:00 on Monday through Friday (Europe/Berlin)"
    assert standup["timezone"] == "Europe/Berlin"
    assert "at 09:00 on Monday through Friday (Europe/Berlin)" in invoke("status").stdout
