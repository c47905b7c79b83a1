"""Run history: slots claimed before they run, outcomes written in batches, retention.

This module owns the statements on ``task_runs`` (and the columns of ``tasks`` that mirror a
run); what reads the history gets :class:`RunInfo` records from :func:`read_runs`,
:func:`runs_in_flight` and :func:`recent_failed_runs`.

A slot ``(task, scheduled_at)`` is claimed by inserting its ``task_runs`` row with outcome
``running`` in the same transaction that advances the job in the job store. The row's unique
key makes a second claim of the same slot a no-op, so no slot runs twice, not even with two
processes on one database.

While a row is ``running``, ``started_at`` says whether the slot was *dispatched*: set, the run
may have started (it is ``scheduled_at`` until the run's real start is written at its end);
NULL, the slot was claimed ahead of its instant and certainly never started. A slot claimed
well ahead (a burst) is marked dispatched by one statement just before its instant
(:func:`mark_dispatched`). So at the next start, or at a take-over, a dispatched claim whose
process died is recorded ``interrupted``, and an undispatched one is *released*: its row goes
and its job is moved back to it, so that the slot is caught up (:func:`release_claims`,
:func:`release_undispatched`). A cleanly stopping scheduler releases the claims it has not
started in the same way.

Fencing: an outcome is written only over a row that is still ``running``. A node that was
fenced off (frozen past its lease while another node took over and recorded the row
``interrupted``) does not overwrite what the new leader recorded: :func:`write_finishes`
returns such finishes, and the caller logs them (``cron.fenced_finish``) with their real
outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Row,
    ScalarSelect,
    SQLColumnExpression,
    String,
    Table,
    TextClause,
    and_,
    bindparam,
    case,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from nanobot.cron.retries import PendingRetry
from nanobot.db import read_transaction, write_transaction
from nanobot.models import (
    FAILED_OUTCOMES,
    Task,
    TaskOutcome,
    TaskRun,
    TaskStateRecord,
    UTCDateTime,
    bound_error,
    utcnow,
)
from nanobot.sqlite_many import SqliteMany, sqlite_time
from nanobot.times import iso

_RUNS = cast(Table, TaskRun.__table__)
_TASKS = cast(Table, Task.__table__)
_STATE = cast(Table, TaskStateRecord.__table__)


@dataclass(frozen=True, slots=True)
class Claim:
    """A slot to claim; ``dispatched`` False for one claimed ahead of its instant (a burst)."""

    task: str
    scheduled_at: datetime
    manual: bool = False
    dispatched: bool = True
    # A retry is attempt 2, 3... of its slot (nanobot.cron.retries), dispatched for its own
    # instant ``started_at`` rather than the slot's.
    attempt: int = 1
    started_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Fenced:
    """A finish that was not written: its row was settled by another node meanwhile."""

    finish: Finish
    recorded: str | None


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of one claimed run, or a slot that did not run (missed, skipped)."""

    task: str
    run_id: int | None
    scheduled_at: datetime
    outcome: TaskOutcome
    started_at: datetime | None
    finished_at: datetime
    error: str | None = None
    slots: int = 1
    node: str | None = None
    # Which attempt of its slot this is (1: the slot's run; 2...: its retries).
    attempt: int = 1
    # False for a failed attempt that a retry follows: the slot is not settled yet, so it does
    # not count in consecutive_failures (auto-pause counts failed slots, not attempts).
    final: bool = True
    # The retry that follows (attempt + 1 at this instant), stored with this outcome.
    retry_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One row of a task's run history (``task_runs``)."""

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
            "scheduled_at": iso(self.scheduled_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration": self.duration,
            "outcome": self.outcome.value,
            "error": self.error,
            "slots": self.slots,
            "manual": self.manual,
            "node": self.node,
            "output": self.output,
            "attempt": self.attempt,
        }


# The unique claim: one row per attempt of a slot.
CLAIM_KEY: Final = ["task_name", "scheduled_at", "attempt"]


def _insert_ignoring_conflicts(conn: Connection) -> Any:
    table = _RUNS
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=CLAIM_KEY)
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=CLAIM_KEY)


# On SQLite a pass's claims go as multi-row INSERTs of at most this many rows, their values
# handed to the driver as they are (see nanobot.sqlite_many): SQLAlchemy's own multi-row
# INSERTs ("insertmanyvalues") prepared each row's eight values in Python first.
_SQLITE_CLAIM_ROWS: Final = 500
_SQLITE_CLAIM_ROW: Final = "(?, ?, ?, ?, ?, ?, ?, ?)"
# The statement for each number of rows, built once.
_SQLITE_CLAIMS: dict[int, str] = {}


def _sqlite_claim_sql(rows: int) -> str:
    sql = _SQLITE_CLAIMS.get(rows)
    if sql is None:
        sql = (
            f"INSERT INTO {TaskRun.__tablename__} ({', '.join(_CLAIM_COLUMNS)}) VALUES "
            f"{', '.join([_SQLITE_CLAIM_ROW] * rows)} "
            f"ON CONFLICT ({', '.join(CLAIM_KEY)}) DO NOTHING "
            "RETURNING id, task_name, scheduled_at"
        )
        _SQLITE_CLAIMS[rows] = sql
    return sql


def _claim_sqlite(
    conn: Connection, claims: Sequence[Claim], node: str
) -> dict[tuple[str, datetime], int]:
    running = TaskOutcome.RUNNING.value
    # The slot of each row by what the column holds: RETURNING gives the text back.
    slots: dict[tuple[str, str | None], datetime] = {}
    claimed: dict[tuple[str, datetime], int] = {}
    for start in range(0, len(claims), _SQLITE_CLAIM_ROWS):
        chunk = claims[start : start + _SQLITE_CLAIM_ROWS]
        values: list[Any] = []
        for c in chunk:
            at = sqlite_time(c.scheduled_at)
            slots[c.task, at] = c.scheduled_at
            started = (sqlite_time(c.started_at) if c.started_at else at) if c.dispatched else None
            values += (c.task, at, running, started, 1, c.manual, node, c.attempt)
        for run_id, task, at in conn.exec_driver_sql(_sqlite_claim_sql(len(chunk)), tuple(values)):
            claimed[task, slots[task, at]] = int(run_id)
    return claimed


# On PostgreSQL a pass's claims go as one INSERT from unnest()ed arrays, one parameter per
# column: 20,000 claims took 2.6 s (2.1 s of this process's CPU) as SQLAlchemy's multi-row
# INSERTs of 1,000 rows each, 0.95 s (0.53 s) so. The arrays' timestamps are bound as UTC.
_CLAIM_COLUMNS: Final = {
    "task_name": "varchar",
    "scheduled_at": "timestamptz",
    "outcome": "varchar",
    "started_at": "timestamptz",
    "slots": "integer",
    "manual": "boolean",
    "node": "varchar",
    "attempt": "integer",
}


def _unnest(columns: dict[str, str]) -> str:
    """``unnest(...)`` of one array parameter per column (PostgreSQL), named as the column."""
    return (
        "unnest(" + ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns.items()) + ")"
    )


def _unnest_statement(sql: str, columns: dict[str, str]) -> TextClause:
    """A statement of :func:`_unnest` arrays whose timestamps are bound as aware UTC, as the
    columns' own type binds them."""
    return text(sql).bindparams(
        *(
            bindparam(name, type_=postgresql.ARRAY(UTCDateTime()))
            for name, kind in columns.items()
            if kind == "timestamptz"
        )
    )


_PG_CLAIM: Final = _unnest_statement(
    f"INSERT INTO {TaskRun.__tablename__} ({', '.join(_CLAIM_COLUMNS)}) "
    f"SELECT * FROM {_unnest(_CLAIM_COLUMNS)} "
    f"ON CONFLICT ({', '.join(CLAIM_KEY)}) DO NOTHING "
    "RETURNING id, task_name, scheduled_at",
    _CLAIM_COLUMNS,
).columns(id=BigInteger(), task_name=String(), scheduled_at=UTCDateTime())


def _claim_pg(conn: Connection, claims: Sequence[Claim], node: str) -> list[Row[Any]]:
    running = TaskOutcome.RUNNING.value
    return list(
        conn.execute(
            _PG_CLAIM,
            {
                "task_name": [c.task for c in claims],
                "scheduled_at": [c.scheduled_at for c in claims],
                "outcome": [running] * len(claims),
                "started_at": [
                    (c.started_at or c.scheduled_at) if c.dispatched else None for c in claims
                ],
                "slots": [1] * len(claims),
                "manual": [c.manual for c in claims],
                "node": [node] * len(claims),
                "attempt": [c.attempt for c in claims],
            },
        )
    )


def claim_slots(
    conn: Connection, claims: Sequence[Claim], *, node: str
) -> dict[tuple[str, datetime], int]:
    """Insert ``running`` rows for ``claims``; the ids of the ones this call claimed.

    A slot claimed before (by this or another process) is not in the result and must not run.
    """
    if not claims:
        return {}
    if conn.dialect.name == "postgresql":
        return {
            (row.task_name, row.scheduled_at): int(row.id) for row in _claim_pg(conn, claims, node)
        }
    return _claim_sqlite(conn, claims, node)


def record_unrun(conn: Connection, finishes: Sequence[Finish]) -> None:
    """Insert rows for slots that did not run (missed, skipped); a slot recorded before stays."""
    if not finishes:
        return
    rows = [
        {
            "task_name": f.task,
            "scheduled_at": f.scheduled_at,
            "started_at": None,
            "finished_at": f.finished_at,
            "outcome": f.outcome.value,
            "error": bound_error(f.error),
            "slots": f.slots,
            "manual": False,
            "node": f.node,
            "attempt": f.attempt,
        }
        for f in finishes
    ]
    conn.execute(_insert_ignoring_conflicts(conn), rows)


# Whether the task ``b_name`` is still at the version ``b_version`` that the scheduler applied.
# On PostgreSQL the tasks row is share-locked: a command line transaction that changed it (a
# new version, and the next run in task_state) and is not committed yet makes this wait and
# then see the new version; without the lock, the re-check of the task_state row that the
# command line wrote would still read the old version and undo its change.
_AT_VERSION: Final = (
    select(_TASKS.c.id)
    .where(_TASKS.c.name == bindparam("b_name"), _TASKS.c.version == bindparam("b_version"))
    .with_for_update(read=True)
    .exists()
)
_MIRROR_NEXT: Final = (
    update(_STATE)
    .where(_STATE.c.task_name == bindparam("b_name"), _AT_VERSION)
    .values(next_run_at=bindparam("b_next"))
)


def set_next_runs(conn: Connection, next_runs: dict[str, tuple[datetime | None, int]]) -> None:
    """Mirror each task's next run into ``task_state`` (for ``status`` and ``cron list``).

    Each value is ``(next_run_at, version)``: the row is written only if its task is still at
    the version the scheduler applied, so a mirror write never undoes a change that the command
    line made in between (the next pass applies that change and mirrors it).
    """
    if not next_runs:
        return
    conn.execute(
        _MIRROR_NEXT,
        [{"b_name": n, "b_next": t, "b_version": v} for n, (t, v) in next_runs.items()],
    )


def _settled(conn: Connection, run_ids: Sequence[int]) -> dict[int, str | None]:
    """Of ``run_ids``, those no longer ``running`` and what they say (None: the row is gone).

    On PostgreSQL the rows are locked until the transaction ends, so that the update that
    follows applies to exactly the rows found running here.
    """
    found: dict[int, str] = {}
    query = _SETTLED_LOCKED if conn.dialect.name == "postgresql" else _SETTLED
    for start in range(0, len(run_ids), _IN_CHUNK):
        chunk = list(run_ids[start : start + _IN_CHUNK])
        found.update(
            {int(row.id): str(row.outcome) for row in conn.execute(query, {"b_ids": chunk})}
        )
    running = TaskOutcome.RUNNING.value
    return {i: found.get(i) for i in run_ids if found.get(i) != running}


# Ids per IN (...) list: far below what SQLite (32766 variables) and PostgreSQL accept.
_IN_CHUNK: Final = 2000
_SETTLED: Final = select(_RUNS.c.id, _RUNS.c.outcome).where(
    _RUNS.c.id.in_(bindparam("b_ids", expanding=True))
)
_SETTLED_LOCKED: Final = _SETTLED.with_for_update()
# A run's outcome, written only over its claim's ``running`` row.
_FINISH_RUN: Final = (
    update(_RUNS)
    .where(_RUNS.c.id == bindparam("b_id"), _RUNS.c.outcome == TaskOutcome.RUNNING.value)
    .values(
        started_at=bindparam("b_started"),
        finished_at=bindparam("b_finished"),
        duration_s=bindparam("b_duration"),
        outcome=bindparam("b_outcome"),
        error=bindparam("b_error"),
    )
)
# The mirror of a task's last run. A failed attempt that a retry follows leaves the count as it
# is: only the slot's last attempt settles it.
_MIRROR_VALUES: Final[dict[str, Any]] = {
    "last_run_at": bindparam("b_last"),
    "last_outcome": bindparam("b_outcome"),
    "consecutive_failures": case(
        (bindparam("b_failed"), _STATE.c.consecutive_failures + 1),
        (bindparam("b_pending"), _STATE.c.consecutive_failures),
        else_=0,
    ),
}
_MIRROR_LAST: Final = (
    update(_STATE).where(_STATE.c.task_name == bindparam("b_name")).values(_MIRROR_VALUES)
)
# The same with the next-run mirror, version-guarded as in set_next_runs (version -1: none).
_MIRROR_LAST_NEXT: Final = (
    update(_STATE)
    .where(_STATE.c.task_name == bindparam("b_name"))
    .values(
        {
            **_MIRROR_VALUES,
            "next_run_at": case((_AT_VERSION, bindparam("b_next")), else_=_STATE.c.next_run_at),
        }
    )
)


# On SQLite the outcome batches' statements go to the driver as they are (see
# nanobot.sqlite_many: SQLAlchemy's preparation of each row was half of the batches' CPU).
_SQLITE_FINISH_RUN: Final = SqliteMany(
    _FINISH_RUN, ("b_id", "b_started", "b_finished", "b_duration", "b_outcome", "b_error")
)
_MIRROR_NAMES: Final = ("b_name", "b_last", "b_outcome", "b_failed", "b_pending")
_SQLITE_MIRROR_LAST: Final = SqliteMany(_MIRROR_LAST, _MIRROR_NAMES)
_SQLITE_MIRROR_LAST_NEXT: Final = SqliteMany(
    _MIRROR_LAST_NEXT, (*_MIRROR_NAMES, "b_next", "b_version")
)


# The same as _FINISH_RUN on PostgreSQL, for a whole batch in one UPDATE from unnest()ed
# arrays (SQLAlchemy's executemany runs one UPDATE per row there).
_FINISH_COLUMNS: Final = {
    "id": "bigint",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "duration_s": "double precision",
    "outcome": "varchar",
    "error": "text",
}
_PG_FINISH_RUNS: Final = _unnest_statement(
    f"UPDATE {TaskRun.__tablename__} AS r SET "
    + ", ".join(f"{name} = v.{name}" for name in list(_FINISH_COLUMNS)[1:])
    + f" FROM {_unnest(_FINISH_COLUMNS)} AS v({', '.join(_FINISH_COLUMNS)}) "
    f"WHERE r.id = v.id AND r.outcome = '{TaskOutcome.RUNNING.value}'",
    _FINISH_COLUMNS,
)


def _finish_runs(conn: Connection, ran: Sequence[Finish]) -> None:
    """Write the outcomes of ``ran`` over their claims' ``running`` rows."""
    durations = [
        (f.finished_at - f.started_at).total_seconds() if f.started_at is not None else None
        for f in ran
    ]
    if conn.dialect.name == "postgresql":
        conn.execute(
            _PG_FINISH_RUNS,
            {
                "id": [f.run_id for f in ran],
                "started_at": [f.started_at for f in ran],
                "finished_at": [f.finished_at for f in ran],
                "duration_s": durations,
                "outcome": [f.outcome.value for f in ran],
                "error": [bound_error(f.error) for f in ran],
            },
        )
        return
    _SQLITE_FINISH_RUN.execute(
        conn,
        [
            (
                f.run_id,
                sqlite_time(f.started_at),
                sqlite_time(f.finished_at),
                duration,
                f.outcome.value,
                bound_error(f.error),
            )
            for f, duration in zip(ran, durations, strict=True)
        ],
    )


# mirror_outcomes on PostgreSQL: one UPDATE from unnest()ed arrays per round, a round holding
# at most one outcome per task (the next outcome of a task is in the next round), so that the
# rows change as by one statement per outcome in order. The next-run mirror is guarded by the
# task's version as in _MIRROR_LAST_NEXT (version -1: none).
_MIRROR_COLUMNS: Final = {
    "name": "varchar",
    "last": "timestamptz",
    "outcome": "varchar",
    "failed": "boolean",
    "pending": "boolean",
    "next": "timestamptz",
    "version": "integer",
}
_PG_MIRROR: Final = _unnest_statement(
    f"UPDATE {TaskStateRecord.__tablename__} AS s SET last_run_at = v.last, "
    "last_outcome = v.outcome, consecutive_failures = CASE WHEN v.failed THEN "
    "s.consecutive_failures + 1 WHEN v.pending THEN s.consecutive_failures ELSE 0 END, "
    "next_run_at = CASE WHEN EXISTS (SELECT t.id FROM "
    f"{Task.__tablename__} AS t WHERE t.name = v.name AND t.version = v.version FOR SHARE) "
    "THEN v.next ELSE s.next_run_at END "
    f"FROM {_unnest(_MIRROR_COLUMNS)} AS v({', '.join(_MIRROR_COLUMNS)}) "
    "WHERE s.task_name = v.name",
    _MIRROR_COLUMNS,
)


def _mirror_pg(conn: Connection, params: list[dict[str, Any]]) -> None:
    rounds: list[list[dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for row in params:
        at = seen.get(row["b_name"], 0)
        seen[row["b_name"]] = at + 1
        if at == len(rounds):
            rounds.append([])
        rounds[at].append(row)
    for rows in rounds:
        conn.execute(
            _PG_MIRROR,
            {
                "name": [r["b_name"] for r in rows],
                "last": [r["b_last"] for r in rows],
                "outcome": [r["b_outcome"] for r in rows],
                "failed": [r["b_failed"] for r in rows],
                "pending": [r["b_pending"] for r in rows],
                "next": [r.get("b_next") for r in rows],
                "version": [r.get("b_version", -1) for r in rows],
            },
        )


def _mirror_row(f: Finish) -> tuple[Any, ...]:
    """The values of an outcome's mirror, in the order of :data:`_MIRROR_NAMES` (the time as
    the datetime itself: SQLite takes it as :func:`sqlite_time` text)."""
    return (
        f.task,
        f.started_at or f.finished_at,
        f.outcome.value,
        f.final and f.outcome in FAILED_OUTCOMES,
        not f.final,
    )


def _sqlite_mirror_row(f: Finish) -> tuple[Any, ...]:
    name, last, *rest = _mirror_row(f)
    return (name, sqlite_time(last), *rest)


def mirror_outcomes(
    conn: Connection,
    finishes: Sequence[Finish],
    next_runs: dict[str, tuple[datetime | None, int]],
) -> None:
    """Mirror written outcomes into their tasks' ``task_state`` rows, with the next runs of
    ``next_runs`` that belong to the same tasks (those are taken out of ``next_runs``).

    The outcomes apply in order, so that consecutive_failures counts across the batch: one
    statement run per outcome, or on PostgreSQL one per round of distinct tasks
    (:data:`_PG_MIRROR`); a skipped slot is not mirrored.
    """
    mirrored = [f for f in finishes if f.outcome is not TaskOutcome.SKIPPED]
    if not mirrored:
        return
    if conn.dialect.name == "postgresql":
        params = []
        for f in mirrored:
            row = dict(zip(_MIRROR_NAMES, _mirror_row(f), strict=True))
            if next_runs:
                row["b_next"], row["b_version"] = next_runs.get(f.task, (None, -1))
            params.append(row)
        _mirror_pg(conn, params)
    elif next_runs:
        rows = []
        for f in mirrored:
            next_run, version = next_runs.get(f.task, (None, -1))
            rows.append((*_sqlite_mirror_row(f), sqlite_time(next_run), version))
        _SQLITE_MIRROR_LAST_NEXT.execute(conn, rows)
    else:
        _SQLITE_MIRROR_LAST.execute(conn, [_sqlite_mirror_row(f) for f in mirrored])
    for f in mirrored:
        next_runs.pop(f.task, None)


def write_finishes(
    engine: Engine,
    finishes: Sequence[Finish],
    *,
    next_runs: dict[str, tuple[datetime | None, int]] | None = None,
) -> list[Fenced]:
    """Write a batch of run outcomes and the tasks' last-run mirror, in one transaction.

    A finish whose row is no longer ``running`` (another node recorded it meanwhile) is not
    written, and not mirrored: it is returned, with what the row says, for the caller to log.

    ``next_runs`` (as for :func:`set_next_runs`) are next-run mirrors of these runs' tasks that
    the scheduler left to be written with the outcome: in the same row write as the last-run
    mirror, so that a run makes one new version of its ``task_state`` row, not two.
    """
    next_runs = dict(next_runs or {})
    unrun = [f for f in finishes if f.run_id is None]
    with write_transaction(engine) as conn:
        settled = _settled(conn, [f.run_id for f in finishes if f.run_id is not None])
        ran = [f for f in finishes if f.run_id is not None and f.run_id not in settled]
        fenced = [
            Fenced(f, settled[f.run_id])
            for f in finishes
            if f.run_id is not None and f.run_id in settled
        ]
        if ran:
            _finish_runs(conn, ran)
        record_unrun(conn, unrun)
        mirror_outcomes(conn, ran, next_runs)
        store_retries(conn, [f for f in ran if f.retry_at is not None])
        # Mirrors of runs that were not mirrored above (skipped slots, for one).
        set_next_runs(conn, next_runs)
    return fenced


def mark_dispatched(
    engine: Engine, run_ids: Sequence[int], fence: Callable[[Connection], bool] | None
) -> set[int]:
    """Mark claimed slots as dispatched just before they start; the ids marked.

    Only rows still ``running`` and not yet dispatched are marked, and nothing is if ``fence``
    says this process no longer leads: a slot that was released (a take-over) meanwhile, or
    whose node lost the lease, is not in the result and must not start.
    """
    marked: set[int] = set()
    with write_transaction(engine) as conn:
        if fence is not None and not fence(conn):
            return marked
        for start in range(0, len(run_ids), _IN_CHUNK):
            chunk = list(run_ids[start : start + _IN_CHUNK])
            result = conn.execute(
                update(TaskRun)
                .where(
                    TaskRun.id.in_(chunk),
                    TaskRun.outcome == TaskOutcome.RUNNING.value,
                    TaskRun.started_at.is_(None),
                )
                .values(started_at=TaskRun.scheduled_at)
                .returning(TaskRun.id)
            )
            marked.update(int(i) for i in result.scalars())
    return marked


def undispatch(engine: Engine, run_ids: Sequence[int]) -> None:
    """Say that claimed slots never started (a node that lost its lease before their instant),
    so that whoever leads next releases them and catches them up instead of recording them
    interrupted. Only rows still ``running`` change."""
    with write_transaction(engine) as conn:
        for start in range(0, len(run_ids), _IN_CHUNK):
            chunk = list(run_ids[start : start + _IN_CHUNK])
            conn.execute(
                update(TaskRun)
                .where(TaskRun.id.in_(chunk), TaskRun.outcome == TaskOutcome.RUNNING.value)
                .values(started_at=None)
            )


def release_claims(conn: Connection, run_ids: Sequence[int]) -> list[tuple[str, datetime, bool]]:
    """Delete claims that never started (still ``running``); their ``(task, slot, manual)``.

    The caller moves each job back to its slot in the same transaction, so that the slot is
    due again: it runs at its instant, or is caught up at the next start.
    """
    released: list[tuple[str, datetime, bool]] = []
    for start in range(0, len(run_ids), _IN_CHUNK):
        chunk = list(run_ids[start : start + _IN_CHUNK])
        rows = conn.execute(
            delete(TaskRun)
            .where(TaskRun.id.in_(chunk), TaskRun.outcome == TaskOutcome.RUNNING.value)
            .returning(*_RELEASED)
        ).all()
        released.extend(_slots_of(conn, rows))
    return released


_RELEASED: Final = (
    TaskRun.task_name,
    TaskRun.scheduled_at,
    TaskRun.manual,
    TaskRun.attempt,
    TaskRun.started_at,
)


def _slots_of(
    conn: Connection, rows: Sequence[Row[*tuple[Any, ...]]]
) -> list[tuple[str, datetime, bool]]:
    """The released claims that were slots; a released retry (attempt 2...) is not a slot to
    catch up: it becomes its task's pending retry again (at its instant, or now)."""
    retries = [r for r in rows if int(r.attempt) > 1]
    if retries:
        store_retries(
            conn,
            [
                Finish(
                    task=str(r.task_name),
                    run_id=None,
                    scheduled_at=r.scheduled_at,
                    outcome=TaskOutcome.ERROR,
                    started_at=None,
                    finished_at=utcnow(),
                    attempt=int(r.attempt) - 1,
                    final=False,
                    retry_at=r.started_at or utcnow(),
                )
                for r in retries
            ],
        )
    return [(str(r.task_name), r.scheduled_at, bool(r.manual)) for r in rows if int(r.attempt) <= 1]


def release_undispatched(conn: Connection, *, node: str | None) -> list[tuple[str, datetime, bool]]:
    """Delete the claims left undispatched by a process that is gone (of ``node``, or of every
    node at a take-over); their ``(task, slot, manual)``, for the caller to catch them up."""
    where = [TaskRun.outcome == TaskOutcome.RUNNING.value, TaskRun.started_at.is_(None)]
    if node is not None:
        where.append(TaskRun.node == node)
    rows = conn.execute(delete(TaskRun).where(*where).returning(*_RELEASED)).all()
    return _slots_of(conn, rows)


def restore_slots(conn: Connection, released: Sequence[tuple[str, datetime, bool]]) -> None:
    """Mirror released slots back into ``tasks`` and ``task_state``: the earliest one is the
    next run again, and a released run-now request is requested again. Two statements, whatever
    the number."""
    earliest: dict[str, datetime] = {}
    requests: dict[str, datetime] = {}
    for name, slot, manual in released:
        chosen = requests if manual else earliest
        if name not in chosen or slot < chosen[name]:
            chosen[name] = slot
    if requests:
        conn.execute(
            update(_TASKS)
            .where(_TASKS.c.name == bindparam("b_name"), _TASKS.c.run_requested_at.is_(None))
            .values(run_requested_at=bindparam("b_slot")),
            [{"b_name": n, "b_slot": t} for n, t in requests.items()],
        )
    if earliest:
        running = (
            select(_TASKS.c.id)
            .where(_TASKS.c.name == bindparam("b_name"), _TASKS.c.paused.is_(False))
            .exists()
        )
        conn.execute(
            update(_STATE)
            .where(
                _STATE.c.task_name == bindparam("b_name"),
                _STATE.c.next_run_at.is_not(None),
                _STATE.c.next_run_at > bindparam("b_slot"),
                running,
            )
            .values(next_run_at=bindparam("b_slot")),
            [{"b_name": n, "b_slot": t} for n, t in earliest.items()],
        )


# --- reading ---------------------------------------------------------------------------------


def run_info(r: Row[*tuple[Any, ...]]) -> RunInfo:
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


def read_runs(
    conn: Connection, name: str, limit: int, *, before: datetime | None = None
) -> list[RunInfo]:
    """The last ``limit`` rows of a task's run history, newest first, in the caller's
    transaction.

    With ``before``, only slots scheduled before it: the next page after a page whose oldest
    row was scheduled at ``before``. The attempts of a slot (retries) are never split between
    two pages: a page holds at least ``limit`` rows when there are that many, so that no row is
    shown twice or skipped.
    """
    query = select(_RUNS).where(_RUNS.c.task_name == name)
    if before is not None:
        query = query.where(_RUNS.c.scheduled_at < before)
    rows = list(
        conn.execute(
            query.order_by(_RUNS.c.scheduled_at.desc(), _RUNS.c.attempt.desc()).limit(limit)
        ).all()
    )
    if len(rows) == limit and rows[-1].attempt > 1:
        # A page ends inside a slot's attempts: its earlier attempts come with it, since the
        # next page starts before that slot (a page may hold a few rows more).
        rows += conn.execute(
            select(_RUNS)
            .where(
                _RUNS.c.task_name == name,
                _RUNS.c.scheduled_at == rows[-1].scheduled_at,
                _RUNS.c.attempt < rows[-1].attempt,
            )
            .order_by(_RUNS.c.attempt.desc())
        ).all()
    return [run_info(r) for r in rows]


def runs_in_flight(engine: Engine, name: str) -> list[RunInfo]:
    """The task's rows still ``running`` (runs in flight, or slots claimed to run), oldest
    first."""
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(_RUNS)
            .where(TaskRun.task_name == name, TaskRun.outcome == TaskOutcome.RUNNING.value)
            .order_by(TaskRun.scheduled_at)
        ).all()
    return [run_info(r) for r in rows]


def recent_failed_runs(conn: Connection, limit: int) -> list[RunInfo]:
    """The newest ``limit`` failed runs (:data:`nanobot.models.FAILED_OUTCOMES`) of every task,
    newest first, in the caller's transaction."""
    rows = conn.execute(
        select(_RUNS)
        .where(_RUNS.c.outcome.in_(FAILED_OUTCOMES))
        .order_by(_RUNS.c.scheduled_at.desc())
        .limit(limit)
    ).all()
    return [run_info(r) for r in rows]


def last_failed_run(conn: Connection, name: str) -> RunInfo | None:
    """The task's newest failed run (:data:`nanobot.models.FAILED_OUTCOMES`), without its
    output, in the caller's transaction."""
    row = conn.execute(
        select(*(column for column in _RUNS.c if column.name != "output"))
        .where(_RUNS.c.task_name == name, _RUNS.c.outcome.in_(FAILED_OUTCOMES))
        .order_by(_RUNS.c.scheduled_at.desc())
        .limit(1)
    ).first()
    return None if row is None else run_info(row)


@dataclass(frozen=True, slots=True)
class RunSlot:
    """A row of a task's history as a backfill matches it to its slots."""

    id: int
    scheduled_at: datetime
    outcome: str
    slots: int


def slots_between(conn: Connection, name: str, first: datetime, last: datetime) -> list[RunSlot]:
    """The task's rows scheduled from ``first`` to ``last``, oldest first, in the caller's
    transaction."""
    rows = conn.execute(
        select(_RUNS.c.id, _RUNS.c.scheduled_at, _RUNS.c.outcome, _RUNS.c.slots)
        .where(
            _RUNS.c.task_name == name,
            _RUNS.c.scheduled_at >= first,
            _RUNS.c.scheduled_at <= last,
        )
        .order_by(_RUNS.c.scheduled_at)
    ).all()
    return [RunSlot(int(r.id), r.scheduled_at, str(r.outcome), int(r.slots)) for r in rows]


def claim_missed(conn: Connection, row: RunSlot, *, node: str) -> bool:
    """Turn a ``missed`` row into the claimed run of its first slot (a backfill runs it), in
    the caller's transaction; False if it is no longer missed."""
    result = conn.execute(
        update(_RUNS)
        .where(_RUNS.c.id == row.id, _RUNS.c.outcome == TaskOutcome.MISSED.value)
        .values(
            outcome=TaskOutcome.RUNNING.value,
            started_at=row.scheduled_at,
            finished_at=None,
            duration_s=None,
            error=None,
            slots=1,
            manual=True,
            node=node,
        )
    )
    return result.rowcount == 1


@dataclass(frozen=True, slots=True)
class StartedRun:
    """A run in flight (dispatched, still ``running``) and its task's interval and timeout."""

    task: str
    started_at: datetime
    interval: float
    timeout: float | None


def started_before(conn: Connection, horizon: datetime) -> list[StartedRun]:
    """The runs in flight that started before ``horizon``, of tasks that still exist, in the
    caller's transaction."""
    rows = conn.execute(
        select(_RUNS.c.task_name, _RUNS.c.started_at, _TASKS.c.interval_s, _TASKS.c.timeout_s)
        .join(_TASKS, _TASKS.c.name == _RUNS.c.task_name)
        .where(
            _RUNS.c.outcome == TaskOutcome.RUNNING.value,
            _RUNS.c.started_at.is_not(None),
            _RUNS.c.started_at < horizon,
        )
    ).all()
    return [StartedRun(r.task_name, r.started_at, r.interval_s, r.timeout_s) for r in rows]


def write_output(engine: Engine, run_id: int, text: str) -> None:
    """Store the captured output of run ``run_id`` (a command task's tail)."""
    with write_transaction(engine) as conn:
        conn.execute(update(_RUNS).where(_RUNS.c.id == run_id).values(output=text))


# --- retries (nanobot.cron.retries) -----------------------------------------------------------


def store_retries(conn: Connection, finishes: Sequence[Finish]) -> None:
    """Store the pending retry that follows each of ``finishes`` on its task's row (attempt
    ``attempt + 1`` of its slot at ``retry_at``): it survives a restart."""
    if not finishes:
        return
    conn.execute(
        update(_TASKS)
        .where(_TASKS.c.name == bindparam("b_name"))
        .values(
            retry_at=bindparam("b_at"),
            retry_slot=bindparam("b_slot"),
            retry_attempt=bindparam("b_attempt"),
        ),
        [
            {
                "b_name": f.task,
                "b_at": f.retry_at,
                "b_slot": f.scheduled_at,
                "b_attempt": f.attempt + 1,
            }
            for f in finishes
        ],
    )


def clear_retries(conn: Connection, retries: Sequence[PendingRetry]) -> None:
    """Forget pending retries that were claimed, missed or given up: only those still stored
    (a newer one of the same task stays)."""
    if not retries:
        return
    conn.execute(
        update(_TASKS)
        .where(
            _TASKS.c.name == bindparam("b_name"),
            _TASKS.c.retry_slot == bindparam("b_slot"),
            _TASKS.c.retry_attempt == bindparam("b_attempt"),
        )
        .values(retry_at=None, retry_slot=None, retry_attempt=None),
        [{"b_name": r.task, "b_slot": r.slot, "b_attempt": r.attempt} for r in retries],
    )


def pending_retries(conn: Connection) -> dict[str, PendingRetry]:
    """Every stored pending retry, by task (read by a scheduler at its start)."""
    rows = conn.execute(
        select(Task.name, Task.retry_at, Task.retry_slot, Task.retry_attempt).where(
            Task.retry_at.is_not(None)
        )
    ).all()
    return {
        str(r.name): PendingRetry(str(r.name), r.retry_slot, int(r.retry_attempt), r.retry_at)
        for r in rows
        if r.retry_slot is not None and r.retry_attempt is not None
    }


def settle_failed_slots(conn: Connection, names: Sequence[str]) -> None:
    """Count one more failed slot for each of ``names``: a slot whose pending retry was given
    up or missed, so its last attempt (already written) was its last."""
    if not names:
        return
    conn.execute(
        update(_STATE)
        .where(_STATE.c.task_name == bindparam("b_name"))
        .values(consecutive_failures=_STATE.c.consecutive_failures + 1),
        [{"b_name": n} for n in names],
    )


def note_given_up(conn: Connection, task: str, slot: datetime, attempt: int, text: str) -> None:
    """Add why a slot's remaining attempts were given up to its last attempt's error."""
    row = _RUNS
    conn.execute(
        update(row)
        .where(row.c.task_name == task, row.c.scheduled_at == slot, row.c.attempt == attempt)
        .values(error=func.coalesce(row.c.error + "; ", "") + text)
    )


def set_broken(engine: Engine, reasons: dict[str, str | None]) -> None:
    """Mark tasks broken (their class cannot be imported, their job cannot be loaded) or mend."""
    if not reasons:
        return
    with write_transaction(engine) as conn:
        for name, reason in reasons.items():
            bounded = bound_error(reason)
            conn.execute(
                update(Task)
                .where(Task.name == name, Task.broken_reason.is_distinct_from(bounded))
                .values(broken_reason=bounded)
            )


def mark_interrupted(engine: Engine, *, node: str | None, now: datetime) -> int:
    """Record as ``interrupted`` the runs left ``running`` by a process that died: those of
    ``node``, or of every node (``node=None``, for a leader taking over: only the leader runs
    tasks, so whatever still says running belongs to a leader that is gone)."""
    # Only dispatched claims: one never dispatched is released and caught up instead.
    running = and_(TaskRun.outcome == TaskOutcome.RUNNING.value, TaskRun.started_at.is_not(None))
    where = [running] if node is None else [running, TaskRun.node == node]
    with write_transaction(engine) as conn:
        names = list(conn.execute(select(TaskRun.task_name).where(*where).distinct()).scalars())
        if not names:
            return 0
        result = conn.execute(
            update(TaskRun)
            .where(*where)
            .values(
                outcome=TaskOutcome.INTERRUPTED.value,
                finished_at=now,
                error="the process running it stopped before the run finished",
            )
        )
        conn.execute(
            update(TaskStateRecord)
            .where(TaskStateRecord.task_name.in_(names))
            .values(
                last_outcome=TaskOutcome.INTERRUPTED.value,
                consecutive_failures=TaskStateRecord.consecutive_failures + 1,
            )
        )
        return int(result.rowcount or 0)


def prune(engine: Engine, *, now: datetime, retention_days: float, max_rows: int) -> int:
    """Delete task runs older than the retention, and beyond ``max_rows`` per task."""
    cutoff = now - timedelta(days=retention_days)
    running = TaskOutcome.RUNNING.value
    removed = 0
    with write_transaction(engine) as conn:
        result = conn.execute(
            delete(TaskRun).where(TaskRun.scheduled_at < cutoff, TaskRun.outcome != running)
        )
        removed += int(result.rowcount or 0)
        over = conn.execute(
            select(TaskRun.task_name).group_by(TaskRun.task_name).having(func.count() > max_rows)
        ).scalars()
        for name in list(over):
            # The scheduled_at of the newest row past the limit: everything up to it goes.
            boundary = conn.execute(
                select(TaskRun.scheduled_at)
                .where(TaskRun.task_name == name)
                .order_by(TaskRun.scheduled_at.desc())
                .offset(max_rows)
                .limit(1)
            ).scalar()
            if boundary is None:
                continue
            result = conn.execute(
                delete(TaskRun).where(
                    TaskRun.task_name == name,
                    TaskRun.scheduled_at <= boundary,
                    TaskRun.outcome != running,
                )
            )
            removed += int(result.rowcount or 0)
    return removed


def newest_success(task_name: SQLColumnExpression[str]) -> ScalarSelect[datetime | None]:
    """When the newest successful run of the task named by ``task_name`` (a column of the
    enclosing statement) finished: a correlated subquery, one index search per task on
    ``(task_name, scheduled_at)`` from the newest slot back to the first success (a task's
    history is capped by ``cron.history_max_rows``)."""
    return (
        select(TaskRun.finished_at)
        .where(TaskRun.task_name == task_name, TaskRun.outcome == TaskOutcome.SUCCESS.value)
        .order_by(TaskRun.scheduled_at.desc())
        .limit(1)
        .scalar_subquery()
    )
