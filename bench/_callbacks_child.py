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
import os
import runpy
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
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


# Runs one call (its first argument) of the key its second argument names: a timer or a recorder.
Runner = Callable[[Callable[[], None], Callable[[], str]], None]


def patch(run: Runner) -> None:
    """Every event-loop callback and thread-pool item of this process goes through ``run``,
    keyed ``loop: NAME`` or ``pool: NAME``."""
    handle_run = asyncio.events.Handle._run
    item_run = concurrent.futures.thread._WorkItem.run

    def patched_handle(self: asyncio.Handle) -> None:
        run(lambda: handle_run(self), lambda: "loop: " + _name(self._callback))  # type: ignore[attr-defined]

    def patched_item(self: Any) -> None:
        run(lambda: item_run(self), lambda: "pool: " + _name(self.fn))

    asyncio.events.Handle._run = patched_handle  # type: ignore[method-assign]
    concurrent.futures.thread._WorkItem.run = patched_item  # type: ignore[method-assign]


def _timed(call: Callable[[], None], key: Callable[[], str]) -> None:
    if not _counting.is_set():
        call()
        return
    started, wall_started = time.thread_time(), time.perf_counter()
    try:
        call()
    finally:
        _add(key(), started, wall_started)


def write_json(out: str, value: Any) -> None:
    """Write ``value`` to ``out`` whole: a file beside it, renamed (the parent waits for OUT)."""
    with open(out + ".part", "w") as f:
        json.dump(value, f)
    os.replace(out + ".part", out)


def main(out: str) -> None:
    def start(*_: object) -> None:
        with _lock:
            _stats.clear()
        _counting.set()

    def stop(*_: object) -> None:
        _counting.clear()
        with _lock:
            write_json(out, dict(_stats))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    patch(_timed)
    sys.argv = ["nanobot"]
    runpy.run_module("nanobot", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1])
