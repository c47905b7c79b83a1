"""The APScheduler adapter (nanobot/cron/aps_adapter.py): nanobot's own scheduler class over
APScheduler's job stores, the only module of nanobot that imports APScheduler, and a stored
format that does not change with it."""

from __future__ import annotations

import ast
import asyncio
import itertools
import pickle
import pickletools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, select

import nanobot
from nanobot.cron.aps_adapter import (
    EPHEMERAL,
    PERSISTENT,
    RUN_STORED_TASK_REF,
    JobSpec,
    NanobotJobStore,
    NanobotScheduler,
    SchedulerState,
)
from nanobot.cron.schedules import AtSchedule, CronSchedule, IntervalSchedule
from nanobot.exceptions import UnknownTaskError
from nanobot.models import apscheduler_job_states, apscheduler_jobs

T0 = datetime(2026, 6, 1, 12, 0, 0, 250_000, tzinfo=UTC)
WAIT_S = 10.0


def _scheduler(engine: Engine, process: Any = None) -> NanobotScheduler:
    return NanobotScheduler(
        engine,
        process=process or (lambda *_: None),
        poll_interval=60.0,
        clock=lambda: datetime.now(UTC),
    )


# --- the boundary -----------------------------------------------------------------------------


def test_only_the_adapter_imports_apscheduler() -> None:
    """No module of the package but nanobot/cron/aps_adapter.py imports APScheduler."""
    package = Path(nanobot.__file__).parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name == "apscheduler" or name.startswith("apscheduler.") for name in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"cron/aps_adapter.py"}


def test_the_scheduler_is_not_an_apscheduler_scheduler() -> None:
    """NanobotScheduler inherits nothing, so none of APScheduler's scheduler API leaks out."""
    assert NanobotScheduler.__mro__ == (NanobotScheduler, object)
    for name in ("add_job", "modify_job", "get_jobs", "pause", "resume", "shutdown"):
        assert not hasattr(NanobotScheduler, name), name


# --- the stored format ------------------------------------------------------------------------


def _stored_state(engine: Engine, name: str) -> bytes:
    with engine.connect() as conn:
        return bytes(
            conn.execute(
                select(apscheduler_job_states.c.job_state).where(
                    apscheduler_job_states.c.id == name
                )
            ).scalar_one()
        )


def _pickled_strings(raw: bytes) -> list[str]:
    """The strings of a pickle, in order (a class is named by its module, then its name)."""
    return [arg for _, arg, _ in pickletools.genops(raw) if isinstance(arg, str)]


def test_stored_rows_keep_the_names_older_versions_wrote(engine: Engine) -> None:
    """Jobs written by add and add_many name the trampoline and the trigger class by the module
    path every earlier version wrote (nanobot.cron._aps), never the adapter's new one; they load
    back with the schedule they were given."""
    scheduler = _scheduler(engine)
    try:
        cron = CronSchedule(expression="30 2 * * *", timezone="America/New_York")
        once = AtSchedule(at=T0 + timedelta(days=1))
        scheduler.add(
            "cron",
            store=PERSISTENT,
            task_class="cron_tasks:Counter",
            kwargs={},
            interval=0.0,
            anchor=T0,
            next_run_at=T0,
            schedule=cron,
        )
        scheduler.add(
            "once",
            store=PERSISTENT,
            task_class="cron_tasks:Counter",
            kwargs={},
            interval=0.0,
            anchor=T0,
            next_run_at=once.at,
            schedule=once,
        )
        scheduler.add_many([JobSpec("every", "cron_tasks:Counter", {"n": 1}, 10.0, T0, T0)])
        assert RUN_STORED_TASK_REF == "nanobot.cron._aps:run_stored_task"
        for name in ("cron", "once", "every"):
            raw = _stored_state(engine, name)
            assert b"aps_adapter" not in raw
            assert pickle.loads(raw)["func"] == RUN_STORED_TASK_REF
        for name in ("cron", "once"):
            strings = _pickled_strings(_stored_state(engine, name))
            assert ("nanobot.cron._aps", "ScheduleTrigger") in itertools.pairwise(strings)
        assert isinstance(pickle.loads(_stored_state(engine, "every"))["trigger"], IntervalTrigger)
        jobs = scheduler.lookup_many(["cron", "once", "every"])
        assert jobs["cron"].schedule == cron
        assert jobs["once"].schedule == once
        assert jobs["every"].schedule == IntervalSchedule(seconds=10.0)
        assert (jobs["every"].anchor, jobs["every"].next_run_at) == (T0, T0)
    finally:
        scheduler.close()


# --- APScheduler's job-store contract on nanobot's store ---------------------------------------


def _job(context: Any, name: str, next_run: datetime | None) -> Job:
    return Job(
        context,
        id=name,
        name=name,
        func=RUN_STORED_TASK_REF,
        trigger=IntervalTrigger(seconds=10, start_date=T0, timezone=UTC),
        args=("cron_tasks:Counter", {}),
        kwargs={},
        executor="default",
        misfire_grace_time=None,
        coalesce=True,
        max_instances=1,
        next_run_time=next_run,
    )


def test_job_store_keeps_apschedulers_contract(engine: Engine) -> None:
    """NanobotJobStore answers as APScheduler's job stores do: lookups, due jobs in order of
    their next run, the earliest next run (paused jobs left out, listed last), conflicts and
    missing ids raised as APScheduler's errors, and removal of both halves of a job."""
    context = SimpleNamespace(timezone=UTC)
    store = NanobotJobStore(engine)
    store.start(context, "default")
    assert store.lookup_job("nothing") is None
    late, early = _job(context, "late", T0 + timedelta(hours=1)), _job(context, "early", T0)
    paused = _job(context, "paused", None)
    for job in (late, early, paused):
        store.add_job(job)
    with pytest.raises(ConflictingIdError):
        store.add_job(_job(context, "early", T0))

    early = store.lookup_job("early")
    assert early is not None
    assert early.next_run_time == T0
    assert [j.id for j in store.get_due_jobs(T0)] == ["early"]
    assert [j.id for j in store.get_due_jobs(T0 + timedelta(hours=2))] == ["early", "late"]
    assert store.get_next_run_time() == T0
    assert [j.id for j in store.get_all_jobs()] == ["early", "late", "paused"]

    early.next_run_time = T0 + timedelta(hours=2)
    store.update_job(early)
    assert store.get_next_run_time() == T0 + timedelta(hours=1)
    with pytest.raises(JobLookupError):
        store.update_job(_job(context, "gone", T0))

    store.remove_job("late")
    with pytest.raises(JobLookupError):
        store.remove_job("late")
    assert store.lookup_job("late") is None
    store.remove_all_jobs()
    assert store.get_all_jobs() == []
    with engine.connect() as conn:
        assert conn.execute(select(apscheduler_jobs.c.id)).all() == []
        assert conn.execute(select(apscheduler_job_states.c.id)).all() == []


def test_a_job_read_again_is_its_own_copy_and_follows_its_row(engine: Engine) -> None:
    """A job read again whose stored state is unchanged is a copy of the one read before: a
    change to one job read is not in the next one read, whose next run time is its row's; a
    job whose state was rewritten (new arguments) is read with it."""
    context = SimpleNamespace(timezone=UTC)
    store = NanobotJobStore(engine)
    store.start(context, "default")
    store.add_job(_job(context, "job", T0))
    first = store.get_due_jobs(T0)[0]
    first.next_run_time = T0 + timedelta(hours=3)
    first.name = "changed in memory"
    second = store.get_due_jobs(T0)[0]
    assert second is not first
    assert (second.name, second.next_run_time) == ("job", T0)
    assert second.args == ("cron_tasks:Counter", {})
    # A pass moves the job by its column alone (and, once committed, in the store's index):
    # read again, it is due at the new time.
    with engine.begin() as conn:
        moves = store.update_jobs(conn, [first])
    store.moved(moves)
    assert store.get_due_jobs(T0) == []
    assert store.get_due_jobs(T0 + timedelta(hours=3))[0].next_run_time == T0 + timedelta(hours=3)
    changed = store.lookup_job("job")
    assert changed is not None
    changed.args = ("cron_tasks:Counter", {"label": "new"})
    store.update_job(changed)
    assert store.get_due_jobs(T0 + timedelta(hours=3))[0].args[1] == {"label": "new"}


# --- the scheduler's operations ---------------------------------------------------------------


def test_change_or_remove_of_a_missing_job_changes_nothing(engine: Engine) -> None:
    """change() of a job that does not exist raises UnknownTaskError (a KeyError); remove()
    says False; the store is left as it was."""
    scheduler = _scheduler(engine)
    try:
        scheduler.add_many([JobSpec("j", "cron_tasks:Counter", {}, 10.0, T0, T0)])
        with pytest.raises(UnknownTaskError) as raised:
            scheduler.change("gone", store=PERSISTENT, next_run_at=None)
        assert isinstance(raised.value, KeyError)
        assert str(raised.value) == "unknown task 'gone'"
        assert scheduler.remove("gone") is False
        assert scheduler.persistent_job_ids() == {"j"}
        scheduler.change("j", store=PERSISTENT, next_run_at=None)
        job = scheduler.lookup("j")
        assert job is not None
        assert job.next_run_at is None
        assert scheduler.remove("j") is True
        assert scheduler.persistent_job_ids() == set()
    finally:
        scheduler.close()


def test_in_memory_jobs_move_after_their_pass(engine: Engine) -> None:
    """A job of this process only (the memory store) is found due like a stored one and moves to
    its next slot when advance_memory() runs."""
    scheduler = _scheduler(engine)
    try:
        scheduler.add(
            "local",
            store=EPHEMERAL,
            task_class="cron_tasks:Counter",
            kwargs={},
            interval=10.0,
            anchor=T0,
            next_run_at=T0,
        )
        assert scheduler.lookup("local") is None, "not in the persistent store"
        due = scheduler.due(T0, T0, {})
        assert [(d.name, d.store, d.run_slot, d.next_run_at) for d in due] == [
            ("local", EPHEMERAL, T0, T0 + timedelta(seconds=10))
        ]
        assert scheduler.count_due(T0) == 1
        scheduler.advance_memory()
        job = scheduler.lookup("local", EPHEMERAL)
        assert job is not None
        assert job.next_run_at == T0 + timedelta(seconds=10)
        assert scheduler.next_run_at() == T0 + timedelta(seconds=10)
    finally:
        scheduler.close()


def test_next_wakeup_is_the_earliest_job_and_the_count_due_by_it_plus_the_window(
    engine: Engine,
) -> None:
    """next_wakeup(window) says what next_run_at() and count_due(next + window) say, over the
    stored and the in-memory jobs: the earliest next run, and how many are due by it + window;
    nothing scheduled is (None, 0)."""
    scheduler = _scheduler(engine)
    try:
        assert scheduler.next_wakeup(0.05) == (None, 0)
        at = [T0, T0 + timedelta(seconds=0.04), T0 + timedelta(seconds=0.06)]
        scheduler.add_many(
            [
                JobSpec(f"s{i}", "cron_tasks:Counter", {}, 10.0, slot, slot)
                for i, slot in enumerate(at)
            ]
        )
        assert scheduler.next_wakeup(0.05) == (T0, 2)
        assert scheduler.next_wakeup(0.1) == (T0, 3)
        # An in-memory job due before every stored one is the next wakeup, counted with them.
        early = T0 - timedelta(seconds=0.03)
        scheduler.add(
            "local",
            store=EPHEMERAL,
            task_class="cron_tasks:Counter",
            kwargs={},
            interval=10.0,
            anchor=early,
            next_run_at=early,
        )
        assert scheduler.next_wakeup(0.05) == (early, 2)
        for window in (0.0, 0.05, 0.1):
            first = scheduler.next_run_at()
            assert first is not None
            expected = scheduler.count_due(first + timedelta(seconds=window))
            assert scheduler.next_wakeup(window) == (first, expected)
    finally:
        scheduler.close()


async def test_lifecycle_passes_run_in_the_worker_until_quiesced(engine: Engine) -> None:
    """start() runs a first pass at once, in the scheduler's worker thread; wakeup() asks for
    another; quiesce() stops them; close() ends the worker. A scheduler starts only once."""
    passes: list[str] = []
    ran = asyncio.Event()
    loop = asyncio.get_running_loop()

    def process(scheduler: NanobotScheduler, now: datetime) -> float | None:
        passes.append(threading.current_thread().name)
        loop.call_soon_threadsafe(ran.set)
        return None

    scheduler = _scheduler(engine, process)
    assert scheduler.state is SchedulerState.NEW
    scheduler.start()
    assert scheduler.dispatching
    with pytest.raises(RuntimeError):
        scheduler.start()
    await asyncio.wait_for(ran.wait(), WAIT_S)
    assert passes[0].startswith("nanobot-scheduler")
    ran.clear()
    scheduler.wakeup()
    await asyncio.wait_for(ran.wait(), WAIT_S)
    assert len(passes) == 2

    await scheduler.quiesce()
    state: SchedulerState = scheduler.state
    assert state is SchedulerState.QUIESCED
    assert not scheduler.dispatching
    scheduler.wakeup()
    assert await scheduler.run_in_worker(lambda: "still open") == "still open"
    assert len(passes) == 2, "no pass once quiesced"

    await asyncio.to_thread(scheduler.close)
    assert scheduler.closed
    with pytest.raises(RuntimeError):
        await scheduler.run_in_worker(lambda: None)
