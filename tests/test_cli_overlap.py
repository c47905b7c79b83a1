"""The command line of overlap policies: cron add --overlap, cron run obeying it, --force."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select
from test_cli import APPEND, add, assert_one_line_error, invoke
from test_status import add_heartbeat

from nanobot.cron import control
from nanobot.cron.taskfile import parse_task_file
from nanobot.db import write_transaction
from nanobot.exceptions import TaskFileError
from nanobot.lease import SchedulerLease
from nanobot.models import Task, TaskRun, utcnow


def _service_up(engine: Engine) -> None:
    """The database as a running service leaves it: a fresh heartbeat and a held lease."""
    add_heartbeat(engine, "n1", utcnow())
    assert SchedulerLease(engine, "n1:1", 30).try_acquire()


def _run_in_flight(engine: Engine, name: str) -> None:
    at = utcnow() - timedelta(seconds=3)
    with write_transaction(engine) as conn:
        conn.execute(
            insert(TaskRun).values(
                task_name=name, scheduled_at=at, started_at=at, outcome="running", node="n1"
            )
        )


def _request(engine: Engine, name: str) -> tuple[object, bool]:
    with engine.connect() as conn:
        row = conn.execute(
            select(Task.run_requested_at, Task.run_forced).where(Task.name == name)
        ).one()
    return row.run_requested_at, bool(row.run_forced)


@pytest.mark.parametrize(
    ("extra", "overlap", "count"),
    [
        ([], "skip", 1),
        (["--overlap", "buffer_one"], "buffer_one", 1),
        (["--overlap", "cancel_previous"], "cancel_previous", 1),
        (["--overlap", "allow"], "allow", 2),
        (["--overlap", "allow", "--max-concurrent", "4"], "allow", 4),
    ],
)
def test_cron_add_stores_the_overlap(
    engine: Engine, tmp_path: Path, extra: list[str], overlap: str, count: int
) -> None:
    result = add("job", tmp_path, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    stored = json.loads(result.stdout)
    assert (stored["overlap"], stored["max_concurrent"]) == (overlap, count)
    listed = json.loads(invoke("cron", "list", "--json").stdout)[0]
    assert (listed["overlap"], listed["max_concurrent"]) == (overlap, count)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--max-concurrent", "3"], "max_concurrent applies to the overlap policy allow only"),
        (["--overlap", "skip", "--max-concurrent", "2"], "allow only"),
        (["--overlap", "allow", "--max-concurrent", "0"], "--max-concurrent"),
        (["--overlap", "sometimes"], "--overlap"),
    ],
)
def test_cron_add_refuses_contradictions(
    engine: Engine, tmp_path: Path, extra: list[str], fragment: str
) -> None:
    """One line, exit code 2, nothing stored."""
    assert_one_line_error(add("job", tmp_path, *extra), 2, fragment)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Task)).scalar_one() == 0


def test_cron_run_with_skip_and_a_run_in_flight_is_refused(engine: Engine, tmp_path: Path) -> None:
    """Under skip, with the service running a run of the task, cron run is refused (exit 1,
    nothing requested); --force requests a forced run."""
    assert add("job", tmp_path).exit_code == 0
    _service_up(engine)
    _run_in_flight(engine, "job")
    assert_one_line_error(
        invoke("cron", "run", "job"), 1, "1 run(s) in flight", "overlap policy is skip", "--force"
    )
    assert _request(engine, "job") == (None, False)
    forced = invoke("cron", "run", "job", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert "forced run requested (beside 1 run(s) in flight)" in forced.stdout
    requested, is_forced = _request(engine, "job")
    assert requested is not None
    assert is_forced


@pytest.mark.parametrize(
    ("overlap", "said"),
    [
        ("buffer_one", "it starts when that run ends"),
        ("cancel_previous", "the run in flight is cancelled first"),
        ("allow", "run requested:"),
    ],
)
def test_cron_run_says_what_the_policy_does(
    engine: Engine, tmp_path: Path, overlap: str, said: str
) -> None:
    assert add("job", tmp_path, "--overlap", overlap).exit_code == 0
    _service_up(engine)
    _run_in_flight(engine, "job")
    result = invoke("cron", "run", "job")
    assert result.exit_code == 0, result.stderr
    assert said in result.stdout
    assert _request(engine, "job")[1] is False


def test_cron_run_with_allow_at_its_maximum_is_refused(engine: Engine, tmp_path: Path) -> None:
    assert add("job", tmp_path, "--overlap", "allow", "--max-concurrent", "1").exit_code == 0
    _service_up(engine)
    _run_in_flight(engine, "job")
    assert_one_line_error(invoke("cron", "run", "job"), 1, "allow (at most 1 at once)")


def test_rows_left_running_without_a_service_do_not_refuse(engine: Engine, tmp_path: Path) -> None:
    """A row left running by a service that is not running is no run in flight (it is
    recorded interrupted at the next start): the run is requested."""
    assert add("job", tmp_path).exit_code == 0
    _run_in_flight(engine, "job")
    assert invoke("cron", "run", "job").exit_code == 0
    assert _request(engine, "job")[0] is not None


def test_task_file_overlap_keys(engine: Engine, nanobot_home: Path) -> None:
    """overlap and max_concurrent in tasks.toml are checked and stored; a contradiction names
    its key."""

    path = nanobot_home / "tasks.toml"
    parsed = parse_task_file(
        f'[tasks.a]\ntask = "{APPEND}"\nevery = "5m"\noverlap = "allow"\nmax_concurrent = 3\n',
        path,
    )
    assert parsed["a"].definition.overlap.max_concurrent == 3
    with pytest.raises(TaskFileError, match="max_concurrent") as info:
        parse_task_file(f'[tasks.a]\ntask = "{APPEND}"\nevery = "5m"\nmax_concurrent = 3\n', path)
    assert "\n" not in str(info.value)


def test_a_backfill_s_run_in_flight_does_not_refuse_cron_run(
    engine: Engine, tmp_path: Path
) -> None:
    """A run of a pending backfill does not count for the policy, as in the scheduler."""

    assert add("job", tmp_path).exit_code == 0
    _service_up(engine)
    at = utcnow() - timedelta(hours=1)
    control.set_backfill(engine, "job", at - timedelta(minutes=1), at + timedelta(minutes=1), 1)
    with write_transaction(engine) as conn:
        conn.execute(
            insert(TaskRun).values(
                task_name="job", scheduled_at=at, started_at=utcnow(), outcome="running"
            )
        )
    result = invoke("cron", "run", "job")
    assert result.exit_code == 0, result.stderr
    assert _request(engine, "job")[0] is not None
