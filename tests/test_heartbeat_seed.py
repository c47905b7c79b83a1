"""The seed's HeartbeatMonitor (section 5.2): its interface, its tests, and its seven defects.

Each defect has a test named after it. The seed's own two tests are here too, rewritten as
pytest tests that run and await (its unittest versions were ``async def`` methods of a
``TestCase``, which are never awaited and cannot fail).
"""

from __future__ import annotations

import ast
import asyncio
import threading
import typing
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, Mock

import pytest
from heartbeat_helpers import FakeClock, Recorder, error_rows, make_monitor
from sqlalchemy import Engine

from nanobot.bus import MessageBus, get_bus
from nanobot.config import reset_config
from nanobot.exceptions import ComponentError
from nanobot.heartbeat import (
    CHECK_BUSY_REASON,
    STALE_REASON,
    HeartbeatMonitor,
    NoRunningLoopError,
    get_heartbeat_monitor,
    initialize_heartbeat,
    install_heartbeat_monitor,
)

WAIT = 10  # seconds: the bound of every wait in these tests


# --- the seed's own tests, made real ----------------------------------------------------------


@pytest.fixture
def seed_monitor() -> HeartbeatMonitor:
    """The seed's setUp: a Mock bus with an AsyncMock publish, interval 1."""
    mock_bus = Mock()
    mock_bus.publish = AsyncMock()
    return HeartbeatMonitor(mock_bus, interval=1)


async def test_seed_start_stop(seed_monitor: HeartbeatMonitor) -> None:
    """The seed's test_start_stop: running after start(), publishing, stopped after stop()."""
    published = asyncio.Event()
    seed_monitor.message_bus.publish.side_effect = lambda *args: published.set()
    await seed_monitor.start()
    assert seed_monitor.is_running()
    await asyncio.wait_for(published.wait(), WAIT)
    await seed_monitor.stop()
    assert not seed_monitor.is_running()
    topics = [c.args[0] for c in seed_monitor.message_bus.publish.await_args_list]
    assert "heartbeat" in topics


def test_seed_register_component(seed_monitor: HeartbeatMonitor) -> None:
    """The seed's test_register_component: a new component is healthy."""
    seed_monitor.register_component("test")
    assert seed_monitor.get_component_status("test")["status"] == "healthy"


# --- the defects --------------------------------------------------------------------------------


def test_seed_defect_1_the_module_imports_and_its_annotations_resolve() -> None:
    """``from typing import callable`` did not import; the annotations now resolve to real types."""
    hints = typing.get_type_hints(HeartbeatMonitor.register_component)
    assert "health_check" in hints
    assert typing.get_type_hints(HeartbeatMonitor.__init__)["interval"] is float


def _async_testcase_methods(source: str) -> list[str]:
    """``Class.method`` of every ``async def`` of a ``unittest.TestCase`` subclass in ``source``."""
    offenders = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        if {ast.unparse(base) for base in node.bases} & {"TestCase", "unittest.TestCase"}:
            offenders += [
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.AsyncFunctionDef)
            ]
    return offenders


def test_seed_defect_2_no_test_is_an_async_method_of_a_testcase() -> None:
    """Async methods of a unittest.TestCase are never awaited: none may hide in the suite. The
    scan finds the seed's own shape of the defect, so that it cannot pass by finding nothing."""
    seed_shape = (
        "import unittest\n"
        "class TestHeartbeat(unittest.TestCase):\n"
        "    async def test_cycle(self):\n"
        "        assert False\n"
    )
    assert _async_testcase_methods(seed_shape) == ["TestHeartbeat.test_cycle"]
    tests = Path(__file__).parent
    offenders = [
        f"{path.relative_to(tests)}:{found}"
        for path in sorted(tests.rglob("*.py"))
        for found in _async_testcase_methods(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


async def test_seed_defect_2_an_async_test_really_awaits_the_monitor() -> None:
    """This async test awaits a cycle and fails if it is wrong: it runs, as the seed's did not."""
    bus = MessageBus()
    recorder = Recorder(bus, "heartbeat")
    monitor = HeartbeatMonitor(bus, interval=1)
    monitor.register_component("test")
    status = await asyncio.wait_for(monitor.run_cycle(), WAIT)
    assert status["status"] == "healthy"
    assert recorder.of("heartbeat")[0]["status"] == status


async def test_seed_defect_3_a_stale_component_is_counted_in_error_in_the_same_call(
    engine: Engine,
) -> None:
    """The seed counted statuses before marking stale components, so they counted healthy."""
    clock = FakeClock()
    monitor = make_monitor(engine, MessageBus(), clock, interval=10)
    monitor.register_component("quiet")
    clock.advance(21)
    status = monitor.get_system_status()
    assert status["status"] == "error"
    assert status["components"] == {"total": 1, "healthy": 0, "error": 1, "unknown": 0}


async def test_seed_defect_4_staleness_is_recorded_once_and_errors_stay_bounded(
    engine: Engine,
) -> None:
    """The seed appended "heartbeat timeout" on every call; it is recorded once per episode,
    and the errors shown are the last 10 however many there are."""
    clock = FakeClock()
    monitor = make_monitor(engine, MessageBus(), clock, interval=10)
    monitor.register_component("quiet")
    clock.advance(25)
    for _ in range(50):
        monitor.get_system_status()
        monitor.get_component_status("quiet")
    await monitor.run_cycle()
    await monitor.run_cycle()
    assert [e["error"] for e in monitor.get_component_status("quiet")["errors"]] == [STALE_REASON]
    assert [r.error for r in error_rows(engine, "quiet")] == [STALE_REASON]

    for i in range(25):
        monitor.mark_component_error("quiet", f"failure {i}")
    errors = monitor.get_component_status("quiet")["errors"]
    assert [e["error"] for e in errors] == [f"failure {i}" for i in range(15, 25)]
    await monitor.flush()
    assert len(error_rows(engine, "quiet")) == 26  # the table keeps them all until retention


async def test_seed_defect_5_a_passing_health_check_is_a_heartbeat(engine: Engine) -> None:
    """A component with only a health check stays healthy for as long as the check passes."""
    clock = FakeClock()
    monitor = make_monitor(engine, MessageBus(), clock, interval=10)
    monitor.register_component("checked", lambda: True)
    for _ in range(5):
        clock.advance(10)
        status = await monitor.run_cycle()
        assert status["status"] == "healthy"
    component = monitor.get_component_status("checked")
    assert component["last_heartbeat"] == clock.now.timestamp()
    assert component["errors"] == []


async def test_seed_defect_6_hanging_checks_time_out_and_the_cycle_goes_on(engine: Engine) -> None:
    """A hanging plain check and a hanging async check cost one timeout, not the monitor."""
    release = threading.Event()
    never = asyncio.Event()
    calls = {"sync": 0}

    def hangs() -> bool:
        calls["sync"] += 1
        release.wait(WAIT)
        return True

    async def hangs_async() -> bool:
        await never.wait()
        return True

    async def fine() -> bool:
        return True

    clock = FakeClock()
    monitor = make_monitor(engine, MessageBus(), clock, interval=1, check_timeout=0.2)
    monitor.register_component("hung-thread", hangs)
    monitor.register_component("hung-task", hangs_async)
    monitor.register_component("fine", fine)
    try:
        status = await asyncio.wait_for(monitor.run_cycle(), WAIT)
        assert status["components"] == {"total": 3, "healthy": 1, "error": 2, "unknown": 0}
        for name in ("hung-thread", "hung-task"):
            assert monitor.get_component_status(name)["errors"][-1]["error"] == (
                "health check timed out after 0.2s"
            )
        # The thread still hangs: the next cycle does not start a second copy of it.
        await asyncio.wait_for(monitor.run_cycle(), WAIT)
        assert calls["sync"] == 1
        errors = monitor.get_component_status("hung-thread")["errors"]
        assert errors[-1]["error"] == CHECK_BUSY_REASON
        assert monitor.get_component_status("fine")["status"] == "healthy"
    finally:
        release.set()


def test_seed_defect_7_initialize_needs_a_running_loop_and_says_so() -> None:
    """Called without a running event loop, initialize_heartbeat explains what to do."""
    with pytest.raises(NoRunningLoopError, match="running event loop"):
        initialize_heartbeat()
    assert issubclass(NoRunningLoopError, RuntimeError)


async def test_seed_defect_7_initialize_registers_what_this_process_runs() -> None:
    """Not providers, agent, skills and channels, which nothing here beats: the components
    this process runs, each with a real check, and all healthy on a working installation."""
    bus = get_bus()
    started = asyncio.Event()
    bus.subscribe("heartbeat", lambda topic, payload: started.set())
    monitor = initialize_heartbeat()
    try:
        await asyncio.wait_for(started.wait(), WAIT)
        status = await asyncio.wait_for(monitor.run_cycle(), WAIT)
        names = {"config", "bus", "session", "database", "cron", "event_loop"}
        for name in names:
            component = monitor.get_component_status(name)
            assert component["registered"], name
            assert component["status"] == "healthy", (name, component["errors"])
        for name in ("config", "bus", "session", "database"):
            assert monitor.get_component_status(name)["health_check"] is not None
        for name in ("providers", "agent", "skills", "channels"):
            assert monitor.get_component_status(name)["status"] == "unknown"
        assert status["status"] == "healthy"
        assert status["components"]["total"] == len(names)
    finally:
        await asyncio.wait_for(monitor.stop(), WAIT)


async def test_get_heartbeat_monitor_reads_the_configured_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process-wide monitor uses heartbeat.interval and heartbeat.check_timeout."""
    monkeypatch.setenv("NANOBOT_HEARTBEAT__INTERVAL", "7")
    monkeypatch.setenv("NANOBOT_HEARTBEAT__CHECK_TIMEOUT", "2")
    reset_config()
    monitor = get_heartbeat_monitor()
    assert monitor is get_heartbeat_monitor()
    assert monitor.interval == 7
    assert monitor.check_timeout == 2
    assert monitor.message_bus is get_bus()


def test_check_timeout_never_reaches_the_next_cycle() -> None:
    """A check timeout at or above the interval is capped below it."""
    monitor = HeartbeatMonitor(Mock(), interval=2, check_timeout=60)
    assert monitor.check_timeout < monitor.interval


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), "30", True])
def test_a_bad_interval_is_refused(interval: Any) -> None:
    with pytest.raises(ValueError, match="interval"):
        HeartbeatMonitor(Mock(), interval=interval)


async def test_an_installed_monitor_is_the_process_wide_one_and_is_not_replaced() -> None:
    """A composition root's monitor becomes the one get_heartbeat_monitor() returns (what the
    scheduler's heartbeat task beats); a second one is refused, naming the way out."""
    bus = MessageBus()
    mine = HeartbeatMonitor(bus, interval=5, node="composed")
    install_heartbeat_monitor(mine)
    install_heartbeat_monitor(mine)  # the same one again: nothing changes
    assert get_heartbeat_monitor() is mine
    with pytest.raises(ComponentError, match="reset_heartbeat_monitor"):
        install_heartbeat_monitor(HeartbeatMonitor(bus, interval=5, node="other"))
    assert get_heartbeat_monitor() is mine
