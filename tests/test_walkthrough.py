"""The README's walk-through, run as written: its shell blocks in bash, its Python file saved
where its first line says, ``nanobot`` started as the service, in a fresh HOME; then its
"Adding tasks from Python" script next to that service.

Only the environment differs from a user's: HOME is a temporary folder, the project's
environment is first on PATH (the README's ``. .venv/bin/activate``), and the service's HTTP
port is a free one so that the test never meets another nanobot.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _blocks() -> list[tuple[str, str]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Walk-through", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """Write a task, make it loadable, start the service, declare the task in tasks.toml and
    a command with cron add; both run, and history, status and the task's file show it. Then
    the README's Python example adds a task that the service, not the script, runs."""
    home = tmp_path / "user"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOBOT_", "PYTHON"))}
    env |= {
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "NANOBOT_HTTP__PORT": str(_free_port()),
    }
    blocks = _blocks()
    kinds = [kind for kind, _ in blocks]
    assert kinds == ["sh", "python", "sh", "sh", "sh", "sh", "sh"], kinds
    service: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "service.log").open("wb")
    try:
        for kind, body in blocks[:-1]:
            if kind == "python":
                first = body.splitlines()[0]
                assert first.startswith("# ~/"), first
                target = home / first.removeprefix("# ~/")
                target.write_text(body)
            elif body.strip() == "nanobot":
                service = subprocess.Popen(
                    ["bash", "-c", body],
                    cwd=home,
                    # At debug the service logs each run it finishes (a success is a debug
                    # line): how the Python example below tells the service's runs apart.
                    env=env | {"NANOBOT_LOGGING__LEVEL": "debug"},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                _wait_for_log(tmp_path / "service.log", '"tasks.module_loaded"', service)
                _wait_for_log(tmp_path / "service.log", '"service.leader"', service)
            else:
                done = subprocess.run(
                    ["bash", "-e", "-c", body],
                    cwd=home,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert done.returncode == 0, f"{body}\n{done.stdout}\n{done.stderr}"
        # Step 5 as written, until both tasks have run and the system is healthy.
        last = _until_ok(blocks[-1][1], home, env)
        assert re.search(r"hello at \d\d:\d\d:\d\d", last.stdout)
        assert last.stdout.count("success") >= 2
        assert "HEALTHY" in last.stdout
        assert re.search(r"module\s+hello\s+loaded", last.stdout)
        _python_example(home, env, tmp_path / "service.log")
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGTERM)
            service.wait(30)
        log.close()


def _python_example(home: Path, env: dict[str, str], service_log: Path) -> None:
    """The README's "Adding tasks from Python", run as written next to the running service:
    the script stores the task and exits; the service runs it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Adding tasks from Python", 1)[1].split("\n## ", 1)[0]
    (script,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert "~/nanobot-tasks/add_hourly.py" in section
    folder = home / "nanobot-tasks"
    (folder / "add_hourly.py").write_text(script)
    done = subprocess.run(
        [sys.executable, "add_hourly.py"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

    def ran() -> list[dict[str, object]] | None:
        history = subprocess.run(
            ["nanobot", "cron", "history", "hello-hourly", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        runs = json.loads(history.stdout) if history.returncode == 0 else []
        return [r for r in runs if r["outcome"] == "success"] or None

    deadline = time.monotonic() + 30
    while ran() is None:
        assert time.monotonic() < deadline, "the task never ran"
        time.sleep(0.5)
    # The service ran it (the script and the service share a node name: the log tells them
    # apart).
    finished = [
        json.loads(line)
        for line in service_log.read_text(errors="replace").splitlines()
        if '"task.finished"' in line and '"hello-hourly"' in line
    ]
    assert [e["outcome"] for e in finished][:1] == ["success"]
    status = subprocess.run(
        ["nanobot", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    data = json.loads(status.stdout)
    tasks = {t["name"]: t for t in data["tasks"]}
    assert tasks["hello-hourly"]["source"] == "code"


def _wait_for_log(path: Path, needle: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while needle not in path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"the service exited:\n{path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needle} in the service's log")
        time.sleep(0.1)


def _until_ok(body: str, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            ["bash", "-e", "-c", body], cwd=home, env=env, capture_output=True, text=True
        )
        if done.returncode == 0 and done.stdout.count("success") >= 2:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"step 5 never succeeded:\n{done.stdout}\n{done.stderr}")
        time.sleep(0.5)
