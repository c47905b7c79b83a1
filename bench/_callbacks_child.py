"""The service (``python -m nanobot``) with the thread CPU of each of its callbacks counted.

``python -m bench._callbacks_child OUT`` runs nanobot as ``python -m nanobot`` does, and times
with ``time.thread_time()`` every event-loop callback (keyed by the callback, or by the
coroutine of a task's step) and every item of a thread pool (keyed by the function). SIGUSR1
starts counting afresh; SIGUSR2 stops and writes ``{key: [calls, cpu_seconds, longest_s,
over_1ms]}`` to OUT as JSON: the longest call and the calls over a millisecond are wall time,
how long a callback held the loop (or a pool item its thread), which delays what is due then.
A diagnostic of :mod:`bench.callbacks`: the timing itself costs each callback about a
microsecond, so these figures are not the service's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import json
import runpy
import signal
import sys
import threading
import time
from collections import defaultdict
from typing import Any

_stats: defaultdict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0])
_lock = threading.Lock()
_counting = threading.Event()


def _name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return "task " + str(getattr(coro, "__qualname__", type(coro).__name__))
    inner = getattr(func, "func", None)  # functools.partial (contextvars' run: its args)
    if inner is not None:
        args = getattr(func, "args", ())
        if getattr(inner, "__name__", "") == "run" and args:
            return _name(args[0])
        return _name(inner)
    return str(getattr(func, "__qualname__", type(func).__name__))


def _add(key: str, started: float, wall_started: float) -> None:
    spent = time.thread_time() - started
    wall = time.perf_counter() - wall_started
    with _lock:
        entry = _stats[key]
        entry[0] += 1
        entry[1] += spent
        entry[2] = max(entry[2], wall)
        entry[3] += wall > 0.001


def _patch() -> None:
    handle_run = asyncio.events.Handle._run
    item_run = concurrent.futures.thread._WorkItem.run

    def timed_handle(self: asyncio.Handle) -> None:
        if not _counting.is_set():
            handle_run(self)
            return
        started, wall_started = time.thread_time(), time.perf_counter()
        try:
            handle_run(self)
        finally:
            _add("loop: " + _name(self._callback), started, wall_started)  # type: ignore[attr-defined]

    def timed_item(self: Any) -> None:
        if not _counting.is_set():
            item_run(self)
            return
        started, wall_started = time.thread_time(), time.perf_counter()
        try:
            item_run(self)
        finally:
            _add("pool: " + _name(self.fn), started, wall_started)

    asyncio.events.Handle._run = timed_handle  # type: ignore[method-assign]
    concurrent.futures.thread._WorkItem.run = timed_item  # type: ignore[method-assign]


def main(out: str) -> None:
    def start(*_: object) -> None:
        with _lock:
            _stats.clear()
        _counting.set()

    def stop(*_: object) -> None:
        _counting.clear()
        with _lock, open(out, "w") as f:
            json.dump(dict(_stats), f)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    _patch()
    sys.argv = ["nanobot"]
    runpy.run_module("nanobot", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1])
