"""Figure 4, health cycle: C components, each with a check that takes 20 ms.

Measured: the wall time of one ``HeartbeatMonitor.run_cycle()`` (checks, staleness, system
status, the cycle's state written to the database, publication), the median of a few cycles
after a warm-up cycle (the first one loads the stored state and writes C registrations), and
the database transactions it opened (counted with an SQLAlchemy ``begin`` event on the engine).

- async checks: ``await asyncio.sleep(0.02)``;
- half plain: every other component has a plain blocking check, ``time.sleep(0.02)``;
- baseline, the seed's design: one sequential loop calling each check in turn (awaiting the
  async ones, calling the plain ones), state kept in memory: about C x 20 ms. It is measured
  once per C on the half-plain set (sequentially both kinds take their 20 ms).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from bench.common import LoopMonitor, Result, bench_home, median, nanobot_engine

CHECK_S = 0.02
CYCLES = 3


async def _async_check() -> bool:
    await asyncio.sleep(CHECK_S)
    return True


def _plain_check() -> bool:
    time.sleep(CHECK_S)
    return True


def _checks(count: int, half_plain: bool) -> list[tuple[str, Any]]:
    return [
        (f"c{i:04d}", _plain_check if half_plain and i % 2 else _async_check) for i in range(count)
    ]


async def seed_cycle(checks: list[tuple[str, Any]]) -> float:
    """The seed's monitor loop body: each check in turn, the status kept in a dict."""
    status: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name, check in checks:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            status[name] = {"status": "healthy" if result else "error", "at": time.time()}
        except Exception as exc:
            status[name] = {"status": "error", "error": str(exc)}
    return time.perf_counter() - started


async def nanobot_cycles(home: Path, checks: list[tuple[str, Any]], tag: str) -> dict[str, Any]:
    from nanobot.bus import MessageBus
    from nanobot.heartbeat import HeartbeatMonitor

    engine = nanobot_engine(home / f"health-{tag}.db")
    begins = [0]
    event.listen(engine, "begin", lambda _conn: begins.__setitem__(0, begins[0] + 1))
    monitor = HeartbeatMonitor(MessageBus(), 30, engine=engine, node="bench", check_timeout=5)
    for name, check in checks:
        monitor.register_component(name, check)
    await monitor.run_cycle()  # warm-up: loads the stored state, writes the registrations
    times, transactions = [], []
    loop_monitor = LoopMonitor().start()
    for _ in range(CYCLES):
        before = begins[0]
        started = time.perf_counter()
        status = await monitor.run_cycle()
        times.append(time.perf_counter() - started)
        transactions.append(begins[0] - before)
        assert status["components"]["healthy"] == len(checks), status
    held = await loop_monitor.stop()
    engine.dispose()
    return {"cycle": median(times), "transactions": max(transactions), "held": held}


async def _run(quick: bool, res: Result) -> None:
    sizes = (10, 100, 1000)
    res.settings = {"C": list(sizes), "check_s": CHECK_S, "cycles_measured": CYCLES}
    with bench_home("health") as home:
        for count in sizes:
            base = await seed_cycle(_checks(count, half_plain=True))
            nb = await nanobot_cycles(home, _checks(count, half_plain=False), f"async-{count}")
            mixed = await nanobot_cycles(home, _checks(count, half_plain=True), f"mixed-{count}")
            big = count == 1000
            res.add(
                f"C={count} async checks: one cycle, nanobot (transactions: {nb['transactions']})",
                nb["cycle"],
                "s",
                "seed sequential loop",
                base,
                "<= 120 ms, 1 transaction" if big else "",
                (nb["cycle"] <= 0.120 and nb["transactions"] == 1) if big else None,
            )
            res.add(
                f"C={count} half plain: one cycle, nanobot (transactions: {mixed['transactions']})",
                mixed["cycle"],
                "s",
                "seed sequential loop",
                base,
                "<= 0.1x seed" if big else "",
                (mixed["cycle"] <= base / 10) if big else None,
            )
            res.add(f"C={count} loop held longest, async checks", nb["held"], "s")
            res.add(f"C={count} loop held longest, half plain", mixed["held"], "s")
    res.notes.append(
        "Targets apply at C = 1000; for smaller C the ratio is shown. The half-plain target "
        "(a tenth of the seed) is also out of reach by construction at C = 10, where the seed "
        "takes 200 ms and one check alone takes 20 ms."
    )


def run(quick: bool) -> Result:
    res = Result("4 health")
    asyncio.run(_run(quick, res))
    return res
