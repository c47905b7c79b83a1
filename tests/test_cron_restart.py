"""Restarts of a real process: clean (SIGTERM) and kill -9, on a SQLite file and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Row, select

from nanobot.cron import control
from nanobot.db import create_db_engine
from nanobot.models import Task, TaskRun, apscheduler_jobs

TESTS = Path(__file__).parent
DEADLINE = 20.0

pytestmark = pytest.mark.slow


class Runner:
    """One cron_runner.py process on the test's database; its output goes to a file."""

    def __init__(self, spec: dict[str, Any], log: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
        env["NANOBOT_LOGGING__FORMAT"] = "json"
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(TESTS / "cron_runner.py"), json.dumps(spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            wait_until(self._ready)
        except BaseException:
            self.kill()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"runner exited: {self.log.read_text()[-2000:]}")
        return "ready" in self.log.read_text().splitlines()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=DEADLINE) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start runners; whatever still runs at the end of the test is killed."""
    started: list[Runner] = []

    def start(spec: dict[str, Any], name: str) -> Runner:
        runner = Runner(spec, tmp_path / f"{name}.log")
        started.append(runner)
        return runner

    yield start
    for runner in started:
        if runner.proc.poll() is None:
            runner.kill()


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    engine = create_db_engine(db_url)
    yield engine
    engine.dispose()


def wait_until(predicate: Any, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def runs(engine: Engine, task: str) -> Sequence[Row[Any]]:
    with engine.connect() as conn:
        return conn.execute(
            select(TaskRun.__table__)
            .where(TaskRun.task_name == task)
            .order_by(TaskRun.scheduled_at)
        ).all()


def next_run(engine: Engine, name: str) -> float | None:
    with engine.connect() as conn:
        return conn.execute(
            select(apscheduler_jobs.c.next_run_time).where(apscheduler_jobs.c.id == name)
        ).scalar_one_or_none()


def test_clean_restart_keeps_phase_and_catches_up_once(
    db: Engine, tmp_path: Path, spawn: Any
) -> None:
    """Stopped with SIGTERM and started again after missing slots, the task keeps its grid,
    runs the latest missed slot once, and records the others as missed."""
    spec = {"tick": ["AppendLine", {"interval": 0.5, "path": str(tmp_path / "ticks")}]}
    first = spawn(spec, "first")
    wait_until(lambda: len([r for r in runs(db, "tick") if r.outcome == "success"]) >= 2)
    first.stop()
    stored = next_run(db, "tick")
    assert stored is not None
    wait_until(lambda: time.time() > stored + 1.2, timeout=5)  # at least two slots pass

    second = spawn(spec, "second")
    try:
        wait_until(lambda: any(r.outcome == "missed" for r in runs(db, "tick")))
        wait_until(lambda: (next_run(db, "tick") or 0) > time.time())
    finally:
        second.stop()
    rows = runs(db, "tick")
    slots = [r.scheduled_at for r in rows]
    assert len(slots) == len(set(slots)), "no slot twice"
    anchor = rows[0].scheduled_at
    for row in rows:
        k = (row.scheduled_at - anchor).total_seconds() / 0.5
        assert k == pytest.approx(round(k), abs=1e-6), "the phase is kept across the restart"
    missed = [r for r in rows if r.outcome == "missed"]
    assert len(missed) == 1
    assert missed[0].slots >= 2
    assert missed[0].scheduled_at.timestamp() == pytest.approx(stored)
    lines = (tmp_path / "ticks").read_text().splitlines()
    assert len(lines) == len([r for r in rows if r.outcome == "success"])


def test_kill_9_marks_interrupted_and_keeps_schedule(
    db: Engine, tmp_path: Path, spawn: Any
) -> None:
    """kill -9 during a run: at the next start the run is recorded interrupted, and the task
    keeps its persisted next run time."""
    marker = tmp_path / "started"
    spec = {"long": ["Sleeper", {"interval": 3600, "seconds": 60, "path": str(marker)}]}
    first = spawn(spec, "first")
    wait_until(marker.exists)
    before = next_run(db, "long")
    first.kill()
    assert [r.outcome for r in runs(db, "long")] == ["running"]

    second = spawn(spec, "second")
    try:
        wait_until(lambda: runs(db, "long")[0].outcome == "interrupted")
        assert next_run(db, "long") == before
        with db.connect() as conn:
            row = conn.execute(control.TASK_ROWS.where(Task.name == "long")).one()
        assert row.last_outcome == "interrupted"
        assert row.next_run_at == datetime.fromtimestamp(before or 0, UTC)
    finally:
        second.stop()
