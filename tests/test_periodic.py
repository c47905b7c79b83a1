"""A periodic callback on the event loop: called again after a failure, not after stop."""

from __future__ import annotations

import asyncio

from nanobot.periodic import Periodic


async def test_called_every_period_again_after_a_failure_and_not_after_stop() -> None:
    calls: list[int] = []
    three = asyncio.Event()
    errors: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context.get("exception")))

    def callback() -> None:
        calls.append(len(calls))
        if len(calls) == 3:
            three.set()
        if len(calls) == 1:
            raise RuntimeError("the first look fails")

    ticks = Periodic(0.01, callback)
    ticks.start()
    ticks.start()  # idempotent: one timer
    async with asyncio.timeout(10):
        await three.wait()
    ticks.stop()
    seen = len(calls)
    stopped = loop.create_future()
    loop.call_later(0.05, stopped.set_result, None)
    await stopped
    assert len(calls) == seen
    assert [type(e) for e in errors] == [RuntimeError]


async def test_a_callback_that_stops_it_is_not_called_again() -> None:
    calls: list[int] = []
    called = asyncio.Event()

    def callback() -> None:
        calls.append(1)
        called.set()
        ticks.stop()

    ticks = Periodic(0.01, callback)
    ticks.start()
    async with asyncio.timeout(10):
        await called.wait()
    later = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.05, later.set_result, None)
    await later
    assert calls == [1]
