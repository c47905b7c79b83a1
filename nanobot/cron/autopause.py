"""Auto-pause: a task whose last N slots all failed is paused, and says why.

A failed slot is one whose run ended ``error``, ``timeout`` or ``interrupted`` (what
``task_state.consecutive_failures`` counts; a success sets it back to 0, a ``cancelled``, ``missed``
or ``skipped`` slot is neither). N is the task's ``pause_after_failures``, or the
``cron.pause_after_failures`` setting when the task gives none; 0 means never.

:func:`pause_failing` runs in the manager's worker thread right after a batch of outcomes is
written, in its own transaction, so the count it reads is the one that batch wrote. Pausing is
an ordinary control-plane change (the row's version goes up): the scheduler applies it like a
``cron pause``, and ``cron resume`` clears it. A crash between the two transactions leaves the
task running until its next failure, which pauses it then.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import Engine

from nanobot.cron.control import auto_pause, failure_counts
from nanobot.cron.history import last_failed_run
from nanobot.db import write_transaction

# The last error quoted in the reason is cut to this many characters (the full text is in the
# run's history).
ERROR_QUOTE_MAX: Final = 500


@dataclass(frozen=True, slots=True)
class AutoPause:
    """A task that was just paused for its failures."""

    task: str
    failures: int
    threshold: int
    reason: str
    paused_at: datetime


def threshold_of(own: int | None, default: int) -> int:
    """The number of failed slots in a row that pauses a task (0: never)."""
    return default if own is None else own


def reason_text(failures: int, last_error: str | None) -> str:
    """The stored reason: ``paused after 5 consecutive failures; last error: ...``."""
    error = (last_error or "none recorded").strip()
    if len(error) > ERROR_QUOTE_MAX:
        error = error[: ERROR_QUOTE_MAX - 4] + " ..."
    return f"paused after {failures} consecutive failures; last error: {error}"


def pause_failing(
    engine: Engine, names: Iterable[str], *, default: int, now: datetime
) -> list[AutoPause]:
    """Pause those of ``names`` (tasks whose slot just failed) that reached their threshold."""
    wanted = sorted(set(names))
    if not wanted:
        return []
    paused: list[AutoPause] = []
    with write_transaction(engine) as conn:
        for task in failure_counts(conn, wanted):
            threshold = threshold_of(task.pause_after_failures, default)
            if threshold <= 0 or task.consecutive_failures < threshold:
                continue
            last = last_failed_run(conn, task.name)
            reason = reason_text(task.consecutive_failures, last.error if last else None)
            if auto_pause(conn, task.name, reason, now):
                paused.append(
                    AutoPause(task.name, task.consecutive_failures, threshold, reason, now)
                )
    return paused
