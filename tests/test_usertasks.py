"""End to end: the user's task code, the task file and shell-command tasks on a real service.

Each test starts ``python -m nanobot`` as a subprocess on a temporary NANOBOT_HOME, without the
test's PYTHONPATH (the service finds task code only as a user's would: ``tasks.path``,
``tasks.modules``, entry points), and runs the command line as a subprocess too, so that it sees
what a user's shell sees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from nanobot.cli import cli

pytestmark = pytest.mark.slow

T = TypeVar("T")

BASE_ENV = {
    "NANOBOT_HEARTBEAT__INTERVAL": "1",
    "NANOBOT_CRON__POLL_INTERVAL": "0.2",
    "NANOBOT_SERVICE__LEASE_TTL": "3",
    "NANOBOT_SERVICE__SHUTDOWN_GRACE": "1",
    "NANOBOT_LOGGING__FORMAT": "json",
    "NANOBOT_HTTP__ENABLED": "false",
}

TASK_MODULE = '''
from pathlib import Path

from nanobot.cron import CronTask


class Mark(CronTask):
    """Appends a line per run to a file."""

    def __init__(self, interval: float = 60, path: str = "marks.txt", word: str = "run") -> None:
        super().__init__(interval)
        self.path = path
        self.word = word

    async def run(self) -> None:
        with Path(self.path).open("a") as out:
            out.write(self.word + "\\n")
'''


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOBOT_")}
    env.pop("PYTHONPATH", None)
    env |= BASE_ENV | (extra or {})
    env["NANOBOT_HOME"] = str(home)
    return env


class Service:
    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "service.out"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanobot"],
            env=_env(home, env),
            cwd=home,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_leading(self, cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
        def check() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited {self.proc.returncode}:\n{self.output()}")
            if '"event": "service.leader"' not in self.output():
                return False
            # Leading and beating: status counts the node as running.
            status = cli("status", "--json")
            return bool(status.stdout and json.loads(status.stdout)["service"]["running"])

        wait_for("the service to lead and beat", check)

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in started:
            service.kill()


@pytest.fixture
def nb(home: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The command line: reading commands in this process (the same NANOBOT_HOME, set by
    conftest), commands whose environment matters (adding, syncing) as a subprocess."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        if args[0] == "status" or args[:2] in (("cron", "list"), ("cron", "history")):
            assert env is None
            result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
            return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
        return subprocess.run(
            [sys.executable, "-m", "nanobot", *args],
            env=_env(home, env),
            cwd=home.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode in (0, 1, 2), result.stderr
    return json.loads(result.stdout)


def _config(home: Path, **tasks: Any) -> None:
    (home / "config.json").write_text(json.dumps({"tasks": tasks}))


def _history(nb: Callable[..., Any], name: str) -> list[dict[str, Any]]:
    result = nb("cron", "history", name, "--json")
    return json.loads(result.stdout) if result.returncode == 0 else []


def _finished(nb: Callable[..., Any], name: str, count: int = 1) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        runs = [r for r in _history(nb, name) if r["outcome"] != "running"]
        return runs if len(runs) >= count else None

    return wait_for(f"{count} finished run(s) of {name}", check)


def _tasks(nb: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in _json(nb("cron", "list", "--json"))}


# --- task code ---------------------------------------------------------------------------------


def test_module_from_the_setting_runs_and_status_tells_when_its_file_is_newer(
    home: Path, tmp_path: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """A module named in tasks.modules, found on tasks.path, runs a task from the task file;
    status lists it, and says a restart is due once its file on disk changes."""
    code = tmp_path / "code"
    code.mkdir()
    module = code / "ut_mark.py"
    module.write_text(TASK_MODULE)
    _config(home, path=[str(code)], modules=["ut_mark"])
    marks = tmp_path / "marks.txt"
    (home / "tasks.toml").write_text(
        f'[tasks.mark]\ntask = "ut_mark:Mark"\nevery = 3600\nkwargs = {{ path = "{marks}" }}\n'
    )
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)
    runs = _finished(nb, "mark")
    assert runs[0]["outcome"] == "success"
    assert marks.read_text() == "run\n"

    status = _json(nb("status", "--json"))
    modules = [c for c in status["code"] if c["kind"] == "module"]
    assert [(c["name"], c["error"], c["newer_on_disk"]) for c in modules] == [
        ("ut_mark", None, False)
    ]
    assert status["status"] == "healthy", status["problems"]
    assert "ut_mark" in nb("status").stdout

    later = module.stat().st_mtime + 5
    os.utime(module, (later, later))
    status = _json(nb("status", "--json"))
    assert [c["newer_on_disk"] for c in status["code"] if c["kind"] == "module"] == [True]
    assert status["status"] == "degraded"
    assert any("restart the service" in p for p in status["problems"])


def test_module_from_an_entry_point_is_loaded(
    home: Path, tmp_path: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """A distribution declaring the entry point group nanobot.tasks is imported at start."""
    site = tmp_path / "site"
    (site / "ut_plugin").mkdir(parents=True)
    (site / "ut_plugin" / "__init__.py").write_text("")
    (site / "ut_plugin" / "jobs.py").write_text(TASK_MODULE)
    dist = site / "ut_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ut-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nanobot.tasks]\nut = ut_plugin.jobs\n")
    # A folder of installed distributions, as site-packages is.
    _config(home, path=[str(site)])
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)
    marks = tmp_path / "marks.txt"
    added = nb(
        "cron", "add", "plugin", "--task", "ut_plugin.jobs:Mark", "--interval", "3600",
        "--kwargs", json.dumps({"path": str(marks)}),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert _finished(nb, "plugin")[0]["outcome"] == "success"
    status = _json(nb("status", "--json"))
    loaded = {c["name"]: c for c in status["code"] if c["kind"] == "module"}
    assert loaded["ut_plugin.jobs"]["error"] is None


def test_a_module_that_fails_to_import_stops_the_start(
    home: Path, tmp_path: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """Exit code 2 and one line naming the module and its error; with on_import_error =
    continue the service starts and status shows the failure."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "ut_broken.py").write_text("import no_such_dependency_xyz\n")
    _config(home, path=[str(code)], modules=["ut_broken"])
    service = Service(home)
    services.append(service)
    assert service.proc.wait(30) == 2
    errors = [line for line in service.output().splitlines() if line.startswith("nanobot: error")]
    assert len(errors) == 1
    assert "'ut_broken'" in errors[0]
    assert "No module named 'no_such_dependency_xyz'" in errors[0]

    _config(home, path=[str(code)], modules=["ut_broken"], on_import_error="continue")
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)

    def failed() -> dict[str, Any] | None:
        status = _json(nb("status", "--json"))
        modules = [c for c in status["code"] if c["kind"] == "module"]
        return status if modules else None

    status = wait_for("the module's record in status", failed)
    assert "no_such_dependency_xyz" in status["code"][0]["error"]
    assert any("ut_broken did not import" in p for p in status["problems"])


def test_cron_add_checks_the_class_as_the_service_sees_it(
    home: Path, tmp_path: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """A class found through tasks.path is accepted; one importable only through the shell's
    PYTHONPATH is stored but reported, because the running service cannot build it."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "ut_mark.py").write_text(TASK_MODULE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "ut_private.py").write_text(TASK_MODULE)
    _config(home, path=[str(code)])
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)
    marks = str(tmp_path / "marks.txt")
    good = nb(
        "cron", "add", "good", "--task", "ut_mark:Mark", "--interval", "3600",
        "--kwargs", json.dumps({"path": marks}),
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    bad = nb(
        "cron", "add", "bad", "--task", "ut_private:Mark", "--interval", "3600",
        env={"PYTHONPATH": str(elsewhere)},
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
    assert "the running service cannot build it" in bad.stderr
    assert "No module named 'ut_private'" in bad.stderr
    missing = nb("cron", "add", "missing", "--task", "ut_private:Mark", "--interval", "60")
    assert missing.returncode == 2
    assert "No module named 'ut_private'" in missing.stderr
    assert "missing" not in _tasks(nb)


# --- the task file ---------------------------------------------------------------------------


def test_the_service_syncs_the_task_file_when_it_changes(
    home: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """Changed, unchanged, removed, malformed (last good set kept) and a name clash, applied by
    the running service without a restart."""
    tasks_file = home / "tasks.toml"
    tasks_file.write_text(
        '[tasks.keep]\ncommand = ["true"]\nevery = 3600\n'
        '[tasks.change]\ncommand = ["true"]\nevery = 3600\n'
        '[tasks.gone]\ncommand = ["true"]\nevery = 3600\n'
    )
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)
    for name in ("keep", "change", "gone"):
        _finished(nb, name)
    assert nb("cron", "add", "mine", "--command", "true", "--interval", "3600").returncode == 0
    before = _tasks(nb)
    assert before["keep"]["source"] == "file"
    assert before["mine"]["source"] == "cli"

    tasks_file.write_text(
        '[tasks.keep]\ncommand = ["true"]\nevery = 3600\n'
        '[tasks.change]\ncommand = ["echo", "new"]\nevery = 3600\ntimeout = 30\n'
    )
    after = wait_for("the change applied", lambda: (t := _tasks(nb))["gone"]["paused"] and t)
    assert after["gone"]["pause_reason"] == "removed from tasks.toml"
    assert "paused: removed from tasks.toml" in nb("cron", "list").stdout
    assert len(_history(nb, "gone")) == 1
    assert after["keep"]["next_run_at"] == before["keep"]["next_run_at"]
    assert after["change"]["kwargs"]["command"] == ["echo", "new"]
    assert after["change"]["timeout"] == 30
    assert after["change"]["next_run_at"] == before["change"]["next_run_at"]
    assert after["mine"] == before["mine"]

    tasks_file.write_text(
        '[tasks.keep]\ncommand = ["true"]\nevery = 60\n'
        '[tasks.oops]\ncommand = ["true"]\nevery = 60\ncolour = "red"\n'
    )

    def file_error() -> str | None:
        status = _json(nb("status", "--json"))
        errors = [c["error"] for c in status["code"] if c["kind"] == "task_file"]
        return errors[0] if errors and errors[0] else None

    error = wait_for("the file's error in status", file_error)
    assert str(tasks_file) in error
    assert "task 'oops': key 'colour'" in error
    assert _tasks(nb)["keep"]["interval"] == 3600  # nothing of the bad file applied
    sync = nb("tasks", "sync")
    assert sync.returncode == 2
    assert "key 'colour'" in sync.stderr
    assert service.proc.poll() is None

    tasks_file.write_text(
        '[tasks.keep]\ncommand = ["true"]\nevery = 3600\n[tasks.mine]\ncommand = ["false"]\n'
        "every = 5\n"
    )
    error = wait_for(
        "the clash in status", lambda: e if (e := file_error()) and "'mine'" in e else None
    )
    assert "command line" in error
    assert _tasks(nb)["mine"] == before["mine"] | {
        "last_run_at": _tasks(nb)["mine"]["last_run_at"],
        "last_outcome": _tasks(nb)["mine"]["last_outcome"],
        "next_run_at": _tasks(nb)["mine"]["next_run_at"],
    }
    assert _tasks(nb)["mine"]["kwargs"]["command"] == "true"
    status = _json(nb("status", "--json"))
    assert any("'mine'" in p for p in status["problems"])


# --- shell commands ----------------------------------------------------------------------------


def _command_task(nb: Callable[..., Any], name: str, *args: str) -> None:
    result = nb("cron", "add", name, "--interval", "3600", *args)
    assert result.returncode == 0, result.stderr


def test_cron_add_notes_shell_syntax_in_a_command_run_without_a_shell(
    nb: Callable[..., Any],
) -> None:
    """'echo a; exit 3' without --shell would run echo and succeed: cron add says so, once."""
    assert nb("db", "upgrade").returncode == 0
    result = nb("cron", "add", "plain", "--command", "echo a; exit 3", "--every", "1h", "--paused")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("nanobot: note:")]
    assert len(notes) == 1
    assert "';'" in notes[0]
    assert "--shell" in notes[0]
    for name, args in (
        ("shelled", ("--shell", "--command", "echo a; exit 3")),
        ("argv", ("--command", "df -h /")),
        ("quoted", ("--command", "echo 'a;b'")),
    ):
        result = nb("cron", "add", name, *args, "--every", "1h", "--paused")
        assert result.returncode == 0, result.stderr
        assert "nanobot: note" not in result.stderr


def test_command_exit_codes_and_output_tail(
    home: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """0 is success; another code is error with the code and the output's tail, in history."""
    (home / "tasks.toml").write_text(
        '[tasks.ok]\ncommand = "echo all good"\nevery = 3600\n'
        '[tasks.env]\ncommand = \'echo "$GREETING"\'\nshell = true\nenv = { GREETING = "hi" }\n'
        "every = 3600\n"
    )
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)
    _command_task(
        nb, "bad", "--shell", "--command", "echo to-out; echo to-err >&2; exit 3",
    )  # fmt: skip
    ok = _finished(nb, "ok")[0]
    assert ok["outcome"] == "success"
    assert ok["output"] == "all good\n"
    bad = _finished(nb, "bad")[0]
    assert bad["outcome"] == "error"
    assert bad["error"] == "CommandFailed: exit code 3: to-err"
    assert bad["output"] == "to-out\nto-err\n"
    assert _finished(nb, "env")[0]["output"] == "hi\n"
    shown = nb("cron", "history", "bad")
    assert "exit code 3" in shown.stdout
    assert "to-out" in nb("cron", "history", "bad", "--output").stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_command_past_its_timeout_is_killed_with_its_group(
    home: Path, tmp_path: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """A child that traps SIGTERM is gone by timeout + grace; the run is recorded timeout."""
    pids = tmp_path / "pids"
    (home / "tasks.toml").write_text(
        textwrap.dedent(
            f"""
            [tasks.stubborn]
            command = "trap '' TERM; sleep 60 & echo $! > {pids}; wait"
            shell = true
            every = 3600
            timeout = 1
            kill_grace = 1
            """
        )
    )
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)
    run = _finished(nb, "stubborn")[0]
    assert run["outcome"] == "timeout"
    assert 1.0 <= run["duration"] < 1.0 + 1.0 + 1.5
    child = int(pids.read_text())
    wait_for("the trapping child gone", lambda: not _alive(child), timeout=3)
    # The same from the command line's --timeout.
    _command_task(nb, "slow", "--command", "sleep 30", "--timeout", "0.5")
    run = _finished(nb, "slow")[0]
    assert run["outcome"] == "timeout"
    assert run["duration"] < 0.5 + 1.5


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_ten_megabytes_of_output_keep_memory_flat(
    home: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """The service's peak memory grows by far less than the output; the tail is 64 KiB."""
    service = Service(home)
    services.append(service)
    service.wait_leading(nb)
    _command_task(nb, "warmup", "--command", "echo warm")
    _finished(nb, "warmup")
    before = _hwm_kib(service.proc.pid)
    script = "import sys\nfor _ in range(10): sys.stdout.write('x' * 1_000_000)\nprint('\\nEND')"
    _command_task(nb, "loud", "--command", f'{sys.executable} -c "{script}"')
    run = _finished(nb, "loud")[0]
    assert run["outcome"] == "success", run
    assert run["output"].endswith("END\n")
    assert run["output"].startswith("[... ")
    assert len(run["output"].encode()) < 64 * 1024 + 100
    grown = _hwm_kib(service.proc.pid) - before
    print(f"10 MB of output: the service's peak RSS grew by {grown} KiB")  # shown with -s
    assert grown < 4 * 1024, f"peak memory grew by {grown} KiB"


def test_shutdown_cancels_a_running_command(
    home: Path, tmp_path: Path, nb: Callable[..., Any], services: list[Service]
) -> None:
    """SIGTERM to the service: the command is cancelled like any run, and its process gone."""
    pids = tmp_path / "pids"
    (home / "tasks.toml").write_text(
        f'[tasks.long]\ncommand = "echo $$ > {pids}; exec sleep 60"\nshell = true\n'
        "kill_grace = 1\nevery = 3600\n"
    )
    service = Service(home, NANOBOT_SERVICE__SHUTDOWN_GRACE="0.5")
    services.append(service)
    service.wait_leading(nb)
    wait_for("the command started", lambda: pids.exists() and pids.read_text().strip())
    pid = int(pids.read_text())
    started = time.monotonic()
    assert service.stop() == 0
    # The service's grace, the command's kill grace, and the stop itself.
    assert time.monotonic() - started < 0.5 + 1 + 5
    assert not _alive(pid)
    run = _history(nb, "long")[0]
    assert run["outcome"] == "cancelled"
