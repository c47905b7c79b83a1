"""The one engine factory, transactions that do not deadlock on SQLite, and migrations.

Everything that touches the database (the models, APScheduler's job store, the command line,
Alembic) gets its engine from :func:`get_engine`, so the settings below hold everywhere.

Limits, so that no process can hold the others up whatever happens to it:

- SQLite: the write-ahead log is truncated back to ``journal_size_limit`` after each checkpoint,
  and :func:`checkpoint` (which the service calls every lease period) folds it into the
  database and truncates it, so that a burst of writes does not leave a log of tens of
  megabytes behind on a disk that may be short of space.
- PostgreSQL: every connection of the engine has server-side limits (:class:`SessionLimits`,
  derived from ``service.lease_ttl``): a lock wait (``lock_timeout``), a session left idle in a
  transaction (``idle_in_transaction_session_timeout``: a process frozen or cut off inside a
  transaction has its session ended by the server, and its row locks freed), a statement
  (``statement_timeout``), and TCP keepalives on both sides plus ``tcp_user_timeout`` so that a
  peer gone silent is noticed in seconds, not after the system's 2-hour keepalive. Migrations run
  on a connection without the statement and lock limits (they may legitimately be long).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from nanobot.config import Config, get_config
from nanobot.exceptions import DatabaseError, SchemaTooNewError
from nanobot.models import DatabaseIdentity, Task, error_text
from nanobot.writer_queue import WriterQueue

# Alembic is imported where it is used (each such import says `noqa: PLC0415 -- alembic`): a
# process that does not migrate (the scheduler's worker, the command line's readers) saves a
# quarter of a second.
if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
# How long a checkpoint waits for readers. Every writer waits while it does (it holds the write
# lock): with the 10 s above, the readers of a 20,000-task burst kept a checkpoint waiting 10 s,
# and the leader's lease renewal with it, until the lease was lost.
CHECKPOINT_BUSY_TIMEOUT_MS: Final = 100
# The write-ahead log is truncated to this size after a checkpoint (SQLite's default keeps it
# at its largest, which under a burst grew to 30 MB and never shrank).
SQLITE_JOURNAL_SIZE_LIMIT: Final = 1024 * 1024
# The most values one IN list of a statement carries: some databases refuse long ones (SQLite
# before 3.32 took at most 999 parameters per statement).
IN_MAX: Final = 500
# Any constant key for the PostgreSQL advisory lock that serialises migrations.
_PG_MIGRATION_LOCK: Final = 0x6E616E6F  # "nano"

_engines: dict[str, Engine] = {}
_writer_queues: dict[str, WriterQueue] = {}
_engines_lock = threading.Lock()


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook below emit BEGIN itself, instead of pysqlite's own implicit
    # and deferred BEGIN, so that write transactions can ask for BEGIN IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_JOURNAL_SIZE_LIMIT}")
    finally:
        cursor.close()


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Server-side limits of every PostgreSQL session of an engine, in seconds (0: none)."""

    lock_timeout: float
    idle_in_transaction_timeout: float
    statement_timeout: float
    keepalive_idle: int

    @classmethod
    def for_lease(cls, ttl: float, statement_timeout: float) -> SessionLimits:
        """Limits that keep fail-over within the lease's bound (ttl + ttl/3):

        - a session idle inside a transaction (a frozen leader holding the lease row FOR SHARE)
          is ended by the server after one ttl;
        - no statement waits for a lock longer than a ninth of the lease: a statement of the
          frozen leader already waiting behind its own idle transaction would otherwise get the
          locks when that one ends, and hold the lease row for another ttl (measured: more than
          twice the bound); a standby's acquire gives up in time for its next poll.
        """
        period = ttl / 3
        return cls(
            lock_timeout=period / 3,
            idle_in_transaction_timeout=ttl,
            statement_timeout=statement_timeout,
            keepalive_idle=max(1, math.ceil(period)),
        )

    def options(self) -> str:
        """The libpq ``options`` string that sets them at connect (no extra round trip)."""
        settings = {
            "lock_timeout": _ms(self.lock_timeout),
            "idle_in_transaction_session_timeout": _ms(self.idle_in_transaction_timeout),
            "statement_timeout": _ms(self.statement_timeout),
            "tcp_keepalives_idle": str(self.keepalive_idle),
            "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": "3",
        }
        return " ".join(f"-c {key}={value}" for key, value in settings.items())

    def connect_args(self, existing_options: str | None) -> dict[str, Any]:
        """Client-side keepalives, and the server-side settings after the URL's own options."""
        options = self.options()
        if existing_options:
            options = f"{existing_options} {options}"
        return {
            "options": options,
            "keepalives": 1,
            "keepalives_idle": self.keepalive_idle,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            # Data sent and not acknowledged for this long (a peer gone, a cable cut) ends the
            # connection: a thread waiting on it returns instead of waiting for hours.
            "tcp_user_timeout": int(max(self.keepalive_idle, self.idle_in_transaction_timeout))
            * 1000,
            "connect_timeout": max(2, self.keepalive_idle),
        }


def _ms(seconds: float) -> str:
    return str(max(0, int(seconds * 1000)))


def _on_sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that reads and then writes fails with "database is locked" when
    # another connection committed in between, whatever busy_timeout says; a transaction that
    # will write must take the write lock up front.
    if conn.get_execution_options().get("nanobot_write", False):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def create_db_engine(
    url: str, *, echo: bool = False, limits: SessionLimits | None = None
) -> Engine:
    """A new engine for ``url`` with nanobot's connection settings (and, on PostgreSQL, the
    session ``limits`` if given)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            # psycopg 3 is the driver nanobot installs; plain postgresql:// would ask for psycopg2.
            parsed = parsed.set(drivername="postgresql+psycopg")
        connect_args: dict[str, Any] = {}
        if limits is not None:
            existing = parsed.query.get("options")
            # connect_args win over the URL's query: the URL's own options come first in it.
            connect_args = limits.connect_args(existing if isinstance(existing, str) else None)
        return create_engine(parsed, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    raise DatabaseError(
        f"unsupported database URL {url!r}: use sqlite:/// or postgresql+psycopg://"
    )


def get_engine(config: Config | None = None) -> Engine:
    """The process-wide engine of the configured database (one per URL)."""
    cfg = config or get_config()
    url = cfg.database_url
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            limits = SessionLimits.for_lease(
                float(cfg.get("service.lease_ttl", 10.0)),
                float(cfg.get("database.statement_timeout", 60.0)),
            )
            engine = create_db_engine(
                url, echo=bool(cfg.get("database.echo", False)), limits=limits
            )
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (at shutdown, and between tests)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: BEGIN IMMEDIATE on SQLite, a plain BEGIN elsewhere. On
    SQLite this process's writers take their turn first (:mod:`nanobot.writer_queue`)."""
    queue = _writer_queue(engine)
    turn = queue.turn(SQLITE_BUSY_TIMEOUT_MS / 1000) if queue else contextlib.nullcontext()
    with turn, engine.connect() as conn:
        conn = conn.execution_options(nanobot_write=True)
        with conn.begin():
            yield conn


def _writer_queue(engine: Engine) -> WriterQueue | None:
    """The queue of this process's writers of ``engine``'s SQLite file (None elsewhere): one
    per file, whatever the engines on it."""
    if engine.dialect.name != "sqlite":
        return None
    key = str(engine.url.database)
    with _engines_lock:
        queue = _writer_queues.get(key)
        if queue is None:
            queue = _writer_queues[key] = WriterQueue()
        return queue


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent snapshot."""
    with engine.connect() as conn, conn.begin():
        yield conn


def checkpoint(engine: Engine) -> None:
    """SQLite: fold the write-ahead log into the database and truncate it to nothing.

    Run outside any transaction (on the raw, autocommit connection), in this process's turn
    among its writers (:mod:`nanobot.writer_queue`). A TRUNCATE checkpoint holds SQLite's write
    lock while it waits for readers of an older snapshot, so it waits for them at most
    :data:`CHECKPOINT_BUSY_TIMEOUT_MS`, then does the part it can without them, which the next
    call finishes. Nothing on other databases.
    """
    queue = _writer_queue(engine)
    if queue is None:
        return
    with queue.turn(SQLITE_BUSY_TIMEOUT_MS / 1000):
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_TIMEOUT_MS}")
                try:
                    cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    cursor.fetchall()
                finally:
                    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            finally:
                cursor.close()
        finally:
            raw.close()


def ping(engine: Engine) -> bool:
    """``SELECT 1`` on a connection of ``engine``: True when the database answers (an error
    says why it does not)."""
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT 1")).scalar_one() == 1)


def count_tasks(engine: Engine) -> int:
    """How many tasks the database stores, apart from the built-in ones (which every leader
    stores again at its start)."""
    query = (
        select(func.count())
        .select_from(Task)
        .where(Task.task_class.not_like("nanobot.cron.builtin:%"))
    )
    with read_transaction(engine) as conn:
        return int(conn.execute(query).scalar_one())


def database_id(engine: Engine) -> str | None:
    """The random id this database was given when it was created (:class:`DatabaseIdentity`);
    None if it has none."""
    with read_transaction(engine) as conn:
        return conn.execute(select(DatabaseIdentity.id).limit(1)).scalar_one_or_none()


# --- migrations -------------------------------------------------------------------------------


def migrations_dir() -> Path:
    """The folder of the Alembic scripts (the repository's migrations/, shipped in the package)."""
    return Path(str(resources.files("nanobot._migrations")))


def alembic_config(engine: Engine | None = None) -> AlembicConfig:
    """An Alembic configuration on nanobot's scripts, bound to ``engine`` if one is given."""
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415 -- alembic

    repo_ini = migrations_dir().parent / "alembic.ini"
    cfg = AlembicConfig(str(repo_ini)) if repo_ini.is_file() else AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


# Alembic's table of the revision a database is at (one row: the migrations form one line).
_VERSION_TABLE: Final = "alembic_version"


def head_revision() -> str:
    """The newest schema revision this nanobot knows.

    Every script is named ``<date>_<revision>_<what>.py`` and the revisions are numbered in
    order (tests/test_migrations.py checks both against Alembic's own reading): the head is the
    highest, known without importing Alembic, which took a tenth of the service's start."""
    return max(
        path.name.split("_")[1] for path in (migrations_dir() / "versions").glob("[0-9]*_*_*.py")
    )


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at; None if it was never migrated (no version
    table, or an empty one). Read with plain SQL, for the same reason as :func:`head_revision`."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(_VERSION_TABLE):
            return None
        return conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalar()


def _is_known_revision(script: ScriptDirectory, revision: str) -> bool:
    from alembic.util import CommandError  # noqa: PLC0415 -- alembic

    # get_revision raises CommandError, rather than returning None, for an id it cannot locate.
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def check_schema_known(engine: Engine) -> None:
    """Refuse a database migrated by a newer nanobot than this one."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415 -- alembic

    script = ScriptDirectory.from_config(alembic_config())
    current = current_revision(engine)
    if current is not None and not _is_known_revision(script, current):
        raise SchemaTooNewError(
            f"the database is newer than this nanobot: it is at schema revision {current!r}, "
            f"which this nanobot does not know (its newest is {script.get_current_head()!r}): "
            "upgrade nanobot, or point "
            "database.url at another database"
        )


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations between processes that start at the same moment."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).expanduser().with_name(Path(database).name + ".migrate.lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _unlimited(engine: Engine) -> Iterator[Engine]:
    """An engine on the same database without the session limits (for migrations, which may
    wait for another process's migration and run long statements)."""
    if engine.dialect.name != "postgresql":
        yield engine
        return
    # The URL keeps its own options (a search_path, say); the limits live in connect_args.
    plain = create_engine(engine.url, poolclass=NullPool, echo=engine.echo)
    try:
        yield plain
    finally:
        plain.dispose()


def upgrade_database(engine: Engine, revision: str = "head") -> None:
    """Apply pending migrations up to ``revision``; refuse a database newer than the code."""
    if revision == "head":
        try:
            current = current_revision(engine)
        except SQLAlchemyError:
            current = None  # the migration below says what is wrong
        if current is not None and current == head_revision():
            return  # nothing to do: no second connection, no migration lock
    with _unlimited(engine) as plain:
        _upgrade(plain, revision)


def _upgrade(engine: Engine, revision: str) -> None:
    try:
        with _migration_lock(engine):
            check_schema_known(engine)
            before = current_revision(engine)
            from alembic import command  # noqa: PLC0415 -- alembic

            command.upgrade(alembic_config(engine), revision)
            after = current_revision(engine)
    except SchemaTooNewError:
        raise
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot migrate {engine.url!r}: {error_text(exc)}") from exc
    if before != after:
        log.info("db.migrated", url=engine.url.render_as_string(), before=before, after=after)


def downgrade_database(engine: Engine, revision: str) -> None:
    # Without the session limits, as for upgrades: waiting for the migration lock held by a
    # migration elsewhere is not a lock timeout.
    with _unlimited(engine) as plain, _migration_lock(plain):
        from alembic import command  # noqa: PLC0415 -- alembic

        command.downgrade(alembic_config(plain), revision)
