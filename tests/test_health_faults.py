"""Bad health checks hurt only their own component; a check that blocks the loop is named.

Real SQLite file and PostgreSQL (the ``engine`` fixture); blocks of the event loop are real
(``time.sleep`` inside an async check) but short, with the limits lowered for the test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from heartbeat_helpers import FakeClock, component_rows, heartbeat_rows, make_monitor
from sqlalchemy import Engine

from nanobot.bus import MessageBus
from nanobot.heartbeat import HeartbeatMonitor
from nanobot.heartbeat import monitor as monitor_module
from nanobot.heartbeat.monitor import EVENT_LOOP_COMPONENT
from nanobot.loopwatch import HOLD_REPORT_S, PROBE_PERIOD_S, LagProbe, Stepper, last_hold

WAIT = 10


@pytest.fixture
def monitor(engine: Engine) -> HeartbeatMonitor:
    return make_monitor(engine, MessageBus(), FakeClock(), interval=30, check_timeout=2)


class Untellable:
    """A result whose truth test raises (``if result:`` fails)."""

    def __bool__(self) -> bool:
        raise ValueError("the truth of this is ambiguous")

    def __repr__(self) -> str:
        raise RuntimeError("and it cannot be shown either")


async def test_check_whose_result_has_no_truth_fails_only_its_component(
    monitor: HeartbeatMonitor, engine: Engine
) -> None:
    """A check returning an object whose truth test raises puts its own component in error;
    the cycle goes on, the other components stay healthy and the heartbeat row is written."""
    monitor.register_component("odd", lambda: Untellable())
    monitor.register_component("fine", lambda: True)

    async def async_odd() -> Any:
        return Untellable()

    monitor.register_component("odd_async", async_odd)
    status = await asyncio.wait_for(monitor.run_cycle(), WAIT)
    assert status["components"] == {"total": 3, "healthy": 1, "error": 2, "unknown": 0}
    odd = monitor.get_component_status("odd")
    assert odd["status"] == "error"
    assert "truth cannot be told" in odd["last_error"]
    assert "ValueError" in odd["last_error"]
    assert monitor.get_component_status("fine")["status"] == "healthy"
    assert len(heartbeat_rows(engine)) == 1
    assert component_rows(engine)["odd_async"].status == "error"


class FalseUnshowable:
    """A false result that cannot be shown (its ``repr`` raises)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_check_whose_false_result_cannot_be_shown_is_named_by_its_type(
    monitor: HeartbeatMonitor,
) -> None:
    """A false result whose repr raises still fails its component, with a reason naming its
    type instead of its value (reprlib's form); the cycle goes on."""
    monitor.register_component("quiet", lambda: FalseUnshowable())
    monitor.register_component("fine", lambda: True)
    status = await asyncio.wait_for(monitor.run_cycle(), WAIT)
    assert status["components"] == {"total": 2, "healthy": 1, "error": 1, "unknown": 0}
    quiet = monitor.get_component_status("quiet")
    assert quiet["status"] == "error"
    assert quiet["last_error"].startswith("health check returned <FalseUnshowable instance at ")


async def test_check_that_blocks_the_loop_is_blamed_not_its_neighbours(
    monitor: HeartbeatMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async check that blocks the event loop fails with the time it held the loop; an async
    check that was starved meanwhile is not blamed, and ``event_loop`` is put in error naming
    the culprit."""
    monkeypatch.setattr(monitor_module, "LOOP_LAG_ERROR_S", 0.2)
    block = 2 * HOLD_REPORT_S + 0.1

    async def blocking() -> bool:
        time.sleep(block)  # noqa: ASYNC251 - the fault under test: a blocking async check
        return True

    async def innocent() -> bool:
        await asyncio.sleep(0.01)
        return True

    monitor.register_component(EVENT_LOOP_COMPONENT)
    await monitor.start()
    try:
        await asyncio.wait_for(monitor.run_cycle(), WAIT)  # a calm cycle first
        assert monitor.get_component_status(EVENT_LOOP_COMPONENT)["status"] == "healthy"
        monitor.register_component("blocker", blocking)
        monitor.register_component("innocent", innocent)
        await asyncio.wait_for(monitor.run_cycle(), WAIT)
        blocker = monitor.get_component_status("blocker")
        assert blocker["status"] == "error"
        assert "held the event loop" in blocker["last_error"]
        assert monitor.get_component_status("innocent")["status"] == "healthy"
        loop = monitor.get_component_status(EVENT_LOOP_COMPONENT)
        assert loop["status"] == "error"
        assert "health check of component blocker" in loop["last_error"]
        # A timer due within the block fires that much late (up to one probe period less).
        assert monitor.last_loop_lag >= block - PROBE_PERIOD_S - 0.05
        # Once the blocker goes, the loop component recovers at the next cycle.
        monitor.unregister_component("blocker")
        await asyncio.wait_for(monitor.run_cycle(), WAIT)
        assert monitor.get_component_status(EVENT_LOOP_COMPONENT)["status"] == "healthy"
    finally:
        await asyncio.wait_for(monitor.stop(), WAIT)


async def test_lag_probe_measures_a_blocked_loop() -> None:
    """The probe reports about as much lag as the loop was blocked, and resets on take()."""
    probe = LagProbe(period=0.05)
    probe.start()
    try:
        await asyncio.sleep(0.06)
        time.sleep(0.3)  # noqa: ASYNC251 - the loop blocked on purpose
        await asyncio.sleep(0.06)
        worst, _ = probe.take()
        assert 0.25 <= worst < 1.0
        await asyncio.sleep(0.12)
        worst, _ = probe.take()
        assert worst < 0.25
    finally:
        probe.stop()


async def test_stepper_times_steps_and_records_the_culprit() -> None:
    """A coroutine stepped by Stepper returns its value; its longest step is measured and a
    step past the report limit is recorded as the latest hold with its owner."""
    since = time.monotonic()

    async def work() -> int:
        await asyncio.sleep(0)
        time.sleep(HOLD_REPORT_S + 0.05)  # noqa: ASYNC251 - a step that holds the loop
        await asyncio.sleep(0)
        return 7

    stepper = Stepper(work(), "unit of work")
    assert await stepper == 7
    assert stepper.held >= HOLD_REPORT_S
    hold = last_hold(since)
    assert hold is not None
    assert hold.owner == "unit of work"


async def test_stepper_fence_stops_a_coroutine_before_its_next_step() -> None:
    """When the fence says no, the coroutine gets a cancellation at its await and not one more
    of its lines runs."""
    allowed = True
    reached: list[str] = []

    async def run() -> None:
        reached.append("start")
        await asyncio.sleep(0.01)
        reached.append("after the await")

    def fence() -> bool:
        return allowed

    stepper = Stepper(run(), "fenced run", fence=fence)
    task = asyncio.ensure_future(stepper)
    await asyncio.sleep(0)
    allowed = False
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert reached == ["start"]
    assert stepper.fenced
