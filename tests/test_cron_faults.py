"""The scheduler under faults, in one process: fencing, released claims, the lease, overruns.

Real SQLite file and PostgreSQL (``db_url``), real managers and leases. The scenarios with real
processes (SIGSTOP, kill -9, a script next to a service) are in tests/faults/.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from burst_helpers import store_burst
from cron_tasks import Counter
from sqlalchemy import Engine, insert, select, update
from test_cron import Outcomes
from test_cron_restart import Runner

from nanobot.bus import MessageBus
from nanobot.config import reset_config
from nanobot.cron import CronManager, CronTask, control, definitions, history, launcher
from nanobot.cron.history import Claim, Finish
from nanobot.cron.manager import MARK_AHEAD
from nanobot.cron.schedules import IntervalSchedule
from nanobot.db import create_db_engine, upgrade_database, write_transaction
from nanobot.exceptions import TaskNotStorableError
from nanobot.heartbeat import get_heartbeat_monitor
from nanobot.lease import SchedulerLease
from nanobot.metrics import Metrics
from nanobot.models import (
    Component,
    Task,
    TaskOutcome,
    TaskRun,
    apscheduler_jobs,
    utcnow,
)
from nanobot.models import SchedulerLease as LeaseRow

POLL = 0.05
WAIT = 10.0
TESTS = Path(__file__).parent


async def until(predicate: Callable[[], bool], within: float = WAIT) -> None:
    """Poll state that a worker thread or the database changes, under a deadline."""
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(POLL)


@pytest.fixture
def bus() -> MessageBus:
    return MessageBus()


@pytest.fixture
def outcomes(bus: MessageBus) -> Outcomes:
    return Outcomes(bus)


@pytest.fixture
def short_lease(db_url: str, monkeypatch: pytest.MonkeyPatch) -> float:
    """A 0.6 s scheduling lease: a manager renews and retries every 0.2 s."""
    monkeypatch.setenv("NANOBOT_SERVICE__LEASE_TTL", "0.6")
    reset_config()
    return 0.6


@pytest.fixture
async def manager(db_url: str, bus: MessageBus) -> AsyncIterator[CronManager]:
    m = CronManager(poll_interval=POLL, bus=bus)
    yield m
    await m.shutdown(grace=0)


def rows(engine: Engine, task: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(TaskRun.__table__)
                .where(TaskRun.task_name == task)
                .order_by(TaskRun.scheduled_at)
            ).all()
        )


def task_row(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(control.TASK_ROWS.where(Task.name == name)).one()


def job_next_run(engine: Engine, name: str) -> float | None:
    with engine.connect() as conn:
        return conn.execute(
            select(apscheduler_jobs.c.next_run_time).where(apscheduler_jobs.c.id == name)
        ).scalar_one_or_none()


class ControlledLease(SchedulerLease):
    """A real lease row whose remaining time the test decides (a freeze past the lease)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, "test-leader:1", 30.0)
        self.left = 30.0

    def seconds_left(self) -> float:
        return self.left


def leased_manager(db_url: str, bus: MessageBus) -> tuple[Engine, CronManager, ControlledLease]:
    """A manager on a migrated database, scheduling under a lease the test controls."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    manager = CronManager(engine, poll_interval=POLL, bus=bus)
    lease = ControlledLease(engine)
    assert lease.try_acquire()
    manager.use_lease(lease)
    return engine, manager, lease


class Holder(CronTask):
    """Holds its run until released, and notes whether any code after its await ran."""

    def __init__(self, interval: float) -> None:
        super().__init__(interval)
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.after_await = 0

    async def run(self) -> None:
        self.started.set()
        await self.release.wait()
        self.after_await += 1


# --- item 2: a fenced-off node neither starts, nor goes on, nor overwrites ----------------------


def test_finish_of_a_fenced_off_node_does_not_overwrite_the_new_leaders_record(
    engine: Engine,
) -> None:
    """A run the new leader recorded interrupted keeps that record when the old leader's real
    outcome arrives; the outcome is returned (to be logged) and the task's mirror is untouched."""
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        control.insert_task(
            conn, dict(name="t", task_class="cron_tasks:Counter", interval_s=1.0, kwargs={})
        )
        claimed = history.claim_slots(conn, [Claim("t", slot)], node="old")
    history.mark_interrupted(engine, node=None, now=slot + timedelta(seconds=5))
    finish = Finish(
        task="t",
        run_id=claimed[("t", slot)],
        scheduled_at=slot,
        outcome=TaskOutcome.SUCCESS,
        started_at=slot,
        finished_at=slot + timedelta(seconds=9),
    )
    fenced = history.write_finishes(engine, [finish])
    assert [(f.finish.run_id, f.recorded) for f in fenced] == [(finish.run_id, "interrupted")]
    [row] = rows(engine, "t")
    assert row.outcome == "interrupted"
    assert task_row(engine, "t").last_outcome == "interrupted"


async def test_run_in_flight_stops_at_its_next_step_once_the_lease_ran_out(
    db_url: str, bus: MessageBus, outcomes: Outcomes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader whose lease ran out while its run was suspended (frozen) does not execute one
    more line of the run: it is recorded cancelled, and the next slot, claimed before the lease
    ran out, is not started but left undispatched, for whoever leads next to catch it up."""
    # Claims a second ahead: the next slot is claimed while the lease still holds (a pass of a
    # node past its lease claims nothing).
    monkeypatch.setenv("NANOBOT_CRON__DISPATCH_AHEAD", "1")
    reset_config()
    engine, manager, lease = leased_manager(db_url, bus)
    holder = Holder(0.3)
    try:
        with structlog.testing.capture_logs() as logs:
            manager.register_task("held", holder)
            await manager.start_task("held")
            await asyncio.wait_for(holder.started.wait(), WAIT)
            await until(lambda: len(rows(engine, "held")) >= 2)
            lease.left = 0.0  # frozen past the lease
            holder.release.set()
            await outcomes.wait(lambda: bool(outcomes.of("held", "cancelled")))
            await until(lambda: any(e["event"] == "cron.start_refused" for e in logs))
            await manager.flush()
        assert holder.after_await == 0
        first = rows(engine, "held")[0]
        assert first.outcome == "cancelled"
        assert "lost the scheduling lease" in first.error
        refused = [r for r in rows(engine, "held") if r.outcome == "running"]
        await until(lambda: all(r.started_at is None for r in rows(engine, "held")[1:]))
        assert refused
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()


async def test_a_pass_past_the_lease_writes_nothing(db_url: str, bus: MessageBus) -> None:
    """A leader frozen past its lease, before it steps down: its passes neither claim nor apply
    a task added meanwhile to the job table (that write is not fenced, and the new leader's
    index of next run times counts on being the only writer); once the lease holds again, the
    task is applied and runs."""
    engine, manager, lease = leased_manager(db_url, bus)
    outcomes = Outcomes(bus)
    try:
        with structlog.testing.capture_logs() as logs:
            await manager.start()
            lease.left = 0.0  # frozen past the lease
            definition = definitions.definition_from_class(
                "late", "cron_tasks:Counter", kwargs={}, schedule=IntervalSchedule(seconds=0.2)
            )
            control.add_task(engine, definition)
            await until(lambda: sum(e["event"] == "cron.not_leader" for e in logs) >= 3)
            assert job_next_run(engine, "late") is None
            assert rows(engine, "late") == []
            lease.left = 30.0
            await outcomes.wait(lambda: bool(outcomes.of("late", "success")))
        assert job_next_run(engine, "late") is not None
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()


async def test_a_job_row_deleted_by_hand_is_made_again_from_its_task(
    db_url: str, bus: MessageBus
) -> None:
    """The job table's rows deleted behind a running scheduler (by hand, with SQL): the leader,
    which keeps the jobs' next run times in memory, notices at the next due slot, writes
    nothing of that pass, applies the task's row again, and the task goes on running."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    manager = CronManager(engine, poll_interval=POLL, bus=bus)
    outcomes = Outcomes(bus)
    definition = definitions.definition_from_class(
        "kept", "cron_tasks:Counter", kwargs={}, schedule=IntervalSchedule(seconds=0.1)
    )
    control.add_task(engine, definition)
    try:
        with structlog.testing.capture_logs() as logs:
            await manager.start()
            await outcomes.wait(lambda: len(outcomes.of("kept", "success")) >= 2)
            with engine.begin() as conn:
                conn.execute(apscheduler_jobs.delete())
            before = len(outcomes.of("kept", "success"))
            await outcomes.wait(lambda: len(outcomes.of("kept", "success")) >= before + 3)
        noticed = {e["event"] for e in logs} & {"cron.job_table_changed", "cron.job_rows_missing"}
        assert noticed
        assert not any(e["event"] == "cron.pass_failed" for e in logs)
        assert job_next_run(engine, "kept") is not None
        slots = [r.scheduled_at for r in rows(engine, "kept")]
        assert len(slots) == len(set(slots))
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()


# --- item 21: slots claimed ahead of a stop ------------------------------------------------------


def burst_rows(engine: Engine, names: list[str]) -> dict[str, list[Any]]:
    """The rows of each task of a burst, oldest slot first."""
    found: dict[str, list[Any]] = {name: [] for name in names}
    with engine.connect() as conn:
        for row in conn.execute(
            select(TaskRun.__table__)
            .where(TaskRun.task_name.in_(names))
            .order_by(TaskRun.scheduled_at)
        ):
            found[row.task_name].append(row)
    return found


def second_instant_claimed(engine: Engine, names: list[str]) -> bool:
    """Every task of the burst has run its first slot and has its second one claimed."""
    found = burst_rows(engine, names)
    return all(
        len(rows) == 2 and rows[0].outcome == TaskOutcome.SUCCESS.value for rows in found.values()
    )


async def runs_at(
    engine: Engine, manager: CronManager, outcomes: Outcomes, names: list[str], slot: datetime
) -> list[Any]:
    """Wait until every task of the burst has run ``slot`` with success; its one row at that
    slot per task, checked to be that one success."""
    await outcomes.wait(
        lambda: all(
            any(e["scheduled_at"] == slot.isoformat() for e in outcomes.of(n, "success"))
            for n in names
        )
    )
    await manager.flush()
    runs = []
    for name, found in burst_rows(engine, names).items():
        at_slot = [r for r in found if r.scheduled_at == slot]
        assert [r.outcome for r in at_slot] == ["success"], name
        runs.append(at_slot[0])
    return runs


def claimed_ahead(engine: Engine, names: list[str]) -> datetime:
    """The burst's second instant, checked to be claimed by every task ahead of its time and
    not dispatched (no start time): the lead window."""
    claims = [rows[1] for rows in burst_rows(engine, names).values()]
    slot: datetime = claims[0].scheduled_at
    assert all(c.scheduled_at == slot for c in claims), "the burst is one instant"
    assert all(c.started_at is None for c in claims), "claimed ahead, not dispatched"
    assert all(c.outcome == TaskOutcome.RUNNING.value for c in claims)
    assert slot > utcnow()
    return slot


async def test_stop_releases_claims_not_yet_due_and_next_start_runs_them(
    db_url: str, bus: MessageBus, outcomes: Outcomes
) -> None:
    """Slots claimed ahead of their instant (a burst's lead) when the scheduler stops are
    released: no row, no ``cancelled`` before their time, their jobs moved back to them; the
    next start runs them."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    first = CronManager(engine, poll_interval=POLL, bus=bus)
    try:
        await first.start()
        names = store_burst(engine, "ahead")
        await until(lambda: second_instant_claimed(engine, names))
        slot = claimed_ahead(engine, names)
        await first.shutdown(grace=0)
        left = burst_rows(engine, names)
        assert all([r.outcome for r in rows] == ["success"] for rows in left.values())
        for name in names:
            assert job_next_run(engine, name) == pytest.approx(slot.timestamp())
            assert task_row(engine, name).next_run_at == slot

        second = CronManager(engine, poll_interval=POLL, bus=bus)
        try:
            await second.start()
            await outcomes.wait(lambda: all(len(outcomes.of(n, "success")) >= 2 for n in names))
            await second.flush()
        finally:
            await second.shutdown(grace=0)
        for rows in burst_rows(engine, names).values():
            assert [(r.scheduled_at, r.outcome) for r in rows][:2] == [
                (rows[0].scheduled_at, "success"),
                (slot, "success"),
            ]
            assert not [r for r in rows if r.outcome == "cancelled"]
    finally:
        await first.shutdown(grace=0)
        engine.dispose()


async def test_claims_made_ahead_are_marked_and_start_at_their_instant(
    db_url: str, bus: MessageBus, outcomes: Outcomes
) -> None:
    """A burst's slots claimed ahead are marked dispatched just before their instant and start
    at it, not before; a task of the burst stopped in the lead window has its claim released
    (no row, nothing recorded cancelled) while the others run."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    manager = CronManager(engine, poll_interval=POLL, bus=bus)
    try:
        await manager.start()
        names = store_burst(engine, "marked")
        await until(lambda: second_instant_claimed(engine, names))
        slot = claimed_ahead(engine, names)
        stopped, others = names[0], names[1:]
        with structlog.testing.capture_logs() as logs:
            await manager.stop_task(stopped)
            await outcomes.wait(lambda: all(len(outcomes.of(n, "success")) >= 2 for n in others))
            await manager.flush()
        for rows in burst_rows(engine, others).values():
            assert (rows[1].scheduled_at, rows[1].outcome) == (slot, "success")
            # At its instant: not at the mark, MARK_AHEAD before it (a little clock slack).
            assert rows[1].started_at >= slot - timedelta(seconds=MARK_AHEAD / 5)
        assert [r.outcome for r in burst_rows(engine, [stopped])[stopped]] == ["success"]
        assert task_row(engine, stopped).paused
        released = [e for e in logs if e["event"] == "cron.claims_released"]
        assert [e["count"] for e in released] == [1]
        assert not [e for e in logs if e["event"] == "cron.slots_not_dispatched"]
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()


async def test_a_large_burst_is_marked_before_its_instant(
    db_url: str, bus: MessageBus, outcomes: Outcomes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The more slots of one instant there are to mark, the earlier their marking starts, so
    that all of them are marked before the instant and their launches never wait for a mark
    (here the burst counts as 1.5 s of marking, more than its claim's lead: marked as soon as
    claimed), and they still start at the instant, not at their mark."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    manager = CronManager(engine, poll_interval=POLL, bus=bus)
    try:
        await manager.start()
        names = store_burst(engine, "early")
        monkeypatch.setattr(launcher, "MARK_S_PER_SLOT", 1.5 / len(names))
        await until(lambda: second_instant_claimed(engine, names))
        slot = burst_rows(engine, names)[names[0]][1].scheduled_at

        def all_marked() -> bool:
            # A mark sets started_at to the slot; the run's real start rewrites it later.
            return all(
                rows[1].started_at is not None for rows in burst_rows(engine, names).values()
            )

        await until(all_marked)
        # Marked well before the instant (just in time, the marking would only have started
        # MARK_AHEAD before it).
        assert utcnow() < slot - timedelta(seconds=4 * MARK_AHEAD)
        for run in await runs_at(engine, manager, outcomes, names, slot):
            # Started at the instant (its real start), not at the mark a second before.
            assert run.started_at >= slot - timedelta(seconds=MARK_AHEAD / 5), run.task_name
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()


class DatabaseClock:
    """The time a lease reads as the database's: real time, moved ahead when the test says (a
    holder frozen past its lease, without waiting for it to run out)."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.ahead


async def test_claims_ahead_of_a_leader_that_lost_its_lease_are_left_to_the_next(
    db_url: str, bus: MessageBus, outcomes: Outcomes
) -> None:
    """A leader that finds its lease taken over (its renewal fails) and stops, with slots
    claimed ahead, deletes none of them: they are no longer its to release. It says they never
    started; the next leader releases them and runs them, none recorded interrupted."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    clock = DatabaseClock()
    old_lease = SchedulerLease(engine, "old-leader:1", 30.0, clock)
    new_lease = SchedulerLease(engine, "new-leader:2", 30.0, clock)
    assert old_lease.try_acquire()
    old = CronManager(engine, node="old-leader", poll_interval=POLL, bus=bus)
    old.use_lease(old_lease)
    new = CronManager(engine, node="new-leader", poll_interval=POLL, bus=bus)
    try:
        await old.start(takeover=True)
        names = store_burst(engine, "left")
        await until(lambda: second_instant_claimed(engine, names))
        slot = claimed_ahead(engine, names)
        # The old leader's lease runs out unrenewed; another node takes it, and the old
        # leader's next renewal fails: it steps down, as the service does.
        clock.ahead = timedelta(seconds=31)
        assert new_lease.try_acquire()
        assert not old_lease.renew()
        with structlog.testing.capture_logs() as logs:
            await old.shutdown(grace=0, standby=True)
        left = [e for e in logs if e["event"] == "cron.claims_left"]
        assert [e["count"] for e in left] == [len(names)]
        assert not [e for e in logs if e["event"] == "cron.claims_released"]
        claims = [rows[1] for rows in burst_rows(engine, names).values()]
        assert {(c.scheduled_at, c.outcome, c.started_at, c.node) for c in claims} == {
            (slot, "running", None, "old-leader")
        }

        new.use_lease(new_lease)
        await new.start(takeover=True)
        await outcomes.wait(
            lambda: all(
                any(e["scheduled_at"] >= slot.isoformat() for e in outcomes.of(n, "success"))
                for n in names
            )
        )
        await new.flush()
        for rows in burst_rows(engine, names).values():
            outcome = {r.scheduled_at: r.outcome for r in rows}
            # Run at its instant, or caught up if the new leader came after it.
            assert outcome[slot] in ("success", "missed")
            assert "interrupted" not in outcome.values()
            assert "cancelled" not in outcome.values()
    finally:
        await new.shutdown(grace=0)
        await old.shutdown(grace=0)
        engine.dispose()


async def test_claims_of_a_crashed_scheduler_never_dispatched_are_caught_up(
    db_url: str,
    bus: MessageBus,
    outcomes: Outcomes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process killed (SIGKILL) inside the lead window, its claims made and their instant not
    come, leaves undispatched claims: the next scheduler releases them and runs the slots,
    instead of recording interrupted runs that never started."""
    # The next scheduler waits for the dead process's lease to run out: a short one.
    monkeypatch.setenv("NANOBOT_SERVICE__LEASE_TTL", "2")
    reset_config()
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    crashed = Runner({}, tmp_path / "crashed.log")  # schedules the stored tasks
    try:
        names = store_burst(engine, "window")
        await until(lambda: second_instant_claimed(engine, names))
        slot = claimed_ahead(engine, names)
    finally:
        crashed.kill()
    assert utcnow() < slot, "killed after the instant: not this case"

    restarted = CronManager(engine, poll_interval=POLL, bus=bus)
    try:
        await restarted.start()
        await outcomes.wait(
            lambda: all(
                any(e["scheduled_at"] >= slot.isoformat() for e in outcomes.of(n, "success"))
                for n in names
            )
        )
        await restarted.flush()
        for rows in burst_rows(engine, names).values():
            outcome = {r.scheduled_at: r.outcome for r in rows}
            # Run at its instant, or (on a slow machine, the restart came after it) caught up.
            assert outcome[slot] in ("success", "missed")
            assert any(o == "success" for at, o in outcome.items() if at >= slot)
            assert "interrupted" not in outcome.values()
    finally:
        await restarted.shutdown(grace=0)
        engine.dispose()


# --- item 6: only the lease holder schedules; the library becomes a client -----------------------


async def test_manager_next_to_a_leader_is_a_client_of_the_control_plane(
    db_url: str, bus: MessageBus, outcomes: Outcomes, short_lease: float
) -> None:
    """While another process holds the lease, a manager used from code schedules nothing: it
    stores the task started (for that process to schedule), refuses a task it cannot store,
    leaves the leader's runs alone; and takes over once the lease is free."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    service = SchedulerLease(engine, "service-node:4242", 60.0)
    assert service.try_acquire()
    with write_transaction(engine) as conn:
        leader_run = history.claim_slots(conn, [Claim("leaders", utcnow())], node="service-node")

    class LocalOnly(CronTask):
        async def run(self) -> None:
            return None

    manager = CronManager(engine, poll_interval=POLL, bus=bus)
    try:
        with structlog.testing.capture_logs() as logs:
            manager.register_task("stored", Counter(3600, label="client"))
            await manager.start_task("stored")
            assert manager.client_of == "service-node:4242"
            assert not manager.is_alive()
            row = task_row(engine, "stored")
            assert not row.paused
            assert row.next_run_at is not None
            manager.register_task("local", LocalOnly(3600))
            with pytest.raises(TaskNotStorableError, match="service-node:4242"):
                await manager.start_task("local")
        assert not [e for e in logs if e["event"] == "cron.runs_interrupted"]
        assert (
            rows(engine, "leaders")[0].id
            == leader_run[("leaders", rows(engine, "leaders")[0].scheduled_at)]
        )
        assert rows(engine, "leaders")[0].outcome == "running"
        assert rows(engine, "stored") == []

        # The service stops: the manager is a candidate and takes over.
        service.release()
        await outcomes.wait(lambda: bool(outcomes.of("stored", "success")))
        assert manager.client_of is None
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()


# --- item 7: outcomes survive a script that returns without shutdown() --------------------------

SCRIPT = """
import asyncio, sys, time
from pathlib import Path
from nanobot.cron import get_cron_manager
from cron_tasks import AppendLine

async def main() -> None:
    path = Path(sys.argv[1])
    manager = get_cron_manager()
    manager.register_task("once", AppendLine(3600, path=str(path)))
    await manager.start_task("once")
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    # returns at once: no shutdown(), the run's outcome is still only in memory

asyncio.run(main())
"""


def test_script_returning_right_after_its_run_keeps_the_outcome(
    db_url: str, tmp_path: Path
) -> None:
    """A script that exits right after its task ran (no shutdown()) leaves the run recorded
    success, not running (nor interrupted later), and the scheduling lease released."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ran.txt")],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert (tmp_path / "ran.txt").exists()
    engine = create_db_engine(db_url)
    try:
        assert [r.outcome for r in rows(engine, "once")] == ["success"]
        with engine.connect() as conn:
            lease = conn.execute(select(LeaseRow.__table__)).one()
        assert lease.holder is None
    finally:
        engine.dispose()


# --- item 8: tasks only this process can build survive a lease lost and regained ----------------


def lease_events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["event"] for e in logs if e["event"] in ("cron.lease_lost", "cron.lease_taken")]


def after_loss(events: list[str]) -> list[str]:
    """The lease events from its first loss on."""
    return events[events.index("cron.lease_lost") :] if "cron.lease_lost" in events else []


async def test_unstorable_task_runs_again_after_the_lease_is_lost_and_regained(
    db_url: str, bus: MessageBus, outcomes: Outcomes, short_lease: float
) -> None:
    """A task that cannot be stored (its class lives in a function) stops with the lease and
    runs again once the manager has taken the lease back."""

    class Local(CronTask):
        async def run(self) -> None:
            return None

    manager = CronManager(poll_interval=POLL, bus=bus)
    try:
        with structlog.testing.capture_logs() as logs:
            manager.register_task("local", Local(0.1))
            await manager.start_task("local")
            engine = manager.engine
            await outcomes.wait(lambda: bool(outcomes.of("local", "success")))
            # Another holder takes the row (as after a database outage): the renewal fails.
            stolen_until = utcnow() + timedelta(seconds=1)
            with write_transaction(engine) as conn:
                conn.execute(
                    update(LeaseRow).values(
                        holder="thief:1", epoch=LeaseRow.epoch + 1, expires_at=stolen_until
                    )
                )
            await until(lambda: "cron.lease_lost" in lease_events(logs))
            before = len(outcomes.of("local", "success"))
            await until(lambda: "cron.lease_taken" in after_loss(lease_events(logs)))
            await outcomes.wait(lambda: len(outcomes.of("local", "success")) > before + 1)
        # Taken at the start, lost, taken back: the runs counted above came after the regain.
        assert after_loss(lease_events(logs)) == ["cron.lease_lost", "cron.lease_taken"]
    finally:
        await manager.shutdown(grace=0)


# --- item 16: a run past its bound shows ---------------------------------------------------------


async def test_run_longer_than_its_bound_shows_in_health_and_metrics(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """A run in flight longer than cron.overrun_intervals (3) intervals puts task:<name> in
    error and nanobot_task_overrunning at 1; its successful end clears both."""
    holder = Holder(0.1)
    manager.register_task("long", holder)
    await manager.start_task("long")
    await asyncio.wait_for(holder.started.wait(), WAIT)
    monitor = get_heartbeat_monitor()
    await until(lambda: monitor.get_component_status("task:long")["status"] == "error")
    assert (
        "longer than its bound of 0.3s" in monitor.get_component_status("task:long")["last_error"]
    )
    [run] = manager.runs_in_flight()
    assert run.overrunning
    assert run.bound_s == pytest.approx(0.3)
    metrics = Metrics(manager.engine, "n", runs_in_flight=manager.runs_in_flight)
    text = metrics.render().decode()
    assert 'nanobot_task_overrunning{task="long"} 1.0' in text
    assert 'nanobot_task_run_age_seconds{task="long"}' in text
    holder.release.set()
    await outcomes.wait(lambda: bool(outcomes.of("long", "success")))
    assert monitor.get_component_status("task:long")["status"] == "healthy"
    assert manager.runs_in_flight() == [] or not manager.runs_in_flight()[0].overrunning


# --- item 17: components of removed tasks go -----------------------------------------------------


async def test_components_of_tasks_gone_are_dropped_at_start(
    manager: CronManager, outcomes: Outcomes
) -> None:
    """A ``task:<name>`` component whose task no longer exists (removed just before a crash)
    is deleted when a scheduler starts, on every node; those of existing tasks stay."""
    engine = manager.open_engine()
    manager.register_task("kept", Counter(3600, label="kept"))
    now = utcnow()
    with write_transaction(engine) as conn:
        for name, node in (("task:gone", "n1"), ("task:gone", "n2"), ("task:kept", "n1")):
            conn.execute(
                insert(Component).values(
                    name=name, node=node, status="healthy", registered_at=now, updated_at=now
                )
            )
    await manager.start()
    with engine.connect() as conn:
        left = sorted(
            (r.name, r.node) for r in conn.execute(select(Component.name, Component.node))
        )
    assert ("task:gone", "n1") not in left
    assert ("task:gone", "n2") not in left
    assert ("task:kept", "n1") in left


async def test_a_burst_claimed_ahead_is_marked_chunk_by_chunk_and_all_of_it_runs(
    db_url: str, bus: MessageBus, outcomes: Outcomes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots of one instant claimed ahead are marked dispatched a chunk per transaction, each
    chunk started once marked: every slot of the instant runs once, marked, none left."""
    monkeypatch.setattr(launcher, "MARK_CHUNK", 7)
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    manager = CronManager(engine, poll_interval=POLL, bus=bus)
    try:
        await manager.start()
        # A burst's lead: its second instant is claimed ahead, undispatched (store_burst).
        names = store_burst(engine, "chunked")
        await until(lambda: second_instant_claimed(engine, names))
        slot = claimed_ahead(engine, names)
        for run in await runs_at(engine, manager, outcomes, names, slot):
            assert run.started_at is not None, run.task_name
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()
