"""The control plane of the scheduler: the ``tasks`` table, read and written by any process.

The command line and the manager both change tasks through these functions. Each change bumps
the row's ``version``; the scheduler that runs applies rows whose version it has not applied
yet (within ``cron.poll_interval``), or at its next start. These functions are synchronous and
do database I/O: call them from a thread when an event loop is running.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from nanobot.cron import overlap as overlaps
from nanobot.cron.overlap import Overlap, check_overlap
from nanobot.cron.pings import check_ping_url
from nanobot.cron.retries import DEFAULT_BACKOFF, RetryBackoff, check_retries, parse_backoff
from nanobot.cron.schedules import (
    AtSchedule,
    CronSchedule,
    IntervalSchedule,
    Schedule,
    describe,
    fire_times,
    load_schedule,
    slot_at_or_after,
    zone,
)
from nanobot.cron.task import (
    CronTask,
    TaskDefinition,
    check_failure_count,
    check_interval,
    nominal_period,
)
from nanobot.db import read_transaction, write_transaction
from nanobot.exceptions import InvalidTaskError, TaskExistsError, UnknownTaskError
from nanobot.models import (
    NAME_MAX,
    MisfirePolicy,
    Task,
    TaskOutcome,
    TaskRun,
    TaskSource,
    bound_error,
    utcnow,
)


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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "pause_reason": self.pause_reason,
            "pause_after_failures": self.pause_after_failures,
            "auto_paused_at": _iso(self.auto_paused_at),
            "ping_url": self.ping_url,
            "catch_up_window": self.catch_up_window,
            "retries": self.retries,
            "retry_backoff": (self.retry_backoff or DEFAULT_BACKOFF).text(),
            "retry": (
                {
                    "at": _iso(self.retry_at),
                    "slot": _iso(self.retry_slot),
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
            "task": self.task_class,
            "interval": self.interval,
            **schedule_json(self.schedule),
            "next_run_local": _local_iso(self.next_run_at, self.schedule),
            "kwargs": self.kwargs,
            "timeout": self.timeout,
            "paused": self.paused,
            "next_run_at": _iso(self.next_run_at),
            "last_run_at": _iso(self.last_run_at),
            "last_outcome": self.last_outcome,
            "consecutive_failures": self.consecutive_failures,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One row of a task's run history."""

    id: int
    task_name: str
    scheduled_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration: float | None
    outcome: TaskOutcome
    error: str | None
    slots: int
    manual: bool
    node: str | None
    output: str | None = None
    # Which attempt of its slot (1: the slot's run; 2...: its retries).
    attempt: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task_name,
            "scheduled_at": _iso(self.scheduled_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration": self.duration,
            "outcome": self.outcome.value,
            "error": self.error,
            "slots": self.slots,
            "manual": self.manual,
            "node": self.node,
            "output": self.output,
            "attempt": self.attempt,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


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
        "run_at": _iso(schedule.at) if isinstance(schedule, AtSchedule) else None,
    }


def row_schedule(row: Any) -> Schedule:
    """The schedule of a ``tasks`` row."""
    return load_schedule(
        row.schedule_kind,
        interval=row.interval_s,
        cron=row.cron,
        timezone=row.timezone,
        run_at=row.run_at,
    )


# A task is also the heartbeat component "task:<name>", whose name has NAME_MAX characters.
TASK_NAME_MAX: Final = NAME_MAX - len("task:")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidTaskError(f"a task name must be a non-empty string, got {name!r}")
    if len(name) > TASK_NAME_MAX:
        raise InvalidTaskError(f"a task name may have at most {TASK_NAME_MAX} characters")
    if name != name.strip():
        raise InvalidTaskError(f"a task name may not start or end with spaces: {name!r}")
    # A newline or other control character would split the lines of cron list, the log and
    # the alert messages that show the name.
    if not name.isprintable():
        raise InvalidTaskError(f"a task name may not hold control characters: {name!r}")
    return name


def import_task_class(path: str) -> type[CronTask]:
    """The class named by ``pkg.module:Class``, or :class:`InvalidTaskError` saying why not."""
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise InvalidTaskError(f"task class {path!r} must be written pkg.module:Class")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise InvalidTaskError(
            f"cannot import module {module_name!r} of task class {path!r}: "
            f"{exc.__class__.__name__}: {exc}"
        ) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidTaskError(f"module {module_name!r} has no {qualname!r}") from None
    if not isinstance(obj, type) or not issubclass(obj, CronTask):
        raise InvalidTaskError(f"{path!r} is not a subclass of nanobot.cron.CronTask")
    return obj


def build_task(path: str, kwargs: dict[str, Any]) -> CronTask:
    """A new instance of the stored task ``path`` with its stored constructor arguments."""
    cls = import_task_class(path)
    if getattr(cls, "__abstractmethods__", None):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise InvalidTaskError(f"{path!r} is abstract: it does not implement {missing}")
    try:
        return cls(**kwargs)
    except InvalidTaskError:
        raise
    except Exception as exc:
        raise InvalidTaskError(
            f"{path!r} cannot be built with {kwargs!r}: {exc.__class__.__name__}: {exc}"
        ) from exc


def parse_kwargs(raw: str | None) -> dict[str, Any]:
    """Constructor arguments given as JSON text: an object, or an error that says so."""
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidTaskError(
            f"kwargs are not valid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise InvalidTaskError(f"kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _optional_seconds(value: Any, what: str) -> float | None:
    return None if value is None else check_interval(value, what)


def definition_from_class(
    name: str,
    path: str,
    interval: Any = None,
    kwargs: dict[str, Any] | None = None,
    *,
    schedule: Schedule | None = None,
    timeout: float | None = None,
    jitter: float | None = None,
    misfire_policy: MisfirePolicy | str | None = None,
    overlap: str | None = None,
    max_concurrent: int | None = None,
    pause_after_failures: int | None = None,
    ping_url: str | None = None,
    catch_up_window: float | None = None,
    retries: int | None = None,
    retry_backoff: RetryBackoff | str | None = None,
) -> TaskDefinition:
    """Validate a task given by class path (the command line's ``cron add``) and define it.

    The schedule is ``schedule``, or every ``interval`` seconds; ``timeout``, ``jitter`` and
    ``misfire_policy``, ``overlap`` (with ``max_concurrent``) and ``pause_after_failures``
    override the class's own when given.
    """
    if overlap is not None:
        # A bad policy or a contradiction is refused before anything is imported.
        check_overlap(overlap, max_concurrent)
    failures = check_failure_count(pause_after_failures)
    ping = check_ping_url(ping_url)
    window = _optional_seconds(catch_up_window, "catch_up_window")
    own_retries = None if retries is None else check_retries(retries)
    backoff = None if retry_backoff is None else parse_backoff(retry_backoff)
    check_name(name)
    if schedule is None:
        schedule = IntervalSchedule(seconds=check_interval(interval))
    elif interval is not None:
        raise InvalidTaskError("a task has one schedule: give an interval or a schedule, not both")
    kwargs = dict(kwargs or {})
    cls = import_task_class(path)
    params = inspect.signature(cls).parameters
    if isinstance(schedule, IntervalSchedule):
        seconds = schedule.seconds
        if "interval" in params:
            given = interval if interval is not None else seconds
            if isinstance(given, float) and given.is_integer():
                given = int(given)  # stored as the user wrote it: 10, not 10.0
            if "interval" in kwargs and kwargs["interval"] != given:
                raise InvalidTaskError(
                    f"kwargs give interval {kwargs['interval']!r} but --interval is {given!r}"
                )
            kwargs["interval"] = given
    else:
        seconds = nominal_period(schedule)
        if "interval" in kwargs:
            raise InvalidTaskError(
                f"kwargs give interval {kwargs['interval']!r} but the schedule is "
                f"{describe(schedule)}: keep one"
            )
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        raise InvalidTaskError("kwargs must be plain JSON data") from None
    task = build_task(path, kwargs)
    if misfire_policy is not None:
        try:
            policy = MisfirePolicy(misfire_policy)
        except ValueError:
            choices = ", ".join(p.value for p in MisfirePolicy)
            raise InvalidTaskError(
                f"misfire policy must be one of {choices}, got {misfire_policy!r}"
            ) from None
    else:
        policy = MisfirePolicy(task.misfire_policy)
    return TaskDefinition(
        name=name,
        task_class=path,
        interval=seconds,
        kwargs=kwargs,
        timeout=task.timeout if timeout is None else _optional_seconds(timeout, "timeout"),
        jitter=task.jitter if jitter is None else _optional_seconds(jitter, "jitter"),
        misfire_policy=policy,
        overlap=_chosen_overlap(task, overlap, max_concurrent),
        schedule=schedule,
        pause_after_failures=task.pause_after_failures if failures is None else failures,
        ping_url=task.ping_url if ping is None else ping,
        catch_up_window=task.catch_up_window if window is None else window,
        retries=task.retries if own_retries is None else own_retries,
        retry_backoff=(
            backoff
            if backoff is not None
            else None
            if task.retry_backoff is None
            else parse_backoff(task.retry_backoff)
        ),
    )


def _chosen_overlap(task: CronTask, policy: str | None, max_concurrent: int | None) -> Overlap:
    """The overlap given (``cron add --overlap``, a task-file key) over the class's own; a
    maximum given alone applies to a class whose own policy is allow."""
    own = overlaps.OverlapPolicy(task.overlap)
    if policy is None and max_concurrent is None:
        return Overlap(own, task.max_concurrent or 1)
    chosen = policy if policy is not None else own
    if max_concurrent is None and chosen == own:
        max_concurrent = task.max_concurrent if own is overlaps.OverlapPolicy.ALLOW else None
    return check_overlap(chosen, max_concurrent)


# --- reading ---------------------------------------------------------------------------------


def _info(row: Any) -> TaskInfo:
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
    )


def _stored_backoff(text: str | None) -> RetryBackoff | None:
    return None if text is None else parse_backoff(text)


def stored_definition_of(engine: Engine, name: str) -> TaskDefinition:
    """The definition stored for task ``name`` (its options included)."""
    with read_transaction(engine) as conn:
        row = conn.execute(select(Task.__table__).where(Task.name == name)).first()
    if row is None:
        raise UnknownTaskError(name)
    return stored_definition(row)


def list_tasks(engine: Engine) -> list[TaskInfo]:
    with read_transaction(engine) as conn:
        rows = conn.execute(select(Task.__table__).order_by(Task.name)).all()
    return [_info(row) for row in rows]


def get_task(engine: Engine, name: str) -> TaskInfo:
    with read_transaction(engine) as conn:
        row = conn.execute(select(Task.__table__).where(Task.name == name)).first()
    if row is None:
        raise UnknownTaskError(name)
    return _info(row)


def task_history(
    engine: Engine, name: str, limit: int = 20, *, before: datetime | None = None
) -> list[RunInfo]:
    """The last ``limit`` rows of a task's run history, newest first.

    With ``before``, only slots scheduled before it: the next page after a page whose oldest
    row was scheduled at ``before``. The attempts of a slot (retries) are never split between
    two pages: a page holds at least ``limit`` rows when there are that many, so that no row is
    shown twice or skipped.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise InvalidTaskError(f"limit must be a positive whole number, got {limit!r}")
    query = select(TaskRun.__table__).where(TaskRun.task_name == name)
    if before is not None:
        query = query.where(TaskRun.scheduled_at < before)
    with read_transaction(engine) as conn:
        known = conn.execute(select(Task.id).where(Task.name == name)).first()
        rows = list(
            conn.execute(
                query.order_by(TaskRun.scheduled_at.desc(), TaskRun.attempt.desc()).limit(limit)
            ).all()
        )
        if len(rows) == limit and rows[-1].attempt > 1:
            # A page ends inside a slot's attempts: its earlier attempts come with it, since
            # the next page starts before that slot (a page may hold a few rows more).
            rows += conn.execute(
                select(TaskRun.__table__)
                .where(
                    TaskRun.task_name == name,
                    TaskRun.scheduled_at == rows[-1].scheduled_at,
                    TaskRun.attempt < rows[-1].attempt,
                )
                .order_by(TaskRun.attempt.desc())
            ).all()
    if known is None and not rows:
        raise UnknownTaskError(name)
    return [run_info(r) for r in rows]


def run_info(r: Any) -> RunInfo:
    """A ``task_runs`` row as a record (``output`` where the query selected it)."""
    return RunInfo(
        id=r.id,
        task_name=r.task_name,
        scheduled_at=r.scheduled_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
        duration=r.duration_s,
        outcome=TaskOutcome(r.outcome),
        error=r.error,
        slots=r.slots,
        manual=r.manual,
        node=r.node,
        output=getattr(r, "output", None),
        attempt=getattr(r, "attempt", 1),
    )


# --- writing ---------------------------------------------------------------------------------


def definition_values(d: TaskDefinition) -> dict[str, Any]:
    schedule = d.the_schedule
    return {
        "schedule_kind": schedule.kind.value,
        "cron": schedule.expression if isinstance(schedule, CronSchedule) else None,
        "timezone": None if isinstance(schedule, IntervalSchedule) else schedule.timezone,
        "run_at": schedule.at if isinstance(schedule, AtSchedule) else None,
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


def stored_definition(row: Any) -> TaskDefinition:
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


def add_task(engine: Engine, definition: TaskDefinition, *, paused: bool = False) -> TaskInfo:
    """Store a new task; started (first run at once) unless ``paused``. A taken name is refused."""
    now = utcnow()
    values = definition_values(definition) | {
        "name": definition.name,
        "paused": paused,
        "anchor_at": None if paused else now,
        "next_run_at": None if paused else first_run(definition.the_schedule, now),
        "created_at": now,
        "updated_at": now,
        "version": 1,
        "consecutive_failures": 0,
    }
    try:
        with write_transaction(engine) as conn:
            conn.execute(insert(Task).values(**values))
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
        row = conn.execute(select(Task.__table__).where(Task.name == definition.name)).first()
        if row is None and not create:
            raise UnknownTaskError(definition.name)
        if row is None:
            conn.execute(
                insert(Task).values(
                    **definition_values(definition),
                    name=definition.name,
                    source=TaskSource.CODE.value,
                    paused=True,
                    created_at=now,
                    updated_at=now,
                    version=1,
                    consecutive_failures=0,
                )
            )
            outcome = "created"
        else:
            current = row
            if stored_definition(current).same_schedule_as(definition):
                outcome = "unchanged"
            else:
                values = definition_values(definition) | {
                    "updated_at": now,
                    "version": Task.version + 1,
                    "broken_reason": None,
                }
                before = stored_definition(current).the_schedule
                if before != definition.the_schedule and not (
                    isinstance(before, IntervalSchedule)
                    and isinstance(definition.the_schedule, IntervalSchedule)
                ):
                    # Another kind of schedule, another expression or time: the next run is the
                    # new schedule's first (the scheduler recomputes it from the new schedule).
                    if current.next_run_at is not None:
                        values["anchor_at"] = now
                        values["next_run_at"] = first_run(definition.the_schedule, now)
                elif current.interval_s != definition.interval and current.next_run_at is not None:
                    # Keep the phase: the next slot stays where it was, later ones follow the
                    # new interval from there.
                    values["anchor_at"] = current.next_run_at
                conn.execute(update(Task).where(Task.name == definition.name).values(**values))
                outcome = "updated"
    return outcome, get_task(engine, definition.name)


def _change(engine: Engine, name: str, **values: Any) -> TaskInfo:
    with write_transaction(engine) as conn:
        result = conn.execute(
            update(Task)
            .where(Task.name == name)
            .values(**values, version=Task.version + 1, updated_at=utcnow())
        )
        if result.rowcount == 0:
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


def runs_in_flight(engine: Engine, name: str) -> list[RunInfo]:
    """The task's rows still ``running`` (runs in flight, or slots claimed to run), oldest
    first."""
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(TaskRun.__table__)
            .where(TaskRun.task_name == name, TaskRun.outcome == TaskOutcome.RUNNING.value)
            .order_by(TaskRun.scheduled_at)
        ).all()
    return [run_info(r) for r in rows]


def remove_task(engine: Engine, name: str) -> None:
    """Delete a task. Its run history stays until retention prunes it."""
    with write_transaction(engine) as conn:
        result = conn.execute(delete(Task).where(Task.name == name))
        if result.rowcount == 0:
            raise UnknownTaskError(name)


def count_tasks(engine: Engine) -> int:
    with read_transaction(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(Task)).scalar_one())


# --- read and written by the scheduler (nanobot.cron.reconcile, nanobot.cron.dispatch) ---------


@dataclass(frozen=True, slots=True)
class TaskVersion:
    """What the reconciliation compares of every stored task: its version and run request."""

    version: int
    run_requested_at: datetime | None


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
    return {
        row.name: TaskVersion(row.version, row.run_requested_at)
        for row in conn.execute(select(Task.name, Task.version, Task.run_requested_at))
    }


def task_rows(conn: Connection, names: Sequence[str], *, whole_table: bool) -> list[Any]:
    """The whole ``tasks`` rows of ``names``. ``whole_table``: read every row and keep the
    wanted ones, rather than send an IN list longer than the database accepts."""
    if whole_table:
        wanted = set(names)
        return [row for row in conn.execute(select(Task.__table__)) if row.name in wanted]
    if not names:
        return []
    return list(conn.execute(select(Task.__table__).where(Task.name.in_(names))).all())


def consume_run_request(conn: Connection, name: str, requested: datetime) -> None:
    """Clear the run request of ``name`` made at ``requested`` (a newer one stays), in the
    transaction that claims its run."""
    conn.execute(
        update(Task)
        .where(Task.name == name, Task.run_requested_at == requested)
        .values(run_requested_at=None, run_forced=False)
    )
