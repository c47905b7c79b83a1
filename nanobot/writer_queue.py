"""This process's writers of one SQLite database, let in one at a time in the order they came.

SQLite lets one writer in at a time, and a writer that finds the database locked does not
queue: its busy handler sleeps and tries again, up to 100 ms apart. A thread that writes
transaction after transaction (the scheduler's worker during a burst of 20,000 slots: the
claims, then the outcomes) takes the lock back the moment it lets it go, so a waiting writer
can miss every gap: the leader's lease renewal waited its whole budget of a third of the lease
behind the burst's own writes, and the leader stepped down in the middle of its burst. Inside
one process nanobot's write transactions (:func:`nanobot.db.write_transaction`) take their
turn here first, first come first served, so that a renewal waits for the transaction in
progress and no longer. Other processes (the command line) still meet SQLite's busy handler.

Threads: any; a thread that has its turn may take it again (a nested write transaction of
the same thread waits for SQLite itself, as before).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

from nanobot.exceptions import DatabaseError


class WriterQueue:
    """A fair, reentrant lock with a bounded wait (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        # The threads waiting, first come first: (thread id, event set when it is their turn).
        self._waiting: collections.deque[tuple[int, threading.Event]] = collections.deque()

    @contextlib.contextmanager
    def turn(self, timeout: float) -> Iterator[None]:
        """Hold the turn for the block; :class:`DatabaseError` after ``timeout`` seconds of
        waiting (as SQLite's own busy timeout would say that the database is locked)."""
        if not self._acquire(timeout):
            raise DatabaseError(
                f"database is locked: this process's other writers held it for {timeout:g} s"
            )
        try:
            yield
        finally:
            self._release()

    def waiting(self) -> int:
        """How many threads wait for their turn now."""
        with self._lock:
            return len(self._waiting)

    def _acquire(self, timeout: float) -> bool:
        me = threading.get_ident()
        with self._lock:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._waiting:
                self._owner, self._depth = me, 1
                return True
            entry = (me, threading.Event())
            self._waiting.append(entry)
        if entry[1].wait(timeout):
            return True
        with self._lock:
            if entry[1].is_set():
                return True  # handed over just as the wait ended
            self._waiting.remove(entry)
            return False

    def _release(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth:
                return
            if self._waiting:
                owner, event = self._waiting.popleft()
                self._owner, self._depth = owner, 1
                event.set()
            else:
                self._owner = None
