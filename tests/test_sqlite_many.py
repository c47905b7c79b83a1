"""Rows handed to SQLite's driver as they are (nanobot.sqlite_many): the same text, the same rows.

A slot's time is its identity in ``task_runs``: the claims and outcomes written at the driver
level must hold exactly what SQLAlchemy's own statements write and read, on a real SQLite file.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, bindparam, create_engine, delete, select, text, update

from nanobot.cron import history
from nanobot.cron.history import Claim, Finish
from nanobot.db import create_db_engine, upgrade_database, write_transaction
from nanobot.models import TaskOutcome, TaskRun, UTCDateTime
from nanobot.sqlite_many import SqliteMany, sqlite_time

# What SQLAlchemy binds for a UTCDateTime on SQLite, as the driver received it.
_BOUND = text("SELECT :v").bindparams(bindparam("v", type_=UTCDateTime()))
_MEMORY = create_engine("sqlite://")

_ZONES = st.one_of(
    st.just(UTC),
    st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-23 * 60, 23 * 60)),
    st.sampled_from([ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")]),
)


@given(
    st.datetimes(
        min_value=datetime(1900, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=_ZONES,
    )
)
def test_sqlite_time_is_the_text_sqlalchemy_binds(value: datetime) -> None:
    with _MEMORY.connect() as conn:
        bound = conn.execute(_BOUND, {"v": value}).scalar_one()
    assert isinstance(bound, str)
    assert sqlite_time(value) == bound


def test_sqlite_time_refuses_a_naive_datetime_and_passes_none() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        sqlite_time(datetime(2026, 1, 1))
    assert sqlite_time(None) is None


def test_a_statement_without_the_named_parameter_is_refused(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'nanobot.db'}")
    upgrade_database(engine)
    many = SqliteMany(update(TaskRun).values(error="x"), ("b_id",))
    with write_transaction(engine) as conn, pytest.raises(ValueError, match="no parameter b_id"):
        many.execute(conn, [(1,)])


def test_a_statement_of_one_parameter_runs_once_per_row(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'nanobot.db'}")
    upgrade_database(engine)
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        ids = history.claim_slots(conn, [Claim(n, slot) for n in ("a", "b", "c")], node="n")
        gone = SqliteMany(delete(TaskRun).where(TaskRun.id == bindparam("b_id")), ("b_id",))
        gone.execute(conn, [(ids["a", slot],), (ids["c", slot],)])
    with engine.connect() as conn:
        assert list(conn.execute(select(TaskRun.task_name)).scalars()) == ["b"]


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'nanobot.db'}")
    upgrade_database(engine)
    return engine


def test_a_slot_claimed_at_the_driver_is_the_slot_sqlalchemy_records(
    sqlite_engine: Engine,
) -> None:
    """A claim (driver level) and an unrun row (SQLAlchemy) of one instant, given in two time
    zones, are one row; the claim reads back as the same instant."""
    slot = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    berlin = slot.astimezone(ZoneInfo("Europe/Berlin"))
    with write_transaction(sqlite_engine) as conn:
        claimed = history.claim_slots(conn, [Claim("t", berlin)], node="a")
        history.record_unrun(
            conn,
            [Finish("t", None, slot, TaskOutcome.MISSED, None, slot)],
        )
        again = history.claim_slots(conn, [Claim("t", slot)], node="b")
    assert list(claimed) == [("t", slot)]
    assert again == {}
    with sqlite_engine.connect() as conn:
        rows = conn.execute(select(TaskRun.id, TaskRun.scheduled_at, TaskRun.outcome)).all()
    assert [(r.id, r.scheduled_at, r.outcome) for r in rows] == [
        (claimed["t", slot], slot, "running")
    ]


def test_claims_beyond_one_statement_each_get_their_own_id(sqlite_engine: Engine) -> None:
    """More claims than one INSERT takes: every new slot's id is the id of its own row."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(sqlite_engine) as conn:
        history.claim_slots(conn, [Claim("t0007", base + timedelta(microseconds=1))], node="a")
    claims = [Claim(f"t{i:04d}", base + timedelta(microseconds=i % 3)) for i in range(1203)]
    with write_transaction(sqlite_engine) as conn:
        ids = history.claim_slots(conn, claims, node="b")
    assert len(ids) == 1202
    assert ("t0007", base + timedelta(microseconds=1)) not in ids
    with sqlite_engine.connect() as conn:
        stored = {
            (r.task_name, r.scheduled_at): r.id
            for r in conn.execute(select(TaskRun.id, TaskRun.task_name, TaskRun.scheduled_at))
        }
    assert all(stored[key] == run_id for key, run_id in ids.items())


def test_outcomes_written_at_the_driver_read_back_as_written(sqlite_engine: Engine) -> None:
    slot = datetime(2026, 1, 1, 9, tzinfo=UTC)
    with write_transaction(sqlite_engine) as conn:
        ids = history.claim_slots(conn, [Claim("a", slot), Claim("b", slot)], node="n")
    new_york = ZoneInfo("America/New_York")
    started = (slot + timedelta(milliseconds=3)).astimezone(new_york)
    finished = slot + timedelta(seconds=2, microseconds=7)
    fenced = history.write_finishes(
        sqlite_engine,
        [
            Finish("a", ids["a", slot], slot, TaskOutcome.SUCCESS, started, finished),
            Finish("b", ids["b", slot], slot, TaskOutcome.ERROR, started, finished, "boom"),
        ],
    )
    assert fenced == []
    with sqlite_engine.connect() as conn:
        rows = {
            r.task_name: r
            for r in conn.execute(
                select(TaskRun.__table__).where(TaskRun.scheduled_at == slot)
            ).all()
        }
    assert rows["a"].started_at == started
    assert rows["a"].finished_at == finished
    assert rows["a"].duration_s == pytest.approx((finished - started).total_seconds())
    assert (rows["a"].outcome, rows["a"].error) == ("success", None)
    assert (rows["b"].outcome, rows["b"].error) == ("error", "boom")
    # Written only over a running row: a second outcome of the same run is returned, not written.
    again = history.write_finishes(
        sqlite_engine,
        [Finish("a", ids["a", slot], slot, TaskOutcome.TIMEOUT, started, finished)],
    )
    assert [f.finish.outcome for f in again] == [TaskOutcome.TIMEOUT]
    with sqlite_engine.connect() as conn:
        outcome = conn.execute(
            select(TaskRun.outcome).where(TaskRun.id == ids["a", slot])
        ).scalar_one()
    assert outcome == "success"
