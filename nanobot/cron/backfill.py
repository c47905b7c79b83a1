"""Backfill: run the past slots of a task that never ran (``nanobot cron backfill``).

Who does what. The command line validates the range and stores the request on the task's row
(``tasks.backfill_from``, ``backfill_to``, ``backfill_concurrency``; :func:`request_backfill`);
it runs nothing itself. The scheduler that holds the scheduling lease (the leader) reads it
with the task's other changes and, at most once per poll interval, claims the next slots of the
range (:func:`claim_next`) in a transaction fenced by the lease, like any slot: a ``task_runs``
row with the slot's historical ``scheduled_at``, unique per task and slot. So only the leader
runs a backfill, each slot runs at most once even with two nodes, a backfill survives a
restart of the leader (or a fail-over) and goes on where it was, and repeating a backfill runs
nothing more.

A paused task's backfill waits: the leader claims nothing of it until the task is resumed, so
that ``nanobot cron pause`` stops a backfill that does harm, and an auto-pause after failed
runs stops a backfill whose every run fails.

Which slots. The slots of the task's schedule (interval: its grid, from its anchor on; cron;
at) in ``[from, to]`` that have no row, or whose row is ``missed`` (nothing ran them: a missed
row stands for its first slot and counts the following ones, so it is taken over by the run of
its first slot and what it counted is recorded again from the next slot). A slot recorded with
any other outcome (a success, an error, a skipped or cancelled slot) is left alone: run it with
``nanobot cron run``.

Threads: :func:`request_backfill` is called by the command line; :func:`claim_next` in the
scheduler's worker thread, inside its transaction. Both are synchronous and do database I/O.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Engine, Row

from nanobot.cron import control, history
from nanobot.cron.history import Claim, RunSlot
from nanobot.cron.schedules import (
    AtSchedule,
    IntervalSchedule,
    Schedule,
    next_after,
    parse_at,
    slot_at_or_after,
)
from nanobot.db import read_transaction
from nanobot.exceptions import InvalidScheduleError, InvalidTaskError
from nanobot.models import TaskOutcome

# A range with more slots than this is refused even with --yes: its slots are listed in memory.
SLOTS_LIMIT: Final = 100_000
_CLOCK_ONLY: Final = re.compile(r"^\s*\d{1,2}:\d{2}(:\d{2})?\s*$")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Backfill:
    """A backfill of one task: the slots in ``[start, end]``, ``concurrency`` at a time."""

    task: str
    start: datetime
    end: datetime
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    """What a backfill request found: the range's slots, and those it will run."""

    backfill: Backfill
    slots: int
    to_run: list[datetime]
    stored: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.backfill.task,
            "from": self.backfill.start.isoformat(),
            "to": self.backfill.end.isoformat(),
            "concurrency": self.backfill.concurrency,
            "slots": self.slots,
            "to_run": len(self.to_run),
            "first": self.to_run[0].isoformat() if self.to_run else None,
            "last": self.to_run[-1].isoformat() if self.to_run else None,
            "requested": self.stored,
        }


@dataclass(frozen=True, slots=True)
class BackfillJob:
    """A stored backfill as the leader runs it: the request and what building a run needs."""

    backfill: Backfill
    schedule: Schedule
    anchor: datetime | None
    task_class: str
    kwargs: dict[str, Any]
    # A paused task's backfill waits for it to be resumed (a pause, or an auto-pause after
    # failed runs, is a brake on the backfill too).
    paused: bool = False


def parse_time(value: str, timezone: str, option: str) -> datetime:
    """A past or present instant given as ``cron add --at`` takes it (ISO 8601; naive times
    read in ``timezone``), or :class:`InvalidScheduleError` in one line naming ``option``."""
    if _CLOCK_ONLY.match(value):
        raise InvalidScheduleError(
            f"{option} {value!r}: give a date and time, such as 2026-11-29T03:00"
        )
    try:
        # parse_at refuses times not after `now`: the epoch lets any real past time through.
        return parse_at(value, timezone, now=_EPOCH).schedule.at
    except InvalidScheduleError as exc:
        raise InvalidScheduleError(f"{option}: {exc}") from None


def tolerance(schedule: Schedule) -> timedelta:
    """How far a stored ``scheduled_at`` may be from a computed slot and still be that slot:
    the scheduler steps an interval task's slots from one to the next, so microseconds of
    rounding add up; slots are always much further apart than this."""
    if isinstance(schedule, IntervalSchedule):
        return timedelta(seconds=min(0.5, schedule.seconds / 4))
    return timedelta(seconds=0.25)


def range_slots(
    schedule: Schedule, start: datetime, end: datetime, *, anchor: datetime | None
) -> list[datetime]:
    """The slots of ``schedule`` in ``[start, end]``, in order, by the schedule's own
    arithmetic (an interval task's grid begins at its ``anchor``: none before it, and none at
    all for a task never started). More than :data:`SLOTS_LIMIT` is refused."""
    if isinstance(schedule, IntervalSchedule):
        if anchor is None:
            return []
        slot = slot_at_or_after(schedule, start, anchor=anchor)
    elif isinstance(schedule, AtSchedule):
        return [schedule.at] if start <= schedule.at <= end else []
    else:
        slot = slot_at_or_after(schedule, start)
    slots: list[datetime] = []
    while slot is not None and slot <= end:
        if len(slots) >= SLOTS_LIMIT:
            raise InvalidTaskError(
                f"the range holds more than {SLOTS_LIMIT} slots: backfill it in smaller ranges"
            )
        slots.append(slot)
        slot = next_after(schedule, slot, anchor=anchor)
    return slots


def _rows(
    conn: Connection, name: str, start: datetime, end: datetime, slack: timedelta
) -> list[RunSlot]:
    return history.slots_between(conn, name, start - slack, end + slack)


def _match(
    rows: Sequence[RunSlot], times: list[datetime], slot: datetime, slack: timedelta
) -> RunSlot | None:
    """The row of ``slot`` (within ``slack``), if any."""
    i = bisect.bisect_left(times, slot - slack)
    if i < len(rows) and rows[i].scheduled_at <= slot + slack:
        return rows[i]
    return None


def _to_run(
    slots: list[datetime], rows: Sequence[RunSlot], slack: timedelta
) -> list[tuple[datetime, RunSlot | None]]:
    """The slots without a row, or with a missed one (returned with it)."""
    times = [r.scheduled_at for r in rows]
    result: list[tuple[datetime, RunSlot | None]] = []
    for slot in slots:
        row = _match(rows, times, slot, slack)
        if row is None:
            result.append((slot, None))
        elif row.outcome == TaskOutcome.MISSED.value:
            result.append((row.scheduled_at, row))
    return result


def request_backfill(
    engine: Engine,
    name: str,
    start: datetime,
    end: datetime,
    *,
    concurrency: int,
    max_slots: int,
    confirmed: bool,
    now: datetime,
) -> BackfillPlan:
    """Validate a backfill and store it for the leader; nothing is changed when it is refused
    (:class:`InvalidTaskError`, :class:`nanobot.exceptions.UnknownTaskError`) or when every
    slot of the range has run already (then ``stored`` is False)."""
    info = control.get_task(engine, name)
    if start > end:
        raise InvalidTaskError(
            f"--from {start.isoformat()} is after --to {end.isoformat()}: nothing to backfill"
        )
    if end > now:
        raise InvalidTaskError(
            f"--to {end.isoformat()} is in the future (now is "
            f"{now.astimezone(end.tzinfo).isoformat(timespec='seconds')}): a backfill runs "
            "slots that have passed; the schedule runs the others"
        )
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidTaskError(f"--concurrency must be a whole number >= 1, got {concurrency!r}")
    if info.backfill is not None:
        pending_from, pending_to, _ = info.backfill
        raise InvalidTaskError(
            f"task {name!r} has a backfill pending ({pending_from.isoformat()} to "
            f"{pending_to.isoformat()}): let it end first ('cron list --json' shows it)"
        )
    backfill = Backfill(name, start, end, concurrency)
    slots = range_slots(info.schedule, start, end, anchor=info.anchor_at)
    slack = tolerance(info.schedule)
    if slots:
        with read_transaction(engine) as conn:
            rows = _rows(conn, name, start, end, slack)
        to_run = [slot for slot, _row in _to_run(slots, rows, slack)]
    else:
        to_run = []
    if not to_run:
        return BackfillPlan(backfill, len(slots), [], stored=False)
    if len(to_run) > max_slots and not confirmed:
        raise InvalidTaskError(
            f"the range holds {len(to_run)} slots to run, more than scheduler.backfill_max_slots "
            f"({max_slots}): add --yes to run them all, or give a narrower range"
        )
    control.set_backfill(engine, name, backfill.start, backfill.end, backfill.concurrency)
    return BackfillPlan(backfill, len(slots), to_run, stored=True)


def claim_next(
    conn: Connection, job: BackfillJob, *, node: str, after: datetime | None = None
) -> tuple[list[tuple[datetime, int]], bool]:
    """In the leader's transaction: claim the next slots of a backfill, as many as its
    concurrency leaves free (rows of the range still ``running`` count against it), and only
    slots later than ``after`` (the last one this leader claimed: a row of the backfill that
    history trimming deleted since is not run again). Returns the claimed ``(slot, run id)``
    and whether the backfill is done (then its request is cleared)."""
    backfill = job.backfill
    slots = range_slots(job.schedule, backfill.start, backfill.end, anchor=job.anchor)
    slack = tolerance(job.schedule)
    rows = _rows(conn, backfill.task, backfill.start, backfill.end, slack)
    running = sum(1 for r in rows if r.outcome == TaskOutcome.RUNNING.value)
    pending = [
        (slot, row) for slot, row in _to_run(slots, rows, slack) if after is None or slot > after
    ]
    if not pending:
        if running == 0:
            _clear(conn, backfill)
            return [], True
        return [], False
    claimed: list[tuple[datetime, int]] = []
    for slot, row in pending[: max(0, backfill.concurrency - running)]:
        if row is not None:
            run_id = _take_missed(conn, job, row, node=node)
            if run_id is not None:
                claimed.append((row.scheduled_at, run_id))
            continue
        ids = history.claim_slots(conn, [Claim(backfill.task, slot, manual=True)], node=node)
        if (backfill.task, slot) in ids:
            claimed.append((slot, ids[(backfill.task, slot)]))
    return claimed, False


def _take_missed(conn: Connection, job: BackfillJob, row: RunSlot, *, node: str) -> int | None:
    """Claim the first slot of a missed row by turning the row into that slot's run; the
    slots it counted after the first are recorded missed again from the next slot."""
    if not history.claim_missed(conn, row, node=node):
        return None
    if row.slots > 1:
        following = next_after(job.schedule, row.scheduled_at, anchor=job.anchor)
        if following is not None:
            history.record_unrun(
                conn,
                [
                    history.Finish(
                        task=job.backfill.task,
                        run_id=None,
                        scheduled_at=following,
                        outcome=TaskOutcome.MISSED,
                        started_at=None,
                        finished_at=following,
                        error=f"{row.slots - 1} slot(s) passed while nothing could run them",
                        slots=row.slots - 1,
                        node=node,
                    )
                ],
            )
    return row.id


def _clear(conn: Connection, backfill: Backfill) -> None:
    """The backfill is done: its request goes (only this one: a newer request stays)."""
    control.clear_backfill(conn, backfill.task, backfill.start, backfill.end)


def job_of(row: Row[*tuple[Any, ...]]) -> BackfillJob | None:
    """The backfill stored on a ``tasks`` row, if any."""
    if row.backfill_from is None or row.backfill_to is None:
        return None
    return BackfillJob(
        backfill=Backfill(
            row.name, row.backfill_from, row.backfill_to, row.backfill_concurrency or 1
        ),
        schedule=control.row_schedule(row),
        anchor=row.anchor_at,
        task_class=row.task_class,
        kwargs=dict(row.kwargs or {}),
        paused=bool(row.paused),
    )
