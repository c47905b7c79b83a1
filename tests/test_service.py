"""End to end: the real service as a subprocess on a temporary NANOBOT_HOME.

Each test starts ``python -m nanobot`` with a 1 s heartbeat, a 0.2 s scheduler poll and a 3 s
lease, waits for ``/healthz`` with a deadline, and kills what it started in ``finally``. The
command line runs in this process (click's runner) against the same database.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from faults.harness import (
    ServiceProcess,
    add_append,
    http,
    lines,
    log_events,
    run_cli,
    run_nanobot,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

Service = ServiceProcess


def history(name: str) -> list[dict[str, Any]]:
    code, runs = run_cli("cron", "history", name, "--limit", "100", "--json")
    assert code == 0, runs
    assert isinstance(runs, list)
    return runs


def test_status_and_every_endpoint_while_running_then_after_stop(
    services: Callable[..., Service],
) -> None:
    """Running: status healthy (exit 0) and the endpoints answer; stopped: down (exit 2)."""
    service = services()
    assert service.wait_healthy()["role"] == "leader"

    def healthy() -> dict[str, Any] | None:
        code, data = run_cli("status", "--json")
        return data if code == 0 else None

    data = wait_for("status healthy", healthy)
    assert data["status"] == "healthy"
    assert data["service"]["running"] is True
    assert data["service"]["leader"]["holder"].endswith(f":{service.pid}")
    assert {c["name"] for c in data["components"]} >= {"database", "cron", "bus"}
    assert {t["name"] for t in data["tasks"]} == {"cleanup", "heartbeat"}

    status, body = http(service.base + "/readyz")
    assert status == 200
    status, body = http(service.base + "/status")
    assert status == 200
    assert {"status", "service", "components", "tasks"} <= set(json.loads(body))
    status, body = http(service.base + "/metrics")
    assert status == 200
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {
        "nanobot_task_runs", "nanobot_task_duration_seconds", "nanobot_component_up",
        "nanobot_task_next_run_timestamp_seconds", "nanobot_heartbeat_timestamp_seconds",
        "nanobot_task_last_success_timestamp_seconds", "nanobot_build_info", "nanobot_leader",
    } <= families  # fmt: skip
    assert http(service.base + "/nope")[0] == 404
    assert http(service.base + "/healthz", method="POST")[0] == 405
    assert http(service.base + "/metrics", method="DELETE")[0] == 405
    assert service.health() is not None, "the service survives whatever a client sends"

    stopping_at = time.time()
    assert service.stop() == 0
    code, data = run_cli("status", "--json")
    assert code == 2
    assert data["service"]["running"] is False
    assert data["status"] == "error"
    last = datetime.fromisoformat(data["service"]["last_heartbeat"]).timestamp()
    assert last >= stopping_at - 0.5, "a last heartbeat is recorded at stop"
    log = service.output(tail=10**7)
    assert '"service.starting"' in log
    assert "nanobot.db" in log
    assert "nanobot.log" in log


def test_command_line_changes_apply_within_two_seconds(
    services: Callable[..., Service], tmp_path: Path
) -> None:
    """add, run, pause, resume and remove take effect in the running service within 2 s."""
    service = services()
    service.wait_healthy()
    out = tmp_path / "job.txt"
    add_append("job", out, 60)
    t0 = time.monotonic()
    wait_for("first run of an added task", lambda: lines(out), timeout=10.0)
    assert time.monotonic() - t0 < 2.0, "the added task ran, but later than 2 s after the command"

    assert run_cli("cron", "run", "job")[0] == 0
    wait_for("the requested run", lambda: len(lines(out)) >= 2, timeout=2.0)

    code, task = run_cli("cron", "pause", "job", "--json")
    assert code == 0
    assert task["next_run_at"] is None
    assert run_cli("cron", "remove", "job")[0] == 0
    add_append("fast", tmp_path / "fast.txt", 0.5)
    wait_for("a fast task runs", lambda: len(lines(tmp_path / "fast.txt")) >= 2, timeout=3.0)
    assert run_cli("cron", "pause", "fast")[0] == 0
    time.sleep(0.5)  # let a run dispatched just before the pause finish
    paused_count = len(lines(tmp_path / "fast.txt"))
    time.sleep(1.5)  # a paused task must stay quiet: nothing to wait for but time
    assert len(lines(tmp_path / "fast.txt")) == paused_count
    assert run_cli("cron", "resume", "fast")[0] == 0
    wait_for("the resumed task runs", lambda: len(lines(tmp_path / "fast.txt")) > paused_count, 2.0)
    assert service.stop() == 0


def test_sigterm_with_a_run_in_flight_cancels_it_after_the_grace(
    services: Callable[..., Service], tmp_path: Path
) -> None:
    """SIGTERM: no new runs, grace for the run in flight, then cancelled and recorded; exit 0."""
    service = services(NANOBOT_SERVICE__SHUTDOWN_GRACE="1")
    service.wait_healthy()
    out = tmp_path / "slow.txt"
    code, _ = run_cli(
        "cron", "add", "slow", "--task", "e2e_tasks:SlowTask", "--interval", "60",
        "--kwargs", json.dumps({"path": str(out), "seconds": 30}),
    )  # fmt: skip
    assert code == 0
    wait_for("the slow run starts", lambda: lines(out, "start"), timeout=3.0)
    t0 = time.monotonic()
    assert service.stop() == 0
    assert time.monotonic() - t0 < 6, "the grace is 1 s"
    assert lines(out, "cancelled")
    assert not lines(out, "end")
    runs = history("slow")
    assert runs[0]["outcome"] == "cancelled"
    assert runs[0]["finished_at"] is not None


def test_kill_9_and_restart_loses_nothing_and_catches_up_once(
    services: Callable[..., Service], tmp_path: Path
) -> None:
    """After kill -9 and a restart, the run left running is interrupted, the missed slots are
    caught up by one run, and the task keeps its schedule."""
    first = services()
    first.wait_healthy()
    out = tmp_path / "tick.txt"
    add_append("tick", out, 1)
    wait_for("two runs", lambda: len(lines(out)) >= 2, timeout=4.0)
    first.stop(signal.SIGKILL)
    time.sleep(3.5)  # the downtime itself: slots pass while nothing runs
    before = len(lines(out))
    second = services()
    second.wait_role("leader", timeout=15.0)
    wait_for("a catch-up run", lambda: len(lines(out)) > before, timeout=3.0)
    runs = history("tick")
    missed = [r for r in runs if r["outcome"] == "missed"]
    assert missed, "the slots that passed during the downtime are recorded as missed"
    slots = [r["scheduled_at"] for r in runs]
    assert len(slots) == len(set(slots)), "no slot was recorded twice"
    pids = {row[2] for row in lines(out)}
    assert pids == {str(first.pid), str(second.pid)}
    _code, tasks = run_cli("cron", "list", "--json")
    assert [t["name"] for t in tasks if t["name"] == "tick"] == ["tick"]
    assert second.stop() == 0


def test_second_instance_stands_by_and_takes_over(
    services: Callable[..., Service], tmp_path: Path
) -> None:
    """A second service on the same database runs no task until the first stops; then it
    takes over within a lease poll, and no slot runs twice."""
    first = services()
    assert first.wait_healthy()["role"] == "leader"
    second = services(NANOBOT_SERVICE__NODE="second")
    assert second.wait_healthy()["role"] == "standby"
    out = tmp_path / "tick.txt"
    add_append("tick", out, 0.5)
    wait_for("runs", lambda: len(lines(out)) >= 3, timeout=4.0)
    assert {row[2] for row in lines(out)} == {str(first.pid)}
    _status, body = http(second.base + "/metrics")
    assert b'nanobot_leader{node="second"} 0.0' in body

    stopped_at = time.monotonic()
    assert first.stop() == 0
    wait_for(
        "the standby leads",
        lambda: (h := second.health()) is not None and h["role"] == "leader",
        timeout=5.0,
    )
    takeover = time.monotonic() - stopped_at
    count = len(lines(out))
    wait_for("runs by the new leader", lambda: len(lines(out)) > count + 1, timeout=4.0)
    assert str(second.pid) in {row[2] for row in lines(out)}
    runs = history("tick")
    slots = [r["scheduled_at"] for r in runs]
    assert len(slots) == len(set(slots))
    ran = [r for r in runs if r["outcome"] in ("success", "running")]
    assert len(lines(out)) >= len([r for r in ran if r["outcome"] == "success"])
    print(f"take-over after a clean stop: {takeover:.2f}s")
    assert second.stop() == 0


def test_a_second_signal_exits_at_once(services: Callable[..., Service], tmp_path: Path) -> None:
    """While the first signal waits for a run in flight, a second one exits immediately."""
    service = services(NANOBOT_SERVICE__SHUTDOWN_GRACE="30")
    service.wait_healthy()
    out = tmp_path / "slow.txt"
    code, _ = run_cli(
        "cron", "add", "slow", "--task", "e2e_tasks:SlowTask", "--interval", "60",
        "--kwargs", json.dumps({"path": str(out), "seconds": 30}),
    )  # fmt: skip
    assert code == 0
    wait_for("the slow run starts", lambda: lines(out, "start"), timeout=3.0)
    service.send(signal.SIGTERM)
    wait_for("the stop begins", lambda: '"service.stopping"' in service.output(10**7), 3.0)
    t0 = time.monotonic()
    assert service.stop(signal.SIGINT, timeout=5) == 1
    assert time.monotonic() - t0 < 2
    assert '"exit_now"' in service.output()


def test_a_token_file_that_cannot_be_read_stops_the_start_with_exit_2(
    nanobot_home: Path, tmp_path: Path
) -> None:
    """The dashboard's token file is read before the endpoint binds: a missing one is a bad
    configuration, one line naming it and exit 2, the same code in the log's last line."""
    missing = tmp_path / "no-such-tokens"
    result = run_nanobot(
        "run",
        env={"NANOBOT_HOME": str(nanobot_home), "NANOBOT_HTTP__TOKEN_FILE": str(missing)},
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("nanobot: error:")]
    assert errors == [f"nanobot: error: http.token_file {missing}: cannot be read: "
                      "No such file or directory"]  # fmt: skip
    stopped = log_events(nanobot_home / "logs" / "nanobot.log", "service.stopped")
    assert [e["exit_code"] for e in stopped] == [2]


def test_a_file_that_is_not_a_database_stops_the_start_with_exit_3(nanobot_home: Path) -> None:
    """Something else at the database's path (here text): one line naming the database and
    what is wrong, exit 3; the file is left as it was."""
    nanobot_home.mkdir(parents=True, exist_ok=True)
    database = nanobot_home / "nanobot.db"
    database.write_text("not a database, a page of notes " * 40)
    before = database.read_bytes()
    result = run_nanobot("run", env={"NANOBOT_HTTP__ENABLED": "false"})
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("nanobot: error:")]
    assert len(errors) == 1, result.stderr
    assert f"database sqlite:///{database} is not usable" in errors[0]
    assert "file is not a database" in errors[0]
    assert database.read_bytes() == before


def test_with_the_dashboard_off_the_probes_answer_and_the_pages_do_not(
    services: Callable[..., Service],
) -> None:
    """``http.dashboard = false`` keeps /healthz, /readyz, /status and /metrics, and serves no
    page or API."""
    service = services(NANOBOT_HTTP__DASHBOARD="false")
    assert service.wait_healthy()["role"] == "leader"
    for path in ("/healthz", "/readyz", "/status", "/metrics"):
        assert http(service.base + path)[0] == 200, path
    for path in ("/", "/tasks", "/api/tasks"):
        assert http(service.base + path)[0] == 404, path
    assert service.stop() == 0


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_read_only_postgresql_stops_the_start_with_exit_3(
    nanobot_home: Path, db_url: str
) -> None:
    """A database the service can read but not write (here every transaction read-only, as on
    a hot standby): one line saying it is read-only, exit 3, the same code logged; no
    traceback."""
    upgraded = run_nanobot("db", "upgrade", env={"NANOBOT_DATABASE__URL": db_url})
    assert upgraded.returncode == 0, upgraded.stderr
    read_only = db_url + "%20-cdefault_transaction_read_only%3Don"
    result = run_nanobot(
        "run",
        env={"NANOBOT_DATABASE__URL": read_only, "NANOBOT_HTTP__ENABLED": "false"},
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("nanobot: error:")]
    assert len(errors) == 1, result.stderr
    assert "is read-only" in errors[0]
    assert "read-only transaction" in errors[0]
    stopped = log_events(nanobot_home / "logs" / "nanobot.log", "service.stopped")
    assert [e["exit_code"] for e in stopped] == [3]
    assert not log_events(nanobot_home / "logs" / "nanobot.log", "service.crashed")
