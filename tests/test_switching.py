"""The switch interval: short while the scheduler's backlog is a burst, the process's own
otherwise, and given back at stop."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
from burst_helpers import store_burst
from sqlalchemy import func, select

from nanobot.bus import MessageBus
from nanobot.cron import CronManager
from nanobot.db import create_db_engine, upgrade_database
from nanobot.models import TaskOutcome, TaskRun
from nanobot.switching import BURST_INTERVAL_S, BURST_MIN, SwitchInterval


@pytest.fixture(autouse=True)
def _interval_restored() -> Iterator[None]:
    saved = sys.getswitchinterval()
    yield
    sys.setswitchinterval(saved)


async def test_a_burst_shortens_the_interval_until_it_is_over() -> None:
    sys.setswitchinterval(0.004)
    backlog = [0]
    switching = SwitchInterval(lambda: backlog[0])
    switching.start()
    try:
        assert not switching.look()
        assert sys.getswitchinterval() == pytest.approx(0.004)
        backlog[0] = BURST_MIN
        assert switching.look()
        assert sys.getswitchinterval() == pytest.approx(BURST_INTERVAL_S)
        backlog[0] = BURST_MIN - 1
        assert not switching.look()
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        switching.stop()


async def test_the_periodic_look_follows_the_backlog_and_stop_gives_the_interval_back() -> None:
    sys.setswitchinterval(0.004)
    backlog = [5 * BURST_MIN]
    switching = SwitchInterval(lambda: backlog[0], period=0.01)
    switching.start()
    async with asyncio.timeout(10):
        while not switching.bursting:
            await asyncio.sleep(0.01)
    assert sys.getswitchinterval() == pytest.approx(BURST_INTERVAL_S)
    switching.stop()
    assert sys.getswitchinterval() == pytest.approx(0.004)
    assert not switching.look()  # stopped: it no longer sets anything
    assert sys.getswitchinterval() == pytest.approx(0.004)


async def test_the_scheduler_counts_a_burst_claimed_ahead_in_its_backlog(db_url: str) -> None:
    """Slots claimed ahead of their instant (not yet started: the burst's second instant) are
    in the scheduler's backlog, which is what makes a burst here; a scheduler with nothing
    stored has none."""
    engine = create_db_engine(db_url)
    upgrade_database(engine)
    manager = CronManager(engine, poll_interval=0.05, bus=MessageBus())
    try:
        await manager.start()
        assert manager.backlog() == 0
        names = store_burst(engine, "b")

        def claimed_ahead() -> bool:
            with engine.connect() as conn:
                return bool(
                    conn.execute(
                        select(func.count())
                        .select_from(TaskRun)
                        .where(
                            TaskRun.outcome == TaskOutcome.RUNNING.value,
                            TaskRun.started_at.is_(None),
                        )
                    ).scalar_one()
                    == len(names)
                )

        async with asyncio.timeout(30):
            while not claimed_ahead():
                await asyncio.sleep(0.02)
        assert manager.backlog() >= len(names)
    finally:
        await manager.shutdown(grace=0)
        engine.dispose()
