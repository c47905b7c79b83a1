"""The command line without a running service: reads, changes, and every bad input refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, insert, select

from nanobot.cli import cli
from nanobot.db import write_transaction
from nanobot.lease import SchedulerLease
from nanobot.models import Component, Heartbeat, Task, TaskRun, utcnow

TESTS = Path(__file__).parent
REPO = TESTS.parent
APPEND = "e2e_tasks:AppendLine"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    """The command failed with ``code`` and said why in one line on stderr, no traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nanobot: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def task_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Task)).scalar_one())


def add(name: str, tmp_path: Path, *extra: str) -> Result:
    kwargs = json.dumps({"path": str(tmp_path / f"{name}.txt")})
    return invoke(
        "cron", "add", name, "--task", APPEND, "--interval", "5", "--kwargs", kwargs, *extra
    )


# --- state that cannot be read ---------------------------------------------------------------


def test_status_without_database_exits_3_and_creates_nothing(nanobot_home: Path) -> None:
    """No database yet: exit 3, one line, and no database file appears."""
    result = invoke("status")
    assert_one_line_error(result, 3, "no database", "db upgrade")
    assert not (nanobot_home / "nanobot.db").exists()
    for args in (["cron", "list"], ["heartbeat", "status"], ["db", "current"]):
        assert invoke(*args).exit_code == 3
    assert not (nanobot_home / "nanobot.db").exists()


def test_schema_behind_asks_for_upgrade(engine: Engine) -> None:
    """A database below the head revision is not migrated implicitly: exit 3, the way out."""
    assert invoke("db", "downgrade", "base").exit_code == 0
    result = invoke("status")
    assert_one_line_error(result, 3, "nanobot db upgrade")
    assert invoke("db", "upgrade").exit_code == 0
    assert invoke("status").exit_code == 2  # readable now: no service, so down


def test_unreachable_database_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBOT_DATABASE__URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert_one_line_error(invoke("status", "--json"), 3, "cannot read the database")


def test_malformed_config_file_exits_2(nanobot_home: Path) -> None:
    nanobot_home.mkdir(parents=True, exist_ok=True)
    (nanobot_home / "config.json").write_text("{not json", encoding="utf-8")
    for args in (["status"], ["cron", "list"], ["run"]):
        assert_one_line_error(invoke(*args), 2, "config.json", "not valid JSON")


def test_bad_environment_value_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBOT_HTTP__PORT", "seventy")
    assert_one_line_error(invoke("status"), 2, "NANOBOT_HTTP__PORT")


# --- db ----------------------------------------------------------------------------------------


def test_db_upgrade_current_downgrade(db_url: str) -> None:
    assert invoke("db", "upgrade").exit_code == 0
    result = invoke("db", "current", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["up_to_date"] is True
    assert data["current"] == data["head"]
    assert invoke("db", "downgrade", "base").exit_code == 0
    assert json.loads(invoke("db", "current", "--json").stdout)["current"] is None
    assert_one_line_error(invoke("db", "downgrade", "nonsense"), 2, "nonsense")


# --- status ------------------------------------------------------------------------------------


def test_status_json_of_a_stopped_service(engine: Engine, tmp_path: Path) -> None:
    """Readable state, no service: the documented keys, service down, exit code 2."""
    assert add("job", tmp_path).exit_code == 0
    result = invoke("status", "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert {"status", "service", "components", "tasks"} <= set(data)
    assert data["service"]["running"] is False
    assert data["service"]["last_heartbeat"] is None
    assert data["tasks"][0]["name"] == "job"
    table = invoke("status")
    assert table.exit_code == 2
    assert "DOWN" in table.stdout
    assert "job" in table.stdout


def test_heartbeat_status_json(engine: Engine) -> None:
    result = invoke("heartbeat", "status", "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["components"] == []
    assert "tasks" not in data
    assert "no component" in invoke("heartbeat", "status").stdout


# --- cron --------------------------------------------------------------------------------------


def test_cron_add_starts_the_task_at_once(engine: Engine, tmp_path: Path) -> None:
    """Added tasks have their first run now, then every interval."""
    before = utcnow()
    result = add("job", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["paused"] is False
    assert data["interval"] == 5
    next_run = data["next_run_at"]
    assert next_run.endswith("+00:00")
    assert abs(datetime.fromisoformat(next_run) - before) < timedelta(seconds=5)
    listed = json.loads(invoke("cron", "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["job"]
    assert {
        "name",
        "task",
        "interval",
        "paused",
        "next_run_at",
        "last_run_at",
        "last_outcome",
        "error",
    } <= set(listed[0])
    assert listed[0]["task"] == APPEND
    text = add("other", tmp_path)
    assert "not running" in text.stdout


def test_cron_add_paused_has_no_next_run_until_resumed(engine: Engine, tmp_path: Path) -> None:
    assert add("job", tmp_path, "--paused").exit_code == 0
    (task,) = json.loads(invoke("cron", "list", "--json").stdout)
    assert task["paused"] is True
    assert task["next_run_at"] is None
    resumed = json.loads(invoke("cron", "resume", "job", "--json").stdout)
    assert resumed["paused"] is False
    assert resumed["next_run_at"] is not None


def test_cron_pause_resume_run_remove(engine: Engine, tmp_path: Path) -> None:
    assert add("job", tmp_path).exit_code == 0
    paused = json.loads(invoke("cron", "pause", "job", "--json").stdout)
    assert (paused["paused"], paused["next_run_at"]) == (True, None)
    assert json.loads(invoke("cron", "resume", "job", "--json").stdout)["paused"] is False
    assert invoke("cron", "run", "job").exit_code == 0
    with engine.connect() as conn:
        requested = conn.execute(select(Task.run_requested_at)).scalar()
    assert requested is not None
    assert json.loads(invoke("cron", "remove", "job", "--json").stdout) == {"removed": "job"}
    assert task_count(engine) == 0


def test_cron_history_json(engine: Engine, tmp_path: Path) -> None:
    assert add("job", tmp_path).exit_code == 0
    now = utcnow()
    with write_transaction(engine) as conn:
        for i in range(5):
            at = now - timedelta(seconds=10 * (5 - i))
            conn.execute(
                insert(TaskRun).values(
                    task_name="job",
                    scheduled_at=at,
                    started_at=at,
                    finished_at=at + timedelta(seconds=1),
                    duration_s=1.0,
                    outcome="error" if i == 4 else "success",
                    error="boom" if i == 4 else None,
                    slots=1,
                    manual=False,
                    node="n",
                )
            )
    result = invoke("cron", "history", "job", "--limit", "3", "--json")
    assert result.exit_code == 0
    runs = json.loads(result.stdout)
    assert len(runs) == 3
    assert {"scheduled_at", "started_at", "finished_at", "duration", "outcome", "error"} <= set(
        runs[0]
    )
    assert (runs[0]["outcome"], runs[0]["error"]) == ("error", "boom")
    assert runs[0]["scheduled_at"].endswith("+00:00")
    assert "boom" in invoke("cron", "history", "job").stdout


BAD_ADDS: list[tuple[list[str], str]] = [
    (["--task", "no_such_module:Task", "--interval", "5"], "no_such_module"),
    (["--task", "e2e_tasks:Missing", "--interval", "5"], "Missing"),
    (["--task", "e2e_tasks:NotATask", "--interval", "5"], "NotATask"),
    (["--task", "e2e_tasks", "--interval", "5"], "pkg.module:Class"),
    (["--task", APPEND, "--interval", "0"], "positive number"),
    (["--task", APPEND, "--interval", "-3"], "positive number"),
    (["--task", APPEND, "--interval", "abc"], "positive number"),
    (["--task", APPEND, "--interval", "inf"], "positive number"),
    (["--task", APPEND, "--interval", "nan"], "positive number"),
    (["--task", APPEND, "--interval", "5", "--kwargs", "{bad"], "not valid JSON"),
    (["--task", APPEND, "--interval", "5", "--kwargs", "[1, 2]"], "JSON object"),
    (["--task", APPEND, "--interval", "5", "--kwargs", '{"nope": 1}'], "nope"),
    (["--interval", "5"], "--task"),
    (["--task", APPEND], "--interval"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_ADDS)
def test_cron_add_refuses_bad_input(engine: Engine, args: list[str], fragment: str) -> None:
    """Exit 2, one line naming the problem, and nothing stored."""
    assert_one_line_error(invoke("cron", "add", "job", *args), 2, fragment)
    assert task_count(engine) == 0


def test_cron_add_refuses_a_taken_name(engine: Engine, tmp_path: Path) -> None:
    assert add("job", tmp_path).exit_code == 0
    assert_one_line_error(add("job", tmp_path), 2, "exists already")
    assert task_count(engine) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["cron", "remove", "ghost"],
        ["cron", "pause", "ghost"],
        ["cron", "resume", "ghost"],
        ["cron", "run", "ghost"],
        ["cron", "history", "ghost"],
    ],
)
def test_unknown_task_exits_2(engine: Engine, args: list[str]) -> None:
    assert_one_line_error(invoke(*args), 2, "unknown task 'ghost'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["frobnicate"], "frobnicate"),
        (["cron", "history", "job", "--limit", "0"], "--limit"),
        (["status", "--bogus"], "--bogus"),
        (["cron", "add"], "NAME"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args: list[str], fragment: str) -> None:
    assert_one_line_error(invoke(*args), 2, fragment)


def _run_module(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_python_m_nanobot_and_nanobot_cli_accept_the_same_commands(
    nanobot_home: Path, engine: Engine
) -> None:
    """``python -m nanobot.cli`` is the seed's spelling of ``python -m nanobot``."""
    env: dict[str, Any] = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    outputs = []
    for module in ("nanobot", "nanobot.cli"):
        result = _run_module(module, "cron", "list", "--json", env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads(result.stdout))
        bad = _run_module(module, "cron", "pause", "ghost", env=env)
        assert bad.returncode == 2
        assert bad.stderr.strip() == "nanobot: error: unknown task 'ghost'"
        assert _run_module(module, "--version", env=env).returncode == 0
    assert outputs[0] == outputs[1] == []


def test_status_text_lists_every_node_and_the_leader(engine: Engine) -> None:
    """The readable status lists each node that beats, which one leads, and whether each is
    alive."""
    now = utcnow()
    with write_transaction(engine) as conn:
        for node, age in (("alpha", 1), ("beta", 1), ("gamma", 600)):
            conn.execute(
                insert(Component).values(
                    name="database",
                    node=node,
                    status="healthy",
                    last_heartbeat=now - timedelta(seconds=age),
                    registered_at=now,
                    updated_at=now,
                )
            )
            conn.execute(
                insert(Heartbeat).values(
                    at=now - timedelta(seconds=age),
                    node=node,
                    status="healthy",
                    interval_s=30.0,
                    total=0,
                    healthy=0,
                    error=0,
                    unknown=0,
                )
            )
    assert SchedulerLease(engine, "alpha:123", 30).try_acquire()
    text = invoke("status").stdout
    rows = {
        line.split()[0]: line.split()[1:3]
        for line in text.splitlines()
        if line[:5] in {"alpha", "beta ", "gamma"}
    }
    assert rows == {
        "alpha": ["leader", "yes"],
        "beta": ["standby", "yes"],
        "gamma": ["standby", "NO"],
    }
