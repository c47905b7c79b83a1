"""The adapter to APScheduler 3: the only module of nanobot that imports it.

nanobot keeps its jobs in APScheduler's SQLAlchemy job store (tables ``apscheduler_jobs`` and
``apscheduler_job_states``, migrations 0001 and 0008) and in its memory store, and uses
APScheduler's ``Job`` and ``IntervalTrigger`` as the stored format. It does not use APScheduler's
scheduler: :class:`NanobotScheduler` is nanobot's own class that holds the two stores, the timer
of the next pass and the worker thread, and offers only what the manager calls. The rest of
nanobot sees typed records (:class:`JobState`, :class:`JobSpec`, :class:`DueJob`), never a
``Job``, a trigger or an APScheduler exception.

APScheduler 3 is untyped and has traps that nanobot must not inherit; each is handled here:

- Its default misfire grace of 1 s silently drops a run that is late by more than a second (a
  catch-up after downtime). nanobot computes the due slots itself
  (:func:`nanobot.cron.schedules.due_slots`).
- Its ``CronTrigger`` fires twice or loops around DST changes (its issues 606 and 1021). Cron
  and one-shot jobs carry a :class:`ScheduleTrigger` that holds nanobot's own schedule record;
  every slot of every kind is computed by :mod:`nanobot.cron.schedules`. Interval jobs keep
  APScheduler's ``IntervalTrigger``, so jobs stored before schedules existed load unchanged.
- ``replace_existing=True`` resets a job's phase (its issue 696). nanobot never replaces: it adds
  a missing job, and modifies an existing one only when its definition changed.
- ``SQLAlchemyJobStore`` deletes a job it cannot unpickle, with one log line.
  :class:`NanobotJobStore` keeps it, reports it, and leaves it out of the wakeup computation.
- After a failed job-store write, 3.11.3's ``_process_jobs`` raises out of ``wakeup`` and the
  timer is never armed again: the scheduler reports running and runs nothing (pull request 1132).
  :class:`NanobotScheduler` runs each pass in a worker thread and always re-arms the timer.
- ``AsyncIOScheduler`` does the job store's synchronous I/O on the event loop. Here every store
  operation runs in one worker thread, off the loop and serialised.

Stored names. Every job row names its function as ``nanobot.cron._aps:run_stored_task`` and the
pickled trigger of a cron or one-shot job names ``nanobot.cron._aps.ScheduleTrigger`` (this
module's name until it was renamed). Rows keep being written with those names, so that a
database reads the same to every version of nanobot; :mod:`nanobot.cron._aps` gives them a home.

Threads. One event loop (the one :meth:`NanobotScheduler.start` runs on) and one worker thread
(``nanobot-scheduler``):

- On the loop: :meth:`~NanobotScheduler.start`, :meth:`~NanobotScheduler.quiesce`,
  :meth:`~NanobotScheduler.run_in_worker`, the pass timer and the task that awaits each pass;
  ``last_pass_at``, ``pass_started_at`` and the lifecycle state are written there, ``passing`` and
  ``pass_within`` read.
- In the worker thread: the pass (the manager's ``process``, given the scheduler) and everything
  it calls here: :meth:`~NanobotScheduler.due`, :meth:`~NanobotScheduler.advance_due`,
  :meth:`~NanobotScheduler.advance_memory`, :meth:`~NanobotScheduler.rewind`, the reads
  (``lookup``, ``lookup_many``, ``next_run_at``, ``count_due``, ``persistent_job_ids``,
  ``unloadable``) and the changes (``add``, ``add_many``, ``change``, ``remove``). The jobs found
  by ``due`` are kept for ``advance_due``/``advance_memory`` and belong to this thread. Each of
  these does blocking I/O; they take the store lock, so a call from another thread is safe (the
  manager removes an ephemeral job from the loop; tests call them before ``start``), but it
  blocks that thread.
- From any thread: :meth:`~NanobotScheduler.wakeup` and :meth:`~NanobotScheduler.call_soon`
  (both hand over to the loop). :meth:`~NanobotScheduler.close` from any thread but the loop:
  it waits for the worker to finish.
"""

from __future__ import annotations

import asyncio
import enum
import pickle
import threading
from collections.abc import Callable, Container, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import datetime_to_utc_timestamp
from sqlalchemy import Connection, Engine, Row, and_, bindparam, select
from sqlalchemy.exc import IntegrityError

from nanobot.cron.definitions import build_task
from nanobot.cron.next_runs import NextRuns
from nanobot.cron.schedules import (
    AtSchedule,
    CronSchedule,
    DueSlots,
    IntervalSchedule,
    Schedule,
    due_slots,
    load_schedule,
    next_after,
)
from nanobot.db import IN_MAX
from nanobot.exceptions import JobTableChangedError, NotLeaderError, UnknownTaskError
from nanobot.gcsteward import release
from nanobot.models import MisfirePolicy, apscheduler_job_states, apscheduler_jobs, error_text
from nanobot.times import Clock

log = structlog.get_logger(__name__)


class Store(enum.StrEnum):
    """The two job stores, by the alias APScheduler knew them by (the persistent one's alias is
    in no row, but it is the name tests and logs have always used)."""

    PERSISTENT = "default"  # the database: every task a process can rebuild from its row
    EPHEMERAL = "memory"  # this process only: tasks whose class only it can import


PERSISTENT: Final = Store.PERSISTENT
EPHEMERAL: Final = Store.EPHEMERAL
TIMEOUT_MAX: Final = 4294967.0  # asyncio's call_later accepts no more on some platforms

# The module path that stored rows name (see the module's docstring): not this module's.
STORED_MODULE: Final = "nanobot.cron._aps"
# Jobs whose unpickled state the job store keeps, at most (see NanobotJobStore._load_rows).
LOADED_MAX: Final = 5000
# What a Job is made of: a job loaded before is handed out as a copy of these.
_JOB_SLOTS: Final = tuple(name for name in Job.__slots__ if name != "__weakref__")


async def run_stored_task(task_class: str, kwargs: dict[str, Any]) -> None:
    """The function every stored job names: build the task from plain data and run it once.

    The manager dispatches runs itself (to claim slots and keep history), but the job's stored
    function is this module-level trampoline, so a job row never holds a pickled task instance
    and can always be loaded, whatever became of the task's class.
    """
    await build_task(task_class, kwargs).run()


# The textual reference APScheduler stores for the trampoline.
RUN_STORED_TASK_REF: Final = f"{STORED_MODULE}:{run_stored_task.__qualname__}"


class SchedulerState(enum.Enum):
    """Where a :class:`NanobotScheduler` is in its life; it only moves down this list."""

    NEW = "new"  # built: its stores can be read and written, no pass runs
    DISPATCHING = "dispatching"  # started: passes run on the timer and on wakeups
    QUIESCED = "quiesced"  # no more passes (the manager is shutting down); stores still usable
    CLOSED = "closed"  # the worker thread is gone: nothing can be run in it any more


@dataclass(frozen=True, slots=True)
class JobState:
    """What the scheduler holds of one task's schedule."""

    name: str
    store: Store
    task_class: str
    kwargs: dict[str, Any]
    interval: float
    anchor: datetime
    next_run_at: datetime | None
    schedule: Schedule


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job to add: a task's schedule (None: every ``interval`` seconds)."""

    name: str
    task_class: str
    kwargs: dict[str, Any]
    interval: float
    anchor: datetime
    next_run_at: datetime | None
    schedule: Schedule | None = None


@dataclass(frozen=True, slots=True)
class DueJob:
    """A job found due in one pass, and its slots as :func:`due_slots` split them: the slot to
    run (if any), the slots it missed, the next one."""

    name: str
    store: Store
    task_class: str
    kwargs: dict[str, Any]
    slots: DueSlots

    @property
    def run_slot(self) -> datetime | None:
        return self.slots.run_slot

    @property
    def next_run_at(self) -> datetime | None:
        """The job's next slot, as ``task_state.next_run_at`` mirrors it; None: the schedule has no
        later slot (a one-shot that came due)."""
        return self.slots.next_slot


@dataclass(frozen=True, slots=True)
class _Found:
    """A job :meth:`NanobotScheduler.due` found, kept for ``advance_due``/``advance_memory``."""

    store: Store
    job: Job
    next_slot: datetime | None


class _JobContext:
    """What APScheduler's ``Job`` and job stores need of a scheduler: its zone alone (a ``Job``
    reads it to convert a naive next run time; nanobot gives only aware ones). Stores keep it and
    give it to every job they load."""

    timezone = UTC


class ScheduleTrigger(BaseTrigger):  # type: ignore[misc]
    """The trigger of a cron or one-shot job: nanobot's schedule record, stored as plain data
    (kind, expression, zone, instant) so that a job row never depends on a pickled class
    layout beyond this one."""

    __slots__ = ("schedule",)
    # Pickled job states name the class by this path (see the module's docstring).
    __module__ = STORED_MODULE

    def __init__(self, schedule: CronSchedule | AtSchedule) -> None:
        self.schedule = schedule

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # APScheduler asks this only when a job is added without a next run time; nanobot
        # always gives one, and moves jobs itself (see NanobotScheduler.due).
        return next_after(self.schedule, previous_fire_time or now)

    def __getstate__(self) -> dict[str, Any]:
        schedule = self.schedule
        return {
            "version": 1,
            "kind": schedule.kind.value,
            "cron": schedule.expression if isinstance(schedule, CronSchedule) else None,
            "timezone": schedule.timezone,
            "run_at": schedule.at.isoformat() if isinstance(schedule, AtSchedule) else None,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        run_at = state.get("run_at")
        schedule = load_schedule(
            state["kind"],
            interval=None,
            cron=state.get("cron"),
            timezone=state.get("timezone"),
            run_at=datetime.fromisoformat(run_at) if run_at else None,
        )
        assert isinstance(schedule, CronSchedule | AtSchedule)
        self.schedule = schedule

    def __str__(self) -> str:
        return f"schedule[{self.schedule}]"


class NanobotJobStore(SQLAlchemyJobStore):  # type: ignore[misc]
    """APScheduler's SQLAlchemy job store on nanobot's engine, without its silent deletions."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine=engine)
        # nanobot's layout (migration 0008): the job table keeps the id and the next run time,
        # each job's pickled state is in a table of its own. A pass moves jobs to their next slot
        # by writing their ``next_run_time`` alone (:meth:`update_jobs`): not a new pickle per
        # job and run, and on PostgreSQL the dead row each UPDATE leaves is a few dozen bytes,
        # not the 600 of a row holding the state. Every read takes the next run time from the
        # column (the copy inside the pickle is the one of the job's last full write).
        self.jobs_t = apscheduler_jobs
        self.states_t = apscheduler_job_states
        # Built once: a pass runs it many times a second.
        self._move_stmt = (
            self.jobs_t.update()
            .where(self.jobs_t.c.id == bindparam("b_id"))
            .values(next_run_time=bindparam("b_next"))
        )
        # Jobs that could not be loaded: id -> why. Kept in the table, left out of wakeups.
        self.unloadable: dict[str, str] = {}
        # Jobs found without a row (deleted behind the scheduler), for the control plane to
        # apply their tasks' rows again (NanobotScheduler.take_lost).
        self.lost: set[str] = set()
        # Jobs loaded before: id -> (their stored state, the job made of it); see _load_rows.
        # Every write of a job's state here drops its entry.
        self._loaded: dict[str, tuple[bytes, Job]] = {}
        # The next run time of every row (nanobot.cron.next_runs): what a pass reads instead of
        # the table. Loaded at its first use, moved by this store's own writes once committed,
        # dropped (None, loaded again at its next use) after a write whose outcome is not known
        # here. Correct only while no other process writes the table: the leader's, which is
        # the only place a store is made (its scheduler is made when it takes the lease).
        self._next_runs: NextRuns | None = None

    def start(self, scheduler: Any, alias: str) -> None:
        # Only what every job store does (keep the scheduler and alias, for the jobs it loads).
        # Not SQLAlchemyJobStore's table creation: the tables are the migrations' (0001, 0008),
        # and creating them here would make a job table without its table of states.
        BaseJobStore.start(self, scheduler, alias)

    def shutdown(self) -> None:
        # The engine is nanobot's, shared with everything else: not ours to dispose.
        pass

    def _select(self) -> Any:
        jobs, states = self.jobs_t, self.states_t
        return select(jobs.c.id, states.c.job_state, jobs.c.next_run_time).select_from(
            jobs.outerjoin(states, states.c.id == jobs.c.id)
        )

    def lookup_job(self, job_id: str) -> Job | None:
        with self.engine.begin() as connection:
            row = connection.execute(self._select().where(self.jobs_t.c.id == job_id)).first()
        if row is None or row.job_state is None:
            return None
        return _with_column_time(self._reconstitute_job(row.job_state), row.next_run_time)

    def next_runs(self) -> NextRuns:
        """The index of next run times, loaded from the table if it is not held."""
        if self._next_runs is None:
            table = self.jobs_t
            with self.engine.begin() as connection:
                rows = connection.execute(select(table.c.id, table.c.next_run_time)).all()
            self._next_runs = NextRuns((row.id, row.next_run_time) for row in rows)
        return self._next_runs

    def forget_next_runs(self) -> None:
        """Drop the index: a write in a caller's transaction moved jobs, committed or not."""
        self._next_runs = None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        """The jobs due by ``now``, earliest first: found in the index, each made from the job
        loaded before (its state is unchanged: every write of it here drops that) or read from
        the table."""
        index = self.next_runs()
        ids = index.due(datetime_to_utc_timestamp(now))
        found: dict[str, Job] = {}
        missing: list[str] = []
        for job_id in ids:
            known = self._loaded.get(job_id)
            if known is None:
                missing.append(job_id)
            else:
                found[job_id] = _with_column_time(_copy_job(known[1]), index.get(job_id))
        for start in range(0, len(missing), IN_MAX):
            part = missing[start : start + IN_MAX]
            with self.engine.begin() as connection:
                rows = connection.execute(self._select().where(self.jobs_t.c.id.in_(part))).all()
            found.update((job.id, job) for job in self._load_rows(rows, remember=True))
            gone = [
                job_id for job_id in part if job_id not in found and job_id not in self.unloadable
            ]
            if gone:
                # Deleted behind the scheduler (see update_jobs): due in the index for ever, they
                # would make every pass wake at once.
                log.warning("cron.job_rows_missing", tasks=gone[:20], count=len(gone))
                for job_id in gone:
                    index.discard(job_id)
                self.lost.update(gone)
        return [found[job_id] for job_id in ids if job_id in found]

    def _get_jobs(self, *conditions: Any) -> list[Job]:
        selectable = self._select().order_by(self.jobs_t.c.next_run_time)
        if conditions:
            selectable = selectable.where(and_(*conditions))
        with self.engine.begin() as connection:
            rows = connection.execute(selectable).all()
        return self._load_rows(rows)

    def _load_rows(self, rows: Sequence[Row[Any]], *, remember: bool = False) -> list[Job]:
        """The jobs of ``rows`` (id, state, next run time); those that cannot be loaded are
        noted in :attr:`unloadable` and left out.

        A pass reads the jobs due within its lead many times a second, and unpickling a job
        (its trigger, its arguments, the function it names) was most of reading it: a job whose
        stored state is the same bytes as when it was last loaded is a copy of the job made
        then (its attributes, not its arguments: no caller changes those in place), with the
        next run time of its row. Only the due jobs' reads (``remember``) keep what they made,
        at most :data:`LOADED_MAX`, the oldest dropped: a read of every job (a start, a
        reconciliation) would only churn through them."""
        jobs: list[Job] = []
        loaded = self._loaded
        for row in rows:
            try:
                state = row.job_state
                if state is None:
                    raise LookupError("its state is missing")
                known = loaded.get(row.id)
                if known is not None and known[0] == state:
                    job = _copy_job(known[1])
                else:
                    job = self._reconstitute_job(state)
                    if remember:
                        loaded.pop(row.id, None)
                        if len(loaded) >= LOADED_MAX:
                            del loaded[next(iter(loaded))]
                        loaded[row.id] = (state, _copy_job(job))
                jobs.append(_with_column_time(job, row.next_run_time))
            except Exception as exc:
                reason = f"stored job cannot be loaded: {exc.__class__.__name__}: {exc}"
                if self.unloadable.get(row.id) != reason:
                    log.error("cron.job_unloadable", task=row.id, error=reason)
                self.unloadable[row.id] = reason
            else:
                self.unloadable.pop(row.id, None)
        return jobs

    def add_job(self, job: Job) -> None:
        state = pickle.dumps(job.__getstate__(), self.pickle_protocol)
        with self.engine.begin() as connection:
            try:
                connection.execute(
                    self.jobs_t.insert().values(
                        id=job.id, next_run_time=datetime_to_utc_timestamp(job.next_run_time)
                    )
                )
            except IntegrityError:
                raise ConflictingIdError(job.id) from None
            connection.execute(self.states_t.delete().where(self.states_t.c.id == job.id))
            connection.execute(self.states_t.insert().values(id=job.id, job_state=state))
        self._written(job)

    def update_job(self, job: Job) -> None:
        state = pickle.dumps(job.__getstate__(), self.pickle_protocol)
        with self.engine.begin() as connection:
            result = connection.execute(
                self.jobs_t.update()
                .where(self.jobs_t.c.id == job.id)
                .values(next_run_time=datetime_to_utc_timestamp(job.next_run_time))
            )
            if result.rowcount == 0:
                raise JobLookupError(job.id)
            connection.execute(self.states_t.delete().where(self.states_t.c.id == job.id))
            connection.execute(self.states_t.insert().values(id=job.id, job_state=state))
        self._written(job)

    def _written(self, job: Job) -> None:
        """``job`` was stored whole (committed): its loaded state is stale, its time known."""
        self._loaded.pop(job.id, None)
        if self._next_runs is not None:
            self._next_runs.set(job.id, datetime_to_utc_timestamp(job.next_run_time))

    def remove_job(self, job_id: str) -> None:
        self._loaded.pop(job_id, None)
        with self.engine.begin() as connection:
            connection.execute(self.states_t.delete().where(self.states_t.c.id == job_id))
            result = connection.execute(self.jobs_t.delete().where(self.jobs_t.c.id == job_id))
            if result.rowcount == 0:
                raise JobLookupError(job_id)
        if self._next_runs is not None:
            self._next_runs.discard(job_id)

    def remove_all_jobs(self) -> None:
        self._loaded.clear()
        with self.engine.begin() as connection:
            connection.execute(self.states_t.delete())
            connection.execute(self.jobs_t.delete())
        self._next_runs = NextRuns()

    def get_next_run_time(self) -> datetime | None:
        value = self.next_runs().first(skip=self.unloadable)
        return datetime.fromtimestamp(value, UTC) if value is not None else None

    def next_and_count(self, window: float) -> tuple[datetime | None, int]:
        """The earliest next run time of a loadable job, and how many jobs are due by it plus
        ``window`` seconds (a pass asks it every time, many times a second)."""
        index = self.next_runs()
        value = index.first(skip=self.unloadable)
        if value is None:
            return None, 0
        return datetime.fromtimestamp(value, UTC), index.count_due(value + window)

    def jobs_named(self, names: list[str], *, all_rows: bool = False) -> dict[str, Job]:
        """The loadable jobs among ``names``, in one query (the whole table if ``all_rows``)."""
        if all_rows:
            wanted = set(names)
            return {job.id: job for job in self._get_jobs() if job.id in wanted}
        jobs: dict[str, Job] = {}
        # IN lists of at most IN_MAX names: some databases refuse longer ones.
        for start in range(0, len(names), IN_MAX):
            part = names[start : start + IN_MAX]
            jobs.update((job.id, job) for job in self._get_jobs(self.jobs_t.c.id.in_(part)))
        return jobs

    def ids_due_by(self, horizon: datetime) -> set[str]:
        """The jobs due by ``horizon``, by their next run time alone (no state is loaded)."""
        return set(self.next_runs().due(datetime_to_utc_timestamp(horizon)))

    def count_due_by(self, horizon: datetime) -> int:
        """How many jobs are due by ``horizon``."""
        return self.next_runs().count_due(datetime_to_utc_timestamp(horizon))

    def insert_states(self, states: list[dict[str, Any]]) -> None:
        """Add several new jobs, given as ``Job.__getstate__`` dicts, in one transaction; an id
        that exists is left as it is."""
        if not states:
            return
        rows = [
            (
                state["id"],
                datetime_to_utc_timestamp(state["next_run_time"]),
                pickle.dumps(state, self.pickle_protocol),
            )
            for state in states
        ]
        with self.engine.begin() as connection:
            # A plain driver executemany: ten thousand rows need none of SQLAlchemy's per-row
            # processing, which would triple the time of a cold start.
            mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
            name = connection.dialect.identifier_preparer.format_table
            # Both halves of a job are written together (add, remove), so a job whose row
            # exists has its state too: neither is touched.
            connection.exec_driver_sql(
                f"INSERT INTO {name(self.jobs_t)} (id, next_run_time) VALUES ({mark}, {mark}) "
                "ON CONFLICT (id) DO NOTHING",
                [(job_id, next_run) for job_id, next_run, _ in rows],
            )
            connection.exec_driver_sql(
                f"INSERT INTO {name(self.states_t)} (id, job_state) VALUES ({mark}, {mark}) "
                "ON CONFLICT (id) DO NOTHING",
                [(job_id, state) for job_id, _, state in rows],
            )
        index = self._next_runs
        if index is not None:
            for job_id, next_run, _ in rows:
                if job_id not in index:
                    self._loaded.pop(job_id, None)
                    index.set(job_id, next_run)

    def job_ids(self) -> set[str]:
        with self.engine.begin() as connection:
            return set(connection.execute(select(self.jobs_t.c.id)).scalars())

    def update_jobs(self, conn: Connection, jobs: Iterable[Job]) -> list[tuple[str, float | None]]:
        """Write the next run time of several jobs in the caller's transaction (one wakeup, one
        transaction). Only that column: a pass moves jobs to their next slot and changes
        nothing else of them (see the note above :meth:`lookup_job`). The moves written, for
        :meth:`moved` once the transaction committed."""
        moves = [(job.id, datetime_to_utc_timestamp(job.next_run_time)) for job in jobs]
        if moves:
            result = conn.execute(self._move_stmt, [{"b_id": i, "b_next": t} for i, t in moves])
            # (rowcount is the rows matched on SQLite and PostgreSQL; -1 where a driver does
            # not know it.)
            if 0 <= result.rowcount != len(moves):
                # Rows deleted behind the scheduler (by hand: nanobot removes a job only through
                # this store): the jobs kept in memory would run on without a row. The caller's
                # transaction rolls back, and the pass that finds it unadvanced drops the index.
                # (Every id of the table: this happens once per such deletion, not per pass.)
                kept = set(conn.execute(select(self.jobs_t.c.id)).scalars())
                gone = sorted({job_id for job_id, _stamp in moves} - kept)
                self.lost.update(gone)
                raise JobTableChangedError(
                    f"{len(gone)} of {len(moves)} due jobs have no row in the job table any "
                    f"more ({', '.join(gone[:5])}{'...' if len(gone) > 5 else ''}): the "
                    "scheduler reads the table again and applies their tasks again"
                )
        return moves

    def moved(self, moves: Iterable[tuple[str, float | None]]) -> None:
        """The moves :meth:`update_jobs` wrote, once their transaction committed: the index
        follows (the same floats as the column: no conversion twice, no rounding apart)."""
        index = self._next_runs
        if index is None:
            return
        for job_id, stamp in moves:
            if job_id in index:  # not if removed since (or the index was loaded after)
                index.set(job_id, stamp)


def _copy_job(job: Job) -> Job:
    """A new ``Job`` with the same attributes (a change of one's attribute is not the other's)."""
    copy = Job.__new__(Job)
    for name in _JOB_SLOTS:
        object.__setattr__(copy, name, getattr(job, name))
    return copy


def _with_column_time(job: Job, stamp: float | None) -> Job:
    """``job`` with the next run time of its row's column (its pickle may hold an older one)."""
    if stamp is None:
        job.next_run_time = None
    elif job.next_run_time is None or datetime_to_utc_timestamp(job.next_run_time) != stamp:
        # The exact datetime: a slot's time is its identity in task_runs. A double holds epoch
        # seconds to well under a microsecond, so rounding to the microsecond gives it back.
        job.next_run_time = datetime.fromtimestamp(stamp, UTC)
    return job


def _job_schedule(job: Job) -> tuple[Schedule, datetime | None]:
    """A job's schedule and, for an interval job, its anchor (the grid's origin)."""
    trigger = job.trigger
    if isinstance(trigger, ScheduleTrigger):
        return trigger.schedule, None
    return (
        IntervalSchedule(seconds=float(trigger.interval_length)),
        trigger.start_date.astimezone(UTC),
    )


def _job_state(job: Job, store: Store) -> JobState:
    schedule, anchor = _job_schedule(job)
    next_run_at = job.next_run_time.astimezone(UTC) if job.next_run_time else None
    return JobState(
        name=job.id,
        store=store,
        task_class=job.args[0],
        kwargs=dict(job.args[1]),
        interval=schedule.seconds if isinstance(schedule, IntervalSchedule) else 0.0,
        # Cron and one-shot schedules have no grid: their anchor is not used.
        anchor=anchor or next_run_at or datetime.min.replace(tzinfo=UTC),
        next_run_at=next_run_at,
        schedule=schedule,
    )


def _trigger(schedule: Schedule, anchor: datetime) -> BaseTrigger:
    # No jitter in the trigger: a slot's time must be the same in every process, since it is
    # the slot's identity in task_runs. Jitter is applied when a run starts.
    if isinstance(schedule, IntervalSchedule):
        return IntervalTrigger(seconds=schedule.seconds, start_date=anchor, timezone=UTC)
    return ScheduleTrigger(schedule)


PassFunction = Callable[["NanobotScheduler", datetime], float | None]


class NanobotScheduler:
    """nanobot's scheduler over APScheduler's job stores: passes run in one worker thread, one at
    a time, and never stop silently.

    ``process`` is the manager's pass: it is called in the worker thread with this scheduler and
    the current time, and returns how long to wait before the next pass (None: until
    ``poll_interval``). The stores can be read and written from construction on; passes run
    from :meth:`start` until :meth:`quiesce` or :meth:`close`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        process: PassFunction,
        poll_interval: float,
        clock: Clock,
    ) -> None:
        context = _JobContext()
        self._store = NanobotJobStore(engine)
        self._store.start(context, PERSISTENT.value)
        self._memory = MemoryJobStore()
        self._memory.start(context, EPHEMERAL.value)
        self._context = context
        # Serialises the stores' reads and writes between the worker and any other caller.
        self._lock = threading.RLock()
        self._process_pass = process
        self.poll_interval = poll_interval
        self._clock = clock
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanobot-scheduler")
        self._state = SchedulerState.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pass_task: asyncio.Task[None] | None = None
        self._again = False
        # Asked before each pass begins, with the pass to begin (loop): the launcher's gate,
        # which holds it back until an imminent instant's runs started (nanobot.cron.
        # start_gate). None: begin at once.
        self.gate: Callable[[Callable[[], None]], None] | None = None
        # A pass is held back at the gate (loop).
        self._gated = False
        self.last_pass_at: datetime | None = None
        # When the pass in progress began (None before the first).
        self.pass_started_at: datetime | None = None
        self._found: list[_Found] = []
        # What advance_due wrote, for advance_memory to move in the index (worker thread).
        self._moves: list[tuple[str, float | None]] = []
        self._pass_failures = 0
        # Whether this streak of failed passes has logged its traceback (loop).
        self._pass_traceback_logged = False

    # --- the lifecycle and the wakeup cycle (event loop) -----------------------------------------

    @property
    def state(self) -> SchedulerState:
        return self._state

    @property
    def dispatching(self) -> bool:
        """True from :meth:`start` until :meth:`quiesce` or :meth:`close`."""
        return self._state is SchedulerState.DISPATCHING

    @property
    def passing(self) -> bool:
        """True while a pass is in progress in the worker thread."""
        return self._pass_task is not None and not self._pass_task.done()

    def pass_within(self, seconds: float) -> bool:
        """True if a pass is in progress, held at the gate or its timer fires within
        ``seconds``."""
        if self.passing or self._gated:
            return True
        timer, loop = self._timer, self._loop
        return timer is not None and loop is not None and timer.when() - loop.time() <= seconds

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began: the worker thread takes nothing more."""
        return self._state is SchedulerState.CLOSED

    def start(self) -> None:
        """Start passes on the running event loop; the first one is requested at once."""
        if self._state is not SchedulerState.NEW:
            raise RuntimeError(f"a scheduler starts once; this one is {self._state.value}")
        self._loop = asyncio.get_running_loop()
        self._state = SchedulerState.DISPATCHING
        self.wakeup()

    def wakeup(self) -> None:
        """Ask for a pass as soon as possible; safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._request_pass)

    def call_soon(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the event loop; safe from the worker thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(func, *args)

    async def quiesce(self) -> None:
        """Stop dispatching and wait for the pass in progress, if any, to end."""
        if self.dispatching:
            self._state = SchedulerState.QUIESCED
        self._stop_timer()
        task = self._pass_task
        if task is not None and not task.done():
            await asyncio.wait([task])

    async def run_in_worker(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` in the scheduler's worker thread (serialised with passes)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, func, *args)

    def close(self) -> None:
        """Stop passes and end the worker thread once what it runs is done. Not on the loop."""
        self._state = SchedulerState.CLOSED
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # The timer and the pass task are the loop's, and this runs in another thread:
            # stop them there. Until then, a timer that fires finds the scheduler closed.
            loop.call_soon_threadsafe(self._stop_on_loop)
        self._worker.shutdown(wait=True)

    def _stop_on_loop(self) -> None:
        self._stop_timer()
        if self._pass_task is not None and not self._pass_task.done():
            self._pass_task.cancel()

    def _start_timer(self, wait: float) -> None:
        self._stop_timer()
        assert self._loop is not None
        self._timer = self._loop.call_later(wait, self._request_pass)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _request_pass(self) -> None:
        if not self.dispatching or self._gated:
            return
        if self._pass_task is not None and not self._pass_task.done():
            self._again = True
            return
        self._stop_timer()
        if self.gate is None:
            self._begin_pass()
            return
        self._gated = True
        self.gate(self._begin_pass)

    def _begin_pass(self) -> None:
        self._gated = False
        # What changed at the gate: a stop, or a wakeup's pass that began meanwhile.
        if not self.dispatching:
            return
        if self._pass_task is not None and not self._pass_task.done():
            self._again = True
            return
        self._stop_timer()
        assert self._loop is not None
        self._pass_task = self._loop.create_task(self._pass())

    async def _pass(self) -> None:
        wait: float | None = self.poll_interval
        try:
            now = self.pass_started_at = self._clock()
            wait = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._process_pass, self, now
            )
            self._pass_failures = 0
            self._pass_traceback_logged = False
        except NotLeaderError as exc:
            # The service steps down at its next lease check; until then nothing is claimed.
            self._pass_failures += 1
            log.warning("cron.not_leader", reason=str(exc))
            wait = min(self.poll_interval, 1.0)
        except JobTableChangedError as exc:
            # Nothing of the pass was written; the next one reads the table again, at once.
            self._pass_failures += 1
            log.warning("cron.job_table_changed", reason=str(exc))
            wait = 0.0
        except Exception as exc:
            # Whatever failed (a locked database, a lost connection), the timer is armed again
            # below: the scheduler retries instead of stopping while it reports running.
            self._pass_failures += 1
            if not self._pass_traceback_logged:
                self._pass_traceback_logged = True
                log.exception("cron.pass_failed", failures=self._pass_failures)
            else:
                # The same fault again, a pass every poll interval for as long as it lasts (a
                # full disk): its traceback was logged with the first failure of the streak.
                log.error("cron.pass_failed", failures=self._pass_failures, error=error_text(exc))
            wait = min(self.poll_interval, 1.0)
        finally:
            self.last_pass_at = self._clock()
            if self._again:
                self._again = False
                wait = 0.0
            if self.dispatching:
                if wait is None:
                    wait = self.poll_interval
                self._start_timer(max(0.0, min(wait, self.poll_interval, TIMEOUT_MAX)))

    # --- reading jobs (worker thread) -----------------------------------------------------------

    def due(
        self,
        now: datetime,
        horizon: datetime,
        policies: dict[str, tuple[MisfirePolicy, float]],
        held: Container[str] = (),
    ) -> list[DueJob]:
        """The jobs due by ``horizon`` in both stores, their slots split at ``now`` (a slot
        still ahead of ``now`` is simply the one to run); the jobs are not yet moved.

        Persistent jobs named in ``held`` are left as they are, due or not (their task's row
        is not applied yet: a later pass finds them)."""
        result: list[DueJob] = []
        with self._lock:
            unadvanced, self._found = self._found, []
            self._moves = []
            if unadvanced:
                # A pass failed before advance_memory: whether its transaction committed is
                # not known here (a connection lost in COMMIT), so the index is read again.
                self._store.forget_next_runs()
        release(unadvanced)
        with self._lock:
            for alias, store in ((PERSISTENT, self._store), (EPHEMERAL, self._memory)):
                for job in store.get_due_jobs(horizon):
                    if alias == PERSISTENT and job.id in held:
                        continue
                    schedule, _ = _job_schedule(job)
                    # The SKIP grace comes from the schedule (half the gap to the next slot);
                    # the second value is the task's catch-up window (0: none).
                    policy, window = policies.get(job.id, (MisfirePolicy.CATCH_UP_ONCE, 0.0))
                    slots = due_slots(
                        schedule,
                        job.next_run_time.astimezone(UTC),
                        now,
                        policy,
                        window=window or None,
                    )
                    self._found.append(_Found(alias, job, slots.next_slot))
                    result.append(
                        DueJob(
                            name=job.id,
                            store=alias,
                            task_class=job.args[0],
                            kwargs=dict(job.args[1]),
                            slots=slots,
                        )
                    )
        return result

    def advance_due(self, conn: Connection) -> None:
        """Move the persistent jobs found by :meth:`due` to their next slot, in ``conn``'s
        transaction. Call :meth:`advance_memory` once that transaction committed."""
        persistent: list[Job] = []
        for found in self._found:
            if found.store == PERSISTENT:
                found.job._modify(next_run_time=found.next_slot)
                persistent.append(found.job)
        self._moves = self._store.update_jobs(conn, persistent)

    def rewind(self, conn: Connection, slots: dict[str, datetime]) -> list[str]:
        """Move persistent jobs back to ``slots[name]`` where that is earlier than their next
        run, in ``conn``'s transaction: a claim released before it ran is due again. Paused
        jobs (no next run) stay paused. The names of the jobs moved."""
        with self._lock:
            jobs = self._store.jobs_named(sorted(slots))
        moved: list[Job] = []
        for name, job in jobs.items():
            slot = slots[name]
            if job.next_run_time is not None and slot < job.next_run_time:
                job._modify(next_run_time=slot)
                moved.append(job)
        self._store.update_jobs(conn, moved)
        # Read again at its next use: after this transaction, since the worker thread runs
        # both (a start's recovery, a stop's release) and the passes.
        self._store.forget_next_runs()
        return [job.id for job in moved]

    def advance_memory(self) -> None:
        """Move the in-memory jobs found by :meth:`due` to their next slot, and the persistent
        ones in the index (:meth:`advance_due`'s transaction committed)."""
        with self._lock:
            self._store.moved(self._moves)
            self._moves = []
            for found in self._found:
                if found.store != EPHEMERAL:
                    continue
                current = self._memory.lookup_job(found.job.id)
                if current is None or current.next_run_time is None:
                    continue  # removed or stopped since the pass read it
                current._modify(next_run_time=found.next_slot)
                self._memory.update_job(current)
                if found.next_slot is None:
                    log.info("cron.job_done", task=found.job.id)
            done, self._found = self._found, []
        release(done)

    def next_run_at(self) -> datetime | None:
        """The earliest next run time of any job in either store."""
        with self._lock:
            times = [
                t for t in (self._store.get_next_run_time(), self._memory.get_next_run_time()) if t
            ]
        return min(times).astimezone(UTC) if times else None

    def take_lost(self) -> list[str]:
        """The ids of jobs found without a row since the last call (their tasks' rows are to
        be applied again)."""
        with self._lock:
            lost = sorted(self._store.lost)
            self._store.lost.clear()
        return lost

    def next_wakeup(self, window: float) -> tuple[datetime | None, int]:
        """:meth:`next_run_at`, and :meth:`count_due` of that time plus ``window`` seconds."""
        with self._lock:
            stored, count = self._store.next_and_count(window)
            in_memory = self._memory.get_next_run_time()
            if in_memory is not None and (stored is None or in_memory < stored):
                first = in_memory.astimezone(UTC)
                return first, self.count_due(first + timedelta(seconds=window))
            if stored is None:
                return None, 0
            horizon = stored + timedelta(seconds=window)
            return stored, count + sum(1 for _job in self._memory.get_due_jobs(horizon))

    def count_due(self, horizon: datetime) -> int:
        """How many jobs are due by ``horizon`` (no job is loaded)."""
        with self._lock:
            in_memory = sum(1 for job in self._memory.get_due_jobs(horizon))
            return self._store.count_due_by(horizon) + in_memory

    def lookup_many(self, names: list[str], *, all_rows: bool = False) -> dict[str, JobState]:
        """The persistent jobs among ``names``, read in one query."""
        return {
            name: _job_state(job, PERSISTENT)
            for name, job in self._store.jobs_named(names, all_rows=all_rows).items()
        }

    def lookup(self, name: str, store: Store = PERSISTENT) -> JobState | None:
        """The job ``name`` in ``store``, or None."""
        job = self._job_store(store).lookup_job(name)
        return _job_state(job, store) if job is not None else None

    def due_by(self, horizon: datetime) -> set[str]:
        """The persistent jobs due by ``horizon`` (no job is loaded)."""
        with self._lock:
            return self._store.ids_due_by(horizon)

    def persistent_job_ids(self) -> set[str]:
        """The names of every row of the job table, loadable or not."""
        return self._store.job_ids()

    def unloadable(self) -> dict[str, str]:
        """The persistent jobs that could not be loaded when last read: name -> why."""
        return dict(self._store.unloadable)

    def _job_store(self, store: Store) -> BaseJobStore:
        return self._store if store == PERSISTENT else self._memory

    # --- changing jobs (worker thread) ----------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        store: Store,
        task_class: str,
        kwargs: dict[str, Any],
        interval: float,
        anchor: datetime,
        next_run_at: datetime | None,
        schedule: Schedule | None = None,
    ) -> None:
        """Add a job; an existing job of that name is left alone (never replaced)."""
        job = Job(
            self._context,
            id=name,
            name=name,
            func=RUN_STORED_TASK_REF,
            trigger=_trigger(schedule or IntervalSchedule(seconds=interval), anchor),
            args=(task_class, kwargs),
            kwargs={},
            executor="default",
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
            next_run_time=next_run_at,
        )
        try:
            with self._lock:
                self._job_store(store).add_job(job)
        except ConflictingIdError:
            log.debug("cron.job_exists", task=name)
            return
        self._wake_if_dispatching()

    def add_many(self, specs: list[JobSpec]) -> None:
        """Add several persistent jobs in one transaction (existing ones are left alone).

        The stored state is the one ``Job.__getstate__`` writes, built directly: constructing
        ten thousand ``Job`` objects costs a second, most of it in APScheduler checking the
        signature of the one function they all name.
        """
        states = [
            {
                "version": 1,
                "id": spec.name,
                "func": RUN_STORED_TASK_REF,
                "trigger": _trigger(
                    spec.schedule or IntervalSchedule(seconds=spec.interval), spec.anchor
                ),
                "executor": "default",
                "args": (spec.task_class, spec.kwargs),
                "kwargs": {},
                "name": spec.name,
                "misfire_grace_time": None,
                "coalesce": True,
                "max_instances": 1,
                "next_run_time": spec.next_run_at,
            }
            for spec in specs
        ]
        with self._lock:
            self._store.insert_states(states)
        if states:
            self.wakeup()

    def change(
        self,
        name: str,
        *,
        store: Store,
        task_class: str | None = None,
        kwargs: dict[str, Any] | None = None,
        interval: float | None = None,
        anchor: datetime | None = None,
        next_run_at: datetime | object | None = ...,
        schedule: Schedule | None = None,
    ) -> None:
        """Change what is given of the job ``name`` (``next_run_at=None`` pauses it); raises
        :class:`~nanobot.exceptions.UnknownTaskError` if there is no such job."""
        with self._lock:
            target = self._job_store(store)
            job = target.lookup_job(name)
            if job is None:
                raise UnknownTaskError(name)
            current = _job_state(job, store)
            changes: dict[str, Any] = {}
            if task_class is not None or kwargs is not None:
                changes["args"] = (
                    task_class or current.task_class,
                    current.kwargs if kwargs is None else kwargs,
                )
            if schedule is not None:
                changes["trigger"] = _trigger(schedule, anchor or current.anchor)
            elif interval is not None or anchor is not None:
                changes["trigger"] = _trigger(
                    IntervalSchedule(seconds=interval or current.interval),
                    anchor or current.anchor,
                )
            if next_run_at is not ...:
                changes["next_run_time"] = next_run_at
            if not changes:
                return
            job._modify(**changes)
            target.update_job(job)
        # The next run may be earlier now.
        self._wake_if_dispatching()

    def remove(self, name: str, store: Store = PERSISTENT) -> bool:
        """Remove the job ``name``; False if there was none."""
        try:
            with self._lock:
                self._job_store(store).remove_job(name)
        except JobLookupError:
            return False
        return True

    def _wake_if_dispatching(self) -> None:
        if self.dispatching:
            self.wakeup()
