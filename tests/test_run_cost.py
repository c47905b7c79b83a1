"""What each run costs the service: log lines, rows written, history kept, events delivered.

On a real SQLite file and on PostgreSQL (``db_url`` / ``engine``), with a real scheduler.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
from cron_tasks import Counter, Failing
from sqlalchemy import Engine, event, func, select

from nanobot.bus import MessageBus
from nanobot.config import reset_config
from nanobot.cron import CronManager, TaskOutcome, control, definitions, history
from nanobot.cron.aps_adapter import JobSpec, NanobotScheduler
from nanobot.cron.context import CronContext
from nanobot.cron.dispatch import DISPATCH_AHEAD, PASS_MARGIN, Dispatcher
from nanobot.cron.history import Claim, Finish
from nanobot.cron.recorder import FLUSH_WINDOW_S, LAUNCH_DEFER_MAX_S, Recorder
from nanobot.cron.retention import HistoryTrimmer, margin_for
from nanobot.cron.task import TaskDefinition
from nanobot.db import get_engine, write_transaction
from nanobot.models import Task, TaskRun, TaskSource, apscheduler_job_states

POLL = 0.05
WAIT = 10.0


async def _until(predicate: Callable[[], bool], within: float = WAIT) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(POLL)


def _count(engine: Engine, task: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(TaskRun).where(TaskRun.task_name == task)
            ).scalar_one()
        )


# --- history kept within its limit as outcomes are written -----------------------------------


def _run_once(engine: Engine, trimmer: HistoryTrimmer, task: str, slot: datetime) -> None:
    with write_transaction(engine) as conn:
        run_id = history.claim_slots(conn, [Claim(task, slot)], node="n")[(task, slot)]
    finish = Finish(task, run_id, slot, TaskOutcome.SUCCESS, slot, slot + timedelta(seconds=1))
    history.write_finishes(engine, [finish])
    trimmer.after_write(engine, [task])


def test_history_stays_within_limit_plus_margin(engine: Engine) -> None:
    """Every task keeps at most max_rows + margin rows at all times while it runs, and reaches
    its limit: the newest rows are the ones kept, a run in progress is never deleted."""
    trimmer = HistoryTrimmer(20, margin=5, seed=1)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        history.claim_slots(conn, [Claim("a", t0 - timedelta(days=1))], node="n")  # in progress
    most = 0
    for k in range(80):
        for task in ("a", "b", "c"):
            _run_once(engine, trimmer, task, t0 + timedelta(seconds=k))
            most = max(most, _count(engine, task))
    assert most <= 20 + 5 + 1  # + 1: the run in progress of "a", never deleted
    for task in ("b", "c"):
        assert 20 <= _count(engine, task) <= 25
    with engine.connect() as conn:
        newest_b = conn.execute(
            select(func.max(TaskRun.scheduled_at)).where(TaskRun.task_name == "b")
        ).scalar_one()
        running = conn.execute(
            select(func.count())
            .select_from(TaskRun)
            .where(TaskRun.task_name == "a", TaskRun.outcome == TaskOutcome.RUNNING.value)
        ).scalar_one()
    assert newest_b == t0 + timedelta(seconds=79)
    assert running == 1


def test_tasks_in_phase_are_trimmed_in_different_batches() -> None:
    """Thousands of tasks that run together are not all trimmed in the same batch: the first
    count of each is random, so each batch trims about 1/margin of them."""
    trimmer = HistoryTrimmer(1000, seed=7)
    names = [f"t{i}" for i in range(2000)]
    per_batch = [len(trimmer.due(names)) for _ in range(margin_for(1000))]
    assert sum(per_batch) == 2000  # each task once per margin rows
    assert max(per_batch) < 2000 * 3 / margin_for(1000)


def test_margin_is_a_tenth_of_the_limit_at_least_ten() -> None:
    assert margin_for(1000) == 100
    assert margin_for(50) == 10
    with pytest.raises(ValueError, match="max_rows"):
        HistoryTrimmer(0)


async def test_service_trims_history_as_it_runs(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With cron.history_max_rows = 10, a task running every 50 ms never holds much more than
    its limit, long before the hourly cleanup runs."""
    monkeypatch.setenv("NANOBOT_CRON__HISTORY_MAX_ROWS", "10")
    reset_config()
    bus = MessageBus()
    manager = CronManager(poll_interval=POLL, bus=bus)
    done: list[str] = []
    bus.subscribe("task.finished", lambda _t, p: done.append(p["outcome"]))
    try:
        manager.register_task("quick", Counter(0.05, label="quick"))
        await manager.start_task("quick")
        engine = get_engine()
        most = 0
        async with asyncio.timeout(WAIT * 3):
            while len(done) < 60:
                most = max(most, await asyncio.to_thread(_count, engine, "quick"))
                await asyncio.sleep(0.02)
        await manager.flush()
        most = max(most, _count(engine, "quick"))
        # The limit, the trim margin, and the few slots claimed ahead whose outcome is not yet
        # written (they are counted at the next write).
        assert most <= 10 + margin_for(10) + 5
        assert _count(engine, "quick") >= 10
    finally:
        await manager.shutdown(grace=0)


# --- one line per run that matters -------------------------------------------------------------


async def test_success_logs_nothing_at_info_failure_logs_one_line(db_url: str) -> None:
    """At the default level a successful run writes no line (task_runs has it); a failed run
    writes one line at error, with its duration, and no task.finished line above debug."""
    bus = MessageBus()
    manager = CronManager(poll_interval=POLL, bus=bus)
    outcomes: list[dict[str, Any]] = []
    bus.subscribe("task.finished", lambda _t, p: outcomes.append(p))
    try:
        with structlog.testing.capture_logs() as captured:
            manager.register_task("ok", Counter(0.05, label="ok"))
            manager.register_task("bad", Failing(0.05))
            await manager.start_task("ok")
            await manager.start_task("bad")
            await _until(
                lambda: (
                    {"success", "error"} <= {p["outcome"] for p in outcomes} and len(outcomes) >= 6
                )
            )
            await manager.flush()
    finally:
        await manager.shutdown(grace=0)
    # capture_logs leaves out the bound context (task, run_id): events are told apart here by
    # what they are.
    per_run = [
        e
        for e in captured
        if e["log_level"] != "debug" and e["event"].startswith(("task.", "heartbeat."))
    ]
    failed = [e for e in per_run if e["event"] == "task.failed"]
    assert failed
    assert all(isinstance(e["duration_s"], float) for e in failed)
    assert all(e["log_level"] == "error" for e in failed)
    # What is left: the failed task's component going to error.
    others = [e for e in per_run if e["event"] != "task.failed"]
    assert {e["event"] for e in others} <= {"heartbeat.component_error", "heartbeat.status_changed"}
    assert all(e.get("component") == "task:bad" for e in others)
    assert not [e for e in per_run if e["event"] == "task.finished"]
    assert not [e for e in per_run if e["event"] == "heartbeat.component_registered"]


# --- one tasks row version per run -------------------------------------------------------------


async def test_a_run_updates_its_state_row_once(engine: Engine, db_url: str) -> None:
    """The next-run mirror of a claimed slot is written with the run's outcome: a run makes one
    UPDATE of its task_state row (none of its wide tasks row), and the row ends with both its
    last run and its next run."""
    updates: list[str] = []

    def _count_updates(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(("UPDATE TASKS", "UPDATE TASK_STATE")):
            updates.append(statement)

    control.add_task(engine, TaskDefinition(name="m", task_class="cron_tasks:Counter", interval=60))
    nanobot_engine = get_engine()
    bus = MessageBus()
    manager = CronManager(nanobot_engine, poll_interval=POLL, bus=bus)
    seen: list[dict[str, Any]] = []
    bus.subscribe("task.finished", lambda _t, p: seen.append(p))
    await manager.start()
    try:
        await _until(lambda: bool(seen))
        await manager.flush()
        event.listen(nanobot_engine, "before_cursor_execute", _count_updates)
        await manager.run_task_now("m")  # a manual run: no schedule change
        await _until(lambda: len(seen) >= 2)
        await manager.flush()
    finally:
        event.remove(nanobot_engine, "before_cursor_execute", _count_updates)
        await manager.shutdown(grace=0)
    with engine.connect() as conn:
        row = conn.execute(control.TASK_ROWS.where(Task.name == "m")).one()
    assert row.last_outcome == "success"
    assert row.next_run_at is not None
    assert row.next_run_at > row.last_run_at
    # The manual run: one mirror UPDATE for its outcome, and the consumed run request.
    assert len([u for u in updates if "last_run_at" in u]) == 1
    assert not [u for u in updates if "last_run_at" not in u and "next_run_at" in u]
    mirrors = [u for u in updates if "last_run_at" in u]
    assert mirrors[0].lstrip().upper().startswith("UPDATE TASK_STATE")


# --- the job store writes only the next run time on every run ------------------------------


def test_a_pass_writes_only_the_next_run_time(engine: Engine) -> None:
    """Moving a job to its next slot rewrites its next_run_time column, not its pickled state;
    every read gives the column's time, to the microsecond."""
    scheduler = NanobotScheduler(engine, process=lambda *_: None, poll_interval=1, clock=_now)
    t0 = datetime(2026, 1, 1, 9, 0, 0, 123456, tzinfo=UTC)
    scheduler.add_many([JobSpec("j", "cron_tasks:Counter", {"interval": 10}, 10.0, t0, t0)])
    state_before = _job_state(engine)
    due = scheduler.due(t0, t0, {})
    assert [d.run_slot for d in due] == [t0]
    with write_transaction(engine) as conn:
        scheduler.advance_due(conn)
    scheduler.advance_memory()  # the transaction committed
    assert _job_state(engine) == state_before, "the pickled state is not rewritten"
    later = t0 + timedelta(seconds=10)
    assert pickle.loads(state_before)["next_run_time"] == t0
    state = scheduler.lookup("j")
    assert state is not None
    assert state.next_run_at == later
    assert scheduler.next_run_at() == later
    assert [d.run_slot for d in scheduler.due(later, later, {})] == [later]
    scheduler.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _job_state(engine: Engine) -> bytes:
    with engine.connect() as conn:
        return bytes(
            conn.execute(
                select(apscheduler_job_states.c.job_state).where(apscheduler_job_states.c.id == "j")
            ).scalar_one()
        )


# --- events of a burst delivered in one task ---------------------------------------------------


async def test_publish_many_delivers_in_order_to_every_subscriber() -> None:
    """publish_many gives each subscriber every message in order; one that raises is logged
    and the others still get everything."""
    bus = MessageBus()
    plain: list[int] = []
    awaited: list[int] = []

    async def slow(_topic: str, payload: int) -> None:
        await asyncio.sleep(0)
        awaited.append(payload)

    def broken(_topic: str, payload: int) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe("t", lambda _t, p: plain.append(p))
    bus.subscribe("t", slow)
    bus.subscribe("t", broken)
    with structlog.testing.capture_logs() as captured:
        delivered = await bus.publish_many("t", list(range(500)))
    assert plain == awaited == list(range(500))
    assert delivered == 1000
    assert len([e for e in captured if e["event"] == "bus.subscriber_failed"]) == 500


async def test_publish_many_abandons_a_stuck_subscriber_once() -> None:
    """A subscriber that does not answer within the timeout costs one timeout for the whole
    batch, not one per message; the others get every message."""
    bus = MessageBus(handler_timeout=0.05)
    got: list[int] = []

    async def stuck(_topic: str, _payload: int) -> None:
        await asyncio.Event().wait()

    bus.subscribe("t", stuck)
    bus.subscribe("t", lambda _t, p: got.append(p))
    with structlog.testing.capture_logs() as captured:
        async with asyncio.timeout(2):
            await bus.publish_many("t", list(range(100)))
    assert got == list(range(100))
    assert len([e for e in captured if e["event"] == "bus.subscriber_timeout"]) == 1


class _Launched(asyncio.Event):
    """The launcher's event, which says when the recorder starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = asyncio.Event()

    async def wait(self) -> Literal[True]:
        self.waited.set()
        return await super().wait()


def _recorder_on(
    bus: MessageBus, launched: asyncio.Event, engine: Engine | None = None
) -> Recorder:
    ctx = CronContext(
        engine,
        node="n",
        clock=lambda: datetime.now(UTC),
        poll_interval=None,
        bus=bus,
        monitor=None,
        fence=None,
    )
    if engine is not None:
        ctx.open_engine()
    return Recorder(ctx, apply_pauses=lambda _s: None, launched=launched)


async def test_events_of_a_burst_wait_until_its_launches_are_started() -> None:
    """task.finished events of runs that ended while a burst's launches are still being started
    wait until every launch is started (they would make the last ones late), then all go; an
    end of launches that the next ones follow at once does not let them through."""
    bus = MessageBus()
    got: list[str] = []
    bus.subscribe("task.finished", lambda _t, p: got.append(p["task"]))
    launched = _Launched()  # not set: the launcher is in the middle of a burst
    recorder = _recorder_on(bus, launched)
    now = datetime.now(UTC)
    recorder.announce_batch(
        [Finish(name, None, now, TaskOutcome.MISSED, None, now) for name in ("a", "b")]
    )
    async with asyncio.timeout(WAIT):
        await launched.waited.wait()
    for _ in range(20):
        await asyncio.sleep(0)
    assert got == [], "nothing delivered while the launches go on"
    launched.set()  # one hand-over's launches started...
    launched.clear()  # ...and the next one's begin in the same loop iteration
    for _ in range(20):
        await asyncio.sleep(0)
    assert got == [], "nothing delivered while the next launches go on"
    launched.set()
    async with asyncio.timeout(WAIT):
        await recorder.flush()
    assert got == ["a", "b"]


async def test_events_wait_for_a_burst_a_bounded_time() -> None:
    """Launches that never end (a launcher that never sets its event) hold a burst's events
    LAUNCH_DEFER_MAX_S at most."""
    bus = MessageBus()
    delivered = asyncio.Event()
    bus.subscribe("task.finished", lambda _t, _p: delivered.set())
    recorder = _recorder_on(bus, asyncio.Event())
    loop = asyncio.get_running_loop()
    now = datetime.now(UTC)
    announced = loop.time()
    recorder.announce(Finish("a", None, now, TaskOutcome.MISSED, None, now))
    async with asyncio.timeout(WAIT):
        await delivered.wait()
    assert loop.time() - announced >= LAUNCH_DEFER_MAX_S


async def test_outcomes_of_a_burst_are_written_once_its_launches_are_started(
    engine: Engine,
) -> None:
    """An outcome recorded while a burst's launches are still being started is written once
    they are (the writes would take the interpreter lock and the database's write lock from
    them), then at once."""
    bus = MessageBus()
    launched = _Launched()  # not set: the launcher is in the middle of a burst
    recorder = _recorder_on(bus, launched, engine)
    slot = _now()
    with write_transaction(engine) as conn:
        run_id = history.claim_slots(conn, [Claim("burst", slot)], node="n")[("burst", slot)]
    recorder.record(
        Finish("burst", run_id, slot, TaskOutcome.SUCCESS, slot, slot + timedelta(seconds=1))
    )
    async with asyncio.timeout(WAIT):
        await launched.waited.wait()
    # What does not happen has no event to wait for: five times the window after which an
    # outcome is written when no burst is being launched.
    await asyncio.sleep(5 * FLUSH_WINDOW_S)
    with engine.connect() as conn:
        outcome = conn.execute(select(TaskRun.outcome).where(TaskRun.id == run_id)).scalar_one()
    assert outcome == TaskOutcome.RUNNING.value, "not written while the launches go on"
    launched.set()
    async with asyncio.timeout(WAIT):
        await recorder.flush()
    with engine.connect() as conn:
        outcome = conn.execute(select(TaskRun.outcome).where(TaskRun.id == run_id)).scalar_one()
    assert outcome == TaskOutcome.SUCCESS.value


# --- passes at a steady load -------------------------------------------------------------------


@pytest.mark.parametrize(("ahead", "most_per_second"), [(None, 15), ("0.25", 7)])
async def test_a_spread_load_is_claimed_in_few_passes(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ahead: str | None,
    most_per_second: float,
) -> None:
    """20 stored tasks every 0.2 s, 10 ms apart (a slot every 10 ms, as hundreds of tasks spread
    over the second make): each pass claims up to cron.dispatch_ahead ahead (DISPATCH_AHEAD by
    default) and the next one wakes PASS_MARGIN before the next slot, so passes come about every
    dispatch_ahead - PASS_MARGIN seconds, not every SCHEDULE_LEAD (each pass costs statements
    of its own); every slot runs. At 0.25 s a pass claims the next slot of every task (they
    span 0.2 s): a pass about every 0.18 s."""
    if ahead is not None:
        monkeypatch.setenv("NANOBOT_CRON__DISPATCH_AHEAD", ahead)
        reset_config()
    passes: list[float] = []
    run_pass = Dispatcher.run_pass

    def counted(self: Dispatcher, scheduler: NanobotScheduler, now: datetime) -> float | None:
        passes.append(now.timestamp())
        return run_pass(self, scheduler, now)

    monkeypatch.setattr(Dispatcher, "run_pass", counted)
    runs = tmp_path / "runs.txt"
    start = _now() + timedelta(seconds=0.5)
    with write_transaction(engine) as conn:
        for i in range(20):
            definition = definitions.definition_from_class(
                f"spread{i:02d}", "cron_tasks:Counter", 0.2, {"label": "run", "path": str(runs)}
            )
            values = control.new_task_values(
                definition, start + timedelta(seconds=0.01 * i), source=TaskSource.CLI,
                paused=False, started=True,
            )  # fmt: skip
            control.insert_task(conn, values)

    def ran() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    # Polled every second, as by default: a pass also comes at every poll.
    manager = CronManager(engine, poll_interval=1.0, bus=MessageBus())
    try:
        await manager.start()
        await _until(lambda: ran() >= 40)
        first, before = len(passes), ran()
        await _until(lambda: ran() >= before + 200)
        per_second = (len(passes) - 1 - first) / (passes[-1] - passes[first])
        # 1 / (DISPATCH_AHEAD - PASS_MARGIN) = 12.5 a second; 20 with a lead of SCHEDULE_LEAD.
        assert 1 / (DISPATCH_AHEAD - PASS_MARGIN) <= 12.5
        assert per_second <= most_per_second
    finally:
        await manager.shutdown(grace=0)
