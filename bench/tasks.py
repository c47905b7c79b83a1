"""The work the benchmarks schedule: it records when it started, from inside the run.

``Stamp`` is a nanobot task (stored by class path ``bench.tasks:Stamp``, so a scheduler builds
it from the database like any stored task); :func:`stamp` is the same work as a plain coroutine
function for the APScheduler baselines. Both append ``(time.time(), anchor)`` to
``STARTS[key]`` before doing anything else.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from nanobot.cron import CronTask

STARTS: dict[str, list[tuple[float, float | None]]] = {}
_WANTED: dict[str, tuple[int, asyncio.Event]] = {}


def expect(key: str, count: int) -> asyncio.Event:
    """An event set once ``count`` starts are recorded under ``key`` (call inside the loop)."""
    STARTS[key] = []
    done = asyncio.Event()
    _WANTED[key] = (count, done)
    return done


def _record(key: str, anchor: float | None) -> None:
    starts = STARTS.setdefault(key, [])
    starts.append((time.time(), anchor))
    wanted = _WANTED.get(key)
    if wanted is not None and len(starts) >= wanted[0]:
        wanted[1].set()


class Stamp(CronTask):
    """Records its start, then works ``busy`` seconds (awaiting, as an I/O-bound run does)."""

    def __init__(
        self,
        interval: float = 60,
        key: str = "default",
        anchor: float | None = None,
        busy: float = 0.0,
    ) -> None:
        super().__init__(interval)
        self.key = key
        self.anchor = anchor
        self.busy = busy

    async def run(self) -> None:
        _record(self.key, self.anchor)
        if self.busy:
            await asyncio.sleep(self.busy)


async def stamp(key: str, anchor: float | None = None, busy: float = 0.0) -> None:
    _record(key, anchor)
    if busy:
        await asyncio.sleep(busy)


class WriteTime(CronTask):
    """Writes ``time.time()`` to a file at its start (the start-up figure's first dispatch)."""

    def __init__(self, interval: float = 3600, path: str = "first.txt") -> None:
        super().__init__(interval)
        self.path = path

    async def run(self) -> None:
        now = time.time()
        Path(self.path).write_text(repr(now))  # noqa: ASYNC240 - microseconds, once


async def write_time(path: str) -> None:
    """:class:`WriteTime` as a plain coroutine function, for APScheduler's stores."""
    now = time.time()
    Path(path).write_text(repr(now))  # noqa: ASYNC240 - microseconds, once


COUNTS: dict[str, int] = {}


class Count(CronTask):
    """Counts its runs (no per-run memory, for the memory figure)."""

    def __init__(self, interval: float = 60, key: str = "default") -> None:
        super().__init__(interval)
        self.key = key

    async def run(self) -> None:
        COUNTS[self.key] = COUNTS.get(self.key, 0) + 1


async def count(key: str) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + 1


# --- runs in another process: the service's and the baselines' -------------------------------

_FILES: dict[str, int] = {}


def _append(path: str, line: bytes) -> None:
    # One O_APPEND descriptor per file and process: each run is one write(2) of one short line,
    # which the kernel appends atomically; no buffering that a killed process could lose.
    fd = _FILES.get(path)
    if fd is None:
        fd = _FILES[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)


class StampFile(CronTask):
    """Appends ``time.time() anchor`` to ``path`` as its first act (a run of the service).

    ``anchor`` (epoch seconds) is the task's first slot: with the interval it gives the slot of
    each run, hence its lateness, from outside the process.
    """

    def __init__(self, interval: float = 60, path: str = "stamps.txt", anchor: float = 0.0):
        super().__init__(interval)
        self.path = path
        self.anchor = anchor

    async def run(self) -> None:
        _append(self.path, b"%.6f %.6f\n" % (time.time(), self.anchor))


async def stamp_file(path: str, anchor: float = 0.0) -> None:
    """:class:`StampFile` as a plain coroutine function, for the APScheduler baselines."""
    _append(path, b"%.6f %.6f\n" % (time.time(), anchor))


def read_stamps(path: Path) -> list[tuple[float, float]]:
    """The ``(start, anchor)`` pairs written to ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    pairs = []
    for line in path.read_bytes().splitlines():
        start, anchor = line.split()
        pairs.append((float(start), float(anchor)))
    return pairs
