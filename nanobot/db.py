"""The one engine factory, transactions that do not deadlock on SQLite, and migrations.

Everything that touches the database (the models, APScheduler's job store, the command line,
Alembic) gets its engine from :func:`get_engine`, so the SQLite settings below hold everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from nanobot.config import Config, get_config
from nanobot.exceptions import DatabaseError, SchemaTooNewError

if TYPE_CHECKING:  # Alembic is imported where it is used: a process that does not migrate
    # (the scheduler's worker, the command line's readers) saves a quarter of a second.
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
# Any constant key for the PostgreSQL advisory lock that serialises migrations.
_PG_MIGRATION_LOCK: Final = 0x6E616E6F  # "nano"

_engines: dict[str, Engine] = {}
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
    finally:
        cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that reads and then writes fails with "database is locked" when
    # another connection committed in between, whatever busy_timeout says; a transaction that
    # will write must take the write lock up front.
    if conn.get_execution_options().get("nanobot_write", False):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def create_db_engine(url: str, *, echo: bool = False) -> Engine:
    """A new engine for ``url`` with nanobot's connection settings."""
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
        return create_engine(parsed, echo=echo, pool_pre_ping=True)
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
            engine = create_db_engine(url, echo=bool(cfg.get("database.echo", False)))
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
    """A transaction that will write: BEGIN IMMEDIATE on SQLite, a plain BEGIN elsewhere."""
    with engine.connect() as conn:
        conn = conn.execution_options(nanobot_write=True)
        with conn.begin():
            yield conn


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent snapshot."""
    with engine.connect() as conn, conn.begin():
        yield conn


# --- migrations -------------------------------------------------------------------------------


def migrations_dir() -> Path:
    """The folder of the Alembic scripts (the repository's migrations/, shipped in the package)."""
    return Path(str(resources.files("nanobot._migrations")))


def alembic_config(engine: Engine | None = None) -> AlembicConfig:
    """An Alembic configuration on nanobot's scripts, bound to ``engine`` if one is given."""
    from alembic.config import Config as AlembicConfig

    repo_ini = migrations_dir().parent / "alembic.ini"
    cfg = AlembicConfig(str(repo_ini)) if repo_ini.is_file() else AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _is_known_revision(script: ScriptDirectory, revision: str) -> bool:
    from alembic.util import CommandError

    # get_revision raises CommandError, rather than returning None, for an id it cannot locate.
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def check_schema_known(engine: Engine) -> None:
    """Refuse a database migrated by a newer nanobot than this one."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    current = current_revision(engine)
    if current is not None and not _is_known_revision(script, current):
        raise SchemaTooNewError(
            f"the database is at schema revision {current!r}, which this nanobot does not know "
            f"(its newest is {script.get_current_head()!r}): upgrade nanobot, or point "
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


def upgrade_database(engine: Engine, revision: str = "head") -> None:
    """Apply pending migrations up to ``revision``; refuse a database newer than the code."""
    try:
        with _migration_lock(engine):
            check_schema_known(engine)
            before = current_revision(engine)
            from alembic import command

            command.upgrade(alembic_config(engine), revision)
            after = current_revision(engine)
    except SchemaTooNewError:
        raise
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot migrate {engine.url!r}: {exc.__class__.__name__}: {exc}"
        ) from exc
    if before != after:
        log.info("db.migrated", url=engine.url.render_as_string(), before=before, after=after)


def downgrade_database(engine: Engine, revision: str) -> None:
    with _migration_lock(engine):
        from alembic import command

        command.downgrade(alembic_config(engine), revision)
