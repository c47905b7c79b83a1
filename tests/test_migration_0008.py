"""Revision 0008: jobs' pickled states move to apscheduler_job_states, on both databases."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, inspect, text

from nanobot.cron.aps_adapter import NanobotScheduler
from nanobot.db import create_db_engine, downgrade_database, upgrade_database

ANCHOR = datetime(2026, 6, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def _state(job_id: str) -> bytes:
    return pickle.dumps(
        {
            "version": 1,
            "id": job_id,
            "func": "nanobot.cron._aps:run_stored_task",
            "trigger": IntervalTrigger(seconds=10, start_date=ANCHOR, timezone=UTC),
            "executor": "default",
            "args": ("cron_tasks:Counter", {"interval": 10, "label": job_id}),
            "kwargs": {},
            "name": job_id,
            "misfire_grace_time": None,
            "coalesce": True,
            "max_instances": 1,
            "next_run_time": ANCHOR,
        },
        pickle.HIGHEST_PROTOCOL,
    )


def _columns(engine: Engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def test_upgrade_moves_states_and_keeps_jobs(db_url: str) -> None:
    """A database at 0005 holding jobs upgrades in place: every job keeps its id, next run time
    and state (now in apscheduler_job_states) and loads; the downgrade puts the states back."""
    engine = create_db_engine(db_url)
    try:
        upgrade_database(engine, "0005")
        states = {name: _state(name) for name in ("a", "b")}
        with engine.begin() as conn:
            for name, state in states.items():
                conn.execute(
                    text(
                        "INSERT INTO apscheduler_jobs (id, next_run_time, job_state) "
                        "VALUES (:i, :t, :s)"
                    ),
                    {"i": name, "t": ANCHOR.timestamp() + (name == "b"), "s": state},
                )
        upgrade_database(engine, "0008")
        assert "job_state" not in _columns(engine, "apscheduler_jobs")
        with engine.connect() as conn:
            moved: dict[str, bytes] = dict(
                conn.execute(text("SELECT id, job_state FROM apscheduler_job_states")).all()
            )
            times: dict[str, float] = dict(
                conn.execute(text("SELECT id, next_run_time FROM apscheduler_jobs")).all()
            )
        assert {k: bytes(v) for k, v in moved.items()} == states
        assert times == {"a": ANCHOR.timestamp(), "b": ANCHOR.timestamp() + 1}

        scheduler = NanobotScheduler(
            engine, process=lambda *_: None, poll_interval=1, clock=lambda: ANCHOR
        )
        job = scheduler.lookup("b")
        assert job is not None
        assert job.next_run_at == datetime.fromtimestamp(ANCHOR.timestamp() + 1, UTC)
        assert scheduler.persistent_job_ids() == {"a", "b"}
        assert scheduler.remove("a")  # both halves go
        scheduler.close()

        downgrade_database(engine, "0005")
        assert "job_state" in _columns(engine, "apscheduler_jobs")
        with engine.connect() as conn:
            back: dict[str, bytes] = dict(
                conn.execute(text("SELECT id, job_state FROM apscheduler_jobs")).all()
            )
        assert {k: bytes(v) for k, v in back.items()} == {"b": states["b"]}
    finally:
        engine.dispose()
