"""Revision 0011: overlap policies, forced run requests and backfills, upgraded in place."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import inspect, text

from nanobot.cron import control
from nanobot.cron.overlap import DEFAULT
from nanobot.db import create_db_engine, downgrade_database, upgrade_database

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_upgrade_keeps_tasks_skipping_overlaps(db_url: str) -> None:
    """A database at 0010 holding a task upgrades in place: the task keeps today's behaviour
    (overlap skip, no forced request, no backfill pending); the downgrade drops the columns."""
    engine = create_db_engine(db_url)
    try:
        upgrade_database(engine, "0010")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tasks (name, task_class, interval_s, schedule_kind, kwargs, "
                    "misfire_policy, paused, version, consecutive_failures, source, created_at, "
                    "updated_at) VALUES ('old', 'cron_tasks:Counter', 60, 'interval', '{}', "
                    "'catch_up_once', false, 3, 0, 'cli', :t, :t)"
                ),
                {"t": NOW},
            )
        upgrade_database(engine, "0011")
        columns = {c["name"] for c in inspect(engine).get_columns("tasks")}
        assert {"overlap_policy", "max_concurrent", "run_forced", "backfill_from"} <= columns
        with engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM tasks WHERE name = 'old'")).mappings().one()
        assert row["overlap_policy"] is None
        assert not row["run_forced"]
        assert row["backfill_from"] is None
        assert row["version"] == 3
        upgrade_database(engine)
        assert control.get_task(engine, "old").overlap == DEFAULT
        downgrade_database(engine, "0010")
        columns = {c["name"] for c in inspect(engine).get_columns("tasks")}
        assert "overlap_policy" not in columns
        assert "backfill_to" not in columns
    finally:
        engine.dispose()
