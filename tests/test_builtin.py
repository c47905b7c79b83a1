"""The built-in tasks: cleanup (sessions and history retention) and heartbeat (the cron beat)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, insert, select

from nanobot.config import reset_config
from nanobot.cron import (
    CleanupTask,
    HeartbeatTask,
    TaskOutcome,
    get_cron_manager,
    history,
    register_builtin_tasks,
)
from nanobot.db import write_transaction
from nanobot.heartbeat import get_heartbeat_monitor
from nanobot.models import Heartbeat, TaskRun, utcnow
from nanobot.session import SessionManager, get_session_manager


def _count(engine: Engine, model: type) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


async def test_cleanup_removes_expired_sessions_and_old_history(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CleanupTask deletes expired sessions, task runs past the per-task row limit and age,
    and heartbeats past their retention; recent rows stay."""
    monkeypatch.setenv("NANOBOT_CRON__HISTORY_MAX_ROWS", "3")
    reset_config()
    now = utcnow()
    # A session created two hours ago with a one-minute life, and a live one.
    SessionManager(engine, clock=lambda: now - timedelta(hours=2)).create(ttl=60)
    sessions = get_session_manager()
    sessions.create(ttl=3600)
    with write_transaction(engine) as conn:
        history.record_unrun(
            conn,
            [
                history.Finish(
                    task="t",
                    run_id=None,
                    scheduled_at=now - timedelta(minutes=i),
                    outcome=TaskOutcome.SUCCESS,
                    started_at=None,
                    finished_at=now,
                )
                for i in range(5)
            ],
        )
        for age in (timedelta(days=30), timedelta(minutes=1)):
            conn.execute(
                insert(Heartbeat).values(
                    at=now - age,
                    node="n",
                    status="healthy",
                    interval_s=30.0,
                    total=0,
                    healthy=0,
                    error=0,
                    unknown=0,
                )
            )
    await CleanupTask().run()
    assert sessions.count() == 1
    assert _count(engine, TaskRun) == 3
    assert _count(engine, Heartbeat) == 1


async def test_heartbeat_task_beats_the_cron_component(db_url: str) -> None:
    """HeartbeatTask beats `cron` from inside the scheduler: a component in error is healthy
    again after the task runs."""
    monitor = get_heartbeat_monitor()
    monitor.register_component("cron")
    monitor.mark_component_error("cron", "stuck")
    assert monitor.get_component_status("cron")["status"] == "error"
    await HeartbeatTask(5).run()
    assert monitor.get_component_status("cron")["status"] == "healthy"


def test_register_builtin_tasks_uses_configured_intervals(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """register_builtin_tasks registers `cleanup` and `heartbeat` with intervals from
    cron.cleanup_interval and heartbeat.interval."""
    monkeypatch.setenv("NANOBOT_CRON__CLEANUP_INTERVAL", "120")
    monkeypatch.setenv("NANOBOT_HEARTBEAT__INTERVAL", "7")
    reset_config()
    register_builtin_tasks()
    manager = get_cron_manager()
    assert manager.list_tasks()[:2] == ["cleanup", "heartbeat"]
    assert manager.get_task("cleanup").get_interval() == 120
    assert manager.get_task("heartbeat").get_interval() == 7
    assert isinstance(manager.get_task("cleanup"), CleanupTask)
