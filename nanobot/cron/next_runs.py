"""The leading node's index of its job table's next run times.

A pass asks which stored jobs are due by an instant, and when the next one is due and how many
with it, several times a second. The job table answers both with an index range read, but each
answer is a connection, a statement and its rows: measured at a steady load (200 tasks at 1 s),
the two reads were about a third of what a pass cost. While a node leads, every write of the
job table is its own: the lease fences every other node's claims, a node that loses it drops
its scheduler (and this index with it), and a new scheduler loads the index from the table
again. So the leader can keep the same answers in memory: loaded from the table once, then
moved by each of its own writes once it is committed (:class:`~nanobot.cron.aps_adapter.
NanobotJobStore` does both; a write whose outcome it cannot know drops the index, which is then
loaded again at its next use).

Threads: owned by the job store and used under the scheduler's store lock (the worker thread,
or a caller holding that lock).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable

from sortedcontainers import SortedList  # type: ignore[import-untyped]


class NextRuns:
    """Each stored job's next run time (epoch seconds, None when paused), ordered by it."""

    __slots__ = ("_at", "_order")

    def __init__(self, rows: Iterable[tuple[str, float | None]] = ()) -> None:
        self._at: dict[str, float | None] = dict(rows)
        # (time, id): ids break ties, so that a job is found (and removed) in log time even when
        # thousands are due at the same instant.
        self._order = SortedList(
            (stamp, job_id) for job_id, stamp in self._at.items() if stamp is not None
        )

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._at

    def get(self, job_id: str) -> float | None:
        """The next run time of ``job_id`` (None: paused; KeyError: no such job)."""
        return self._at[job_id]

    def set(self, job_id: str, stamp: float | None) -> None:
        """Add ``job_id`` or move it to ``stamp``."""
        if job_id in self._at:
            self.discard(job_id)
        self._at[job_id] = stamp
        if stamp is not None:
            self._order.add((stamp, job_id))

    def discard(self, job_id: str) -> None:
        """Forget ``job_id`` (nothing if it is not known)."""
        if job_id not in self._at:
            return
        stamp = self._at.pop(job_id)
        if stamp is not None:
            self._order.remove((stamp, job_id))

    def due(self, stamp: float) -> list[str]:
        """The jobs due by ``stamp``, earliest first."""
        return [job_id for _at, job_id in self._order.islice(stop=self._end(stamp))]

    def count_due(self, stamp: float) -> int:
        """How many jobs are due by ``stamp``."""
        return int(self._end(stamp))

    def first(self, skip: Container[str] = ()) -> float | None:
        """The earliest next run time of a job not in ``skip`` (None: nothing is scheduled)."""
        for stamp, job_id in self._order:
            if job_id not in skip:
                return float(stamp)
        return None

    def _end(self, stamp: float) -> int:
        # Every entry at or before ``stamp`` sorts before (the next float, the least id).
        return int(self._order.bisect_left((math.nextafter(stamp, math.inf), "")))
