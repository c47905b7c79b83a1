"""The control plane of the scheduler: the ``tasks`` table, read and written by any process.

This module owns the statements on ``tasks`` (the run mirror that outcomes write is
:mod:`nanobot.cron.history`'s): what reads tasks gets records, :class:`TaskInfo` (a task as
stored) or :class:`TaskSummary` (what status and the metrics show), and the states and pages
the dashboard filters by (:class:`TaskState`, :func:`page_tasks`, :func:`count_by_state`).

A definition is validated before it reaches this module (:mod:`nanobot.cron.definitions`).
The command line and the manager both change tasks through these functions. Each change bumps
the row's ``version``; the scheduler that runs applies rows whose version it has not applied
yet (within ``cron.poll_interval``), or at its next start. These functions are synchronous and
do database I/O: call them from a thread when an event loop is running.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    Table,
    and_,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from nanobot.cron import history
from nanobot.cron import overlap as overlaps
from nanobot.cron.history import RunInfo as RunInfo
from nanobot.cron.overlap import Overlap
from nanobot.cron.retries import DEFAULT_BACKOFF, RetryBackoff, parse_backoff
from nanobot.cron.schedules import (
    AtSchedule,
    CronSchedule,
    IntervalSchedule,
    Schedule,
    ScheduleKind,
    describe,
    fire_times,
    load_schedule,
    slot_at_or_after,
    zone,
)
from nanobot.cron.task import (
    TaskDefinition,
)
from nanobot.db import IN_MAX, read_transaction, write_transaction
from nanobot.exceptions import InvalidTaskError, TaskExistsError, UnknownTaskError
from nanobot.models import (
    FAILED_OUTCOMES,
    MisfirePolicy,
    Task,
    TaskOutcome,
    TaskRun,
    TaskSource,
    TaskStateRecord,
    bound_error,
    utcnow,
)
from nanobot.times import iso

_TASKS = cast(Table, Task.__table__)
_STATE = cast(Table, TaskStateRecord.__table__)
# The columns of task_state (the run state, written at every run) that a task row carries.
STATE_COLUMNS: Final[tuple[str, ...]] = (
    "next_run_at",
    "last_run_at",
    "last_outcome",
    "consecutive_failures",
)
# A task with its run state: an outer join, so that a task row without its state row (none
# should be) still reads, as never run.
_WITH_STATE: Final = _TASKS.outerjoin(_STATE, _STATE.c.task_name == _TASKS.c.name)
# Every column of a task, its run state included, as one row (what ``select(Task.__table__)``
# read before the run state moved out of tasks); add ``.where`` and ``.order_by`` to it.
TASK_ROWS: Final[Select[Any]] = select(
    _TASKS,
    _STATE.c.next_run_at,
    _STATE.c.last_run_at,
    _STATE.c.last_outcome,
    func.coalesce(_STATE.c.consecutive_failures, 0).label("consecutive_failures"),
).select_from(_WITH_STATE)
# The tasks with a run going: a claimed slot dispatched (``started_at`` set) and not finished.
# Few rows, found through the index on ``outcome``. The ``next_run_at`` mirror of such a task
# stays at that slot until its outcome is written (Dispatcher._commit): a run longer than a
# minute must not read as overdue.
_RUNNING_TASKS: Final = select(TaskRun.task_name).where(
    TaskRun.outcome == TaskOutcome.RUNNING.value, TaskRun.started_at.is_not(None)
)
# TASK_ROWS with whether the task has a run going, for the dashboard and the API.
_SHOWN_ROWS: Final[Select[Any]] = TASK_ROWS.add_columns(
    _TASKS.c.name.in_(_RUNNING_TASKS).label("running")
)


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """What ``status``, ``/status`` and the metrics show of a task: its schedule, desired state
    and the mirror of its last run, without its constructor arguments (which may hold anything).

    :func:`read_summaries` makes it from the stored columns as they are, so that a row whose
    schedule this nanobot cannot read (edited by hand) still has a summary: its
    :meth:`schedule` is None. :meth:`to_json` is the one builder of these keys; ``cron list
    --json`` and the web API add theirs to it (:meth:`TaskInfo.to_json`).
    """

    name: str
    task_class: str
    interval: float
    schedule_kind: str
    cron: str | None
    timezone: str | None
    run_at: datetime | None
    timeout: float | None
    paused: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_outcome: str | None
    consecutive_failures: int
    error: str | None
    source: str
    pause_reason: str | None
    auto_paused_at: datetime | None
    # When the newest successful run finished: read only by read_summaries(last_success=True).
    last_success_at: datetime | None = None
    # The schedule, when whoever made the summary had it loaded already (a TaskInfo).
    loaded: Schedule | None = field(default=None, compare=False, repr=False)

    @property
    def broken(self) -> bool:
        """True if the scheduler could not build the task (:attr:`error` says why)."""
        return self.error is not None

    @property
    def failed(self) -> bool:
        """True if the task's last slot failed (:data:`nanobot.models.FAILED_OUTCOMES`)."""
        return self.last_outcome in FAILED_OUTCOMES

    def schedule(self) -> Schedule | None:
        """The stored schedule, or None if this nanobot cannot read it. Loaded on each call:
        the metrics, which read every task at each scrape, never need it."""
        if self.loaded is not None:
            return self.loaded
        try:
            return load_schedule(
                self.schedule_kind,
                interval=self.interval,
                cron=self.cron,
                timezone=self.timezone,
                run_at=self.run_at,
            )
        except Exception:
            # Whatever a hand-edited row makes the parser raise: status still answers.
            return None

    def to_json(self) -> dict[str, Any]:
        schedule = self.schedule()
        return {
            "name": self.name,
            "task": self.task_class,
            "interval": self.interval,
            **(
                schedule_json(schedule)
                if schedule is not None
                else {
                    "schedule_kind": self.schedule_kind,
                    "schedule": None,
                    "cron": self.cron,
                    "timezone": self.timezone,
                    "run_at": iso(self.run_at),
                }
            ),
            "timeout": self.timeout,
            "paused": self.paused,
            "next_run_at": iso(self.next_run_at),
            "last_run_at": iso(self.last_run_at),
            "last_outcome": self.last_outcome,
            "consecutive_failures": self.consecutive_failures,
            "error": self.error,
            "broken": self.broken,
            "source": self.source,
            "pause_reason": self.pause_reason,
            "auto_paused_at": iso(self.auto_paused_at),
        }


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as stored: definition, desired state and the mirror of its schedule and last run."""

    name: str
    task_class: str
    interval: float
    kwargs: dict[str, Any]
    timeout: float | None
    paused: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_outcome: str | None
    consecutive_failures: int
    error: str | None
    version: int
    schedule: Schedule
    # The origin of an interval task's grid (None until first started).
    anchor_at: datetime | None = None
    overlap: Overlap = overlaps.DEFAULT
    # A backfill the leader has still to run: (from, to, concurrency), or None.
    backfill: tuple[datetime, datetime, int] | None = None

    def upcoming(self, count: int, now: datetime) -> list[datetime]:
        """The next ``count`` slots (UTC) as the scheduler will run them: from the stored next
        run; for a paused task, from where resuming it now would put it. Reads nothing."""
        if self.next_run_at is not None:
            first: datetime | None = self.next_run_at
        elif self.done:
            return []
        elif self.paused:
            first = slot_at_or_after(self.schedule, now, anchor=self.anchor_at or now)
        else:
            first = None
        if first is None or count <= 0:
            return []
        return [first, *fire_times(self.schedule, first, count - 1, anchor=first)]

    @property
    def done(self) -> bool:
        """True for a one-shot task whose time has come and gone, run or recorded missed (it
        is kept in history). A started one-shot has a next run until then."""
        return (
            isinstance(self.schedule, AtSchedule)
            and self.next_run_at is None
            and (not self.paused or self.last_run_at is not None)
        )

    source: str = "cli"
    pause_reason: str | None = None
    pause_after_failures: int | None = None
    auto_paused_at: datetime | None = None
    ping_url: str | None = None
    catch_up_window: float | None = None
    retries: int = 0
    retry_backoff: RetryBackoff | None = None
    # The pending retry: attempt ``retry_attempt`` of slot ``retry_slot`` at ``retry_at``.
    retry_at: datetime | None = None
    retry_slot: datetime | None = None
    retry_attempt: int | None = None
    # A run of it is going (read for the dashboard and the API only).
    running: bool = False

    def summary(self) -> TaskSummary:
        """The part of the task that ``status`` shows (and :meth:`to_json` starts from)."""
        return TaskSummary(
            name=self.name,
            task_class=self.task_class,
            interval=self.interval,
            **schedule_columns(self.schedule),
            timeout=self.timeout,
            paused=self.paused,
            next_run_at=self.next_run_at,
            last_run_at=self.last_run_at,
            last_outcome=self.last_outcome,
            consecutive_failures=self.consecutive_failures,
            error=self.error,
            source=self.source,
            pause_reason=self.pause_reason,
            auto_paused_at=self.auto_paused_at,
            loaded=self.schedule,
        )

    def to_json(self) -> dict[str, Any]:
        """The summary's keys, and the definition and state that ``cron list --json`` and the
        web API show beyond it."""
        return self.summary().to_json() | {
            "pause_after_failures": self.pause_after_failures,
            "ping_url": self.ping_url,
            "catch_up_window": self.catch_up_window,
            "retries": self.retries,
            "retry_backoff": (self.retry_backoff or DEFAULT_BACKOFF).text(),
            "retry": (
                {
                    "at": iso(self.retry_at),
                    "slot": iso(self.retry_slot),
                    "attempt": self.retry_attempt,
                }
                if self.retry_at is not None
                else None
            ),
            **self.overlap.to_json(),
            "backfill": (
                {
                    "from": self.backfill[0].isoformat(),
                    "to": self.backfill[1].isoformat(),
                    "concurrency": self.backfill[2],
                }
                if self.backfill is not None
                else None
            ),
            "next_run_local": _local_iso(self.next_run_at, self.schedule),
            "kwargs": self.kwargs,
        }


def _local_iso(value: datetime | None, schedule: Schedule) -> str | None:
    """``value`` on the clock of the schedule's zone (UTC for an interval), with its offset."""
    if value is None:
        return None
    tz = "UTC" if isinstance(schedule, IntervalSchedule) else schedule.timezone
    return value.astimezone(zone(tz)).isoformat()


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    """The schedule's fields as the JSON outputs show them."""
    return {
        "schedule_kind": schedule.kind.value,
        "schedule": describe(schedule),
        "cron": schedule.expression if isinstance(schedule, CronSchedule) else None,
        "timezone": None if isinstance(schedule, IntervalSchedule) else schedule.timezone,
        "run_at": iso(schedule.at) if isinstance(schedule, AtSchedule) else None,
    }


def schedule_columns(schedule: Schedule) -> dict[str, Any]:
    """The ``tasks`` columns that store ``schedule`` (beside ``interval_s``)."""
    return {
        "schedule_kind": schedule.kind.value,
        "cron": schedule.expression if isinstance(schedule, CronSchedule) else None,
        "timezone": None if isinstance(schedule, IntervalSchedule) else schedule.timezone,
        "run_at": schedule.at if isinstance(schedule, AtSchedule) else None,
    }


def row_schedule(row: Row[*tuple[Any, ...]]) -> Schedule:
    """The schedule of a ``tasks`` row."""
    return load_schedule(
        row.schedule_kind,
        interval=row.interval_s,
        cron=row.cron,
        timezone=row.timezone,
        run_at=row.run_at,
    )


# --- reading ---------------------------------------------------------------------------------


def _info(row: Row[*tuple[Any, ...]]) -> TaskInfo:
    return TaskInfo(
        name=row.name,
        task_class=row.task_class,
        interval=row.interval_s,
        kwargs=dict(row.kwargs or {}),
        timeout=row.timeout_s,
        paused=row.paused,
        next_run_at=row.next_run_at,
        last_run_at=row.last_run_at,
        last_outcome=row.last_outcome,
        consecutive_failures=row.consecutive_failures,
        error=row.broken_reason,
        version=row.version,
        schedule=row_schedule(row),
        anchor_at=row.anchor_at,
        overlap=overlaps.stored(row.overlap_policy, row.max_concurrent),
        backfill=(
            (row.backfill_from, row.backfill_to, row.backfill_concurrency or 1)
            if row.backfill_from is not None and row.backfill_to is not None
            else None
        ),
        source=row.source,
        pause_reason=row.pause_reason,
        pause_after_failures=row.pause_after_failures,
        auto_paused_at=row.auto_paused_at,
        ping_url=row.ping_url,
        catch_up_window=row.catch_up_window_s,
        retries=row.retries,
        retry_backoff=_stored_backoff(row.retry_backoff),
        retry_at=row.retry_at,
        retry_slot=row.retry_slot,
        retry_attempt=row.retry_attempt,
        running=bool(row._mapping.get("running", False)),
    )


def _stored_backoff(text: str | None) -> RetryBackoff | None:
    return None if text is None else parse_backoff(text)


def stored_definition_of(engine: Engine, name: str) -> TaskDefinition:
    """The definition stored for task ``name`` (its options included)."""
    with read_transaction(engine) as conn:
        row = conn.execute(TASK_ROWS.where(Task.name == name)).first()
    if row is None:
        raise UnknownTaskError(name)
    return stored_definition(row)


def list_tasks(engine: Engine) -> list[TaskInfo]:
    with read_transaction(engine) as conn:
        rows = conn.execute(TASK_ROWS.order_by(Task.name)).all()
    return [_info(row) for row in rows]


# The columns of a TaskSummary, in its order.
_SUMMARY_COLUMNS: Final = (
    Task.name,
    Task.task_class,
    Task.interval_s,
    Task.schedule_kind,
    Task.cron,
    Task.timezone,
    Task.run_at,
    Task.timeout_s,
    Task.paused,
    TaskStateRecord.next_run_at,
    TaskStateRecord.last_run_at,
    TaskStateRecord.last_outcome,
    func.coalesce(TaskStateRecord.consecutive_failures, 0).label("consecutive_failures"),
    Task.broken_reason,
    Task.source,
    Task.pause_reason,
    Task.auto_paused_at,
)


def read_summaries(
    conn: Connection, *, problems_only: bool = False, last_success: bool = False
) -> list[TaskSummary]:
    """Every task's summary, by name, in the caller's transaction and in one statement.

    ``problems_only`` keeps the tasks that can make status degraded (broken, or whose last slot
    failed). ``last_success`` also reads when each task's newest successful run finished, by a
    correlated subquery of the same statement (:func:`nanobot.cron.history.newest_success`).
    """
    query = select(*_SUMMARY_COLUMNS).select_from(_WITH_STATE).order_by(Task.name)
    if last_success:
        query = query.add_columns(history.newest_success(Task.name).label("last_success_at"))
    if problems_only:
        query = query.where(
            or_(
                Task.broken_reason.is_not(None),
                TaskStateRecord.last_outcome.in_(FAILED_OUTCOMES),
            )
        )
    return [_summary(row, last_success=last_success) for row in conn.execute(query)]


def alerting_summaries(conn: Connection, *, failures: int) -> list[TaskSummary]:
    """The tasks the alert rules weigh (:mod:`nanobot.alerts.rules`): broken, paused for their
    failures, or failed ``failures`` slots in a row; in the caller's transaction."""
    query = (
        select(*_SUMMARY_COLUMNS)
        .select_from(_WITH_STATE)
        .where(
            or_(
                TaskStateRecord.consecutive_failures >= failures,
                Task.broken_reason.is_not(None),
                Task.auto_paused_at.is_not(None),
            )
        )
    )
    return [_summary(row, last_success=False) for row in conn.execute(query)]


def _summary(row: Row[*tuple[Any, ...]], *, last_success: bool) -> TaskSummary:
    return TaskSummary(
        name=row.name,
        task_class=row.task_class,
        interval=row.interval_s,
        schedule_kind=row.schedule_kind,
        cron=row.cron,
        timezone=row.timezone,
        run_at=row.run_at,
        timeout=row.timeout_s,
        paused=row.paused,
        next_run_at=row.next_run_at,
        last_run_at=row.last_run_at,
        last_outcome=row.last_outcome,
        consecutive_failures=row.consecutive_failures,
        error=row.broken_reason,
        source=row.source,
        pause_reason=row.pause_reason,
        auto_paused_at=row.auto_paused_at,
        last_success_at=row.last_success_at if last_success else None,
    )


def get_task(engine: Engine, name: str) -> TaskInfo:
    with read_transaction(engine) as conn:
        row = conn.execute(_SHOWN_ROWS.where(Task.name == name)).first()
    if row is None:
        raise UnknownTaskError(name)
    return _info(row)


def task_history(
    engine: Engine, name: str, limit: int = 20, *, before: datetime | None = None
) -> list[RunInfo]:
    """The last ``limit`` rows of a task's run history, newest first (as
    :func:`nanobot.cron.history.read_runs` pages them); :class:`UnknownTaskError` for a name
    that is neither a task nor in the history."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise InvalidTaskError(f"limit must be a positive whole number, got {limit!r}")
    with read_transaction(engine) as conn:
        known = conn.execute(select(Task.id).where(Task.name == name)).first()
        runs = history.read_runs(conn, name, limit, before=before)
    if known is None and not runs:
        raise UnknownTaskError(name)
    return runs


# --- writing ---------------------------------------------------------------------------------


def definition_values(d: TaskDefinition) -> dict[str, Any]:
    return schedule_columns(d.the_schedule) | {
        "task_class": d.task_class,
        "interval_s": d.interval,
        "kwargs": d.kwargs,
        "timeout_s": d.timeout,
        "jitter_s": d.jitter,
        "misfire_policy": d.misfire_policy.value,
        "overlap_policy": d.overlap.policy.value,
        "max_concurrent": d.overlap.max_concurrent,
        "pause_after_failures": d.pause_after_failures,
        "ping_url": d.ping_url,
        "catch_up_window_s": d.catch_up_window,
        "retries": d.retries,
        "retry_backoff": d.retry_backoff.text() if d.retry_backoff is not None else None,
    }


def stored_definition(row: Row[*tuple[Any, ...]]) -> TaskDefinition:
    return TaskDefinition(
        name=row.name,
        task_class=row.task_class,
        interval=row.interval_s,
        kwargs=dict(row.kwargs or {}),
        timeout=row.timeout_s,
        jitter=row.jitter_s,
        misfire_policy=MisfirePolicy(row.misfire_policy),
        overlap=overlaps.stored(row.overlap_policy, row.max_concurrent),
        schedule=row_schedule(row),
        pause_after_failures=row.pause_after_failures,
        ping_url=row.ping_url,
        catch_up_window=row.catch_up_window_s,
        retries=row.retries,
        retry_backoff=_stored_backoff(row.retry_backoff),
    )


def first_run(schedule: Schedule, now: datetime) -> datetime | None:
    """When a task started at ``now`` first runs: an interval task at once, a cron task at its
    next fire time, a one-shot at its instant (even if past: it then runs once, at start)."""
    if isinstance(schedule, IntervalSchedule):
        return now
    if isinstance(schedule, AtSchedule):
        return schedule.at
    return slot_at_or_after(schedule, now)


def new_task_values(
    definition: TaskDefinition,
    now: datetime,
    *,
    source: TaskSource,
    paused: bool,
    started: bool,
    pause_reason: str | None = None,
) -> dict[str, Any]:
    """The columns of a new task (its ``tasks`` row and its ``task_state`` row, which
    :func:`insert_task` writes apart). ``started``: its schedule starts now (first run per
    :func:`first_run`); else it has no schedule until started (as a task registered in code)."""
    starts = started and not paused
    return definition_values(definition) | {
        "name": definition.name,
        "source": source.value,
        "paused": paused,
        "pause_reason": pause_reason,
        "anchor_at": now if starts else None,
        "next_run_at": first_run(definition.the_schedule, now) if starts else None,
        "created_at": now,
        "updated_at": now,
        "version": 1,
        "consecutive_failures": 0,
    }


def redefined_values(
    stored: TaskDefinition,
    definition: TaskDefinition,
    *,
    next_run_at: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    """The columns that change when a task's stored definition becomes ``definition`` (a task
    registered again in code, a task file edited), with where its schedule goes on."""
    values = definition_values(definition) | {"broken_reason": None}
    before, after = stored.the_schedule, definition.the_schedule
    both_intervals = isinstance(before, IntervalSchedule) and isinstance(after, IntervalSchedule)
    if before != after and not both_intervals:
        # Another kind of schedule, another expression or time: the next run is the new
        # schedule's first (the scheduler recomputes it from the new schedule).
        if next_run_at is not None:
            values["anchor_at"] = now
            values["next_run_at"] = first_run(after, now)
    elif stored.interval != definition.interval and next_run_at is not None:
        # Keep the phase: the next slot stays where it was, later ones follow the new interval
        # from there.
        values["anchor_at"] = next_run_at
    return values


def add_task(engine: Engine, definition: TaskDefinition, *, paused: bool = False) -> TaskInfo:
    """Store a new task; started (first run at once) unless ``paused``. A taken name is refused."""
    values = new_task_values(
        definition, utcnow(), source=TaskSource.CLI, paused=paused, started=True
    )
    try:
        with write_transaction(engine) as conn:
            insert_task(conn, values)
    except IntegrityError:
        raise TaskExistsError(definition.name) from None
    return get_task(engine, definition.name)


def upsert_definition(
    engine: Engine, definition: TaskDefinition, *, create: bool = True
) -> tuple[str, TaskInfo]:
    """Store a task registered in code: ``"created"``, ``"unchanged"`` or ``"updated"``.

    A new task is stored stopped (paused, no schedule) until it is started, as in the seed,
    where registering a task does not run it. Registering the same definition again changes
    nothing, so the schedule keeps its phase across restarts. With ``create=False`` (an update
    through the API) an unknown name raises :class:`UnknownTaskError` and nothing is stored.
    """
    now = utcnow()
    with write_transaction(engine) as conn:
        row = conn.execute(TASK_ROWS.where(Task.name == definition.name)).first()
        if row is None and not create:
            raise UnknownTaskError(definition.name)
        if row is None:
            values = new_task_values(
                definition, now, source=TaskSource.CODE, paused=True, started=False
            )
            insert_task(conn, values)
            outcome = "created"
        elif stored_definition(row).same_schedule_as(definition):
            outcome = "unchanged"
        else:
            values = redefined_values(
                stored_definition(row), definition, next_run_at=row.next_run_at, now=now
            )
            change_task(conn, definition.name, values, now)
            outcome = "updated"
    return outcome, get_task(engine, definition.name)


def _change(engine: Engine, name: str, **values: Any) -> TaskInfo:
    with write_transaction(engine) as conn:
        if not change_task(conn, name, values, utcnow()):
            raise UnknownTaskError(name)
    return get_task(engine, name)


def start_task(engine: Engine, name: str) -> TaskInfo:
    """Schedule a stopped task with its first run now (the seed's start); no-op if started."""
    info = get_task(engine, name)
    if not info.paused:
        return info
    now = utcnow()
    return _change(
        engine,
        name,
        paused=False,
        anchor_at=now,
        next_run_at=first_run(info.schedule, now),
        pause_reason=None,
        auto_paused_at=None,
    )


def pause_task(engine: Engine, name: str, note: str | None = None) -> TaskInfo:
    """Stop scheduling a task; a run in flight finishes. No next run until resumed.

    ``note`` is the operator's reason, kept until the task is resumed (``cron list``,
    ``status``)."""
    if note is not None and not note.strip():
        raise InvalidTaskError("a pause note must not be empty")
    reason = bound_error(note.strip()) if note is not None else None
    # A pending retry goes too: a paused task runs nothing, and resuming it starts afresh.
    return _change(
        engine,
        name,
        paused=True,
        next_run_at=None,
        pause_reason=reason,
        auto_paused_at=None,
        retry_at=None,
        retry_slot=None,
        retry_attempt=None,
    )


def resume_task(engine: Engine, name: str) -> TaskInfo:
    """Schedule a paused task again on its original grid (its phase is kept).

    A task that was never started gets its first run now.
    """
    info = get_task(engine, name)
    if not info.paused:
        return info
    with read_transaction(engine) as conn:
        anchor = conn.execute(select(Task.anchor_at).where(Task.name == name)).scalar()
    if anchor is None:
        return start_task(engine, name)
    return _change(engine, name, paused=False, pause_reason=None, auto_paused_at=None)


def request_run(engine: Engine, name: str, *, force: bool = False) -> TaskInfo:
    """Ask the running scheduler to run the task once now, outside its schedule. The run obeys
    the task's overlap policy unless ``force`` (:mod:`nanobot.cron.overlap`)."""
    return _change(engine, name, run_requested_at=utcnow(), run_forced=force)


def set_backfill(
    engine: Engine, name: str, start: datetime, end: datetime, concurrency: int
) -> TaskInfo:
    """Store a backfill for the leader to run (:mod:`nanobot.cron.backfill` checks it first)."""
    return _change(
        engine,
        name,
        backfill_from=start,
        backfill_to=end,
        backfill_concurrency=concurrency,
    )


def clear_backfill(conn: Connection, name: str, start: datetime, end: datetime) -> None:
    """Forget the task's backfill from ``start`` to ``end`` once done (a newer request stays),
    in the caller's transaction."""
    conn.execute(
        update(Task)
        .where(Task.name == name, Task.backfill_from == start, Task.backfill_to == end)
        .values(backfill_from=None, backfill_to=None, backfill_concurrency=None)
    )


def remove_task(engine: Engine, name: str) -> None:
    """Delete a task (its ``task_state`` row goes with it: the foreign key cascades). Its run
    history stays until retention prunes it."""
    with write_transaction(engine) as conn:
        result = conn.execute(delete(Task).where(Task.name == name))
        if result.rowcount == 0:
            raise UnknownTaskError(name)


def existing_names(conn: Connection, names: Iterable[str]) -> set[str]:
    """Those of ``names`` that are tasks now, in the caller's transaction."""
    wanted = list(names)
    if not wanted:
        return set()
    return set(conn.execute(select(Task.name).where(Task.name.in_(wanted))).scalars())


@dataclass(frozen=True, slots=True)
class FailureCount:
    """A started task's failed slots in a row, and its own auto-pause threshold (None: the
    ``cron.pause_after_failures`` setting's)."""

    name: str
    consecutive_failures: int
    pause_after_failures: int | None


def failure_counts(conn: Connection, names: Sequence[str]) -> list[FailureCount]:
    """The count of each of ``names`` that is not paused, in the caller's transaction."""
    rows = conn.execute(
        select(
            Task.name,
            func.coalesce(TaskStateRecord.consecutive_failures, 0).label("consecutive_failures"),
            Task.pause_after_failures,
        )
        .select_from(_WITH_STATE)
        .where(Task.name.in_(list(names)), Task.paused.is_(False))
        .order_by(Task.name)
    ).all()
    return [FailureCount(r.name, r.consecutive_failures, r.pause_after_failures) for r in rows]


def auto_pause(conn: Connection, name: str, reason: str, now: datetime) -> bool:
    """Pause a task for its failures (:mod:`nanobot.cron.autopause`), unless it is paused
    already; True if this call paused it. A change like ``cron pause``: the version goes up."""
    result = conn.execute(
        update(Task)
        .where(Task.name == name, Task.paused.is_(False))
        .values(
            paused=True,
            pause_reason=bound_error(reason),
            auto_paused_at=now,
            version=Task.version + 1,
            updated_at=now,
        )
    )
    if not result.rowcount:
        return False
    _write_state(conn, name, {"next_run_at": None})
    return True


@dataclass(frozen=True, slots=True)
class DueTask:
    """A started task's next slot (what :mod:`nanobot.cron.overdue` weighs), and the latest
    slot of it that a scheduler claimed (or recorded missed) since, if any."""

    name: str
    interval: float
    next_run_at: datetime
    last_claimed: datetime | None


def due_before(conn: Connection, horizon: datetime) -> list[DueTask]:
    """The started tasks whose next slot is before ``horizon``, in the caller's transaction.

    ``next_run_at`` of a slot the leader claimed is advanced with that run's outcome, not at
    the claim (one row write per run, see Dispatcher._commit), so the slot there may be claimed
    already (a run longer than the grace, the last runs of a burst of thousands), and so may
    later ones if outcomes are written late. ``last_claimed`` is the latest such slot, from the
    task's scheduled rows (an index search of each candidate on the unique key of
    ``task_runs``; a manual run does not count).
    """
    last_claimed = (
        select(func.max(TaskRun.scheduled_at))
        .where(
            TaskRun.task_name == Task.name,
            TaskRun.scheduled_at >= TaskStateRecord.next_run_at,
            TaskRun.manual.is_(False),
        )
        .scalar_subquery()
    )
    rows = conn.execute(
        select(
            Task.name,
            Task.interval_s,
            TaskStateRecord.next_run_at,
            last_claimed.label("last_claimed"),
        )
        .select_from(_WITH_STATE)
        .where(
            Task.paused.is_(False),
            TaskStateRecord.next_run_at.is_not(None),
            TaskStateRecord.next_run_at < horizon,
        )
    ).all()
    return [DueTask(r.name, r.interval_s, r.next_run_at, r.last_claimed) for r in rows]


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A ``tasks`` row as a sync of definitions (the task file) weighs it: the definition
    stored, who defined it, and the state a sync keeps or changes."""

    definition: TaskDefinition
    source: str
    paused: bool
    pause_reason: str | None
    anchor_at: datetime | None
    next_run_at: datetime | None


def stored_tasks(conn: Connection) -> dict[str, StoredTask]:
    """Every task as stored, by name, in the caller's transaction."""
    return {
        row.name: StoredTask(
            definition=stored_definition(row),
            source=row.source,
            paused=row.paused,
            pause_reason=row.pause_reason,
            anchor_at=row.anchor_at,
            next_run_at=row.next_run_at,
        )
        for row in conn.execute(TASK_ROWS)
    }


def _split(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` of a task as the columns of ``tasks`` and those of ``task_state``."""
    state = {key: values[key] for key in STATE_COLUMNS if key in values}
    return {key: v for key, v in values.items() if key not in state}, state


def _write_state(conn: Connection, name: str, state: dict[str, Any]) -> None:
    if state:
        conn.execute(
            update(TaskStateRecord).where(TaskStateRecord.task_name == name).values(**state)
        )


def insert_task(conn: Connection, values: dict[str, Any]) -> None:
    """Insert a task made by :func:`new_task_values` (its ``tasks`` row, then its
    ``task_state`` row), in the caller's transaction."""
    task, state = _split(values)
    conn.execute(insert(Task).values(**task))
    conn.execute(insert(TaskStateRecord).values(task_name=task["name"], **state))


def insert_tasks(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    """:func:`insert_task` for each of ``rows`` (which may name different columns)."""
    for values in rows:
        insert_task(conn, values)


def change_task(conn: Connection, name: str, values: dict[str, Any], now: datetime) -> bool:
    """Write ``values`` into the task's rows as a new version (the scheduler applies it), in the
    caller's transaction; False if there is no such task.

    The ``tasks`` row is written first: a scheduler's next-run mirror share-locks it
    (:func:`nanobot.cron.history.set_next_runs`), so it waits for this change to commit and
    then leaves ``task_state`` as this change wrote it.
    """
    task, state = _split(values)
    result = conn.execute(
        update(Task)
        .where(Task.name == name)
        .values(**task, version=Task.version + 1, updated_at=now)
    )
    if not result.rowcount:
        return False
    _write_state(conn, name, state)
    return True


# --- states and pages (the dashboard and the API) ---------------------------------------------

# A started task whose next slot is this far in the past is overdue: no scheduler ran it.
OVERDUE_AFTER: Final = timedelta(seconds=60)
PAGE_SIZE_MAX: Final = 200


class TaskState(enum.StrEnum):
    """The filters of the tasks page and of ``GET /api/v1/tasks?state=``; a task may be in
    several (a paused task can be failing too). :func:`state_of` gives the one it is shown in."""

    ACTIVE = "active"  # scheduled: not paused, not broken
    PAUSED = "paused"
    BROKEN = "broken"  # its class cannot be imported or built
    FAILING = "failing"  # its last slot failed (error, timeout, interrupted)
    # scheduled, but its next slot passed more than a minute ago and no run of it is going
    OVERDUE = "overdue"
    RUNNING = "running"  # a run of it is going
    DONE = "done"  # a one-shot task that has run


def _in_state(state: TaskState, now: datetime) -> ColumnElement[bool]:
    """``state`` as a condition on ``tasks`` joined to ``task_state`` (:func:`state_of` is the
    same rule in Python)."""
    match state:
        case TaskState.ACTIVE:
            return and_(Task.paused.is_(False), Task.broken_reason.is_(None))
        case TaskState.PAUSED:
            return Task.paused.is_(True)
        case TaskState.BROKEN:
            return Task.broken_reason.is_not(None)
        case TaskState.FAILING:
            return or_(
                TaskStateRecord.consecutive_failures > 0,
                TaskStateRecord.last_outcome.in_(FAILED_OUTCOMES),
            )
        case TaskState.OVERDUE:
            return and_(
                Task.paused.is_(False),
                Task.broken_reason.is_(None),
                TaskStateRecord.next_run_at < now - OVERDUE_AFTER,
                Task.name.not_in(_RUNNING_TASKS),
            )
        case TaskState.RUNNING:
            return Task.name.in_(_RUNNING_TASKS)
        case TaskState.DONE:
            return and_(
                Task.schedule_kind == ScheduleKind.AT.value,
                TaskStateRecord.next_run_at.is_(None),
                TaskStateRecord.last_run_at.is_not(None),
            )


def state_of(info: TaskInfo, now: datetime) -> TaskState:
    """The one state a task is shown in, the most urgent first."""
    if info.error is not None:
        return TaskState.BROKEN
    if info.done:
        return TaskState.DONE
    if info.paused:
        return TaskState.PAUSED
    if info.running:
        return TaskState.RUNNING
    if info.consecutive_failures > 0 or info.last_outcome in FAILED_OUTCOMES:
        return TaskState.FAILING
    if info.next_run_at is not None and info.next_run_at < now - OVERDUE_AFTER:
        return TaskState.OVERDUE
    return TaskState.ACTIVE


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of the filtered task list, and how many tasks match in all."""

    items: list[TaskInfo]
    total: int
    offset: int
    limit: int


def page_tasks(
    engine: Engine,
    *,
    search: str = "",
    state: TaskState | None = None,
    offset: int = 0,
    limit: int = 50,
    now: datetime | None = None,
) -> TaskPage:
    """Tasks whose name or class contains ``search`` (any case) and in ``state``, by name: a
    page of at most :data:`PAGE_SIZE_MAX`, and the count of all that match."""
    now = now or utcnow()
    limit = max(1, min(limit, PAGE_SIZE_MAX))
    offset = max(0, offset)
    conditions: list[ColumnElement[bool]] = []
    if search:
        needle = search.lower()
        conditions.append(
            or_(
                func.lower(Task.name).contains(needle, autoescape=True),
                func.lower(Task.task_class).contains(needle, autoescape=True),
            )
        )
    if state is not None:
        conditions.append(_in_state(state, now))
    with read_transaction(engine) as conn:
        total = conn.execute(
            select(func.count()).select_from(_WITH_STATE).where(*conditions)
        ).scalar()
        rows = conn.execute(
            _SHOWN_ROWS.where(*conditions).order_by(Task.name).offset(offset).limit(limit)
        ).all()
    return TaskPage(
        items=[_info(row) for row in rows], total=int(total or 0), offset=offset, limit=limit
    )


def count_by_state(engine: Engine, *, now: datetime | None = None) -> dict[str, int]:
    """``{"total": n, "active": n, "paused": n, ...}`` in one grouped statement."""
    now = now or utcnow()
    columns = [func.count().label("total")] + [
        func.coalesce(func.sum(case((_in_state(s, now), 1), else_=0)), 0).label(s.value)
        for s in TaskState
    ]
    with read_transaction(engine) as conn:
        row = conn.execute(select(*columns).select_from(_WITH_STATE)).one()
    return {key: int(value) for key, value in row._mapping.items()}


def overdue_tasks(
    engine: Engine, *, limit: int = 10, now: datetime | None = None
) -> list[TaskInfo]:
    """The started tasks whose next slot is longest overdue, first."""
    now = now or utcnow()
    with read_transaction(engine) as conn:
        rows = conn.execute(
            _SHOWN_ROWS.where(_in_state(TaskState.OVERDUE, now))
            .order_by(TaskStateRecord.next_run_at)
            .limit(limit)
        ).all()
    return [_info(row) for row in rows]


def upcoming(engine: Engine, *, limit: int = 5) -> list[TaskInfo]:
    """The started tasks that run next, soonest first."""
    with read_transaction(engine) as conn:
        rows = conn.execute(
            _SHOWN_ROWS.where(
                and_(Task.paused.is_(False), TaskStateRecord.next_run_at.is_not(None))
            )
            .order_by(TaskStateRecord.next_run_at, Task.name)
            .limit(limit)
        ).all()
    return [_info(row) for row in rows]


# --- read and written by the scheduler (nanobot.cron.reconcile, nanobot.cron.dispatch) ---------


class TaskVersion(NamedTuple):
    """What the reconciliation compares of every stored task: its version, and whether a run
    of it is requested. A tuple: a pass reads one per stored task, every poll interval."""

    version: int
    requested: bool


def task_exists(engine: Engine, name: str) -> bool:
    """Whether a task named ``name`` is stored."""
    with read_transaction(engine) as conn:
        return conn.execute(select(Task.id).where(Task.name == name)).first() is not None


def task_names(engine: Engine) -> list[str]:
    """The names of every stored task, sorted."""
    with read_transaction(engine) as conn:
        return list(conn.execute(select(Task.name).order_by(Task.name)).scalars().all())


def stored_names(conn: Connection) -> set[str]:
    """The names of every stored task, in ``conn``'s transaction."""
    return set(conn.execute(select(Task.name)).scalars())


def task_versions(conn: Connection) -> dict[str, TaskVersion]:
    """Each stored task's version and pending run request, by name."""
    # Plain columns and a test done by the database: no conversion per row in Python, which
    # took three times as long (0.6 s for 100,000 tasks).
    rows = conn.execute(select(Task.name, Task.version, Task.run_requested_at.is_not(None)))
    return {name: TaskVersion(version, bool(requested)) for name, version, requested in rows}


def names_due_after(conn: Connection, after: datetime) -> list[str]:
    """The tasks whose next-run mirror is after ``after`` and that no run request waits for,
    soonest first."""
    state = TaskStateRecord
    stmt = (
        select(Task.name)
        .join(state, state.task_name == Task.name)
        .where(state.next_run_at > after, Task.run_requested_at.is_(None))
        .order_by(state.next_run_at)
    )
    return list(conn.execute(stmt).scalars())


def task_rows(conn: Connection, names: Sequence[str], *, whole_table: bool) -> list[Any]:
    """The whole ``tasks`` rows of ``names``. ``whole_table``: read every row and keep the
    wanted ones, rather than send an IN list longer than the database accepts."""
    if whole_table:
        wanted = set(names)
        return [row for row in conn.execute(TASK_ROWS) if row.name in wanted]
    rows: list[Any] = []
    # IN lists of at most IN_MAX names: some databases refuse longer ones.
    for start in range(0, len(names), IN_MAX):
        part = list(names[start : start + IN_MAX])
        rows.extend(conn.execute(TASK_ROWS.where(Task.name.in_(part))).all())
    return rows


def consume_run_request(conn: Connection, name: str, requested: datetime) -> None:
    """Clear the run request of ``name`` made at ``requested`` (a newer one stays), in the
    transaction that claims its run."""
    conn.execute(
        update(Task)
        .where(Task.name == name, Task.run_requested_at == requested)
        .values(run_requested_at=None, run_forced=False)
    )
