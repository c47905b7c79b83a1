"""The engine factory: SQLite settings on every connection, IMMEDIATE write transactions, UTC."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select, text, update
from sqlalchemy.exc import OperationalError, StatementError

from nanobot.db import (
    SQLITE_BUSY_TIMEOUT_MS,
    checkpoint,
    create_db_engine,
    get_engine,
    read_transaction,
    upgrade_database,
    write_transaction,
)
from nanobot.exceptions import DatabaseError
from nanobot.models import SessionRecord

# Every wait on another thread is bounded by this; a deadlock fails the test instead of hanging.
JOIN_S = 15.0


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db' / 'nanobot.db'}")
    with write_transaction(engine) as conn:
        conn.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO counter (id, n) VALUES (1, 0)"))
    yield engine
    engine.dispose()


def _pragmas(conn: object) -> dict[str, object]:
    values = {}
    for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys"):
        values[name] = conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # type: ignore[attr-defined]
    return values


def test_sqlite_connections_have_nanobot_settings(sqlite_engine: Engine) -> None:
    """Every pooled SQLite connection runs in WAL, waits for locks, syncs NORMAL, checks FKs."""
    with sqlite_engine.connect() as first, sqlite_engine.connect() as second:
        for conn in (first, second):
            pragmas = _pragmas(conn)
            assert pragmas["journal_mode"] == "wal"
            assert int(pragmas["busy_timeout"]) >= 5000  # type: ignore[call-overload]
            assert pragmas["synchronous"] == 1  # NORMAL
            assert pragmas["foreign_keys"] == 1
    assert SQLITE_BUSY_TIMEOUT_MS >= 5000


def test_sqlite_parent_folder_is_created(tmp_path: Path) -> None:
    """A SQLite URL in a folder that does not exist yet creates the folder."""
    path = tmp_path / "a" / "b" / "nanobot.db"
    engine = create_db_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert path.parent.is_dir()
    assert path.is_file()


def test_unsupported_url_is_refused() -> None:
    """create_db_engine refuses a URL of another database with DatabaseError."""
    with pytest.raises(DatabaseError, match="unsupported database URL"):
        create_db_engine("mysql+pymysql://u@localhost/db")


def test_get_engine_is_one_per_configured_url(db_url: str) -> None:
    """get_engine returns the engine of the configured database, the same one each time."""
    engine = get_engine()
    assert engine is get_engine()
    assert engine.url.get_backend_name() in {"sqlite", "postgresql"}
    assert engine.url.database == create_db_engine(db_url).url.database


def _read_then_write(conn: object, other_commits: threading.Event | None = None) -> None:
    n = conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()  # type: ignore[attr-defined]
    if other_commits is not None:
        other_commits.set()
    conn.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})  # type: ignore[attr-defined]


def _increment_in_thread(engine: Engine, errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            with write_transaction(engine) as conn:
                _read_then_write(conn)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _counter(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one())


def test_deferred_read_then_write_fails_when_another_connection_commits(
    sqlite_engine: Engine,
) -> None:
    """A deferred transaction that read before another commit cannot write: database is locked.

    This is what write_transaction avoids; busy_timeout does not help here, the error is at once.
    """
    errors: list[BaseException] = []
    with sqlite_engine.connect() as conn:
        conn.begin()  # BEGIN (deferred): takes a read snapshot at the first SELECT
        n = conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()
        other = _increment_in_thread(sqlite_engine, errors)
        other.join(JOIN_S)
        assert not other.is_alive()
        assert errors == []
        with pytest.raises(OperationalError, match="database is locked"):
            conn.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
        conn.rollback()
    assert _counter(sqlite_engine) == 1


def test_write_transaction_read_then_write_survives_a_concurrent_writer(
    sqlite_engine: Engine,
) -> None:
    """With BEGIN IMMEDIATE the second writer waits for the first; both increments land."""
    errors: list[BaseException] = []
    read_done = threading.Event()
    with write_transaction(sqlite_engine) as conn:
        _read_then_write(conn, read_done)
        assert read_done.is_set()
        # The other writer starts while this transaction holds the write lock: it must wait.
        other = _increment_in_thread(sqlite_engine, errors)
    other.join(JOIN_S)
    assert not other.is_alive()
    assert errors == []
    assert _counter(sqlite_engine) == 2


def test_many_concurrent_write_transactions_lose_no_update(sqlite_engine: Engine) -> None:
    """Eight threads incrementing through write_transaction end at eight, none locked out."""
    errors: list[BaseException] = []
    threads = [_increment_in_thread(sqlite_engine, errors) for _ in range(8)]
    for thread in threads:
        thread.join(JOIN_S)
        assert not thread.is_alive()
    assert errors == []
    assert _counter(sqlite_engine) == 8


def test_a_checkpoint_gives_up_on_an_old_reader_instead_of_holding_up_writers(
    sqlite_engine: Engine,
) -> None:
    """A TRUNCATE checkpoint holds the write lock while it waits for readers of an older
    snapshot. It waits briefly, checkpoints what it can and returns while the reader still
    reads; a write then commits. Once the reader is gone the next one truncates the log. (It
    used to wait the whole busy timeout, 10 s, and every writer with it: under a burst's reads
    the leader's lease renewal timed out and the leader stepped down.)"""
    path = str(sqlite_engine.url.database)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT n FROM counter").fetchall() == [(0,)]  # its snapshot
        with write_transaction(sqlite_engine) as conn:
            _read_then_write(conn)  # a frame the reader's snapshot does not have
        done = threading.Event()

        def run() -> None:
            checkpoint(sqlite_engine)
            done.set()

        threading.Thread(target=run, daemon=True).start()
        assert done.wait(SQLITE_BUSY_TIMEOUT_MS / 2000), "the checkpoint waited for the reader"
        errors: list[BaseException] = []
        writer = _increment_in_thread(sqlite_engine, errors)
        writer.join(JOIN_S)
        assert not writer.is_alive()
        assert errors == []
        assert reader.execute("SELECT n FROM counter").fetchall() == [(0,)]  # still reading
    finally:
        reader.rollback()
        reader.close()
    assert _counter(sqlite_engine) == 2
    checkpoint(sqlite_engine)
    assert Path(path + "-wal").stat().st_size == 0


def test_write_transaction_rolls_back_on_error(engine: Engine) -> None:
    """An exception inside write_transaction leaves nothing written (both databases)."""
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def insert_then_fail() -> None:
        with write_transaction(engine) as conn:
            conn.execute(
                insert(SessionRecord).values(
                    id="rolled-back", created_at=now, last_active_at=now, expires_at=now, data={}
                )
            )
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        insert_then_fail()
    with read_transaction(engine) as conn:
        assert conn.execute(select(SessionRecord.id)).all() == []


def test_same_code_works_on_both_databases(engine: Engine) -> None:
    """Insert, update and read through write/read_transaction on SQLite and PostgreSQL."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with write_transaction(engine) as conn:
        conn.execute(
            insert(SessionRecord).values(
                id="s1", created_at=now, last_active_at=now, expires_at=now, data={"a": [1, 2]}
            )
        )
    with write_transaction(engine) as conn:
        conn.execute(update(SessionRecord).values(data={"a": [3]}))
    with read_transaction(engine) as conn:
        row = conn.execute(select(SessionRecord.id, SessionRecord.data)).one()
    assert tuple(row) == ("s1", {"a": [3]})


def test_timestamps_round_trip_as_aware_utc(engine: Engine) -> None:
    """A datetime in any zone is stored as UTC and reads back aware, in UTC, the same instant."""
    paris = timezone(timedelta(hours=2))
    at = datetime(2026, 6, 1, 14, 30, 15, 123456, tzinfo=paris)
    with write_transaction(engine) as conn:
        conn.execute(
            insert(SessionRecord).values(
                id="tz", created_at=at, last_active_at=at, expires_at=at, data={}
            )
        )
    with read_transaction(engine) as conn:
        got = conn.execute(select(SessionRecord.expires_at)).scalar_one()
    assert got == at
    assert got.utcoffset() == timedelta(0)
    assert got.hour == 12


def test_naive_datetime_is_refused(engine: Engine) -> None:
    """A naive datetime never reaches the database."""
    naive = datetime(2026, 6, 1, 12, 0)  # naive on purpose
    with pytest.raises(StatementError, match="naive datetime"), write_transaction(engine) as conn:
        conn.execute(
            insert(SessionRecord).values(
                id="naive", created_at=naive, last_active_at=naive, expires_at=naive, data={}
            )
        )


def test_sqlite_stores_readable_iso_text(tmp_path: Path) -> None:
    """On SQLite a datetime column holds ISO-8601 text in UTC, readable by the sqlite3 module."""
    path = tmp_path / "nanobot.db"
    engine = create_db_engine(f"sqlite:///{path}")
    try:
        upgrade_database(engine)
        at = datetime(2026, 6, 1, 14, 30, 15, tzinfo=timezone(timedelta(hours=2)))
        with write_transaction(engine) as conn:
            conn.execute(
                insert(SessionRecord).values(
                    id="raw", created_at=at, last_active_at=at, expires_at=at, data={"k": 1}
                )
            )
    finally:
        engine.dispose()
    raw = sqlite3.connect(path)
    try:
        stored, data = raw.execute("SELECT expires_at, data FROM sessions").fetchone()
    finally:
        raw.close()
    assert isinstance(stored, str)
    assert stored.startswith("2026-06-01 12:30:15")
    assert datetime.fromisoformat(stored) == datetime(2026, 6, 1, 12, 30, 15)
    assert data == '{"k": 1}'
