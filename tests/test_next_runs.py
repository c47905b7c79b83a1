"""The leader's index of next run times (nanobot/cron/next_runs.py) and the job store that keeps
it: every answer a pass reads from the index is the one the job table gives, after any sequence
of the store's writes, committed or rolled back."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.util import datetime_to_utc_timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from test_aps_adapter import _job

from nanobot.cron.aps_adapter import JobSpec, NanobotJobStore, NanobotScheduler
from nanobot.cron.next_runs import NextRuns
from nanobot.db import write_transaction
from nanobot.exceptions import JobTableChangedError
from nanobot.models import apscheduler_jobs

T0 = datetime(2026, 6, 1, 12, 0, 0, 250_000, tzinfo=UTC)
IDS = ["a", "b", "c", "d", "e"]


# --- the index alone --------------------------------------------------------------------------


def test_due_jobs_come_earliest_first_ties_included() -> None:
    """due() lists the jobs due by a time, earliest first, every job at that very time
    included; paused jobs (None) are never due; count_due() agrees; first() skips what it is
    told to."""
    index = NextRuns([("late", 30.0), ("x", 10.0), ("paused", None), ("y", 10.0), ("z", 20.0)])
    assert index.due(9.999) == []
    assert index.due(10.0) == ["x", "y"]
    assert index.due(25.0) == ["x", "y", "z"]
    assert index.count_due(25.0) == 3
    assert index.first() == 10.0
    assert index.first(skip={"x", "y"}) == 20.0
    assert NextRuns([("paused", None)]).first() is None
    assert len(index) == 5
    assert "paused" in index
    assert index.get("paused") is None


_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "discard"]),
        st.sampled_from(IDS),
        st.one_of(st.none(), st.integers(0, 4).map(float)),
    ),
    max_size=40,
)


@given(_ops)
def test_the_index_answers_as_a_plain_dict_would(ops: list[tuple[str, str, float | None]]) -> None:
    """After any sequence of set and discard, due, count_due and first answer what a scan of
    a plain dict of the same times answers."""
    index = NextRuns()
    model: dict[str, float | None] = {}
    for op, job_id, stamp in ops:
        if op == "set":
            index.set(job_id, stamp)
            model[job_id] = stamp
        else:
            index.discard(job_id)
            model.pop(job_id, None)
        timed = sorted((t, i) for i, t in model.items() if t is not None)
        for probe in (-1.0, 0.0, 1.5, 2.0, 4.0):
            assert index.due(probe) == [i for t, i in timed if t <= probe]
            assert index.count_due(probe) == sum(1 for t, _i in timed if t <= probe)
        assert index.first() == (timed[0][0] if timed else None)
        assert len(index) == len(model)


# --- the job store that keeps it ---------------------------------------------------------------


def _table(engine: Engine) -> dict[str, float | None]:
    with engine.connect() as conn:
        rows = conn.execute(select(apscheduler_jobs.c.id, apscheduler_jobs.c.next_run_time))
        return {row.id: row.next_run_time for row in rows}


def _assert_index_is_the_table(store: NanobotJobStore, engine: Engine) -> None:
    table = _table(engine)
    index = store.next_runs()
    assert len(index) == len(table)
    assert {job_id: index.get(job_id) for job_id in table} == table
    for seconds in (-1, 0, 2, 5):
        probe = T0 + timedelta(seconds=seconds)
        stamp = datetime_to_utc_timestamp(probe)
        assert store.ids_due_by(probe) == {
            i for i, t in table.items() if t is not None and t <= stamp
        }
        assert [job.id for job in store.get_due_jobs(probe)] == [
            i for t, i in sorted((t, i) for i, t in table.items() if t is not None and t <= stamp)
        ]
    timed = sorted(t for t in table.values() if t is not None)
    first, count = store.next_and_count(1.0)
    if not timed:
        assert (first, count) == (None, 0)
    else:
        assert first is not None
        assert datetime_to_utc_timestamp(first) == timed[0]
        assert count == sum(1 for t in timed if t <= timed[0] + 1.0)


class _RolledBack(Exception):
    pass


def _add(store: NanobotJobStore, jobs: list[Job]) -> None:
    for job in jobs:
        with contextlib.suppress(ConflictingIdError):
            store.add_job(job)


def _update(store: NanobotJobStore, jobs: list[Job]) -> None:
    for new in jobs:
        job = store.lookup_job(new.id)
        if job is not None:
            job.next_run_time = new.next_run_time
            store.update_job(job)


def _remove(store: NanobotJobStore, jobs: list[Job]) -> None:
    for job in jobs:
        with contextlib.suppress(JobLookupError):
            store.remove_job(job.id)


def _move(store: NanobotJobStore, jobs: list[Job], *, commit: bool) -> None:
    """A pass's move of ``jobs``, in a transaction that commits or rolls back."""
    existing = [job for job in jobs if job.id in _table(store.engine)]
    try:
        with write_transaction(store.engine) as conn:
            moves = store.update_jobs(conn, existing)
            if not commit:
                raise _RolledBack
    except _RolledBack:
        return
    store.moved(moves)


_WRITES: dict[str, Callable[[NanobotJobStore, list[Job]], None]] = {
    "add": _add,
    "update": _update,
    "remove": _remove,
    "move": lambda store, jobs: _move(store, jobs, commit=True),
    "move_rolled_back": lambda store, jobs: _move(store, jobs, commit=False),
    "insert": lambda store, jobs: store.insert_states([job.__getstate__() for job in jobs]),
    "forget": lambda store, _jobs: store.forget_next_runs(),
}

_store_ops = st.lists(
    st.tuples(
        st.sampled_from(sorted(_WRITES)),
        st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True),
        st.one_of(st.none(), st.integers(0, 4)),
    ),
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_store_ops)
def test_the_stores_index_is_its_table_after_any_writes(
    engine: Engine, ops: list[tuple[str, list[str], int | None]]
) -> None:
    """After any sequence of the store's writes (add, update, remove, a pass's move committed
    or rolled back, a batch insert, the index dropped), every answer the index gives is the
    table's, on SQLite and on PostgreSQL."""
    context = SimpleNamespace(timezone=UTC)
    store = NanobotJobStore(engine)
    store.start(context, "default")
    store.remove_all_jobs()
    for op, ids, seconds in ops:
        when = None if seconds is None else T0 + timedelta(seconds=seconds)
        _WRITES[op](store, [_job(context, job_id, when) for job_id in ids])
        _assert_index_is_the_table(store, engine)


def test_a_pass_that_failed_leaves_its_jobs_as_the_table_says(engine: Engine) -> None:
    """A pass whose transaction rolled back finds its job due at the same slot again; one whose
    transaction committed but that failed before advance_memory (a connection lost in COMMIT:
    the pass cannot know) finds it at its next slot, as the table says."""
    scheduler = NanobotScheduler(
        engine, process=lambda *_: None, poll_interval=1.0, clock=lambda: datetime.now(UTC)
    )
    try:
        scheduler.add_many([JobSpec("j", "cron_tasks:Counter", {}, 10.0, T0, T0)])
        assert [d.run_slot for d in scheduler.due(T0, T0, {})] == [T0]
        with contextlib.suppress(_RolledBack), write_transaction(engine) as conn:
            scheduler.advance_due(conn)
            raise _RolledBack
        assert [d.run_slot for d in scheduler.due(T0, T0, {})] == [T0]
        with write_transaction(engine) as conn:
            scheduler.advance_due(conn)
        # No advance_memory: the next pass reads the table again.
        later = T0 + timedelta(seconds=10)
        assert scheduler.due(T0, T0, {}) == []
        assert [d.run_slot for d in scheduler.due(later, later, {})] == [later]
        assert scheduler.next_wakeup(0.1) == (later, 1)
    finally:
        scheduler.close()


def test_job_rows_deleted_behind_the_scheduler_stop_their_jobs(engine: Engine) -> None:
    """Rows deleted from the job table by hand, while the scheduler holds their jobs: a job kept
    in memory from an earlier pass is not moved on without its row (the pass's transaction rolls
    back, and the next pass finds the table as it is); one never loaded leaves the index at once
    (else every pass would wake for it). Neither is claimed again; both are named for the
    control plane to apply their tasks again."""
    scheduler = NanobotScheduler(
        engine, process=lambda *_: None, poll_interval=1.0, clock=lambda: datetime.now(UTC)
    )
    later = T0 + timedelta(seconds=5)
    next_slot = T0 + timedelta(seconds=10)
    try:
        scheduler.add_many(
            [
                JobSpec("kept", "cron_tasks:Counter", {}, 10.0, T0, T0),
                JobSpec("never_loaded", "cron_tasks:Counter", {}, 10.0, later, later),
            ]
        )
        assert [d.name for d in scheduler.due(T0, T0, {})] == ["kept"]
        with write_transaction(engine) as conn:
            scheduler.advance_due(conn)
        scheduler.advance_memory()
        with engine.begin() as conn:
            conn.execute(apscheduler_jobs.delete())

        with structlog.testing.capture_logs() as logs:
            assert scheduler.due(later, later, {}) == []
        assert [e["tasks"] for e in logs if e["event"] == "cron.job_rows_missing"] == [
            ["never_loaded"]
        ]
        assert scheduler.next_wakeup(0.1) == (next_slot, 1)
        assert scheduler.take_lost() == ["never_loaded"]

        assert [d.name for d in scheduler.due(next_slot, next_slot, {})] == ["kept"]
        with pytest.raises(JobTableChangedError), write_transaction(engine) as conn:
            scheduler.advance_due(conn)
        assert scheduler.take_lost() == ["kept"]
        assert scheduler.due(next_slot, next_slot, {}) == []
        assert scheduler.next_wakeup(0.1) == (None, 0)
    finally:
        scheduler.close()
