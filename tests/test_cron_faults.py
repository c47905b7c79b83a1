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
from cron_tasks import Counter
from sqlalchemy import Engine, insert, select, update
from test_cron import Outcomes

from nanobot.bus import MessageBus
from nanobot.config import reset_config
from nanobot.cron import CronManager, CronTask, history, launcher
from nanobot.cron.history import Claim, Finish
from nanobot.db import create_db_engine, upgrade_database, write_transaction
from nanobot.exceptions import TaskNotStorableError
from nanobot.heartbeat import get_heartbeat_monitor
from nanobot.lease import SchedulerLease
from nanobot.metrics import Metrics
from nanobot.models import Component, Task, TaskOutcome, TaskRun, apscheduler_jobs, utcnow
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
        return conn.execute(select(Task.__table__).where(Task.name == name)).one()


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
        conn.execute(
            insert(Task).values(
                name="t", task_class="cron_tasks:Counter", interval_s=1.0, kwargs={}
            )
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
    db_url: str, bus: MessageBus, outcomes: Outcomes
) -> None:
    """A leader whose lease ran out while its run was suspended (frozen) does not execute one
    more line of the run: it is recorded cancelled, and the next slot is not started but left
    undispatched, for whoever leads next to catch it up."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    manager = CronManager(engine, poll_interval=POLL, bus=bus)
    lease = ControlledLease(engine)
    assert lease.try_acquire()
    manager.use_lease(lease)
    holder = Holder(0.3)
    try:
        with structlog.testing.capture_logs() as logs:
            manager.register_task("held", holder)
            await manager.start_task("held")
            await asyncio.wait_for(holder.started.wait(), WAIT)
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


# --- item 21: slots claimed ahead of a stop ------------------------------------------------------


async def test_stop_releases_claims_not_yet_due_and_next_start_runs_them(
    db_url: str, bus: MessageBus, outcomes: Outcomes
) -> None:
    """A slot claimed ahead of its instant when the scheduler stops is released: no row, no
    ``cancelled`` before its time, its job moved back to it; the next start runs it."""
    first = CronManager(poll_interval=POLL, bus=bus)
    # As if a pass cost a second per slot: the next slot is claimed 2 s ahead (a burst's lead).
    first._dispatcher.cost_per_job = 1.0
    first.register_task("ahead", Counter(2, label="ahead"))
    await first.start_task("ahead")
    engine = first.engine
    await outcomes.wait(lambda: bool(outcomes.of("ahead", "success")))
    await until(lambda: len(rows(engine, "ahead")) == 2)
    slot = rows(engine, "ahead")[1].scheduled_at
    assert rows(engine, "ahead")[1].started_at is None, "claimed ahead, not dispatched"
    assert slot > utcnow()
    await first.shutdown(grace=0)
    assert [r.outcome for r in rows(engine, "ahead")] == ["success"]
    assert job_next_run(engine, "ahead") == pytest.approx(slot.timestamp())
    assert task_row(engine, "ahead").next_run_at == slot

    second = CronManager(poll_interval=POLL, bus=bus)
    second.register_task("ahead", Counter(2, label="ahead"))
    try:
        await second.start_all_tasks()
        await outcomes.wait(lambda: len(outcomes.of("ahead", "success")) >= 2)
        await second.flush()
    finally:
        await second.shutdown(grace=0)
    done = rows(engine, "ahead")
    assert [(r.scheduled_at, r.outcome) for r in done][:2] == [
        (done[0].scheduled_at, "success"),
        (slot, "success"),
    ]
    assert not [r for r in done if r.outcome == "cancelled"]


async def test_claims_of_a_crashed_scheduler_never_dispatched_are_caught_up(
    db_url: str, bus: MessageBus, outcomes: Outcomes
) -> None:
    """A process that died inside the lead window (its claim made, its slot's instant not come)
    leaves an undispatched claim: the next scheduler releases it and runs the slot, instead of
    recording interrupted a run that never started."""
    crashed = CronManager(poll_interval=POLL, bus=bus)
    crashed._dispatcher.cost_per_job = 1.0
    crashed.register_task("window", Counter(2, label="window"))
    await crashed.start_task("window")
    engine = crashed.engine
    await until(lambda: len(rows(engine, "window")) == 2)
    slot = rows(engine, "window")[1].scheduled_at
    # The crash: nothing of this scheduler runs any more, nothing is released or written.
    scheduler = crashed._ctx.scheduler
    assert scheduler is not None
    for handle, _ in crashed._launcher.delayed.values():
        handle.cancel()
    crashed._launcher.delayed.clear()
    assert crashed._own_lease.keeper is not None
    crashed._own_lease.keeper.cancel()
    await asyncio.to_thread(scheduler.close)
    crashed._ctx.scheduler = None

    restarted = CronManager(poll_interval=POLL, bus=bus)
    restarted.register_task("window", Counter(2, label="window"))
    try:
        await restarted.start_all_tasks()
        await outcomes.wait(
            lambda: any(
                e["scheduled_at"] >= slot.isoformat() for e in outcomes.of("window", "success")
            )
        )
        await restarted.flush()
    finally:
        await restarted.shutdown(grace=0)
    outcome = {r.scheduled_at: r.outcome for r in rows(engine, "window")}
    # Run at its instant, or (on a slow machine, the restart came after it) caught up once.
    assert outcome[slot] in ("success", "missed")
    assert any(o == "success" for at, o in outcome.items() if at >= slot)
    assert "interrupted" not in outcome.values()


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
    engine = manager.engine
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
    monkeypatch.setattr(launcher, "MARK_CHUNK", 2)
    names = [f"burst{i}" for i in range(5)]
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    now = utcnow()
    instant = now + timedelta(seconds=3)
    with write_transaction(engine) as conn:
        # Stored as `cron add` stores them, all due at one instant.
        conn.execute(
            insert(Task),
            [
                {
                    "name": name,
                    "task_class": "cron_tasks:Counter",
                    "interval_s": 60.0,
                    "kwargs": {"interval": 60, "label": name},
                    "paused": False,
                    "anchor_at": instant,
                    "next_run_at": instant,
                    "created_at": now,
                    "updated_at": now,
                    "version": 1,
                    "consecutive_failures": 0,
                }
                for name in names
            ],
        )
    manager = CronManager(poll_interval=POLL, bus=bus)
    # As if a pass cost a second per slot: the instant's slots are claimed seconds ahead.
    manager._dispatcher.cost_per_job = 1.0
    try:
        await manager.start()
        await until(lambda: all(len(rows(engine, n)) == 1 for n in names))
        assert all(rows(engine, n)[0].started_at is None for n in names), "claimed ahead"
        await outcomes.wait(lambda: all(outcomes.of(n, "success") for n in names))
        await manager.flush()
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()
    for name in names:
        done = rows(engine, name)
        assert [(r.scheduled_at, r.outcome) for r in done] == [(instant, "success")]
        assert done[0].started_at is not None
