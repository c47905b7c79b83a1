"""When work fails: auto-pause after N consecutive failed slots (docs/failures.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from failure_tasks import Breaking, BreaksAfterThree, Quiet
from sqlalchemy import Engine, select, text, update

from nanobot import config as config_module
from nanobot.bus import MessageBus
from nanobot.cli import cli
from nanobot.cron import CronManager, control, recorder
from nanobot.cron.autopause import pause_failing, reason_text
from nanobot.cron.taskfile import parse_task_file
from nanobot.db import (
    count_tasks,
    create_db_engine,
    get_engine,
    upgrade_database,
    write_transaction,
)
from nanobot.exceptions import InvalidTaskError, TaskFileError
from nanobot.models import Task, TaskRun
from nanobot.status import SystemStatus, verdict

POLL = 0.05
WAIT = 30.0  # the bound of every wait below (a loaded machine is slow)


@pytest.fixture
def bus() -> MessageBus:
    return MessageBus()


@pytest.fixture
async def manager(db_url: str, bus: MessageBus) -> AsyncIterator[CronManager]:
    m = CronManager(poll_interval=POLL, bus=bus)
    yield m
    await m.shutdown(grace=0)


class Events:
    """The bus events of one topic, awaited with a bound."""

    def __init__(self, bus: MessageBus, topic: str) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        bus.subscribe(topic, self._on)

    async def _on(self, topic: str, payload: dict[str, Any]) -> None:
        self.items.append(payload)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()


def task_row(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(control.TASK_ROWS.where(Task.name == name)).one()


def outcomes(engine: Engine, name: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(TaskRun.outcome)
                .where(TaskRun.task_name == name)
                .order_by(TaskRun.scheduled_at)
            ).scalars()
        )


async def test_task_pauses_after_its_threshold_of_failed_slots(
    manager: CronManager, bus: MessageBus
) -> None:
    """pause_after_failures=3: three failed slots, then the task is paused with the stored
    reason naming the count and the last error; no fourth run; a task.auto_paused event."""
    finished = Events(bus, "task.finished")
    paused = Events(bus, "task.auto_paused")
    # Slots far enough apart that each outcome (and the pause) is written before the next one.
    manager.register_task("flaky", Breaking(0.3, message="disk full", pause_after_failures=3))
    await manager.start_task("flaky")
    await paused.wait_for(1)
    await manager.flush()
    engine = get_engine()
    row = task_row(engine, "flaky")
    assert row.paused is True
    assert row.next_run_at is None
    assert row.auto_paused_at is not None
    assert row.pause_reason == (
        "paused after 3 consecutive failures; last error: RuntimeError: disk full"
    )
    assert paused.items[0]["task"] == "flaky"
    assert paused.items[0]["failures"] == 3
    # Paused in the scheduler too: no run after the pause (three intervals later).
    count = len(finished.items)
    await asyncio.sleep(0.9)
    assert len(finished.items) == count
    assert outcomes(engine, "flaky") == ["error"] * 3


async def test_a_failure_ends_the_busy_window_of_outcome_writes(
    manager: CronManager, bus: MessageBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a write, outcomes wait for the next batch (the busy window), but a failed one
    ends the window: what follows a failure, its auto-pause here, does not wait for it. The
    window is made an hour long, so this fails (at the bound of the wait) if it holds."""
    monkeypatch.setattr(recorder, "FLUSH_BUSY_WINDOW_S", 3600.0)
    paused = Events(bus, "task.auto_paused")
    engine = get_engine()
    # A success is written: its write opens the busy window.
    manager.register_task("fine", Quiet(3600))
    await manager.start_task("fine")
    async with asyncio.timeout(WAIT):
        while outcomes(engine, "fine") != ["success"]:
            await asyncio.sleep(0.01)
    manager.register_task("flaky", Breaking(3600, pause_after_failures=1))
    await manager.start_task("flaky")
    await paused.wait_for(1)
    assert outcomes(engine, "flaky") == ["error"]
    assert task_row(engine, "flaky").paused is True


async def test_class_attribute_threshold_is_stored(manager: CronManager) -> None:
    """A task class declaring pause_after_failures = 3 is stored with it; the keyword wins."""
    manager.register_task("a", BreaksAfterThree(1))
    manager.register_task("b", BreaksAfterThree(1, pause_after_failures=7))
    engine = get_engine()
    assert task_row(engine, "a").pause_after_failures == 3
    assert task_row(engine, "b").pause_after_failures == 7


async def test_default_is_off(manager: CronManager, bus: MessageBus) -> None:
    """Without a threshold and with the setting's default (0) a failing task is never paused."""
    finished = Events(bus, "task.finished")
    manager.register_task("failing", Breaking(0.1))
    await manager.start_task("failing")
    await finished.wait_for(4)
    await manager.flush()
    row = task_row(get_engine(), "failing")
    assert row.paused is False
    assert row.auto_paused_at is None
    assert row.consecutive_failures >= 3


async def test_setting_gives_the_default_and_zero_opts_out(
    db_url: str, bus: MessageBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cron.pause_after_failures=2 pauses a task that gives no threshold after two failed
    slots; a task with pause_after_failures=0 is never paused."""
    monkeypatch.setenv("NANOBOT_CRON__PAUSE_AFTER_FAILURES", "2")
    config_module.reset_config()
    paused = Events(bus, "task.auto_paused")
    finished = Events(bus, "task.finished")
    manager = CronManager(poll_interval=POLL, bus=bus)
    try:
        # A second apart: the pause after its second failure is applied before a third slot
        # comes, even on a loaded machine (next to a task failing every 0.1 s, 0.3 s was not).
        manager.register_task("inherits", Breaking(1.0))
        manager.register_task("never", Breaking(0.1, pause_after_failures=0))
        await manager.start_task("inherits")
        await manager.start_task("never")
        await paused.wait_for(1)
        async with asyncio.timeout(WAIT):
            while sum(e["task"] == "never" for e in finished.items) < 4:
                await asyncio.sleep(0.02)
        await manager.flush()
    finally:
        await manager.shutdown(grace=0)
    engine = get_engine()
    assert [p["task"] for p in paused.items] == ["inherits"]
    assert task_row(engine, "inherits").pause_reason.startswith(
        "paused after 2 consecutive failures"
    )
    assert task_row(engine, "never").paused is False


async def test_resume_clears_the_reason_and_runs_again(
    manager: CronManager, bus: MessageBus
) -> None:
    """cron resume clears an auto-pause (reason and time); the task is scheduled again."""
    paused = Events(bus, "task.auto_paused")
    finished = Events(bus, "task.finished")
    manager.register_task("flaky", Breaking(0.3, pause_after_failures=2))
    await manager.start_task("flaky")
    await paused.wait_for(1)
    await manager.flush()
    before = len(finished.items)
    await manager.resume_task("flaky")
    engine = get_engine()
    row = task_row(engine, "flaky")
    assert row.paused is False
    assert row.pause_reason is None
    assert row.auto_paused_at is None
    # It runs again; its failures are still consecutive, so the next failure pauses it again.
    await paused.wait_for(2)
    assert len(finished.items) == before + 1


def test_reason_text_quotes_a_bounded_last_error() -> None:
    """The reason names the count and quotes the last error, cut to a readable length."""
    assert reason_text(5, "ValueError: x") == (
        "paused after 5 consecutive failures; last error: ValueError: x"
    )
    assert reason_text(2, None).endswith("last error: none recorded")
    assert len(reason_text(2, "e" * 10_000)) < 600


def test_pause_failing_ignores_paused_and_below_threshold(engine: Engine) -> None:
    """Only running tasks at or over their threshold are paused; a paused one keeps its reason."""
    upgrade_database(engine)
    now = datetime(2026, 11, 30, tzinfo=UTC)
    base = {
        "task_class": "failure_tasks:Breaking",
        "interval_s": 1.0,
        "kwargs": {},
        "created_at": now,
        "updated_at": now,
        "version": 1,
        "pause_reason": None,
        "pause_after_failures": None,
    }
    with write_transaction(engine) as conn:
        control.insert_tasks(
            conn,
            [
                base | {"name": "over", "paused": False, "consecutive_failures": 4},
                base | {"name": "under", "paused": False, "consecutive_failures": 2},
                base
                | {
                    "name": "held",
                    "paused": True,
                    "consecutive_failures": 9,
                    "pause_reason": "maintenance",
                },
                base
                | {
                    "name": "own",
                    "paused": False,
                    "consecutive_failures": 9,
                    "pause_after_failures": 0,
                },
            ],
        )
    done = pause_failing(engine, ["over", "under", "held", "own"], default=3, now=now)
    assert [p.task for p in done] == ["over"]
    assert task_row(engine, "over").version == 2
    assert task_row(engine, "held").pause_reason == "maintenance"
    assert task_row(engine, "under").paused is False
    assert task_row(engine, "own").paused is False


def test_bad_threshold_is_refused() -> None:
    """A negative, fractional or boolean threshold is refused with a clear error."""
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(InvalidTaskError, match="pause_after_failures"):
            Breaking(1, pause_after_failures=bad)  # type: ignore[arg-type]


def test_status_is_degraded_by_an_auto_paused_task() -> None:
    """status names an auto-paused task and its reason, and is degraded."""
    state = {
        "components": [],
        "newest": object(),
        "running_nodes": {"n"},
        "lease": None,
        "leader_held": True,
        "code": [],
        "tasks": [
            control.TaskSummary(
                name="nightly",
                task_class="nanobot.cron.command:CommandTask",
                interval=3600.0,
                schedule_kind="interval",
                cron=None,
                timezone=None,
                run_at=None,
                timeout=None,
                paused=True,
                next_run_at=None,
                last_run_at=datetime(2026, 11, 30, 3, tzinfo=UTC),
                last_outcome="error",
                consecutive_failures=5,
                error=None,
                source="cli",
                pause_reason="paused after 5 consecutive failures; last error: boom",
                auto_paused_at=datetime(2026, 11, 30, 3, tzinfo=UTC),
            )
        ],
    }
    found, problems = verdict(state)
    assert found is SystemStatus.DEGRADED
    assert problems == ["task nightly was paused after 5 consecutive failures; last error: boom"]


# --- the command line and the task file ------------------------------------------------------


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_add_pause_with_note_list_and_resume(engine: Engine) -> None:
    """cron add --pause-after-failures stores it; cron pause --note stores the operator's
    reason, cron list shows it; cron resume clears it."""
    result = _cli(
        "cron", "add", "nightly", "--command", "true", "--every", "1h",
        "--pause-after-failures", "4", "--paused", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert task_row(engine, "nightly").pause_after_failures == 4
    result = _cli("cron", "pause", "nightly", "--note", "upstream API down until Monday")
    assert result.exit_code == 0, result.output
    assert task_row(engine, "nightly").pause_reason == "upstream API down until Monday"
    listing = _cli("cron", "list")
    assert "paused: upstream API down until Monday" in listing.output
    assert _cli("cron", "resume", "nightly").exit_code == 0
    assert task_row(engine, "nightly").pause_reason is None


def test_cli_list_shows_an_auto_pause(engine: Engine) -> None:
    """cron list shows an auto-paused task as PAUSED with its reason."""
    assert _cli("cron", "add", "nightly", "--command", "true", "--every", "1h").exit_code == 0
    now = datetime.now(UTC)
    with write_transaction(engine) as conn:
        conn.execute(
            update(Task)
            .where(Task.name == "nightly")
            .values(
                paused=True,
                auto_paused_at=now,
                pause_reason="paused after 5 consecutive failures; last error: exit 1",
            )
        )
    listing = _cli("cron", "list")
    assert "PAUSED: paused after 5 consecutive failures" in listing.output
    data = _cli("cron", "list", "--json").output
    assert '"auto_paused_at"' in data


@pytest.mark.parametrize("bad", ["-1", "x", "1.5"])
def test_cli_bad_threshold_changes_nothing(engine: Engine, bad: str) -> None:
    """A bad --pause-after-failures: a usage error and no task stored."""
    result = CliRunner().invoke(
        cli,
        ["cron", "add", "t", "--command", "true", "--every", "1h", "--pause-after-failures", bad],
    )
    assert result.exit_code == 2
    assert "pause-after-failures" in result.output
    assert "Traceback" not in result.output
    assert count_tasks(get_engine()) == 0


def test_cli_empty_note_is_refused(engine: Engine) -> None:
    """cron pause --note '' is refused and the task stays as it was."""
    assert _cli("cron", "add", "t", "--command", "true", "--every", "1h").exit_code == 0
    result = CliRunner().invoke(cli, ["cron", "pause", "t", "--note", " "])
    assert result.exit_code != 0
    assert "note" in result.output
    assert task_row(get_engine(), "t").paused is False


def test_task_file_key(tmp_path: Path) -> None:
    """The task file's pause_after_failures is validated and stored with the definition."""
    path = tmp_path / "tasks.toml"
    text = '[tasks.nightly]\ncommand = "true"\nevery = "1h"\npause_after_failures = 5\n'
    tasks = parse_task_file(text, path)
    assert tasks["nightly"].definition.pause_after_failures == 5
    with pytest.raises(TaskFileError, match="pause_after_failures"):
        parse_task_file(text.replace("= 5", "= -2"), path)


def test_migration_0009_keeps_tasks(db_url: str) -> None:
    """A database at 0008 (the revision before 0009) with a task: after the upgrade the task is
    unchanged, with no threshold of its own (the setting's default), not auto-paused and without
    pings."""
    empty_engine = create_db_engine(db_url)
    upgrade_database(empty_engine, "0008")
    now = datetime(2026, 11, 30, tzinfo=UTC)
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (name, task_class, interval_s, kwargs, misfire_policy, paused,"
                " consecutive_failures, version, created_at, updated_at, schedule_kind, source)"
                " VALUES ('old', 'x:Y', 5.0, '{}', 'catch_up_once', false, 2, 3, :now, :now,"
                " 'interval', 'cli')"
            ),
            {"now": now.replace(tzinfo=None) if empty_engine.dialect.name == "sqlite" else now},
        )
    upgrade_database(empty_engine)
    row = task_row(empty_engine, "old")
    assert (row.consecutive_failures, row.version, row.paused) == (2, 3, False)
    assert row.pause_after_failures is None
    assert row.auto_paused_at is None
    assert row.ping_url is None
    empty_engine.dispose()
