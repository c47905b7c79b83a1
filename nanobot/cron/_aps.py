"""The adapter to APScheduler 3: the only module of nanobot that imports it.

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

The rest of nanobot sees typed records (:class:`DueJob`, :class:`JobState`), not APScheduler's.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_RUNNING, STATE_STOPPED
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import datetime_to_utc_timestamp
from sqlalchemy import Connection, Engine, and_, bindparam, func, null, select
from sqlalchemy.exc import IntegrityError

from nanobot.cron.control import build_task
from nanobot.cron.schedules import (
    AtSchedule,
    CronSchedule,
    IntervalSchedule,
    Schedule,
    due_slots,
    load_schedule,
    next_after,
)
from nanobot.exceptions import NotLeaderError
from nanobot.models import MisfirePolicy, apscheduler_job_states, apscheduler_jobs

log = structlog.get_logger(__name__)

PERSISTENT: Final = "default"
EPHEMERAL: Final = "memory"
TIMEOUT_MAX: Final = 4294967.0  # asyncio's call_later accepts no more on some platforms


async def run_stored_task(task_class: str, kwargs: dict[str, Any]) -> None:
    """The function every stored job names: build the task from plain data and run it once.

    The manager dispatches runs itself (to claim slots and keep history), but the job's stored
    function is this module-level trampoline, so a job row never holds a pickled task instance
    and can always be loaded, whatever became of the task's class.
    """
    await build_task(task_class, kwargs).run()


# The textual reference APScheduler stores for the trampoline.
RUN_STORED_TASK_REF: Final = f"{__name__}:{run_stored_task.__qualname__}"


@dataclass(frozen=True, slots=True)
class JobState:
    """What the scheduler holds of one task's schedule."""

    name: str
    store: str
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
    """A job found due in one pass: the slot to run (if any), the slots it missed."""

    name: str
    store: str
    task_class: str
    kwargs: dict[str, Any]
    run_slot: datetime | None
    missed_first: datetime | None
    missed_count: int
    # None: the schedule has no later slot (a one-shot that came due).
    next_run_at: datetime | None
    # True when missed_count is a lower bound (see schedules.MISSED_COUNT_MAX).
    missed_capped: bool = False


class ScheduleTrigger(BaseTrigger):  # type: ignore[misc]
    """The trigger of a cron or one-shot job: nanobot's schedule record, stored as plain data
    (kind, expression, zone, instant) so that a job row never depends on a pickled class
    layout beyond this one."""

    __slots__ = ("schedule",)

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

    def _get_jobs(self, *conditions: Any) -> list[Job]:
        jobs: list[Job] = []
        selectable = self._select().order_by(self.jobs_t.c.next_run_time)
        if conditions:
            selectable = selectable.where(and_(*conditions))
        with self.engine.begin() as connection:
            rows = connection.execute(selectable).all()
        for row in rows:
            try:
                if row.job_state is None:
                    raise LookupError("its state is missing")
                job = _with_column_time(self._reconstitute_job(row.job_state), row.next_run_time)
                jobs.append(job)
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

    def remove_job(self, job_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(self.states_t.delete().where(self.states_t.c.id == job_id))
            result = connection.execute(self.jobs_t.delete().where(self.jobs_t.c.id == job_id))
            if result.rowcount == 0:
                raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(self.states_t.delete())
            connection.execute(self.jobs_t.delete())

    def get_next_run_time(self) -> datetime | None:
        selectable = select(self.jobs_t.c.next_run_time).where(
            self.jobs_t.c.next_run_time != null()
        )
        if self.unloadable:
            selectable = selectable.where(self.jobs_t.c.id.not_in(list(self.unloadable)))
        selectable = selectable.order_by(self.jobs_t.c.next_run_time).limit(1)
        with self.engine.begin() as connection:
            value = connection.execute(selectable).scalar()
        return datetime.fromtimestamp(value, UTC) if value is not None else None

    def jobs_named(self, names: list[str], *, all_rows: bool = False) -> dict[str, Job]:
        """The loadable jobs among ``names``, in one query (the whole table if ``all_rows``)."""
        if all_rows:
            wanted = set(names)
            return {job.id: job for job in self._get_jobs() if job.id in wanted}
        if not names:
            return {}
        return {job.id: job for job in self._get_jobs(self.jobs_t.c.id.in_(names))}

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

    def job_ids(self) -> set[str]:
        with self.engine.begin() as connection:
            return set(connection.execute(select(self.jobs_t.c.id)).scalars())

    def update_jobs(self, conn: Connection, jobs: Iterable[Job]) -> None:
        """Write the next run time of several jobs in the caller's transaction (one wakeup, one
        transaction). Only that column: a pass moves jobs to their next slot and changes
        nothing else of them (see the note above :meth:`lookup_job`)."""
        params = [
            {"b_id": job.id, "b_next": datetime_to_utc_timestamp(job.next_run_time)} for job in jobs
        ]
        if params:
            conn.execute(self._move_stmt, params)


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


def _job_state(job: Job, store: str) -> JobState:
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


class NanobotScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """An ``AsyncIOScheduler`` whose passes run in one worker thread and never stop silently.

    ``process`` is the manager's pass: it is called in the worker thread with the current time
    and returns how long to wait before the next pass (None: until ``poll_interval``).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        process: PassFunction,
        poll_interval: float,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = NanobotJobStore(engine)
        self.memory = MemoryJobStore()
        super().__init__(
            jobstores={PERSISTENT: self.store, EPHEMERAL: self.memory},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone=UTC,
        )
        self._process_pass = process
        self.poll_interval = poll_interval
        self._clock = clock
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanobot-scheduler")
        self._pass_task: asyncio.Task[None] | None = None
        self._again = False
        self.last_pass_at: datetime | None = None
        self._due_jobs: list[tuple[str, Job, datetime | None]] = []
        self.pass_failures = 0

    # --- the wakeup cycle ---------------------------------------------------------------------

    def wakeup(self) -> None:
        """Ask for a pass as soon as possible; safe from any thread."""
        loop = self._eventloop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._request_pass)

    @property
    def dispatching(self) -> bool:
        """True while started and not paused (APScheduler's ``running`` is true when paused)."""
        return bool(self.state == STATE_RUNNING)

    def call_soon(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the event loop; safe from the worker thread."""
        loop = self._eventloop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(func, *args)

    async def quiesce(self) -> None:
        """Stop dispatching and wait for the pass in progress, if any, to end."""
        if self.dispatching:
            self.pause()
        self._stop_timer()
        task = self._pass_task
        if task is not None and not task.done():
            await asyncio.wait([task])

    def _request_pass(self) -> None:
        if not self.dispatching:
            return
        if self._pass_task is not None and not self._pass_task.done():
            self._again = True
            return
        self._stop_timer()
        self._pass_task = self._eventloop.create_task(self._pass())

    async def _pass(self) -> None:
        wait: float | None = self.poll_interval
        try:
            now = self._clock()
            wait = await self._eventloop.run_in_executor(self.worker, self._process_pass, self, now)
            self.pass_failures = 0
        except NotLeaderError as exc:
            # The service steps down at its next lease check; until then nothing is claimed.
            self.pass_failures += 1
            log.warning("cron.not_leader", reason=str(exc))
            wait = min(self.poll_interval, 1.0)
        except Exception:
            # Whatever failed (a locked database, a lost connection), the timer is armed again
            # below: the scheduler retries instead of stopping while it reports running.
            self.pass_failures += 1
            log.exception("cron.pass_failed", failures=self.pass_failures)
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

    def _process_jobs(self) -> float | None:
        # Never used: passes go through _pass. Kept inert in case APScheduler calls it.
        return self.poll_interval

    async def run_in_worker(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` in the scheduler's worker thread (serialised with passes)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, func, *args)

    def close(self) -> None:
        if self.running:
            # APScheduler's own shutdown is deferred to the loop; do its parts here, now.
            self._stop_timer()
            self.state = STATE_STOPPED
            with self._jobstores_lock:
                for store in self._jobstores.values():
                    store.shutdown()
            for executor in self._executors.values():
                executor.shutdown(wait=False)
        if self._pass_task is not None and not self._pass_task.done():
            self._pass_task.cancel()
        self.worker.shutdown(wait=True)

    # --- reading jobs (worker thread) -----------------------------------------------------------

    def due(
        self,
        now: datetime,
        horizon: datetime,
        policies: dict[str, tuple[MisfirePolicy, float]],
    ) -> list[DueJob]:
        """The jobs due by ``horizon`` in both stores, their slots split at ``now`` (a slot
        still ahead of ``now`` is simply the one to run); the jobs are not yet moved."""
        result: list[DueJob] = []
        with self._jobstores_lock:
            self._due_jobs = []
            for alias, store in ((PERSISTENT, self.store), (EPHEMERAL, self.memory)):
                for job in store.get_due_jobs(horizon):
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
                    self._due_jobs.append((alias, job, slots.next_slot))
                    result.append(
                        DueJob(
                            name=job.id,
                            store=alias,
                            task_class=job.args[0],
                            kwargs=dict(job.args[1]),
                            run_slot=slots.run_slot,
                            missed_first=slots.missed_first,
                            missed_count=slots.missed_count,
                            next_run_at=slots.next_slot,
                            missed_capped=slots.missed_capped,
                        )
                    )
        return result

    def advance_due(self, conn: Connection) -> None:
        """Move the persistent jobs found by :meth:`due` to their next slot, in ``conn``'s
        transaction. Call :meth:`advance_memory` once that transaction committed."""
        persistent: list[Job] = []
        for alias, job, next_slot in self._due_jobs:
            if alias == PERSISTENT:
                job._modify(next_run_time=next_slot)
                persistent.append(job)
        self.store.update_jobs(conn, persistent)

    def rewind(self, conn: Connection, slots: dict[str, datetime]) -> list[str]:
        """Move persistent jobs back to ``slots[name]`` where that is earlier than their next
        run, in ``conn``'s transaction: a claim released before it ran is due again. Paused
        jobs (no next run) stay paused. The names of the jobs moved."""
        with self._jobstores_lock:
            jobs = self.store.jobs_named(sorted(slots))
        moved: list[Job] = []
        for name, job in jobs.items():
            slot = slots[name]
            if job.next_run_time is not None and slot < job.next_run_time:
                # Set directly: Job._modify needs a started scheduler, and this runs before.
                job.next_run_time = slot
                moved.append(job)
        self.store.update_jobs(conn, moved)
        return [job.id for job in moved]

    def advance_memory(self) -> None:
        with self._jobstores_lock:
            for alias, job, next_slot in self._due_jobs:
                if alias == EPHEMERAL:
                    try:
                        current = self.memory.lookup_job(job.id)
                        if current is not None and current.next_run_time is not None:
                            current._modify(next_run_time=next_slot)
                            self.memory.update_job(current)
                            if next_slot is None:
                                log.info("cron.job_done", task=job.id)
                    except JobLookupError:
                        pass
            self._due_jobs = []

    def next_run_at(self) -> datetime | None:
        """The earliest next run time of any job in either store."""
        times = [t for t in (self.store.get_next_run_time(), self.memory.get_next_run_time()) if t]
        return min(times).astimezone(UTC) if times else None

    def count_due(self, horizon: datetime) -> int:
        """How many jobs are due by ``horizon`` (an index range count, no job is loaded)."""
        stamp = datetime_to_utc_timestamp(horizon)
        table = self.store.jobs_t
        with self.store.engine.begin() as connection:
            stored = connection.execute(
                select(func.count()).select_from(table).where(table.c.next_run_time <= stamp)
            ).scalar_one()
        in_memory = sum(1 for job in self.memory.get_due_jobs(horizon))
        return int(stored) + in_memory

    def lookup_many(self, names: list[str], *, all_rows: bool = False) -> dict[str, JobState]:
        """The persistent jobs among ``names``, read in one query."""
        return {
            name: _job_state(job, PERSISTENT)
            for name, job in self.store.jobs_named(names, all_rows=all_rows).items()
        }

    def lookup(self, name: str, store: str = PERSISTENT) -> JobState | None:
        job = (self.store if store == PERSISTENT else self.memory).lookup_job(name)
        return _job_state(job, store) if job is not None else None

    def persistent_job_ids(self) -> set[str]:
        return self.store.job_ids()

    # --- changing jobs (worker thread) ----------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        store: str,
        task_class: str,
        kwargs: dict[str, Any],
        interval: float,
        anchor: datetime,
        next_run_at: datetime | None,
        schedule: Schedule | None = None,
    ) -> None:
        """Add a job; an existing job of that name is left alone (never replaced)."""
        try:
            self.add_job(
                run_stored_task,
                trigger=_trigger(schedule or IntervalSchedule(seconds=interval), anchor),
                args=(task_class, kwargs),
                id=name,
                name=name,
                jobstore=store,
                next_run_time=next_run_at,
                replace_existing=False,
            )
        except ConflictingIdError:
            log.debug("cron.job_exists", task=name)

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
        with self._jobstores_lock:
            self.store.insert_states(states)
        if states:
            self.wakeup()

    def change(
        self,
        name: str,
        *,
        store: str,
        task_class: str | None = None,
        kwargs: dict[str, Any] | None = None,
        interval: float | None = None,
        anchor: datetime | None = None,
        next_run_at: datetime | object | None = ...,
        schedule: Schedule | None = None,
    ) -> None:
        current = self.lookup(name, store)
        if current is None:
            raise JobLookupError(name)
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
                IntervalSchedule(seconds=interval or current.interval), anchor or current.anchor
            )
        if next_run_at is not ...:
            changes["next_run_time"] = next_run_at
        if changes:
            self.modify_job(name, jobstore=store, **changes)

    def remove(self, name: str, store: str = PERSISTENT) -> bool:
        try:
            self.remove_job(name, jobstore=store)
        except JobLookupError:
            return False
        return True
