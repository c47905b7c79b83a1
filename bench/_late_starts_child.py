"""The service (``python -m nanobot``) with the wall time of everything its threads run recorded.

``python -m bench._late_starts_child OUT`` runs nanobot as ``python -m nanobot`` does and records
``[began, ended, kind, name]`` (epoch seconds) for every event-loop callback (``loop``), every
thread-pool item (``pool``) and every garbage collection (``gc``). SIGUSR1 starts recording;
SIGUSR2 stops and writes the list to OUT as JSON. A diagnostic of :mod:`bench.late_starts`: the
recording costs each callback a few microseconds, so these are not the service's own timings.
"""

from __future__ import annotations

import gc
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench._callbacks_child import patch, write_json

_events: list[tuple[float, float, str, str]] = []
_recording = threading.Event()
_gc_began: dict[int, float] = {}


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if not _recording.is_set():
        return
    ident = threading.get_ident()
    if phase == "start":
        _gc_began[ident] = time.time()
        return
    began = _gc_began.pop(ident, None)
    if began is not None:
        name = f"generation {info['generation']} in {threading.current_thread().name}"
        _events.append((began, time.time(), "gc", name))


def _recorded(call: Callable[[], None], key: Callable[[], str]) -> None:
    if not _recording.is_set():
        call()
        return
    began = time.time()
    try:
        call()
    finally:
        kind, _, name = key().partition(": ")
        _events.append((began, time.time(), kind, name))


def main(out: str) -> None:
    def stop(*_: object) -> None:
        _recording.clear()
        write_json(out, _events)

    signal.signal(signal.SIGUSR1, lambda *_: _recording.set())
    signal.signal(signal.SIGUSR2, stop)
    patch(_recorded)
    gc.callbacks.append(_on_gc)
    sys.argv = ["nanobot"]
    runpy.run_module("nanobot", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1])
