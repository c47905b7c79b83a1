"""Continuous pruning of run history: every task kept within its limit plus a small margin.

The hourly cleanup (:func:`nanobot.cron.history.prune`) deletes runs older than
``cron.history_retention_days`` and beyond ``cron.history_max_rows`` per task; between two
cleanups, a task that runs every half second adds 7,200 rows, and 200 such tasks 1.4 million.
:class:`HistoryTrimmer` closes that gap as the scheduler works: it counts the rows each task
gets (claims and missed slots, as the scheduler's pass inserts them), and once a task got
``margin`` rows since its last trim, deletes that task's rows beyond ``max_rows`` in one
statement on the ``(task_name, scheduled_at)`` index, with the next batch of outcomes (off the
path that starts runs). A task therefore holds at most ``max_rows + margin`` rows, plus the few
claimed since the last batch of outcomes (once it has been trimmed a first time: at the latest
``margin`` runs after the service started), and each task costs one DELETE every ``margin``
runs. Deleted rows leave free pages that new rows reuse, so a SQLite file stops growing.

The first count of each task is random in ``[0, margin)``, so that thousands of tasks that run in
phase are trimmed spread over ``margin`` batches instead of all in the same one.

Thread: a trimmer is used only by the scheduler's worker thread (the pass,
:mod:`nanobot.cron.dispatch`, counts; :meth:`nanobot.cron.recorder.Recorder.write_outcomes`
trims).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Final, cast

import structlog
from sqlalchemy import Engine, Table, bindparam, delete, select

from nanobot.db import write_transaction
from nanobot.models import TaskOutcome, TaskRun

log = structlog.get_logger(__name__)

_RUNS = cast(Table, TaskRun.__table__)
# Rows a task may get beyond its limit before it is trimmed: a tenth of the limit, at least ten.
MARGIN_SHARE: Final = 0.1
MARGIN_MIN: Final = 10


def margin_for(max_rows: int) -> int:
    return max(MARGIN_MIN, int(max_rows * MARGIN_SHARE))


class HistoryTrimmer:
    """Deletes each task's runs beyond ``max_rows``, every ``margin`` rows it gets."""

    def __init__(self, max_rows: int, *, margin: int | None = None, seed: int | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        self.margin = margin if margin is not None else margin_for(max_rows)
        self._since: dict[str, int] = {}
        self._pending: set[str] = set()
        self._random = random.Random(seed)
        boundary = (
            select(_RUNS.c.scheduled_at)
            .where(_RUNS.c.task_name == bindparam("b_name"))
            .order_by(_RUNS.c.scheduled_at.desc())
            .offset(max_rows)
            .limit(1)
            .scalar_subquery()
        )
        # Everything up to the newest row past the limit goes (a run in progress stays).
        self._delete = delete(_RUNS).where(
            _RUNS.c.task_name == bindparam("b_name"),
            _RUNS.c.outcome != TaskOutcome.RUNNING.value,
            _RUNS.c.scheduled_at <= boundary,
        )

    def due(self, tasks: Iterable[str]) -> list[str]:
        """Count one new row for each name in ``tasks``; the tasks now due for a trim."""
        due: list[str] = []
        since = self._since
        for name in tasks:
            count = since.get(name)
            if count is None:
                count = self._random.randrange(self.margin)
            count += 1
            if count >= self.margin:
                due.append(name)
                count = 0
            since[name] = count
        return due

    def count(self, tasks: Iterable[str]) -> None:
        """Count the rows just inserted for ``tasks`` (a name once per row); the tasks due for
        a trim are trimmed at the next :meth:`trim`."""
        self._pending.update(self.due(tasks))

    def trim(self, engine: Engine) -> int:
        """Delete the rows beyond the limit of every task due for it; the number deleted."""
        if not self._pending:
            return 0
        names, self._pending = sorted(self._pending), set()
        with write_transaction(engine) as conn:
            result = conn.execute(self._delete, [{"b_name": name} for name in names])
        removed = max(0, int(result.rowcount or 0))
        if removed:
            log.debug("cron.history_trimmed", tasks=len(names), removed=removed)
        return removed

    def after_write(self, engine: Engine, tasks: Iterable[str]) -> int:
        """:meth:`count` then :meth:`trim`."""
        self.count(tasks)
        return self.trim(engine)
