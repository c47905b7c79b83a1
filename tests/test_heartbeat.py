"""The heartbeat monitor's behaviour: checks, staleness, transitions, persistence, the loop.

Every test runs on a real SQLite file and on PostgreSQL (the ``engine`` fixture). Time is a
:class:`FakeClock` and cycles are driven by ``run_cycle()``; the only real waits are bounded
waits on events.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
import structlog
from heartbeat_helpers import (
    NODE,
    FakeClock,
    Recorder,
    change_rows,
    component_rows,
    error_rows,
    heartbeat_rows,
    make_monitor,
)
from sqlalchemy import Engine, event

from nanobot.bus import MessageBus
from nanobot.db import create_db_engine, upgrade_database
from nanobot.exceptions import InvalidComponentError
from nanobot.heartbeat import STALE_REASON, SYSTEM_COMPONENT, HeartbeatMonitor, prune
from nanobot.heartbeat import monitor as monitor_module
from nanobot.heartbeat import outbox as outbox_module
from nanobot.heartbeat.component import ComponentState
from nanobot.models import ERROR_TEXT_MAX, ComponentStatus

WAIT = 10  # seconds: the bound of every wait in these tests


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def bus() -> MessageBus:
    return MessageBus()


@pytest.fixture
def monitor(engine: Engine, bus: MessageBus, clock: FakeClock) -> HeartbeatMonitor:
    return make_monitor(engine, bus, clock)


# --- health checks ----------------------------------------------------------------------------


async def test_plain_and_async_checks_run_concurrently(monitor: HeartbeatMonitor) -> None:
    """Two async checks that each wait for the other only pass if they run at the same time;
    a plain check runs in a thread beside them."""
    first, second = asyncio.Event(), asyncio.Event()

    async def check_a() -> bool:
        first.set()
        await second.wait()
        return True

    async def check_b() -> bool:
        second.set()
        await first.wait()
        return True

    monitor.register_component("a", check_a)
    monitor.register_component("b", check_b)
    monitor.register_component("plain", lambda: "yes")
    status = await asyncio.wait_for(monitor.run_cycle(), WAIT)
    assert status["components"] == {"total": 3, "healthy": 3, "error": 0, "unknown": 0}


async def test_a_check_returning_a_false_value_puts_its_component_in_error(
    monitor: HeartbeatMonitor, engine: Engine
) -> None:
    """A check that returns a false value is a failure, with that value in the reason."""
    monitor.register_component("empty", lambda: [])
    monitor.register_component("fine", lambda: True)
    await monitor.run_cycle()
    component = monitor.get_component_status("empty")
    assert component["status"] == "error"
    assert component["last_error"] == "health check returned []"
    assert component_rows(engine)["empty"].last_error == "health check returned []"
    assert monitor.get_component_status("fine")["status"] == "healthy"


async def test_a_check_that_raises_gives_its_reason_and_spares_the_others(
    monitor: HeartbeatMonitor, engine: Engine
) -> None:
    """The exception's type and message become the error; the other checks and cycle go on."""

    async def broken() -> bool:
        raise ConnectionError("disk on fire")

    def broken_plain() -> bool:
        raise ValueError("bad value")

    monitor.register_component("broken", broken)
    monitor.register_component("broken-plain", broken_plain)
    monitor.register_component("fine", lambda: True)
    status = await monitor.run_cycle()
    assert status["status"] == "error"
    assert status["components"]["error"] == 2
    assert monitor.get_component_status("broken")["last_error"] == (
        "health check raised ConnectionError: disk on fire"
    )
    assert [r.error for r in error_rows(engine, "broken-plain")] == [
        "health check raised ValueError: bad value"
    ]
    assert monitor.get_component_status("fine")["status"] == "healthy"


async def test_a_failing_component_recovers_when_its_check_passes(
    monitor: HeartbeatMonitor,
) -> None:
    results = [False, True]
    monitor.register_component("flaky", lambda: results.pop(0))
    await monitor.run_cycle()
    assert monitor.get_component_status("flaky")["status"] == "error"
    await monitor.run_cycle()
    assert monitor.get_component_status("flaky")["status"] == "healthy"


# --- registration and bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"health_check": "not a function"}, "not callable"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"success_threshold": 1.5}, "success_threshold"),
        ({"stale_after": -1}, "stale_after"),
    ],
)
def test_a_bad_registration_is_refused_clearly(
    kwargs: dict[str, Any], message: str, clock: FakeClock
) -> None:
    monitor = HeartbeatMonitor(MessageBus(), 10, node=NODE, clock=clock)
    with pytest.raises(InvalidComponentError, match=message):
        monitor.register_component("x", **kwargs)
    assert monitor.get_component_status("x")["status"] == "unknown"


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, SYSTEM_COMPONENT, None])
def test_a_bad_component_name_is_refused(name: Any, clock: FakeClock) -> None:
    monitor = HeartbeatMonitor(MessageBus(), 10, node=NODE, clock=clock)
    with pytest.raises(InvalidComponentError):
        monitor.register_component(name)


def test_an_unknown_component_reads_as_in_the_seed_and_is_logged(clock: FakeClock) -> None:
    """Beating or failing an unknown name is ignored, as in the seed, but never silently."""
    monitor = HeartbeatMonitor(MessageBus(), 10, node=NODE, clock=clock)
    assert monitor.get_component_status("ghost") == {
        "status": "unknown",
        "last_heartbeat": 0,
        "errors": [],
    }
    with structlog.testing.capture_logs() as logs:
        monitor.update_component_heartbeat("ghost")
        monitor.update_component_heartbeat("ghost")
        monitor.mark_component_error("ghost", "it broke")
    warnings = [e for e in logs if e["event"] == "heartbeat.unknown_component"]
    assert [w["action"] for w in warnings] == ["heartbeat", "error"]  # the beat: once
    assert warnings[1]["error"] == "it broke"
    assert monitor.get_system_status()["components"]["total"] == 0


async def test_registering_again_replaces_the_check_and_keeps_the_history(
    monitor: HeartbeatMonitor,
) -> None:
    monitor.register_component("db", lambda: False)
    await monitor.run_cycle()
    monitor.register_component("db", lambda: True)
    component = monitor.get_component_status("db")
    assert component["status"] == "error"  # no new evidence yet
    assert len(component["errors"]) == 1
    await monitor.run_cycle()
    assert monitor.get_component_status("db")["status"] == "healthy"


async def test_a_megabyte_error_is_stored_bounded(
    monitor: HeartbeatMonitor, engine: Engine
) -> None:
    monitor.register_component("noisy")
    monitor.mark_component_error("noisy", "x" * 1_000_000)
    monitor.mark_component_error("noisy", RuntimeError(""))
    await monitor.flush()
    shown = [e["error"] for e in monitor.get_component_status("noisy")["errors"]]
    stored = [r.error for r in error_rows(engine, "noisy")]
    assert stored == shown
    assert len(stored[0]) <= ERROR_TEXT_MAX
    assert stored[0].endswith("[truncated]")
    assert stored[1] == "RuntimeError"
    assert len(component_rows(engine)["noisy"].last_error) <= ERROR_TEXT_MAX


async def test_unregistering_removes_the_component_and_keeps_its_history(
    monitor: HeartbeatMonitor, engine: Engine
) -> None:
    monitor.register_component("gone")
    monitor.mark_component_error("gone", "boom")
    await monitor.run_cycle()
    monitor.unregister_component("gone")
    monitor.unregister_component("never-registered")  # ignored, as in the seed
    await monitor.run_cycle()
    assert "gone" not in component_rows(engine)
    assert monitor.get_component_status("gone")["status"] == "unknown"
    assert [r.error for r in error_rows(engine, "gone")] == ["boom"]
    assert change_rows(engine, "gone")[-1].reason == "unregistered"


async def test_unregistering_many_components_writes_each_and_logs_one_line(
    monitor: HeartbeatMonitor, engine: Engine
) -> None:
    """A leader that steps down forgets a component per task: each one goes as if unregistered
    alone (row gone, change recorded), and the log has one line for all of them."""
    names = [f"task:t{i:03d}" for i in range(30)]
    for name in names:
        monitor.register_component(name)
    monitor.register_component("kept")
    await monitor.run_cycle()
    with structlog.testing.capture_logs() as logs:
        assert monitor.unregister_components([*names, "never-registered"]) == 30
    await monitor.run_cycle()
    rows = component_rows(engine)
    assert [n for n in names if n in rows] == []
    assert "kept" in rows
    assert {change_rows(engine, n)[-1].reason for n in names} == {"unregistered"}
    assert [(e["event"], e["count"]) for e in logs] == [("heartbeat.components_unregistered", 30)]


async def test_a_cycle_over_more_components_than_a_slice_writes_each_one(
    monitor: HeartbeatMonitor, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle takes the changed components' rows a slice per loop iteration: every one is
    written, with its latest state."""
    monkeypatch.setattr(monitor_module, "ROWS_SLICE", 2)
    names = [f"c{i}" for i in range(7)]
    for name in names:
        monitor.register_component(name)
    await monitor.run_cycle()
    for name in names:
        monitor.mark_component_error(name, "boom")
    await monitor.run_cycle()
    rows = component_rows(engine)
    assert {rows[n].status for n in names} == {"error"}


def test_a_row_taken_ahead_goes_with_its_component(clock: FakeClock) -> None:
    """A component unregistered after its row was taken ahead of the write is not written
    back: its deletion is, alone."""
    box = outbox_module.Outbox(NODE)
    now = clock()
    state, kept = (
        ComponentState(name, ComponentStatus.HEALTHY, now, now, registered=True, dirty=True)
        for name in ("gone", "kept")
    )
    box.take_rows([state, kept], clock())
    box.delete("gone")
    batch = box.take([], None, clock())
    assert [row.name for row in batch.components] == ["kept"]
    assert batch.deletes == ["gone"]


# --- staleness, thresholds and task components -------------------------------------------------


async def test_a_component_beaten_in_time_never_goes_stale(
    monitor: HeartbeatMonitor, clock: FakeClock
) -> None:
    monitor.register_component("cron")
    for _ in range(5):
        clock.advance(15)
        monitor.update_component_heartbeat("cron")
        assert (await monitor.run_cycle())["status"] == "healthy"
    clock.advance(20)  # exactly 2 x interval: not yet stale
    assert monitor.get_component_status("cron")["status"] == "healthy"
    clock.advance(0.001)
    assert monitor.get_component_status("cron")["status"] == "error"
    assert monitor.get_component_status("cron")["last_error"] == STALE_REASON


async def test_reading_status_records_nothing_and_the_next_cycle_records_staleness(
    monitor: HeartbeatMonitor, clock: FakeClock, engine: Engine
) -> None:
    """get_system_status and get_component_status only read: a stale component reads in error
    at once, and its error and the transitions are recorded by the next cycle, at its time."""
    monitor.register_component("quiet")
    await monitor.run_cycle()
    clock.advance(25)
    for _ in range(3):
        assert monitor.get_system_status()["status"] == "error"
        quiet = monitor.get_component_status("quiet")
        assert (quiet["status"], quiet["last_error"]) == ("error", STALE_REASON)
        assert len(quiet["errors"]) == 1
    clock.advance(5)
    await monitor.run_cycle()
    assert [(r.at, r.error) for r in error_rows(engine, "quiet")] == [(clock.now, STALE_REASON)]
    stale = [r for r in change_rows(engine) if r.to_status == "error"]
    assert [(r.component, r.at) for r in stale] == [
        ("quiet", clock.now),
        (SYSTEM_COMPONENT, clock.now),
    ]


async def test_a_stale_component_recovers_with_its_next_heartbeat(
    monitor: HeartbeatMonitor, clock: FakeClock, engine: Engine
) -> None:
    monitor.register_component("cron")
    clock.advance(30)
    await monitor.run_cycle()
    monitor.update_component_heartbeat("cron")
    await monitor.run_cycle()
    assert [(r.from_status, r.to_status, r.reason) for r in change_rows(engine, "cron")] == [
        (None, "healthy", "registered"),
        ("healthy", "error", STALE_REASON),
        ("error", "healthy", "heartbeat"),
    ]
    clock.advance(30)  # a second episode is recorded again, once
    await monitor.run_cycle()
    await monitor.run_cycle()
    assert [r.error for r in error_rows(engine, "cron")] == [STALE_REASON, STALE_REASON]


async def test_thresholds_damp_flapping(monitor: HeartbeatMonitor) -> None:
    """Three failures in a row before error, two successes in a row before healthy."""
    monitor.register_component("flappy", failure_threshold=3, success_threshold=2)
    monitor.mark_component_error("flappy", "1")
    monitor.mark_component_error("flappy", "2")
    monitor.update_component_heartbeat("flappy")  # resets the run of failures
    monitor.mark_component_error("flappy", "3")
    monitor.mark_component_error("flappy", "4")
    assert monitor.get_component_status("flappy")["status"] == "healthy"
    assert len(monitor.get_component_status("flappy")["errors"]) == 4  # all recorded
    monitor.mark_component_error("flappy", "5")
    assert monitor.get_component_status("flappy")["status"] == "error"
    monitor.update_component_heartbeat("flappy")
    assert monitor.get_component_status("flappy")["status"] == "error"
    monitor.update_component_heartbeat("flappy")
    assert monitor.get_component_status("flappy")["status"] == "healthy"


async def test_a_task_component_fails_then_its_next_success_clears_it(
    monitor: HeartbeatMonitor, clock: FakeClock, engine: Engine
) -> None:
    """The scheduler's use: an hourly task is not stale between runs; a failed run puts it in
    error and the next successful run clears it."""
    monitor.register_component("task:report", stale_after=2 * 3600 + 60)
    monitor.mark_component_error("task:report", ZeroDivisionError("division by zero"))
    await monitor.run_cycle()
    assert monitor.get_component_status("task:report")["status"] == "error"
    clock.advance(3600)
    monitor.update_component_heartbeat("task:report")
    assert (await monitor.run_cycle())["status"] == "healthy"
    clock.advance(3600)  # far more than 2 x the monitor's interval, less than stale_after
    assert monitor.get_component_status("task:report")["status"] == "healthy"
    reasons = [r.reason for r in change_rows(engine, "task:report")]
    assert reasons == ["registered", "ZeroDivisionError: division by zero", "heartbeat"]


# --- transitions and publication ------------------------------------------------------------------


async def test_status_changes_are_recorded_and_published_with_their_reasons(
    monitor: HeartbeatMonitor, bus: MessageBus, engine: Engine
) -> None:
    recorder = Recorder(bus, "health.changed", "heartbeat")
    monitor.register_component("db")
    await monitor.run_cycle()
    monitor.mark_component_error("db", "connection refused")
    await monitor.run_cycle()
    await monitor.run_cycle()  # nothing changes: nothing is published
    monitor.update_component_heartbeat("db")
    await monitor.run_cycle()

    expected = [
        ("db", None, "healthy", "registered"),
        (None, None, "healthy", "all components healthy"),
        ("db", "healthy", "error", "connection refused"),
        (None, "healthy", "error", "error: db"),
        ("db", "error", "healthy", "heartbeat"),
        (None, "error", "healthy", "all components healthy"),
    ]
    changes = recorder.of("health.changed")
    assert [(c["component"], c["from"], c["to"], c["reason"]) for c in changes] == expected
    assert all(c["node"] == NODE and c["timestamp"] > 0 for c in changes)
    stored = [(r.component, r.from_status, r.to_status, r.reason) for r in change_rows(engine)]
    assert stored == [
        (SYSTEM_COMPONENT if name is None else name, *rest) for name, *rest in expected
    ]
    beats = recorder.of("heartbeat")
    assert len(beats) == 4
    assert [b["status"]["status"] for b in beats] == ["healthy", "error", "error", "healthy"]
    assert all(b["timestamp"] == b["status"]["last_heartbeat"] for b in beats)


async def test_each_cycle_writes_one_heartbeats_row_in_one_transaction(
    monitor: HeartbeatMonitor, engine: Engine, clock: FakeClock
) -> None:
    await monitor.load_state()
    monitor.register_component("a", lambda: False)
    monitor.register_component("b")
    monitor.mark_component_error("b", "one")
    monitor.mark_component_error("b", "two")
    begins: list[object] = []

    def on_begin(conn: object) -> None:
        begins.append(conn)

    event.listen(engine, "begin", on_begin)
    try:
        await monitor.run_cycle()
        assert len(begins) == 1
        clock.advance(10)
        await monitor.run_cycle()
        assert len(begins) == 2
    finally:
        event.remove(engine, "begin", on_begin)
    rows = heartbeat_rows(engine)
    assert [(r.node, r.status, r.total, r.healthy, r.error, r.interval_s) for r in rows] == [
        (NODE, "error", 2, 0, 2, 10.0),
        (NODE, "error", 2, 0, 2, 10.0),
    ]
    assert rows[1].at - rows[0].at == timedelta(seconds=10)


# --- restarts and other processes ----------------------------------------------------------------


async def test_state_survives_a_restart(engine: Engine, bus: MessageBus, clock: FakeClock) -> None:
    """A new monitor on the same database knows each component's status, heartbeat and last
    errors before the component registers again; the registration is then recorded."""
    first = make_monitor(engine, bus, clock)
    first.register_component("db")
    first.register_component("cache")
    for i in range(12):
        first.mark_component_error("db", f"error {i}")
    await first.run_cycle()
    before = first.get_component_status("db")

    clock.advance(60)
    second = make_monitor(engine, bus, clock)
    await second.load_state()
    after = second.get_component_status("db")
    assert after["status"] == "error"
    assert after["registered"] is False
    assert after["last_heartbeat"] == before["last_heartbeat"]
    assert after["errors"] == before["errors"]  # the last 10, oldest first
    assert second.get_component_status("cache")["status"] == "healthy"
    # Known, not yet registered in this process: visible, not counted, never marked stale.
    assert second.get_system_status()["components"]["total"] == 0
    assert second.get_component_status("cache")["status"] == "healthy"

    second.register_component("db")
    await second.run_cycle()
    assert second.get_component_status("db")["status"] == "healthy"
    assert len(second.get_component_status("db")["errors"]) == 10
    last = change_rows(engine, "db")[-1]
    assert (last.from_status, last.to_status, last.reason) == ("error", "healthy", "registered")
    system = change_rows(engine, SYSTEM_COMPONENT)
    assert [(r.from_status, r.to_status) for r in system] == [
        (None, "error"),
        ("error", "healthy"),
    ]


async def test_registering_before_the_state_loads_merges_it(
    engine: Engine, bus: MessageBus, clock: FakeClock
) -> None:
    first = make_monitor(engine, bus, clock)
    first.register_component("db")
    first.mark_component_error("db", "old")
    await first.run_cycle()

    second = make_monitor(engine, bus, clock)
    second.register_component("db")  # before any load: the first cycle loads and merges
    second.mark_component_error("db", "new")
    await second.run_cycle()
    assert [e["error"] for e in second.get_component_status("db")["errors"]] == ["old", "new"]
    changes = [(r.from_status, r.to_status, r.reason) for r in change_rows(engine, "db")]
    assert changes[-2:] == [("error", "healthy", "registered"), ("healthy", "error", "new")]


async def test_another_process_reads_the_same_state(monitor: HeartbeatMonitor, db_url: str) -> None:
    monitor.register_component("db")
    monitor.mark_component_error("db", "seen from afar")
    await monitor.run_cycle()
    script = (
        "import json, sys\n"
        "from nanobot.db import create_db_engine\n"
        "from nanobot.heartbeat.store import load_state\n"
        "state = load_state(create_db_engine(sys.argv[1]), sys.argv[2])\n"
        "print(json.dumps({c.name: [c.status, [e for _, e in c.errors]] for c in state.components}"
        " | {'system': state.system_status}))\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script, db_url, NODE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == {"db": ["error", ["seen from afar"]], "system": "error"}


async def test_a_database_that_cannot_be_written_loses_nothing(
    tmp_path: Any, bus: MessageBus, clock: FakeClock
) -> None:
    """While the schema is missing, cycles log and keep their state; once it is there, the
    next cycle writes everything that happened meanwhile."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'late.db'}")
    try:
        monitor = make_monitor(engine, bus, clock)
        monitor.register_component("db")
        monitor.mark_component_error("db", "first")
        with structlog.testing.capture_logs() as logs:
            status = await monitor.run_cycle()
        assert status["status"] == "error"
        assert "heartbeat.persist_failed" in [e["event"] for e in logs]
        monitor.mark_component_error("db", "second")
        upgrade_database(engine)
        await monitor.run_cycle()
        assert [r.error for r in error_rows(engine, "db")] == ["first", "second"]
        assert [r.to_status for r in change_rows(engine, "db")] == ["healthy", "error"]
        assert component_rows(engine)["db"].status == "error"
    finally:
        engine.dispose()


async def test_a_long_outage_keeps_the_newest_pending_records_and_says_so(
    tmp_path: Any, bus: MessageBus, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory is bounded while nothing can be written: the oldest queued errors go, counted."""
    monkeypatch.setattr(outbox_module, "MAX_PENDING", 5)
    engine = create_db_engine(f"sqlite:///{tmp_path / 'late.db'}")
    try:
        monitor = make_monitor(engine, bus, clock)
        monitor.register_component("db")
        with structlog.testing.capture_logs() as logs:
            for i in range(8):
                monitor.mark_component_error("db", f"e{i}")
            await monitor.flush()
        assert "heartbeat.pending_dropped" in [e["event"] for e in logs]
        upgrade_database(engine)
        await monitor.flush()
        assert [r.error for r in error_rows(engine, "db")] == ["e3", "e4", "e5", "e6", "e7"]
    finally:
        engine.dispose()


async def test_the_first_runs_of_a_large_burst_lose_no_transition(
    engine: Engine, bus: MessageBus, clock: FakeClock
) -> None:
    """20,000 components registered and beating in one cycle (the first runs of a burst of
    20,000 tasks) on a healthy database: every transition written, nothing dropped."""
    monitor = make_monitor(engine, bus, clock)
    names = [f"task:t{i:05d}" for i in range(20_000)]
    with structlog.testing.capture_logs() as logs:
        for name in names:
            monitor.register_component(name)
            monitor.update_component_heartbeat(name)
        await monitor.flush()
    assert "heartbeat.pending_dropped" not in [e["event"] for e in logs]
    assert {r.component for r in change_rows(engine)} >= set(names)


# --- the loop -------------------------------------------------------------------------------------


async def test_start_runs_cycles_and_stop_writes_a_last_heartbeat(
    engine: Engine, bus: MessageBus, clock: FakeClock
) -> None:
    monitor = make_monitor(engine, bus, clock, interval=0.05, check_timeout=0.02)
    beats: list[Any] = []
    two = asyncio.Event()

    def on_heartbeat(_topic: str, payload: Any) -> None:
        beats.append(payload)
        if len(beats) >= 2:
            two.set()

    bus.subscribe("heartbeat", on_heartbeat)
    monitor.register_component("cron")
    await monitor.start()
    await monitor.start()  # idempotent
    assert monitor.is_running()
    await asyncio.wait_for(two.wait(), WAIT)
    await monitor.stop()
    await monitor.stop()  # idempotent
    assert not monitor.is_running()
    assert monitor.monitor_task is None
    assert len(heartbeat_rows(engine)) >= 3  # two cycles and the last one written by stop()


async def test_a_cycle_that_raises_does_not_end_the_loop(
    engine: Engine, bus: MessageBus, clock: FakeClock
) -> None:
    """An exception escaping a cycle (here: a clock gone wrong) is logged; the loop goes on."""
    ticks = {"n": 0}
    recovered = asyncio.Event()

    def flaky_clock() -> Any:
        ticks["n"] += 1
        if ticks["n"] == 3:
            raise OSError("clock unavailable")
        return clock()

    monitor = make_monitor(engine, bus, flaky_clock, interval=0.05, check_timeout=0.02)
    bus.subscribe("heartbeat", lambda topic, payload: recovered.set())
    with structlog.testing.capture_logs() as logs:
        await monitor.start()
        await asyncio.wait_for(recovered.wait(), WAIT)
        await monitor.stop()
    assert "heartbeat.cycle_failed" in [e["event"] for e in logs]


# --- retention ------------------------------------------------------------------------------------


async def test_prune_deletes_history_past_its_retention(
    monitor: HeartbeatMonitor, engine: Engine, clock: FakeClock
) -> None:
    monitor.register_component("db")
    monitor.mark_component_error("db", "old")
    await monitor.run_cycle()
    clock.advance(10 * 86400)
    monitor.mark_component_error("db", "recent")
    monitor.update_component_heartbeat("db")
    await monitor.run_cycle()

    removed = prune(
        engine,
        now=clock.now,
        error_retention=timedelta(days=5),
        heartbeat_retention=timedelta(days=1),
    )
    assert removed == {"component_errors": 1, "component_status_changes": 3, "heartbeats": 1}
    assert [r.error for r in error_rows(engine)] == ["recent"]
    assert len(heartbeat_rows(engine)) == 1
    assert "db" in component_rows(engine)  # the current state is never pruned
    # Defaults come from configuration (30 and 7 days): nothing more is old enough.
    assert prune(engine, now=clock.now) == {
        "component_errors": 0,
        "component_status_changes": 0,
        "heartbeats": 0,
    }
