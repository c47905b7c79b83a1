"""The start gate (nanobot/cron/start_gate.py): the scheduler's worker items (passes, history
writes) wait for an imminent instant's runs to start, a bounded time, and go at once
otherwise."""

from __future__ import annotations

import asyncio
import functools
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from nanobot.cron.aps_adapter import NanobotScheduler
from nanobot.cron.start_gate import GATE_S, StartGate

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
WAIT_S = 10.0


def _gate(instant: datetime | None) -> StartGate:
    return StartGate(lambda: instant, lambda: NOW)


async def test_an_item_goes_at_once_when_no_instant_is_near() -> None:
    """No instant waiting, or the next one further than GATE_S: the item is called at once,
    before then() returns."""
    for instant in (None, NOW + timedelta(seconds=1), NOW + timedelta(seconds=2 * GATE_S)):
        called: list[str] = []
        _gate(instant).then(functools.partial(called.append, "item"))
        assert called == ["item"], instant


async def test_an_item_waits_for_the_imminent_instants_runs_to_start() -> None:
    """An instant within GATE_S (or already due): the item waits until the launcher opens the
    gate, and comes after what the launcher queued before opening it (the runs' first steps)."""
    for instant in (NOW + timedelta(seconds=GATE_S / 2), NOW - timedelta(seconds=0.001)):
        gate = _gate(instant)
        order: list[str] = []
        done = asyncio.Event()

        def item(order: list[str] = order, done: asyncio.Event = done) -> None:
            order.append("item")
            done.set()

        gate.then(item)
        assert order == [], "held back"
        loop = asyncio.get_running_loop()
        loop.call_soon(order.append, "run's first step")
        gate.open()
        await asyncio.wait_for(done.wait(), WAIT_S)
        assert order == ["run's first step", "item"]


async def test_the_wait_at_the_gate_is_bounded() -> None:
    """An instant that never comes (cancelled, or the loop busy): the item goes anyway; so does
    an awaited clear()."""
    gate = _gate(NOW + timedelta(seconds=GATE_S / 2))
    done = asyncio.Event()
    gate.then(done.set)
    assert not done.is_set()
    await asyncio.wait_for(done.wait(), WAIT_S)
    await asyncio.wait_for(gate.clear(), WAIT_S)


async def test_a_pass_begins_only_once_the_gate_lets_it(engine: Engine) -> None:
    """The scheduler asks its gate before each pass: held there, no pass runs and the pass
    counts as due (pass_within); let through, it runs in the worker. A scheduler stopped while
    its pass waited at the gate runs none."""
    held: list[object] = []
    ran = threading.Event()

    def process(scheduler: NanobotScheduler, now: datetime) -> float | None:
        ran.set()
        return None

    scheduler = NanobotScheduler(
        engine, process=process, poll_interval=60.0, clock=lambda: datetime.now(UTC)
    )
    scheduler.gate = held.append
    try:
        scheduler.start()
        await asyncio.wait_for(_until(lambda: bool(held)), WAIT_S)
        assert scheduler.pass_within(0.0)
        scheduler.wakeup()  # asked again while held: still one pass waiting
        await asyncio.sleep(0)
        assert len(held) == 1
        assert not ran.is_set()
        begin = held.pop()
        assert callable(begin)
        begin()
        await asyncio.wait_for(asyncio.to_thread(ran.wait, WAIT_S), WAIT_S)
        assert ran.is_set()

        await asyncio.wait_for(_until(lambda: not scheduler.passing), WAIT_S)
        ran.clear()
        scheduler.wakeup()
        await asyncio.wait_for(_until(lambda: bool(held)), WAIT_S)
        await scheduler.quiesce()
        held.pop()()  # type: ignore[operator]
        assert not scheduler.passing
        assert not ran.is_set(), "no pass once quiesced"
    finally:
        await asyncio.to_thread(scheduler.close)


async def _until(condition: object) -> None:
    assert callable(condition)
    while not condition():
        await asyncio.sleep(0.001)
