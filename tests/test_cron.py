"""The scheduler: the seed's interface on APScheduler, on a real SQLite file and on PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib
import math
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from cron_tasks import Counter, Failing, Flaky, Gate, TimesOut, counted
from sqlalchemy import Engine, Row, select, text, update

from nanobot.bus import MessageBus
from nanobot.cron import CronManager, CronTask, TaskOutcome, control, definitions, history
from nanobot.cron.aps_adapter import JobState, NanobotScheduler
from nanobot.cron.context import CronContext
from nanobot.cron.manager import PASS_STUCK_S
from nanobot.db import (
    create_db_engine,
    current_revision,
    get_engine,
    head_revision,
    upgrade_database,
    write_transaction,
)
from nanobot.exceptions import (
    EngineNotOpenError,
    InvalidTaskError,
    NanobotError,
    UnknownTaskError,
)
from nanobot.heartbeat import HeartbeatMonitor
from nanobot.models import Task, TaskRun, apscheduler_job_states, apscheduler_jobs, utcnow

POLL = 0.05
WAIT = 10.0  # the bound of every wait below


class Outcomes:
    """Collects the scheduler's task.finished events; waits for them with a bound."""

    def __init__(self, bus: MessageBus) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        bus.subscribe("task.finished", self._on)

    async def _on(self, topic: str, payload: dict[str, Any]) -> None:
        self.events.append(payload)
        self._changed.set()

    def of(self, task: str, outcome: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["task"] == task and (outcome is None or e["outcome"] == outcome)
        ]

    async def wait(self, predicate: Callable[[], bool], within: float = WAIT) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def bus() -> MessageBus:
    return MessageBus()


@pytest.fixture
async def manager(db_url: str, bus: MessageBus) -> AsyncIterator[CronManager]:
    m = CronManager(poll_interval=POLL, bus=bus)
    yield m
    await m.shutdown(grace=0)


@pytest.fixture
def outcomes(bus: MessageBus) -> Outcomes:
    return Outcomes(bus)


def runs(engine: Engine, task: str) -> Sequence[Row[Any]]:
    with engine.connect() as conn:
        return conn.execute(
            select(TaskRun.__table__)
            .where(TaskRun.task_name == task)
            .order_by(TaskRun.scheduled_at)
        ).all()


def task_row(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(control.TASK_ROWS.where(Task.name == name)).one()


def job_next_run(engine: Engine, name: str) -> float | None:
    with engine.connect() as conn:
        value: float | None = conn.execute(
            select(apscheduler_jobs.c.next_run_time).where(apscheduler_jobs.c.id == name)
        ).scalar_one()
        return value


def stored_job(engine: Engine, name: str) -> JobState | None:
    """The job ``name`` as the job store holds it (read by a scheduler that never starts)."""
    reader = NanobotScheduler(engine, process=lambda *_: None, poll_interval=1.0, clock=utcnow)
    try:
        return reader.lookup(name)
    finally:
        reader.close()


# --- the seed's tests, made real ------------------------------------------------------------


class TestTask(CronTask):
    """The seed's TestTask (section 5.1.6), unchanged."""

    __test__ = False  # not a test class for pytest

    def __init__(self, interval: int = 1):
        super().__init__(interval)
        self.executed = False

    async def run(self) -> None:
        self.executed = True


async def test_seed_start_task(manager: CronManager, outcomes: Outcomes) -> None:
    """The seed's test_start_task: a started task runs, and stops when stopped."""
    test_task = TestTask()
    manager.register_task("test", test_task)
    await manager.start_task("test")
    await outcomes.wait(lambda: bool(outcomes.of("test", "success")))
    assert test_task.executed
    assert test_task.is_running()
    await manager.stop_task("test")
    assert not test_task.is_running()
    assert task_row(get_engine(), "test").paused


def test_seed_register_without_event_loop(db_url: str) -> None:
    """register_task is synchronous and works with no event loop, as in the seed's setUp."""
    manager = CronManager()
    manager.register_task("test", TestTask())
    assert manager.list_tasks() == ["test"]
    assert isinstance(manager.get_task("test"), TestTask)


# --- scheduling -----------------------------------------------------------------------------


# The slot arithmetic (due slots, the grid) is tested with the schedules, in test_schedules.py.


async def test_fixed_rate_does_not_drift(manager: CronManager, outcomes: Outcomes) -> None:
    """Run k is scheduled at start + k x interval however long runs take (the seed drifted)."""

    manager.register_task("slow", _SlowTask(0.1))
    await manager.start_task("slow")
    await outcomes.wait(lambda: len(outcomes.of("slow", "success")) >= 8)
    await manager.stop_task("slow")
    await manager.flush()
    recorded = runs(get_engine(), "slow")
    rows = [r for r in recorded if r.outcome == "success"]
    first = recorded[0].scheduled_at
    for row in rows:
        k = (row.scheduled_at - first).total_seconds() / 0.1
        assert math.isclose(k, round(k), abs_tol=1e-6), "slots are on the grid"
    # A drifting schedule would start each run 30 ms later than the one before (165 ms for the
    # median of runs 3 to 8); on time, a run starts within milliseconds of its slot, tens of
    # them on a loaded machine. The first two runs also wait for the first passes.
    lateness = sorted((r.started_at - r.scheduled_at).total_seconds() for r in rows[2:])
    assert lateness[len(lateness) // 2] < 0.1, f"accumulated delay: {lateness}"
    # Every slot from the first to the last is one row (a loaded machine may skip or miss one).
    covered = sum(r.slots for r in recorded)
    span = (recorded[-1].scheduled_at - first).total_seconds()
    assert covered == round(span / 0.1) + 1


class _SlowTask(CronTask):
    async def run(self) -> None:
        await asyncio.sleep(0.03)


async def test_register_same_definition_keeps_phase(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """Registering an unchanged task again (a restart) keeps its next run time."""
    engine = get_engine()
    manager.register_task("c", Counter(3600, label="phase"))
    await manager.start_task("c")
    await outcomes.wait(lambda: bool(outcomes.of("c")))
    before = job_next_run(engine, "c")
    with structlog.testing.capture_logs() as logs:
        manager.register_task("c", Counter(3600, label="phase"))
    await manager.start_task("c")
    assert job_next_run(engine, "c") == before
    assert {"event": "cron.task_unchanged"}.items() <= logs[0].items()


async def test_register_changed_definition_updates(manager: CronManager) -> None:
    """A new interval updates the stored task and its job, and says so in the log."""
    engine = get_engine()
    manager.register_task("c", Counter(3600, label="upd"))
    await manager.start_task("c")
    with structlog.testing.capture_logs() as logs:
        manager.register_task("c", Counter(1800, label="upd"))
    assert any(e["event"] == "cron.task_updated" for e in logs)
    assert task_row(engine, "c").interval_s == 1800

    # The scheduler applies the change to the stored job at its next pass.
    async with asyncio.timeout(WAIT):
        while True:
            job = stored_job(engine, "c")
            if job is not None and job.interval == 1800:
                break
            await asyncio.sleep(POLL)


async def test_pause_resume_keeps_phase(manager: CronManager) -> None:
    """A paused task has no next run; resumed, it continues on its original grid."""
    engine = get_engine()
    manager.register_task("p", Counter(3600, label="pause"))
    await manager.start_task("p")
    anchor = task_row(engine, "p").anchor_at
    await manager.pause_task("p")
    assert task_row(engine, "p").paused
    assert job_next_run(engine, "p") is None
    assert task_row(engine, "p").next_run_at is None
    await manager.resume_task("p")
    next_run = datetime.fromtimestamp(job_next_run(engine, "p") or 0, UTC)
    steps = (next_run - anchor).total_seconds() / 3600
    assert steps == pytest.approx(round(steps))
    assert steps >= 1


async def test_run_now_runs_once_outside_schedule(manager: CronManager, outcomes: Outcomes) -> None:
    """run_task_now runs the task once, recorded as manual, without moving its schedule."""
    engine = get_engine()
    manager.register_task("r", Counter(3600, label="now"))
    await manager.start_task("r")
    await outcomes.wait(lambda: len(outcomes.of("r")) >= 1)
    before = job_next_run(engine, "r")
    await manager.run_task_now("r")
    await outcomes.wait(lambda: len(outcomes.of("r")) >= 2)
    await manager.flush()
    rows = runs(engine, "r")
    assert [r.manual for r in rows] == [False, True]
    assert job_next_run(engine, "r") == before


async def test_error_is_recorded_and_schedule_goes_on(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """An exception in run() is logged with its traceback and the task and run id bound,
    recorded as error with its message, and the next slot still runs."""
    merge = [structlog.contextvars.merge_contextvars]
    with structlog.testing.capture_logs(processors=merge) as logs:
        manager.register_task("f", Failing(0.1, message="kaput"))
        await manager.start_task("f")
        await outcomes.wait(lambda: len(outcomes.of("f", "error")) >= 2)
    await manager.flush()
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert failed
    assert failed[0]["task"] == "f"
    assert "run_id" in failed[0]
    assert failed[0].get("exc_info")
    # A slow start may turn the first slot into a missed one: the first run is what counts.
    rows = [r for r in runs(get_engine(), "f") if r.outcome != "missed"]
    assert rows[0].outcome == "error"
    assert rows[0].error == "RuntimeError: kaput"
    row = task_row(get_engine(), "f")
    assert row.last_outcome == "error"
    assert row.consecutive_failures >= 2


async def test_timeout(manager: CronManager, outcomes: Outcomes) -> None:
    """A run past its timeout is cancelled and recorded as timeout."""
    manager.register_task("t", Gate(3600, timeout=0.05))
    await manager.start_task("t")
    await outcomes.wait(lambda: bool(outcomes.of("t")))
    assert outcomes.of("t")[0]["outcome"] == "timeout"
    await manager.flush()
    assert "timeout of 0.05" in runs(get_engine(), "t")[0].error


async def test_timeout_error_raised_by_the_task_is_an_error(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """A TimeoutError that the task raises itself (a client's own timeout) is recorded as an
    error with its message, not as the run's timeout: the task has none."""
    manager.register_task("te", TimesOut(3600))
    await manager.start_task("te")
    await outcomes.wait(lambda: bool(outcomes.of("te")))
    assert outcomes.of("te")[0]["outcome"] == "error"
    await manager.flush()
    assert runs(get_engine(), "te")[0].error == "TimeoutError: the remote end did not answer"


async def test_overlap_is_skipped(manager: CronManager, outcomes: Outcomes) -> None:
    """A slot that comes while the previous run still goes is skipped and recorded."""
    gate = Gate(0.05)
    manager.register_task("o", gate)
    await manager.start_task("o")
    await outcomes.wait(lambda: len(outcomes.of("o", "skipped")) >= 2)
    assert gate.runs == 1
    gate.release.set()
    await outcomes.wait(lambda: bool(outcomes.of("o", "success")))
    await manager.stop_task("o")
    await manager.flush()
    outcomes_in_db = [r.outcome for r in runs(get_engine(), "o")]
    assert outcomes_in_db.count("skipped") >= 2


@pytest.mark.parametrize("how", ["stop_task", "unregister_task", "shutdown", "cancel_runs"])
async def test_cancel_in_flight(manager: CronManager, outcomes: Outcomes, how: str) -> None:
    """stop_task, unregister_task, shutdown and cancel_runs cancel a run in flight, recorded
    cancelled with why."""
    gate = Gate(3600)
    manager.register_task("g", gate)
    await manager.start_task("g")
    async with asyncio.timeout(WAIT):
        await gate.started.wait()
    if how == "stop_task":
        await manager.stop_task("g")
    elif how == "unregister_task":
        manager.unregister_task("g")
    elif how == "shutdown":
        await manager.shutdown(grace=0)
    else:
        # The service's call when it loses its lease while stopping: runs end at once.
        manager.cancel_runs("the node lost the lease while stopping")
    await outcomes.wait(lambda: bool(outcomes.of("g", "cancelled")))
    await manager.flush()
    row = runs(get_engine(), "g")[0]
    assert row.outcome == "cancelled"
    assert row.error
    if how == "cancel_runs":
        assert row.error == "the node lost the lease while stopping"
        assert manager.running_tasks() == []


async def test_shutdown_waits_for_runs_within_grace(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """Shutdown lets a run finish within the grace period instead of cancelling it."""
    gate = Gate(3600)
    manager.register_task("w", gate)
    await manager.start_task("w")
    async with asyncio.timeout(WAIT):
        await gate.started.wait()
    asyncio.get_running_loop().call_later(0.05, gate.release.set)
    await manager.shutdown(grace=WAIT)
    assert runs(get_engine(), "w")[0].outcome == "success"


async def test_interrupted_runs_recorded_at_start(db_url: str, bus: MessageBus) -> None:
    """A manager that takes the scheduling lease records every dispatched run left running as
    interrupted, whatever its node (only a lease holder runs tasks, so their process is gone),
    and releases a claim that was never dispatched (its slot is caught up, not interrupted)."""
    manager = CronManager(poll_interval=POLL, bus=bus, node="n1")
    manager.register_task("i", Counter(3600, label="int"))
    engine = manager.engine
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        history.claim_slots(conn, [history.Claim("i", slot)], node="n1")
        history.claim_slots(conn, [history.Claim("other-node", slot)], node="n2")
        history.claim_slots(conn, [history.Claim("ahead", slot, dispatched=False)], node="n2")
    await manager.start()
    try:
        assert runs(engine, "i")[0].outcome == "interrupted"
        assert runs(engine, "other-node")[0].outcome == "interrupted"
        assert runs(engine, "ahead") == []
        assert task_row(engine, "i").last_outcome == "interrupted"
    finally:
        await manager.shutdown(grace=0)


def test_slot_claimed_twice_is_claimed_once(engine: Engine) -> None:
    """The unique (task, scheduled_at) claim: a second claim of a slot gets nothing."""
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        first = history.claim_slots(conn, [history.Claim("x", slot)], node="a")
    with write_transaction(engine) as conn:
        second = history.claim_slots(conn, [history.Claim("x", slot)], node="b")
    assert list(first) == [("x", slot)]
    assert second == {}


def test_a_batch_of_claims_stores_each_and_returns_only_the_new_ones(engine: Engine) -> None:
    """A pass's claims in one call (on PostgreSQL one INSERT of arrays): every new slot is
    stored with its values and its id returned; a slot claimed before is left out."""
    slot = datetime(2026, 1, 1, 9, tzinfo=UTC)
    with write_transaction(engine) as conn:
        before = history.claim_slots(conn, [history.Claim("t1", slot)], node="a")
    claims = [
        history.Claim("t1", slot),  # claimed before
        history.Claim("t2", slot),
        history.Claim("t3", slot + timedelta(seconds=5), dispatched=False),
        history.Claim("t4", slot, manual=True, started_at=slot + timedelta(seconds=1)),
        history.Claim("t2", slot, attempt=2),
    ]
    with write_transaction(engine) as conn:
        ids = history.claim_slots(conn, claims, node="b")
    assert sorted(ids) == [
        ("t2", slot),
        ("t3", slot + timedelta(seconds=5)),
        ("t4", slot),
    ]  # the retry of t2 has the same key as its first attempt: one id per (task, slot) here
    with engine.connect() as conn:
        rows = conn.execute(select(TaskRun.__table__).order_by(TaskRun.id)).all()
    stored = {
        (r.task_name, r.attempt): (r.node, r.outcome, r.started_at, r.manual, r.id) for r in rows
    }
    assert stored[("t1", 1)][0] == "a"
    assert stored[("t1", 1)][4] == before[("t1", slot)]
    assert stored[("t2", 1)][:4] == ("b", "running", slot, False)
    assert stored[("t2", 2)][:2] == ("b", "running")
    assert stored[("t3", 1)][:4] == ("b", "running", None, False)
    assert stored[("t4", 1)][:4] == ("b", "running", slot + timedelta(seconds=1), True)
    assert ids[("t3", slot + timedelta(seconds=5))] == stored[("t3", 1)][4]
    assert all(r.scheduled_at.tzinfo is not None for r in rows)


async def test_two_schedulers_run_each_slot_once(db_url: str, tmp_path: Path) -> None:
    """Two managers on one database (two engines, as two processes) never run a slot twice."""
    e1, e2 = create_db_engine(db_url), create_db_engine(db_url)
    b1, b2 = MessageBus(), MessageBus()
    o1, o2 = Outcomes(b1), Outcomes(b2)
    m1 = CronManager(e1, poll_interval=POLL, bus=b1, node="a")
    m2 = CronManager(e2, poll_interval=POLL, bus=b2, node="b")
    ran = tmp_path / "runs.txt"  # m2 builds its own Counter from the stored arguments
    try:
        m1.register_task("d", Counter(0.05, label="dup", path=str(ran)))
        await m1.start_task("d")
        await m2.start()
        await o1.wait(lambda: len(o1.of("d", "success")) + len(o2.of("d", "success")) >= 10)
    finally:
        await m1.shutdown(grace=1)
        await m2.shutdown(grace=1)
    rows = [r for r in runs(e1, "d") if r.outcome == "success"]
    assert len({r.scheduled_at for r in rows}) == len(rows)
    assert len(counted(ran)) == len(rows)
    e1.dispose()
    e2.dispose()


async def test_change_by_other_process_applies_within_two_seconds(
    manager: CronManager, db_url: str
) -> None:
    """A pause written through another engine (the command line) reaches the scheduler."""
    manager.register_task("x", Counter(3600, label="other"))
    await manager.start_task("x")
    other = create_db_engine(db_url)
    control.pause_task(other, "x")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(WAIT):
        while job_next_run(get_engine(), "x") is not None:
            await asyncio.sleep(POLL)
    assert loop.time() - started < 2.0, "the pause reached the scheduler, but after 2 s"
    other.dispose()


async def test_task_added_by_class_path_runs(
    manager: CronManager, outcomes: Outcomes, tmp_path: Path
) -> None:
    """A task stored by class path (cron add) runs at once in a scheduler that never
    registered it, built from its class and stored arguments."""
    await manager.start()
    definition = definitions.definition_from_class(
        "byname", "cron_tasks:Counter", 3600, {"label": "byname", "path": str(tmp_path / "runs")}
    )
    await asyncio.to_thread(control.add_task, get_engine(), definition)
    await outcomes.wait(lambda: bool(outcomes.of("byname", "success")))
    assert counted(tmp_path / "runs") == ["byname"]
    assert manager.get_task("byname").interval == 3600


async def test_stored_timeout_applies_to_a_task_built_by_class_path(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """A timeout stored with the task (cron add --timeout) applies to the instance built from
    its class path, although the class's constructor takes no timeout."""
    await manager.start()
    definition = definitions.definition_from_class(
        "bounded", "cron_tasks:Sleeper", 3600, {"seconds": 30.0}, timeout=0.2
    )
    await asyncio.to_thread(control.add_task, get_engine(), definition)
    await outcomes.wait(lambda: bool(outcomes.of("bounded", "timeout")))
    assert manager.get_task("bounded").timeout == 0.2


async def test_removed_task_job_is_removed(manager: CronManager, outcomes: Outcomes) -> None:
    """A task removed in the database loses its job in the running scheduler."""
    engine = get_engine()
    manager.register_task("gone", Counter(3600, label="gone"))
    await manager.start_task("gone")
    assert job_next_run(engine, "gone") is not None
    await asyncio.to_thread(control.remove_task, engine, "gone")

    def job_left() -> bool:
        with engine.connect() as conn:
            query = select(apscheduler_jobs.c.id).where(apscheduler_jobs.c.id == "gone")
            return conn.execute(query).first() is not None

    try:
        async with asyncio.timeout(WAIT):
            while job_left():
                await asyncio.sleep(POLL)
    except TimeoutError:
        pytest.fail(f"the removed task's job is still in the job store after {WAIT} s")


async def test_restart_keeps_schedule_and_catches_up_once(db_url: str, bus: MessageBus) -> None:
    """After downtime, a new manager keeps the persisted next run, runs the latest missed slot
    once and records the others as missed (one row with their count)."""
    outcomes = Outcomes(bus)
    first = CronManager(poll_interval=POLL, bus=bus)
    first.register_task("h", Counter(10, label="restart"))
    await first.start_task("h")
    engine = first.engine
    await outcomes.wait(lambda: bool(outcomes.of("h", "success")))
    await first.shutdown(grace=1)
    next_before = job_next_run(engine, "h")
    assert next_before is not None

    # 95 s later: the slots at +10 ... +90 passed while nothing ran.
    offset = timedelta(seconds=95)
    second = CronManager(poll_interval=POLL, bus=bus, clock=lambda: datetime.now(UTC) + offset)
    second.register_task("h", Counter(10, label="restart"))
    await second.start_all_tasks()
    try:
        await outcomes.wait(lambda: len(outcomes.of("h", "success")) >= 2)
        await outcomes.wait(lambda: bool(outcomes.of("h", "missed")))
        await second.flush()
    finally:
        await second.shutdown(grace=1)
    rows = runs(engine, "h")
    assert [r.outcome for r in rows] == ["success", "missed", "success"]
    assert rows[1].slots == 8
    assert rows[1].scheduled_at.timestamp() == pytest.approx(next_before)
    assert (rows[2].scheduled_at - rows[1].scheduled_at).total_seconds() == pytest.approx(80)
    assert job_next_run(engine, "h") == pytest.approx(next_before + 90)


async def test_failed_store_write_does_not_stop_scheduler(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """A pass whose write fails is logged and retried; dispatching goes on afterwards
    (APScheduler 3.11.3 would stop for good while reporting that it runs). The traceback is
    logged with the first failure of a streak, not with every retry of the same fault."""
    engine = get_engine()
    manager.register_task("s", Counter(0.05, label="store"))
    await manager.start_task("s")
    await outcomes.wait(lambda: bool(outcomes.of("s", "success")))
    with structlog.testing.capture_logs() as logs:
        with write_transaction(engine) as conn:
            conn.execute(text("ALTER TABLE task_runs RENAME TO task_runs_away"))
        async with asyncio.timeout(WAIT):
            while sum(e["event"] == "cron.pass_failed" for e in logs) < 3:
                await asyncio.sleep(POLL)
    failed = [e for e in logs if e["event"] == "cron.pass_failed"]
    assert [e["failures"] for e in failed] == list(range(1, len(failed) + 1))
    assert failed[0].get("exc_info") is True
    assert all("exc_info" not in e and "task_runs" in e["error"] for e in failed[1:])
    count = len(outcomes.of("s", "success"))
    with write_transaction(engine) as conn:
        conn.execute(text("ALTER TABLE task_runs_away RENAME TO task_runs"))
    await outcomes.wait(lambda: len(outcomes.of("s", "success")) > count + 2)
    assert manager.is_alive()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [0, -5, float("nan"), float("inf"), "abc", True, None])
def test_bad_interval_is_refused(interval: Any) -> None:
    """An interval that is not a positive finite number raises ValueError naming it."""
    with pytest.raises(ValueError, match="interval") as info:
        Counter(interval)
    assert repr(interval) in str(info.value)
    assert isinstance(info.value, NanobotError)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.get_task("nope"),
        lambda m: m.unregister_task("nope"),
        lambda m: asyncio.run(m.start_task("nope")),
        lambda m: asyncio.run(m.stop_task("nope")),
        lambda m: asyncio.run(m.pause_task("nope")),
        lambda m: asyncio.run(m.resume_task("nope")),
        lambda m: asyncio.run(m.run_task_now("nope")),
        lambda m: asyncio.run(m.history("nope")),
    ],
)
def test_unknown_name_raises_key_error(db_url: str, call: Callable[[CronManager], Any]) -> None:
    """Every method given an unknown name raises UnknownTaskError, a KeyError naming it."""
    with pytest.raises(UnknownTaskError, match="nope") as info:
        call(CronManager())
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("", Counter()),
        ("x" * 196, Counter()),
        (" pad", Counter()),
        ("two\nlines", Counter()),
        ("tab\there", Counter()),
        ("ok", object()),
    ],
)
def test_bad_registration_is_refused(db_url: str, name: str, task: Any) -> None:
    """A bad name or a task that is not a CronTask is refused with InvalidTaskError."""
    with pytest.raises(InvalidTaskError):
        CronManager().register_task(name, task)


def test_local_class_runs_but_is_not_persisted(db_url: str) -> None:
    """A task whose class another process cannot import is kept in memory only, with a
    warning that says why; nothing about it is stored."""

    class Local(CronTask):
        async def run(self) -> None:
            pass

    manager = CronManager()
    with structlog.testing.capture_logs() as logs:
        manager.register_task("local", Local(5))
    warning = next(e for e in logs if e["event"] == "cron.task_not_persistent")
    assert "inside a function" in warning["reason"]
    assert control.list_tasks(manager.open_engine()) == []
    assert manager.list_tasks() == ["local"]


def test_unserialisable_kwargs_are_not_persisted(db_url: str) -> None:
    """A task built with arguments that are not JSON data is not persisted."""
    manager = CronManager()
    with structlog.testing.capture_logs() as logs:
        manager.register_task("obj", Counter(5, label=object()))  # type: ignore[arg-type]
    assert any(e["event"] == "cron.task_not_persistent" for e in logs)
    assert control.list_tasks(manager.open_engine()) == []


def test_retention_prunes_old_and_excess_runs(engine: Engine) -> None:
    """prune deletes runs older than the retention and beyond the per-task row limit, but
    never a run in flight."""
    now = datetime(2026, 6, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        for i in range(10):
            history.record_unrun(
                conn,
                [
                    history.Finish(
                        task="p",
                        run_id=None,
                        scheduled_at=now - timedelta(hours=i),
                        outcome=TaskOutcome.SUCCESS,
                        started_at=None,
                        finished_at=now,
                    )
                ],
            )
        history.record_unrun(
            conn,
            [
                history.Finish(
                    task="p",
                    run_id=None,
                    scheduled_at=now - timedelta(days=40),
                    outcome=TaskOutcome.SUCCESS,
                    started_at=None,
                    finished_at=now,
                )
            ],
        )
        history.claim_slots(conn, [history.Claim("p", now - timedelta(days=50))], node="n")
    removed = history.prune(engine, now=now, retention_days=30, max_rows=5)
    left = runs(engine, "p")
    assert removed == 6
    assert [r.outcome for r in left].count("running") == 1
    assert len([r for r in left if r.outcome == "success"]) == 5


async def test_a_pass_at_work_is_alive_until_it_is_stuck(tmp_path: Path, bus: MessageBus) -> None:
    """A pass held up (here: another connection holds SQLite's write lock while a slot is due)
    keeps the scheduler alive, however old the last finished pass, until it has been at work
    PASS_STUCK_S; then it is not. (Under a saturated 20,000-task burst /healthz said 503.)"""
    offset = [timedelta(0)]  # the manager's clock runs ahead of the real one by this
    path = tmp_path / "alive.db"
    engine = create_db_engine(f"sqlite:///{path}")
    upgrade_database(engine)
    outcomes = Outcomes(bus)
    manager = CronManager(engine, poll_interval=POLL, bus=bus, clock=lambda: utcnow() + offset[0])
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        manager.register_task("t", Counter(1))
        await manager.start_task("t")
        await outcomes.wait(lambda: bool(outcomes.of("t")))
        assert manager.is_alive()
        holder.execute("BEGIN IMMEDIATE")  # the next claim waits for this lock
        offset[0] += timedelta(seconds=30)  # slots are due; the last finished pass is 30 s old
        async with asyncio.timeout(5):
            while not manager.is_alive():
                await asyncio.sleep(POLL)
        offset[0] += timedelta(seconds=PASS_STUCK_S)
        assert not manager.is_alive()
    finally:
        holder.rollback()
        holder.close()
        await manager.shutdown(grace=0)
        engine.dispose()


async def test_unloadable_job_is_kept_and_reported(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """A stored job that cannot be loaded (its stored state unreadable when the scheduler
    starts) is not deleted (APScheduler 3 deletes it): it stays in the job store, and its task
    is marked broken."""
    engine = get_engine()
    manager.register_task("u", Counter(3600, label="u"))
    await manager.start_task("u")
    await outcomes.wait(lambda: bool(outcomes.of("u")))
    # While it leads, the scheduler writes the job table and reads its own index of it; a
    # leader reads the table when it starts.
    await manager.shutdown(grace=0)
    with write_transaction(engine) as conn:
        conn.execute(
            update(apscheduler_jobs).where(apscheduler_jobs.c.id == "u").values(next_run_time=0)
        )
        conn.execute(
            update(apscheduler_job_states)
            .where(apscheduler_job_states.c.id == "u")
            .values(job_state=b"not a pickle")
        )
    await manager.start()
    # Its first pass finds the job due, and unloadable.
    async with asyncio.timeout(WAIT):
        while task_row(engine, "u").broken_reason is None:
            await asyncio.sleep(POLL)
    assert "cannot be loaded" in task_row(engine, "u").broken_reason
    assert job_next_run(engine, "u") == 0
    assert manager.is_alive()


async def test_failed_run_marks_task_component_and_success_clears_it(
    db_url: str, bus: MessageBus
) -> None:
    """A run that raises puts the task's component in error; the next success clears it."""
    monitor = HeartbeatMonitor(bus, interval=30)
    outcomes = Outcomes(bus)
    manager = CronManager(poll_interval=POLL, bus=bus, monitor=monitor)
    flaky = Flaky(0.05)
    try:
        manager.register_task("fl", flaky)
        await manager.start_task("fl")
        await outcomes.wait(lambda: bool(outcomes.of("fl", "error")))
        status = monitor.get_component_status("task:fl")
        assert status["status"] == "error"
        assert "flaky" in status["errors"][-1]["error"]
        flaky.failing = False
        await outcomes.wait(lambda: bool(outcomes.of("fl", "success")))
        assert monitor.get_component_status("task:fl")["status"] == "healthy"
        manager.unregister_task("fl")
        assert monitor.get_component_status("task:fl")["status"] == "unknown"
    finally:
        await manager.shutdown(grace=0)


async def test_unimportable_class_is_kept_and_recovers(
    engine: Engine, bus: MessageBus, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored task whose class can no longer be imported (after a restart) is kept in the
    job store and in tasks, marked broken with the import error, and runs again once its
    class is back."""
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    source = (
        "from nanobot.cron import CronTask\n"
        "class Vanishing(CronTask):\n"
        "    async def run(self) -> None:\n"
        "        pass\n"
    )
    module = module_dir / "vanishing_mod.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(module_dir))
    definition = definitions.definition_from_class("v", "vanishing_mod:Vanishing", 0.2)
    control.add_task(engine, definition)

    module.unlink()
    sys.modules.pop("vanishing_mod", None)
    importlib.invalidate_caches()
    outcomes = Outcomes(bus)
    manager = CronManager(poll_interval=POLL, bus=bus)
    await manager.start()
    try:
        await outcomes.wait(lambda: bool(outcomes.of("v", "error")))
        await manager.flush()
        async with asyncio.timeout(WAIT):
            while task_row(engine, "v").broken_reason is None:
                await asyncio.sleep(POLL)
        assert "cannot import module 'vanishing_mod'" in task_row(engine, "v").broken_reason
        assert job_next_run(engine, "v") is not None, "the job is kept"
        # A slow start may have turned the first slot into a missed one: the first run counts.
        first_run = next(r for r in runs(engine, "v") if r.outcome != "missed")
        assert "cannot import" in first_run.error

        module.write_text(source)
        importlib.invalidate_caches()
        await outcomes.wait(lambda: bool(outcomes.of("v", "success")))
        async with asyncio.timeout(WAIT):
            while task_row(engine, "v").broken_reason is not None:
                await asyncio.sleep(POLL)
    finally:
        await manager.shutdown(grace=0)


async def test_takeover_marks_every_nodes_running_rows(db_url: str, bus: MessageBus) -> None:
    """A leader taking over records as interrupted the runs that any dead node left running."""
    manager = CronManager(poll_interval=POLL, bus=bus, node="new-leader")
    engine = manager.open_engine()
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        history.claim_slots(conn, [history.Claim("old", slot)], node="dead-leader")
    await manager.start(takeover=True)
    try:
        assert runs(engine, "old")[0].outcome == "interrupted"
    finally:
        await manager.shutdown(grace=0)


async def test_fence_stops_claims_when_the_lease_is_lost(
    db_url: str, bus: MessageBus, outcomes: Outcomes
) -> None:
    """With a fence that says this process no longer leads, nothing is claimed or run; once it
    leads again, the slot that waited runs (once)."""
    leading = False
    manager = CronManager(poll_interval=POLL, bus=bus, fence=lambda conn: leading)
    try:
        with structlog.testing.capture_logs() as logs:
            manager.register_task("fenced", Counter(3600, label="fenced"))
            await manager.start_task("fenced")
            async with asyncio.timeout(WAIT):
                while not any(e["event"] == "cron.not_leader" for e in logs):
                    await asyncio.sleep(POLL)
        assert runs(manager.engine, "fenced") == []
        leading = True
        await outcomes.wait(lambda: bool(outcomes.of("fenced", "success")))
        await manager.flush()
        assert len(runs(manager.engine, "fenced")) == 1
    finally:
        await manager.shutdown(grace=0)


def test_the_scheduler_context_reads_its_engine_only_once_opened(db_url: str) -> None:
    """The scheduler's collaborators read the engine that open_engine opened and migrated;
    before that, reading it is an error that says what to call, not a silent migration."""
    ctx = CronContext(
        None, node="n", clock=utcnow, poll_interval=None, bus=None, monitor=None, fence=None
    )
    with pytest.raises(EngineNotOpenError, match=r"open_engine\(\)"):
        _ = ctx.engine
    engine = ctx.open_engine()
    assert ctx.engine is engine
    assert ctx.open_engine() is engine
    assert current_revision(engine) == head_revision()
