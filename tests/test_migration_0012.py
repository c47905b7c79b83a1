"""Revision 0012: the run state of each task in task_state, upgraded in place."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import inspect, text

from nanobot.cron import control
from nanobot.db import create_db_engine, downgrade_database, upgrade_database

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
STATE = ("next_run_at", "last_run_at", "last_outcome", "consecutive_failures")


def _bind(engine_dialect: str, t: datetime) -> datetime:
    # The text of UTCDateTime on SQLite (naive, UTC); aware elsewhere.
    return t.replace(tzinfo=None) if engine_dialect == "sqlite" else t


def test_upgrade_moves_the_run_state_and_keeps_it(db_url: str) -> None:
    """A database at 0011 holding tasks upgrades in place: each task gets its task_state row
    with the values it had, tasks loses the four columns; deleting a task deletes its state;
    the downgrade puts the values back into tasks."""
    engine = create_db_engine(db_url)
    try:
        upgrade_database(engine, "0011")
        d = engine.dialect.name
        with engine.begin() as conn:
            for name, nxt, last, outcome, failures in (
                ("ran", NOW + timedelta(minutes=1), NOW, "error", 3),
                ("new", None, None, None, 0),
            ):
                conn.execute(
                    text(
                        "INSERT INTO tasks (name, task_class, interval_s, schedule_kind, kwargs, "
                        "misfire_policy, paused, version, next_run_at, last_run_at, "
                        "last_outcome, consecutive_failures, source, created_at, updated_at) "
                        "VALUES (:n, 'cron_tasks:Counter', 60, 'interval', '{}', "
                        "'catch_up_once', false, 4, :nx, :l, :o, :f, 'cli', :t, :t)"
                    ),
                    {
                        "n": name,
                        "nx": nxt and _bind(d, nxt),
                        "l": last and _bind(d, last),
                        "o": outcome,
                        "f": failures,
                        "t": _bind(d, NOW),
                    },
                )
        upgrade_database(engine, "0012")
        columns = {c["name"] for c in inspect(engine).get_columns("tasks")}
        assert not set(STATE) & columns
        ran = control.get_task(engine, "ran")
        assert (ran.next_run_at, ran.last_run_at, ran.last_outcome) == (
            NOW + timedelta(minutes=1),
            NOW,
            "error",
        )
        assert (ran.consecutive_failures, ran.version) == (3, 4)
        new = control.get_task(engine, "new")
        assert (new.next_run_at, new.last_run_at, new.consecutive_failures) == (None, None, 0)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM task_state")).scalar() == 2
        control.remove_task(engine, "new")
        with engine.connect() as conn:
            names = conn.execute(text("SELECT task_name FROM task_state")).scalars().all()
        assert names == ["ran"]

        downgrade_database(engine, "0011")
        assert "task_state" not in inspect(engine).get_table_names()
        with engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM tasks WHERE name = 'ran'")).mappings().one()
        assert row["last_outcome"] == "error"
        assert row["consecutive_failures"] == 3
        assert row["next_run_at"] is not None
        upgrade_database(engine)
        assert control.get_task(engine, "ran").consecutive_failures == 3
    finally:
        engine.dispose()
