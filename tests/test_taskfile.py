"""The task file: validation (one line naming file, task and key; nothing applied) and the sync
rules (created, unchanged untouched, changed with its phase kept, removed paused, clashes), on
SQLite and PostgreSQL; and revision 0005 upgrading a database that holds rows."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import Engine, Row, insert, select, text, update

from nanobot.cli import cli
from nanobot.cron import control, definitions
from nanobot.cron.command import CommandTask
from nanobot.cron.schedules import AtSchedule, CronSchedule
from nanobot.cron.taskfile import (
    REMOVED_REASON,
    apply_tasks,
    parse_task_file,
    read_task_file,
    sync_task_file,
)
from nanobot.db import alembic_config, create_db_engine, upgrade_database
from nanobot.exceptions import TaskFileError
from nanobot.models import Task, TaskRun, TaskSource, TaskStateRecord, utcnow

FILE = Path("/etc/nanobot/tasks.toml")


def _error(text_: str) -> str:
    with pytest.raises(TaskFileError) as info:
        parse_task_file(text_, FILE)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{FILE}: ")
    return message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[tasks.a]\ncommand = "true"\nevery = 60\ncolour = "red"\n', "task 'a': key 'colour'"),
        ('[tasks.a]\ncommand = "true"\nevery = 0\n', "task 'a': key 'every'"),
        ('[tasks.a]\ncommand = "true"\nevery = "soon"\n', "task 'a': key 'every'"),
        ('[tasks.a]\ncommand = "true"\n', "task 'a': key 'every'"),
        ('[tasks.a]\ncommand = "true"\nevery = 1\ninterval = 1\n', "task 'a': key 'interval'"),
        ('[tasks.a]\ntask = "nope.mod:X"\nevery = 60\n', "task 'a': key 'task'"),
        ('[tasks.a]\ntask = "cron_tasks:X"\ncommand = "true"\nevery = 6\n', "task 'a': key 'task'"),
        ('[tasks.a]\ncommand = "true"\nevery = 60\ntimeout = -1\n', "task 'a': key 'timeout'"),
        ('[tasks.a]\ncommand = "true"\nevery = 60\nmisfire = "x"\n', "task 'a': key 'misfire'"),
        ('[tasks.a]\ncommand = "true"\nevery = 60\nshell = "yes"\n', "task 'a': key 'command'"),
        ('[tasks.a]\ncommand = "true"\ncron = "0 3 * * * * *"\n', "task 'a': key 'cron'"),
        ('[tasks.a]\ncommand = "true"\ncron = "0 3 * * *"\ntz = "Mars/Base"\n', "key 'tz'"),
        ('[tasks.a]\ncommand = "true"\nevery = 60\ntz = "UTC"\n', "task 'a': key 'tz'"),
        ('[tasks.a]\ncommand = "true"\nat = "17:30"\n', "task 'a': key 'at'"),
        ('[tasks.a]\ncommand = "true"\nat = "tomorrow"\n', "task 'a': key 'at'"),
        ('[tasks.a]\ncommand = "true"\nevery = 60\ncron = "@daily"\n', "task 'a': key 'cron'"),
        ("[tasks.a]\ncommand = []\nevery = 60\n", "task 'a': key 'command'"),
        ('[tasks.a]\ntask = "cron_tasks:AppendLine"\nevery = 5\nkwargs = 3\n', "key 'kwargs'"),
        ('[jobs.a]\ncommand = "true"\n', "key 'jobs'"),
        ("[tasks.a\n", "not valid TOML"),
    ],
)
def test_an_invalid_file_is_one_line_naming_file_task_and_key(body: str, expected: str) -> None:
    """Each kind of mistake is refused with one line that names the file, the task and the key."""
    assert expected in _error(body)


def test_every_option_is_accepted() -> None:
    """Durations, timeout, jitter, misfire, paused, and a command's shell, cwd, env."""
    tasks = parse_task_file(
        """
        [tasks.backup]
        command = "pg_dump app > /tmp/x.sql"
        shell = true
        cwd = "/tmp"
        env = { PGHOST = "db" }
        every = "1d"
        timeout = "5m"
        jitter = 10
        misfire = "skip"
        paused = true

        [tasks.report]
        command = ["echo", "hi"]
        interval = 90
        """,
        FILE,
    )
    backup = tasks["backup"].definition
    assert backup.interval == 86400
    assert backup.timeout == 300
    assert backup.jitter == 10
    assert backup.misfire_policy.value == "skip"
    assert backup.kwargs["env"] == {"PGHOST": "db"}
    assert tasks["backup"].paused
    task = definitions.build_task(backup.task_class, backup.kwargs)
    assert isinstance(task, CommandTask)
    assert task.command == "pg_dump app > /tmp/x.sql"
    assert tasks["report"].definition.kwargs["command"] == ["echo", "hi"]


def test_a_class_without_the_option_in_its_constructor_is_refused() -> None:
    """timeout for a class that cannot take it names the key instead of being dropped."""
    message = _error('[tasks.a]\ntask = "cron_tasks:AppendLine"\nevery = 5\ntimeout = 3\n')
    assert "key 'timeout'" in message


def test_a_missing_file_reads_as_none(tmp_path: Path) -> None:
    assert read_task_file(tmp_path / "tasks.toml") is None


def _rows(engine: Engine) -> dict[str, Row[Any]]:
    with engine.connect() as conn:
        return {r.name: r for r in conn.execute(control.TASK_ROWS)}


V1 = """
[tasks.keep]
command = ["true"]
every = 3600

[tasks.change]
command = ["true"]
every = 3600

[tasks.gone]
command = ["true"]
every = 3600
"""

V2 = """
[tasks.keep]
command = ["true"]
every = 3600

[tasks.change]
command = ["echo", "changed"]
every = 3600
timeout = 30

[tasks.new]
command = ["true"]
every = 60
"""


def test_sync_rules(engine: Engine, tmp_path: Path) -> None:
    """Unchanged untouched; a changed option keeps its next run; removed paused with its
    reason and history; back in the file resumes; CLI tasks untouched; a clash reported."""
    path = tmp_path / "tasks.toml"
    path.write_text(V1)
    cli_def = definitions.definition_from_class(
        "cli-task", "nanobot.cron.command:CommandTask", 60, {"command": "true"}
    )
    control.add_task(engine, cli_def)
    first = sync_task_file(engine, path)
    assert first is not None
    assert sorted(first.created) == ["change", "gone", "keep"]
    # The scheduler moves next runs; make them distinct from "now" to see that they stay.
    later = utcnow() + timedelta(minutes=17)
    with engine.begin() as conn:
        files = select(Task.name).where(Task.source == "file").scalar_subquery()
        conn.execute(
            update(TaskStateRecord)
            .values(next_run_at=later)
            .where(TaskStateRecord.task_name.in_(files))
        )
        gone_id = conn.execute(select(Task.id).where(Task.name == "gone")).scalar_one()
        conn.execute(
            insert(TaskRun).values(
                task_name="gone", scheduled_at=utcnow(), outcome="success", slots=1, manual=False
            )
        )
    before = _rows(engine)

    path.write_text(V2)
    result = sync_task_file(engine, path)
    assert result is not None
    assert result.updated == ["change"]
    assert result.created == ["new"]
    assert result.removed == ["gone"]
    after = _rows(engine)
    # Unchanged: not written at all.
    assert after["keep"].version == before["keep"].version
    assert after["keep"].next_run_at == later
    # Changed options only: new definition, same next run (the phase is kept).
    assert after["change"].version == before["change"].version + 1
    assert after["change"].kwargs["command"] == ["echo", "changed"]
    assert after["change"].timeout_s == 30
    assert after["change"].next_run_at == later
    # Removed: paused with its reason, still there with its history.
    assert after["gone"].paused
    assert after["gone"].pause_reason == REMOVED_REASON
    assert after["gone"].id == gone_id
    with engine.connect() as conn:
        runs = conn.execute(text("select count(*) from task_runs where task_name = 'gone'"))
        assert runs.scalar_one() == 1
    # The command line's task is not the file's business.
    assert after["cli-task"].version == before["cli-task"].version
    assert after["cli-task"].source == TaskSource.CLI

    # A second sync of the same file changes nothing.
    again = sync_task_file(engine, path)
    assert again is not None
    assert (again.created, again.updated, again.removed) == ([], [], [])
    assert _rows(engine)["gone"].version == after["gone"].version

    # Back in the file: resumed on its grid.
    path.write_text(V2 + '\n[tasks.gone]\ncommand = ["true"]\nevery = 3600\n')
    back = sync_task_file(engine, path)
    assert back is not None
    assert back.resumed == ["gone"]
    assert not _rows(engine)["gone"].paused
    assert _rows(engine)["gone"].pause_reason is None

    # A name used by the command line is a clash: reported, the rest applied.
    path.write_text(V2 + '\n[tasks.cli-task]\ncommand = ["false"]\nevery = 5\n')
    clash = sync_task_file(engine, path)
    assert clash is not None
    assert clash.clashes == ["cli-task"]
    message = clash.clash_error(path)
    assert message is not None
    assert "cli-task" in message
    assert str(path) in message
    assert _rows(engine)["cli-task"].kwargs == {"command": "true", "interval": 60}
    assert _rows(engine)["gone"].paused  # removed again by this version of the file


def test_an_invalid_file_applies_nothing(engine: Engine, tmp_path: Path) -> None:
    """A file with one bad task changes no task at all, not even the valid ones."""
    path = tmp_path / "tasks.toml"
    path.write_text(V1)
    sync_task_file(engine, path)
    before = _rows(engine)
    path.write_text(V2 + '\n[tasks.bad]\ncommand = "true"\nevery = 60\ncolour = 1\n')
    with pytest.raises(TaskFileError, match="key 'colour'"):
        sync_task_file(engine, path)
    after = _rows(engine)
    assert sorted(after) == sorted(before)
    assert all(after[n].version == before[n].version for n in before)


def test_apply_is_one_transaction(engine: Engine) -> None:
    """apply_tasks of an empty set pauses every file task and nothing else."""
    control.add_task(
        engine,
        definitions.definition_from_class(
            "cli-task", "nanobot.cron.command:CommandTask", 60, {"command": "true"}
        ),
    )
    result = apply_tasks(engine, parse_task_file(V1, FILE))
    assert len(result.created) == 3
    emptied = apply_tasks(engine, {})
    assert sorted(emptied.removed) == ["change", "gone", "keep"]
    assert not _rows(engine)["cli-task"].paused


def test_revision_0005_upgrades_a_database_with_rows(db_url: str) -> None:
    """A database at the revision before 0005 holding a task and a run keeps both; the task is
    marked 'cli'."""
    previous = ScriptDirectory.from_config(alembic_config()).get_revision("0005").down_revision
    assert isinstance(previous, str)
    engine = create_db_engine(db_url)
    try:
        upgrade_database(engine, previous)
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(
                text(
                    "insert into tasks (name, task_class, interval_s, kwargs, misfire_policy,"
                    " paused, consecutive_failures, version, created_at, updated_at)"
                    " values ('old', 'x:Y', 60, '{}', 'catch_up_once', false, 0, 1, :n, :n)"
                ),
                {"n": now.replace(tzinfo=None) if engine.dialect.name == "sqlite" else now},
            )
            conn.execute(
                text(
                    "insert into task_runs (task_name, scheduled_at, outcome, slots, manual)"
                    " values ('old', :n, 'success', 1, false)"
                ),
                {"n": now.replace(tzinfo=None) if engine.dialect.name == "sqlite" else now},
            )
        upgrade_database(engine, "0005")
        with engine.connect() as conn:
            task = conn.execute(text("select source, pause_reason from tasks")).one()
            run = conn.execute(text("select outcome, output from task_runs")).one()
            assert conn.execute(text("select count(*) from task_code")).scalar_one() == 0
        assert tuple(task) == ("cli", None)
        assert tuple(run) == ("success", None)
    finally:
        engine.dispose()


def test_calendar_schedules_from_the_file(engine: Engine, tmp_path: Path) -> None:
    """cron with tz, and at (a TOML date-time, read in tz), go through nanobot.cron.schedules;
    a one-shot already stored stays valid after its time; a new one in the past is refused."""
    path = tmp_path / "tasks.toml"
    path.write_text(
        '[tasks.digest]\ncommand = "true"\ncron = "0 9 * * 1-5"\ntz = "Europe/Berlin"\n'
        '[tasks.once]\ncommand = "true"\nat = 2099-12-24T17:30:00\ntz = "Europe/Berlin"\n'
    )
    tasks = read_task_file(path)
    assert tasks is not None
    digest = tasks["digest"].definition.the_schedule
    assert isinstance(digest, CronSchedule)
    assert (digest.expression, digest.timezone) == ("0 9 * * 1-5", "Europe/Berlin")
    once = tasks["once"].definition.the_schedule
    assert isinstance(once, AtSchedule)
    assert once.at.isoformat() == "2099-12-24T16:30:00+00:00"
    sync_task_file(engine, path)
    rows = _rows(engine)
    # A cron task's first run is its next fire time, not now.
    assert rows["digest"].next_run_at.astimezone(ZoneInfo("Europe/Berlin")).hour == 9
    assert rows["once"].next_run_at.isoformat() == "2099-12-24T16:30:00+00:00"

    # Its time passed (as if it ran): the same file still syncs, and changes nothing.
    with engine.begin() as conn:
        conn.execute(
            update(Task).where(Task.name == "once").values(run_at=utcnow() - timedelta(days=1))
        )
        conn.execute(
            update(TaskStateRecord)
            .where(TaskStateRecord.task_name == "once")
            .values(next_run_at=None)
        )
    again = sync_task_file(engine, path)
    assert again is not None

    path.write_text(
        path.read_text() + '[tasks.late]\ncommand = "true"\nat = 2001-01-01T00:00:00Z\n'
    )
    with pytest.raises(TaskFileError, match=r"task 'late': key 'at'.*past"):
        sync_task_file(engine, path)
    assert "late" not in _rows(engine)


def test_a_changed_schedule_kind_moves_the_next_run(engine: Engine, tmp_path: Path) -> None:
    """every -> cron: the next run becomes the cron schedule's first; the task is updated."""
    path = tmp_path / "tasks.toml"
    path.write_text('[tasks.t]\ncommand = "true"\nevery = 60\n')
    sync_task_file(engine, path)
    path.write_text('[tasks.t]\ncommand = "true"\ncron = "30 4 * * *"\n')
    result = sync_task_file(engine, path)
    assert result is not None
    assert result.updated == ["t"]
    row = _rows(engine)["t"]
    assert (row.schedule_kind, row.cron) == ("cron", "30 4 * * *")
    assert (row.next_run_at.hour, row.next_run_at.minute) == (4, 30)


def test_tasks_check_and_sync_commands(engine: Engine, nanobot_home: Path) -> None:
    """'tasks check' validates without applying; 'tasks sync' applies and says what changed;
    a bad file or a clash is one line and exit 2."""

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    nanobot_home.mkdir(parents=True, exist_ok=True)
    path = nanobot_home / "tasks.toml"
    missing = run("tasks", "check")
    assert missing.exit_code == 2
    assert "no task file" in missing.stderr
    path.write_text(V1)
    checked = run("tasks", "check")
    assert checked.exit_code == 0, checked.stderr
    assert "3 task(s), valid" in checked.stdout
    assert _rows(engine) == {}
    synced = run("tasks", "sync", "--json")
    assert synced.exit_code == 0, synced.stderr
    assert sorted(json.loads(synced.stdout)["created"]) == ["change", "gone", "keep"]
    again = run("tasks", "sync")
    assert again.exit_code == 0
    assert "3 unchanged" in again.stdout
    control.add_task(
        engine,
        definitions.definition_from_class(
            "mine", "nanobot.cron.command:CommandTask", 60, {"command": "true"}
        ),
    )
    path.write_text(V1 + '[tasks.mine]\ncommand = "false"\nevery = 5\n')
    clash = run("tasks", "sync")
    assert clash.exit_code == 2
    assert clash.stderr.count("\n") == 1
    assert "'mine'" in clash.stderr
    path.write_text(V1 + "[tasks.bad]\nevery = 5\n")
    bad = run("tasks", "sync")
    assert bad.exit_code == 2
    assert f"{path}: task 'bad': key 'task'" in bad.stderr
