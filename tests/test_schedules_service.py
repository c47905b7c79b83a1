"""One-shot tasks in the real service: killed before its time and restarted after it, it runs
once; on two PostgreSQL nodes, with the leader killed after the run, it runs once.

The one-shot's time is a few seconds ahead on the real clock: the service runs in its own
process, which has no injected clock. Every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from faults.harness import Cluster, ServiceProcess, lines, run_cli, runs_file, wait_for

pytestmark = pytest.mark.slow

postgres_only = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def cluster(db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Nodes on ``db_url``; whatever still runs is killed afterwards."""
    c = Cluster(tmp_path, db_url, NANOBOT_SERVICE__SHUTDOWN_GRACE="2")
    try:
        yield c
    finally:
        c.kill_all()


def history(name: str) -> list[dict[str, Any]]:
    code, runs = run_cli("cron", "history", name, "--limit", "100", "--json")
    assert code == 0, runs
    assert isinstance(runs, list)
    return runs


def add_once(name: str, path: Path, at: datetime) -> dict[str, Any]:
    code, out = run_cli(
        "cron", "add", name, "--task", "e2e_tasks:AppendLine",
        "--at", at.isoformat(), "--kwargs", json.dumps({"path": str(path)}), "--json",
    )  # fmt: skip
    assert code == 0, out
    assert isinstance(out, dict)
    return out


def wait_until(instant: datetime) -> None:
    """The time itself must pass (the service's clock is the real one)."""
    remaining = (instant - datetime.now(UTC)).total_seconds()
    assert remaining < 10, "the test's instant is too far ahead"
    if remaining > 0:
        time.sleep(remaining)


def test_one_shot_killed_before_its_time_runs_once_after_restart(
    services: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """kill -9 before a one-shot's time, restart after it: it runs once (one success row),
    is then done, and a further restart does not run it again."""
    first = services()
    first.wait_healthy()
    out = tmp_path / "once.txt"
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    add_once("once", out, at)
    # The running service has taken the task (it mirrors its next run) before it is killed.
    wait_for(
        "the service to schedule it",
        lambda: any(
            t["name"] == "once" and t["next_run_at"] for t in run_cli("cron", "list", "--json")[1]
        ),
        timeout=5,
    )
    first.stop(signal.SIGKILL)
    assert lines(out) == [], "killed before its time: it has not run"
    wait_until(at + timedelta(seconds=0.5))

    second = services()
    second.wait_healthy()
    wait_for("the one-shot's run", lambda: lines(out, "run"), timeout=10)
    runs = wait_for(
        "its success recorded",
        lambda: [r for r in history("once") if r["outcome"] == "success"],
        timeout=10,
    )
    assert [r["scheduled_at"] for r in runs] == [at.isoformat()]
    _code, tasks = run_cli("cron", "list", "--json")
    once = next(t for t in tasks if t["name"] == "once")
    assert once["next_run_at"] is None
    assert second.stop() == 0

    third = services()
    third.wait_healthy()
    # A few passes of the new scheduler (poll 0.2 s) must not run it: absence takes a wait.
    time.sleep(1.5)
    assert third.stop() == 0
    assert len(lines(out, "run")) == 1
    assert [r["outcome"] for r in history("once")] == ["success"]


@postgres_only
@pytest.mark.timeout(120)
def test_one_shot_on_two_postgres_nodes_runs_once(cluster: Cluster, tmp_path: Path) -> None:
    """Two nodes on one PostgreSQL database: the one-shot runs once, on the leader; after the
    leader is killed the other node leads and does not run it again."""
    nodes = cluster.start(2)
    leader = cluster.wait_leader(10)
    out = tmp_path / "once.txt"
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    add_once("once", out, at)
    wait_for("the run", lambda: runs_file(out), timeout=10)
    assert {pid for _, pid in runs_file(out)} == {leader.pid}
    wait_for(
        "its success recorded",
        lambda: [r for r in history("once") if r["outcome"] == "success"],
        timeout=10,
    )

    standby = next(n for n in nodes if n is not leader)
    leader.kill()
    cluster.wait_leader(15, among=[standby])
    # The new leader's scheduler applies every task at its start; give it a few passes.
    time.sleep(1.5)
    assert standby.stop() == 0
    assert len(runs_file(out)) == 1
    assert [r["outcome"] for r in history("once")] == ["success"]
