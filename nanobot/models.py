"""The database schema: every table nanobot keeps, in SQLAlchemy 2 declarative form.

The schema is owned by Alembic (``migrations/``); a test checks that these models and the
migrations agree. Timestamps are timezone-aware UTC everywhere: ``UTCDateTime`` refuses naive
datetimes on the way in and restores UTC on the way out (SQLite keeps ISO-8601 text, which
``sqlite3 nanobot.db 'select * from task_runs'`` shows as it is).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Unicode,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Error texts are cut to this many characters before they are stored: a task that raises with a
# megabyte of message must not grow the database by a megabyte per run.
ERROR_TEXT_MAX: Final = 4000
NAME_MAX: Final = 200
ALERT_KEY_MAX: Final = 400
ALERT_TITLE_MAX: Final = 300

# SQLite only gives an auto-incrementing rowid to INTEGER PRIMARY KEY; BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class TaskOutcome(enum.StrEnum):
    """What became of one slot of a task: stored in ``task_runs.outcome``."""

    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    MISSED = "missed"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"


# The outcomes of a failed slot: what task_state.consecutive_failures counts, what auto-pause, the
# alert rules and the dashboard call failing, and what makes status degraded. A success resets
# the count; cancelled, missed and skipped are neither. Members are str, so they compare equal to
# the stored text and bind as it in SQL.
FAILED_OUTCOMES: Final = frozenset(
    {TaskOutcome.ERROR, TaskOutcome.TIMEOUT, TaskOutcome.INTERRUPTED}
)


class TaskSource(enum.StrEnum):
    """Who defined a task: stored in ``tasks.source``; the task file's sync touches only its own."""

    CLI = "cli"  # nanobot cron add
    FILE = "file"  # the task file, tasks.toml
    CODE = "code"  # CronManager.register_task in Python


class CodeKind(enum.StrEnum):
    """What a row of ``task_code`` describes."""

    MODULE = "module"  # a task module the service imported (or failed to)
    TASK_FILE = "task_file"  # the task file the service synced (or refused)


class ComponentStatus(enum.StrEnum):
    """The health of one component, as in the seed."""

    HEALTHY = "healthy"
    ERROR = "error"
    UNKNOWN = "unknown"


class MisfirePolicy(enum.StrEnum):
    """What to do with slots that passed while nothing could run them (downtime, a busy loop)."""

    CATCH_UP_ONCE = "catch_up_once"  # run the latest missed slot once, record the others missed
    SKIP = "skip"  # run none of them; record them all missed and wait for the next slot


def utcnow() -> datetime:
    return datetime.now(UTC)


def bound_error(text: str | None) -> str | None:
    """Cut an error text to what the database keeps, saying that it was cut."""
    if text is None or len(text) <= ERROR_TEXT_MAX:
        return text
    return text[: ERROR_TEXT_MAX - 20] + " ... [truncated]"


def error_text(error: object) -> str:
    """A bounded, readable text of an error: ``Type: message`` for an exception (its type alone
    when the message is empty), the text itself otherwise. Never raises."""
    try:
        if isinstance(error, BaseException):
            message = str(error)
            text = f"{type(error).__name__}: {message}" if message else type(error).__name__
        else:
            text = str(error)
    except Exception:
        # Its own __str__ raised: name its type rather than fail the caller.
        text = f"{type(error).__name__} (its text cannot be shown)"
    return bound_error(text) or "(no message)"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect; naive datetimes are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: nanobot stores aware UTC datetimes only")
        value = value.astimezone(UTC)
        # SQLite has no time zone type: keep readable ISO text without an offset, always UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Task(Base):
    """A readable copy of each stored task: its definition and its desired state (its next and
    latest run are in :class:`TaskStateRecord`).

    Written by the command line and the scheduler (the control plane); the scheduler applies
    rows whose ``version`` changed. APScheduler's own job row holds the schedule itself.
    """

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    task_class: Mapped[str] = mapped_column(String(500))
    # Interval tasks: the interval. Cron tasks: the longest gap between fires (informational);
    # one-shot tasks: 0. The schedule itself is schedule_kind with cron, timezone or run_at.
    interval_s: Mapped[float] = mapped_column(Float)
    schedule_kind: Mapped[str] = mapped_column(
        String(16), default="interval", server_default="interval"
    )
    cron: Mapped[str | None] = mapped_column(String(200), nullable=True)
    timezone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    run_at: Mapped[datetime | None] = mapped_column(nullable=True)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timeout_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    jitter_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    misfire_policy: Mapped[str] = mapped_column(String(32), default=MisfirePolicy.CATCH_UP_ONCE)
    # The slot that comes while a run still goes (nanobot.cron.overlap); NULL: skip. Under
    # allow, max_concurrent is the most runs at once.
    overlap_policy: Mapped[str | None] = mapped_column(String(16), nullable=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # A run-now request (run_requested_at) given --force: it runs whatever the overlap policy.
    run_forced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A pending backfill (nanobot.cron.backfill): the range of slots to run, how many at once.
    backfill_from: Mapped[datetime | None] = mapped_column(nullable=True)
    backfill_to: Mapped[datetime | None] = mapped_column(nullable=True)
    backfill_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=True)
    anchor_at: Mapped[datetime | None] = mapped_column(nullable=True)
    broken_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    run_requested_at: Mapped[datetime | None] = mapped_column(nullable=True)
    source: Mapped[str] = mapped_column(String(8), default=TaskSource.CLI, server_default="cli")
    # Why a task is paused when nanobot paused it (e.g. "removed from tasks.toml"); None when an
    # operator did.
    pause_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Pause the task after this many consecutive failed slots (None: cron.pause_after_failures;
    # 0: never), and when nanobot last did so (None once resumed or paused by an operator).
    pause_after_failures: Mapped[int | None] = mapped_column(Integer, nullable=True)
    auto_paused_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # healthchecks.io-style pings of each run (nanobot.cron.pings); None: no pings.
    ping_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    # Seconds: a slot reached later than this after its time is recorded missed, not caught up.
    catch_up_window_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Retries of a failed slot (nanobot.cron.retries): how many (0: none) and their backoff as
    # "BASE,FACTOR,MAX[,JITTER]" (None: the default backoff).
    retries: Mapped[int] = mapped_column(Integer, server_default="0")
    retry_backoff: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # The pending retry, written with the failed attempt's outcome so that it survives a
    # restart: attempt retry_attempt of the slot retry_slot, due at retry_at (None: none).
    retry_at: Mapped[datetime | None] = mapped_column(nullable=True)
    retry_slot: Mapped[datetime | None] = mapped_column(nullable=True)
    retry_attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskStateRecord(Base):
    """The run state of each task, apart from its definition: its next slot and its latest run.

    Written at every run, so kept narrow (migration 0012): on PostgreSQL an UPDATE leaves a dead
    copy of the whole row, and in ``tasks`` that copy was about 290 bytes per run. One row per
    task, created with it and deleted with it (the foreign key cascades); read joined to
    ``tasks``. A mirror write of ``next_run_at`` is guarded by ``tasks.version``.

    A later revision that copies ``tasks`` in batch mode on SQLite drops the old table, which
    with foreign keys on deletes these rows by the cascade: it keeps them aside first, as
    revision 0012 does.
    """

    __tablename__ = "task_state"

    task_name: Mapped[str] = mapped_column(
        String(NAME_MAX),
        ForeignKey("tasks.name", ondelete="CASCADE", onupdate="CASCADE"),
        primary_key=True,
    )
    next_run_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_run_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class TaskRun(Base):
    """One row per run, or per missed or skipped slot. A slot is claimed here before it runs."""

    __tablename__ = "task_runs"
    __table_args__ = (
        # One attempt of a slot can never run twice, not even with two processes on one
        # database (attempt 1 is the slot's run; retries are 2, 3...).
        UniqueConstraint("task_name", "scheduled_at", "attempt"),
        Index("ix_task_runs_scheduled_at", "scheduled_at"),
        Index("ix_task_runs_outcome", "outcome"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_name: Mapped[str] = mapped_column(String(NAME_MAX))
    scheduled_at: Mapped[datetime]
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A missed row may stand for several slots: scheduled_at is the first, slots how many.
    slots: Mapped[int] = mapped_column(Integer, default=1)
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    node: Mapped[str | None] = mapped_column(String(NAME_MAX), nullable=True)
    # The tail of a shell command's output (stdout and stderr), capped by the command task.
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Which attempt of its slot this row is: 1 for the slot's run, 2... for its retries.
    attempt: Mapped[int] = mapped_column(Integer, server_default="1")


class TaskCode(Base):
    """What task code each node runs: the modules it imported and the task file it synced.

    Written by the service at start (and by each sync of the task file); read by ``status``, which
    compares ``mtime`` with the file on disk to tell that the code running is older.
    """

    __tablename__ = "task_code"

    node: Mapped[str] = mapped_column(String(NAME_MAX), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(500), primary_key=True)
    origin: Mapped[str | None] = mapped_column(Text, nullable=True)
    mtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    loaded_at: Mapped[datetime]
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Component(Base):
    """The latest known state of one component on one node."""

    __tablename__ = "components"
    __table_args__ = (UniqueConstraint("name", "node"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    node: Mapped[str] = mapped_column(String(NAME_MAX))
    status: Mapped[str] = mapped_column(String(16))
    last_heartbeat: Mapped[datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ComponentErrorRecord(Base):
    __tablename__ = "component_errors"
    __table_args__ = (Index("ix_component_errors_component_node_at", "component", "node", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    component: Mapped[str] = mapped_column(String(NAME_MAX))
    node: Mapped[str] = mapped_column(String(NAME_MAX))
    at: Mapped[datetime] = mapped_column(index=True)
    error: Mapped[str] = mapped_column(Text)


class ComponentStatusChange(Base):
    __tablename__ = "component_status_changes"
    __table_args__ = (
        Index("ix_component_status_changes_component_node_at", "component", "node", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    component: Mapped[str] = mapped_column(String(NAME_MAX))
    node: Mapped[str] = mapped_column(String(NAME_MAX))
    at: Mapped[datetime] = mapped_column(index=True)
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Heartbeat(Base):
    """One row per monitor cycle of one node."""

    __tablename__ = "heartbeats"
    __table_args__ = (Index("ix_heartbeats_node_at", "node", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    node: Mapped[str] = mapped_column(String(NAME_MAX))
    status: Mapped[str] = mapped_column(String(16))
    interval_s: Mapped[float] = mapped_column(Float)
    total: Mapped[int] = mapped_column(Integer)
    healthy: Mapped[int] = mapped_column(Integer)
    error: Mapped[int] = mapped_column(Integer)
    unknown: Mapped[int] = mapped_column(Integer)


class SessionRecord(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_active_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class DatabaseIdentity(Base):
    """One row: a random id made when this database was created (migration 0013), shared by no
    other database. The database guard remembers it (``database.json``) to tell a new, empty
    database from the same one emptied on purpose; a file's inode number cannot: once the old
    file is deleted, the new one at the path often gets the same number."""

    __tablename__ = "database_identity"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)


class SchedulerLease(Base):
    """Who may schedule: one row per lease name, held by one node until it expires.

    ``epoch`` grows by one at every change of holder, so a write can be fenced by it.
    """

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(String(NAME_MAX), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(NAME_MAX), nullable=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    acquired_at: Mapped[datetime | None] = mapped_column(nullable=True)
    renewed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)


class AlertRecord(Base):
    """One alert of the outbox (:mod:`nanobot.alerts.store`): written in the transaction that
    decided it, delivered later to each destination (``alert_deliveries``)."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The idempotency key: the same transition always gets the same key, so it is written once
    # and a receiver that stores keys sees it once, whatever is retried.
    key: Mapped[str] = mapped_column(String(ALERT_KEY_MAX), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(ALERT_KEY_MAX))
    severity: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(ALERT_TITLE_MAX))
    body: Mapped[str] = mapped_column(Text)
    link: Mapped[str | None] = mapped_column(Text, nullable=True)
    # How many transitions the alert stands for (flips of a flapping subject, members of a group).
    count: Mapped[int] = mapped_column(Integer, default=1)
    members: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(index=True)


class AlertDelivery(Base):
    """The delivery of one alert to one destination: its state, attempts and last error."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "destination"),
        Index("ix_alert_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(BigId)
    destination: Mapped[str] = mapped_column(String(NAME_MAX))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(nullable=True)


class AlertSubject(Base):
    """What the alert rules last told about one subject (a task, a component, the lead).

    ``alerted`` is the state that people were last told, ``observed`` the latest one seen;
    ``flips`` counts changes held back by the cooldown since ``last_alert_at``; ``seq`` numbers
    the subject's alerts (part of their idempotency keys).
    """

    __tablename__ = "alert_subjects"

    key: Mapped[str] = mapped_column(String(ALERT_KEY_MAX), primary_key=True)
    alerted: Mapped[str] = mapped_column(String(NAME_MAX))
    observed: Mapped[str] = mapped_column(String(NAME_MAX))
    flips: Mapped[int] = mapped_column(Integer, default=0)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    last_alert_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # The time of the newest event consumed for this subject (a status change's ``at``).
    cursor_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# APScheduler 3's job table as nanobot's job store (nanobot.cron.aps_adapter.NanobotJobStore)
# keeps it: the columns of the layout SQLAlchemyJobStore creates (id up to 191 characters for
# MySQL's key limit, an 8-byte float epoch) except the pickled job state, kept in
# apscheduler_job_states below. Declared here so that the migrations create them and
# ``alembic check`` sees no drift.
apscheduler_jobs = Table(
    "apscheduler_jobs",
    Base.metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
)

# The pickled state of each job, apart from its next run time (migration 0008): a run moves
# its job's next run time, and on PostgreSQL an UPDATE leaves a dead copy of the whole row;
# with the state beside it, that copy was about 600 bytes per run instead of a few dozen.
apscheduler_job_states = Table(
    "apscheduler_job_states",
    Base.metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("job_state", LargeBinary, nullable=False),
)
