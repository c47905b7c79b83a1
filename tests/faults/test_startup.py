"""Faults at start: unusable paths (issue items 18, 11), a second service as the same node
(item 9), a port in use (item 19), a schema newer than the code (item 13), a command group
without its subcommand (item 20).

Each start is a real ``python -m nanobot`` process, as an operator (or systemd) runs it: the
exit code and standard error are what is checked, never a traceback.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from faults.harness import ServiceProcess, log_events, run_nanobot, tmpfs


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``nanobot: error:`` line of stderr (JSON log lines aside); no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("nanobot: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("setting", "make", "code", "fragment"),
    [
        # The configuration file is looked for in the home first: its reader says it.
        ("NANOBOT_HOME", "file", 2, "Not a directory"),
        ("NANOBOT_HOME", "under_file", 2, "Not a directory"),
        ("NANOBOT_HOME", "proc", 2, "cannot be created"),
        ("NANOBOT_LOGGING__DIR", "under_file", 2, "cannot be created"),
        ("NANOBOT_LOGGING__DIR", "file", 2, "is not a folder"),
        ("NANOBOT_DATABASE__URL", "under_file", 3, "cannot be created"),
        ("NANOBOT_DATABASE__URL", "folder", 3, "is not a file"),
    ],
)
def test_unusable_path_is_one_line_naming_it_with_the_documented_code(
    tmp_path: Path, setting: str, make: str, code: int, fragment: str
) -> None:
    """A home, log folder or database path that cannot be used: one line that names the path
    and the problem, exit 2 (a folder of the configuration) or 3 (the database)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = {
        "file": blocker,
        "under_file": blocker / "sub" / "dir",
        "proc": Path("/proc/nanobot-no-such/home"),
        "folder": tmp_path / "a-folder",
    }[make]
    if make == "folder":
        target.mkdir()
    env = {"NANOBOT_HOME": str(tmp_path / "home"), "NANOBOT_HTTP__ENABLED": "false"}
    if setting == "NANOBOT_DATABASE__URL":
        path = target / "nanobot.db" if make == "under_file" else target
        env[setting] = f"sqlite:///{path}"
    else:
        env[setting] = str(target)
    result = run_nanobot("run", env=env, timeout=60)
    line = one_line_error(result)
    assert result.returncode == code, result.stderr
    assert fragment in line
    assert str(target) in line or str(target.parent) in line


def test_read_only_database_fails_fast_with_exit_3(tmp_path: Path) -> None:
    """A database on a read-only file system: the start ends at once with one line and exit 3
    (it used to sit as a standby forever, retrying every period)."""
    with tmpfs(tmp_path / "ro", "8m") as mount:
        url = f"sqlite:///{mount / 'nanobot.db'}"
        env = {"NANOBOT_HOME": str(tmp_path / "home"), "NANOBOT_DATABASE__URL": url}
        created = run_nanobot("db", "upgrade", env=env)
        assert created.returncode == 0, created.stderr
        remount = subprocess.run(
            ["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True, timeout=10
        )
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
        result = run_nanobot("run", env=env | {"NANOBOT_HTTP__ENABLED": "false"}, timeout=60)
    line = one_line_error(result)
    assert result.returncode == 3, result.stderr
    assert "read-only" in line
    assert str(tmp_path / "ro") in line


def test_second_service_on_the_same_home_is_refused_in_one_line(
    tmp_path: Path, db_url: str
) -> None:
    """Two services from one NANOBOT_HOME (ports of their own) would share one node name: the
    second is refused with one line naming the home and the first one's pid, exit 1; the
    first goes on leading."""
    home = tmp_path / "home"
    first = ServiceProcess(home=home, logs=tmp_path, env={"NANOBOT_DATABASE__URL": db_url})
    try:
        first.start()
        assert first.wait_up()["role"] == "leader"
        result = run_nanobot(
            "run",
            env={
                "NANOBOT_HOME": str(home),
                "NANOBOT_DATABASE__URL": db_url,
                "NANOBOT_HTTP__PORT": str(ServiceProcess(home=home, logs=tmp_path).port),
                "NANOBOT_LOGGING__FORMAT": "json",
            },
            timeout=60,
        )
        line = one_line_error(result)
        assert result.returncode == 1
        assert "another service already runs as node" in line
        assert str(home) in line
        assert f"pid {first.pid}" in line
        assert first.role() == "leader"
    finally:
        first.close()


def test_port_in_use_exit_code_and_logged_exit_code_agree(tmp_path: Path) -> None:
    """A second service on a taken port exits 1, and its last log line says exit_code 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "service.log"
        result = run_nanobot(
            "run",
            env={
                "NANOBOT_HOME": str(tmp_path / "home"),
                "NANOBOT_HTTP__PORT": str(port),
                "NANOBOT_LOGGING__FORMAT": "json",
            },
            timeout=60,
        )
    log.write_text(result.stderr)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"nanobot: error: cannot listen on 127.0.0.1:{port}: Address already in use"
        " (set http.port, or http.enabled = false)"
    )
    (bind_failed,) = log_events(log, "service.http_bind_failed")
    assert bind_failed["port"] == port
    (stopped,) = log_events(log, "service.stopped")
    assert stopped["exit_code"] == 1


def test_db_current_on_a_newer_schema_says_so_and_exits_3(tmp_path: Path) -> None:
    """``db current`` on a database migrated by a newer nanobot: it says the database is newer
    than this nanobot and exits 3 (it said 'behind: run nanobot db upgrade' and exited 0)."""
    db = tmp_path / "nanobot.db"
    env = {"NANOBOT_HOME": str(tmp_path / "home"), "NANOBOT_DATABASE__URL": f"sqlite:///{db}"}
    assert run_nanobot("db", "upgrade", env=env).returncode == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00dfacecafe'")
    for args in (["db", "current"], ["db", "current", "--json"]):
        result = run_nanobot(*args, env=env)
        line = one_line_error(result)
        assert result.returncode == 3
        assert "newer than this nanobot" in line
        assert "f00dfacecafe" in line
        assert "behind" not in result.stdout


@pytest.mark.parametrize("group", ["cron", "heartbeat", "db"])
def test_a_group_without_subcommand_prints_its_help(tmp_path: Path, group: str) -> None:
    """``nanobot cron`` (heartbeat, db) alone prints the group's help as written, several lines
    with its commands, not one squeezed error line; exit 2 as click's own."""
    result = run_nanobot(group, env={"NANOBOT_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert "nanobot: error:" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"Usage: nanobot {group} ")
    assert "Commands:" in lines
    assert len(lines) > 5
    json.dumps(lines)  # plain text
