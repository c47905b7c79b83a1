"""The checks that a lost database is noticed (nanobot.database_file), on real files: the watch
of the open SQLite file and the marker of the last database, and the guard's check at start on a
real database. The service's side of both (the fault stops scheduling, status says so) is the
fault suite's tests/faults/test_database_file.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text

from nanobot.cron import control
from nanobot.database_file import MARKER_FILE, DatabaseFileWatch, DatabaseMarker
from nanobot.database_guard import RECREATED, DatabaseGuard
from nanobot.db import create_db_engine, upgrade_database
from nanobot.models import utcnow

URL = "sqlite:////srv/nanobot.db"


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    path = tmp_path / "nanobot.db"
    path.write_bytes(b"the database in use")
    return path


def test_the_watch_is_quiet_while_the_file_is_the_one_opened(db_file: Path) -> None:
    watch = DatabaseFileWatch(db_file)
    db_file.write_bytes(b"written in place: the same file")
    assert watch.problem() is None
    assert watch.reason() is None


def test_the_watch_notices_a_deleted_file(db_file: Path) -> None:
    watch = DatabaseFileWatch(db_file)
    db_file.unlink()
    problem = watch.problem()
    assert problem is not None
    assert f"database file {db_file} was deleted while the service ran" in problem
    assert watch.reason() == "deleted"


def test_the_watch_notices_a_file_replaced_at_the_path(db_file: Path, tmp_path: Path) -> None:
    """Another file moved to the path (a restore from backup while the service runs)."""
    watch = DatabaseFileWatch(db_file)
    other = tmp_path / "restored.db"
    other.write_bytes(b"another database")
    os.replace(other, db_file)
    problem = watch.problem()
    assert problem is not None
    assert "was replaced while the service ran" in problem
    assert watch.reason() == "replaced"


def test_the_watch_has_nothing_to_say_of_a_file_that_was_not_there_at_start(
    tmp_path: Path,
) -> None:
    watch = DatabaseFileWatch(tmp_path / "later.db")
    (tmp_path / "later.db").write_bytes(b"created afterwards")
    assert watch.problem() is None
    assert watch.reason() is None


def test_the_marker_remembers_the_database_and_accepts_the_same_one(
    tmp_path: Path, db_file: Path
) -> None:
    """Written at a start with tasks; the same file emptied on purpose later is not a loss."""
    marker = DatabaseMarker(tmp_path, URL, db_file)
    marker.write(3)
    record = marker.read()
    assert record is not None
    assert (record.url, record.tasks) == (URL, 3)
    assert (record.device, record.inode) == (db_file.stat().st_dev, db_file.stat().st_ino)
    assert marker.lost_database(tasks=0) is None
    assert marker.lost_database(tasks=2) is None


def test_the_marker_notices_a_new_empty_file_where_one_with_tasks_was(
    tmp_path: Path, db_file: Path
) -> None:
    DatabaseMarker(tmp_path, URL, db_file).write(3)
    # The old file moved away (it keeps its inode, so the new one cannot reuse it), and a new,
    # empty database created at the path.
    os.replace(db_file, tmp_path / "old.db")
    db_file.write_bytes(b"")
    problem = DatabaseMarker(tmp_path, URL, db_file).lost_database(tasks=0)
    assert problem is not None
    assert problem.startswith(f"a new database file was created at {db_file}")
    assert "had 3 stored task(s)" in problem
    assert f"delete {tmp_path / MARKER_FILE} to accept the new one" in problem


def test_the_marker_of_a_server_database_compares_task_counts_only(tmp_path: Path) -> None:
    """PostgreSQL has no file: an empty database under the remembered URL is the loss."""
    url = "postgresql+psycopg://db.example/nanobot"
    DatabaseMarker(tmp_path, url, None).write(5)
    problem = DatabaseMarker(tmp_path, url, None).lost_database(tasks=0)
    assert problem is not None
    assert problem.startswith("the database is empty: the one this node used before had 5")
    assert DatabaseMarker(tmp_path, "postgresql+psycopg://other/db", None).lost_database(0) is None


@pytest.mark.parametrize("content", ["not json", '{"url": 1}', '["a list"]', '{"tasks": "x"}'])
def test_an_unreadable_marker_is_no_marker(tmp_path: Path, content: str) -> None:
    (tmp_path / MARKER_FILE).write_text(content)
    marker = DatabaseMarker(tmp_path, URL, None)
    assert marker.read() is None
    assert marker.lost_database(tasks=0) is None


def test_a_marker_that_cannot_be_written_does_not_stop_the_service(tmp_path: Path) -> None:
    """A home that is not a folder: the write fails quietly and leaves no temporary file."""
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    DatabaseMarker(home, URL, None).write(1)
    assert DatabaseMarker(home, URL, None).read() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home-is-a-file"]


def test_a_new_database_that_reuses_the_old_inode_is_noticed_by_its_id(
    tmp_path: Path, db_file: Path
) -> None:
    """The file deleted and a new one created at the path can get the same inode number: the
    database's own id (migration 0013) tells them apart; the same id emptied is not a loss."""
    DatabaseMarker(tmp_path, URL, db_file).write(3, "id-of-the-old-database")
    same_file = DatabaseMarker(tmp_path, URL, db_file)  # the same device and inode numbers
    problem = same_file.lost_database(tasks=0, database_id="id-of-a-new-database")
    assert problem is not None
    assert problem.startswith(f"a new database file was created at {db_file}")
    assert "had 3 stored task(s)" in problem
    assert same_file.lost_database(tasks=0, database_id="id-of-the-old-database") is None
    assert same_file.lost_database(tasks=1, database_id="id-of-a-new-database") is None


def test_a_marker_without_an_id_falls_back_to_the_file_identity(
    tmp_path: Path, db_file: Path
) -> None:
    """A marker written before databases had an id: the device and inode numbers decide."""
    DatabaseMarker(tmp_path, URL, db_file).write(3)
    assert DatabaseMarker(tmp_path, URL, db_file).lost_database(0, "any-id") is None
    url = "postgresql+psycopg://db.example/nanobot"
    DatabaseMarker(tmp_path, url, None).write(5, "old")
    problem = DatabaseMarker(tmp_path, url, None).lost_database(0, "new")
    assert problem is not None
    assert problem.startswith("a new, empty database was created under the same URL")
    assert DatabaseMarker(tmp_path, url, None).lost_database(0, "old") is None


def test_the_guard_at_start_tells_a_new_database_at_the_same_inode_by_its_id(
    tmp_path: Path,
) -> None:
    """The service's side: a real database with a task remembered at one start; at the next,
    the same file (same device and inode numbers, as a file made after the old one's deletion
    often has) holds another database id and no task: said recreated. The same id emptied of
    its tasks is not."""
    home = tmp_path / "home"
    home.mkdir()
    path = tmp_path / "nanobot.db"
    engine = create_db_engine(f"sqlite:///{path}")
    warnings: list[tuple[str, str | None]] = []

    def start() -> None:
        guard = DatabaseGuard(
            engine,
            home=home,
            sqlite_path=path,
            node="n1",
            period=1.0,
            warn=lambda key, problem: warnings.append((key, problem)),
        )
        guard.check_at_start()

    try:
        upgrade_database(engine)
        with engine.begin() as conn:
            control.insert_task(
                conn,
                dict(name="t", task_class="x:Y", interval_s=60, kwargs={}, paused=False,
                     anchor_at=utcnow()),
            )  # fmt: skip
        start()
        assert warnings == []
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM tasks"))
        start()  # the same database emptied on purpose
        assert warnings == []
        with engine.begin() as conn:
            control.insert_task(
                conn,
                dict(name="t", task_class="x:Y", interval_s=60, kwargs={}, paused=False,
                     anchor_at=utcnow()),
            )  # fmt: skip
        start()
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM tasks"))
            conn.execute(text("UPDATE database_identity SET id = 'another database'"))
        start()
        assert [key for key, _problem in warnings] == [RECREATED]
        problem = warnings[0][1]
        assert problem is not None
        assert problem.startswith(f"a new database file was created at {path}")
    finally:
        engine.dispose()
