"""A full disk under the SQLite database and the log (issue item 12).

NANOBOT_HOME (database and log folder) on a 16 MiB tmpfs, a task every 0.2 s. The disk is
filled to the last byte, then freed. The service reports the log file's failure once (not a
traceback per record), and works again once space is back; its write-ahead log stays bounded
(checkpointed and truncated every 10 s, journal_size_limit 1 MiB) instead of growing to tens
of megabytes and refilling the disk.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from faults.harness import Ledger, ServiceProcess, fill, log_events, report, tmpfs, wait_for
from nanobot import config as config_module
from nanobot.database_guard import CHECKPOINT_EVERY_S
from nanobot.db import create_db_engine, dispose_engines
from nanobot.models import TaskRun

sqlite_only = pytest.mark.parametrize(
    "db_url", [pytest.param("sqlite", id="sqlite")], indirect=True
)


def _use_database(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """This process's command line (``cron add``) on ``url`` too."""
    monkeypatch.setenv("NANOBOT_DATABASE__URL", url)
    config_module.reset_config()
    dispose_engines()


@pytest.mark.timeout(150)
def test_full_disk_is_reported_once_and_survived(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filled: one ``logging.file_unwritable`` line, no tracebacks. Freed: runs are recorded
    again within a few seconds, and the log says the file is writable again. The WAL is
    truncated after the load."""
    with tmpfs(tmp_path / "disk", "16m") as disk:
        home = disk / "home"
        url = f"sqlite:///{home / 'nanobot.db'}"
        service = ServiceProcess(home=home, logs=tmp_path, env={"NANOBOT_DATABASE__URL": url})
        try:
            service.start()
            assert service.wait_up()["role"] == "leader"
            _use_database(monkeypatch, url)
            ledger.add("tick", interval=0.2)
            ledger.wait_runs(5, timeout=10)
            filler = fill(disk)
            full_at = time.time()
            wait_for(
                "the log file fails",
                lambda: service.events("logging.file_unwritable"),
                timeout=10,
            )
            # The fault lasts a while: every write of the database and the log fails.
            time.sleep(4)
            filler.unlink()
            freed_at = time.time()
            report("disk full for", freed_at - full_at)
            engine = _engine(url)
            try:
                recorded = wait_for(
                    "a run recorded after the space came back",
                    lambda: _recorded_after(engine, freed_at),
                    timeout=20,
                )
                report("disk freed -> a run recorded again", recorded - freed_at)
                wal = home / "nanobot.db-wal"
                wait_for(
                    "the write-ahead log truncated",
                    lambda: not wal.exists() or wal.stat().st_size <= 1024 * 1024,
                    timeout=15,
                )
            finally:
                engine.dispose()
            assert service.stop() == 0
            output = service.output(tail=10**8)
        finally:
            service.close()
            dispose_engines()  # before the tmpfs goes
    assert service.log_path is not None
    events = log_events(service.log_path, "logging.file_unwritable", "logging.file_writable")
    assert [e["event"] for e in events][:2] == ["logging.file_unwritable", "logging.file_writable"]
    assert sum(1 for e in events if e["event"] == "logging.file_unwritable") <= 2
    assert "--- Logging error ---" not in output
    # The log file's failures used to add one traceback per record (222 in the report). A
    # failed scheduler pass and a failed history write carry theirs (two "Traceback" headers
    # each: SQLAlchemy's error and its sqlite3 cause) on the first failure of the outage only:
    # one per retry (a pass every 0.2 s, a write every second) came to 14-20 in a 4 s outage
    # whenever a run's outcome was waiting to be written when the disk filled, and grew with
    # the outage.
    for retried in ("cron.pass_failed", "cron.history_write_failed"):
        with_traceback = [e for e in log_events(service.log_path, retried) if "exception" in e]
        assert len(with_traceback) <= 1, retried
    assert output.count("Traceback") <= 10


def _engine(url: str) -> Engine:
    return create_db_engine(url)


def _recorded_after(engine: Engine, at: float) -> float | None:
    since = datetime.fromtimestamp(at, UTC)
    with engine.connect() as conn:
        last = conn.execute(
            select(func.max(TaskRun.finished_at)).where(
                TaskRun.task_name == "tick",
                TaskRun.outcome == "success",
                TaskRun.started_at > since,
            )
        ).scalar_one()
    return None if last is None else last.timestamp()


@pytest.mark.timeout(90)
@sqlite_only
def test_write_ahead_log_is_truncated_after_a_burst(tmp_path: Path, db_url: str) -> None:
    """A burst leaves an 8 MB write-ahead log (written with automatic checkpoints off, as a
    busy reader would leave it); the leader's periodic checkpoint truncates it within
    CHECKPOINT_EVERY_S (+ a period)."""
    path = Path(db_url.removeprefix("sqlite:///"))
    service = ServiceProcess(
        home=tmp_path / "home", logs=tmp_path, env={"NANOBOT_DATABASE__URL": db_url}
    )
    try:
        service.start()
        assert service.wait_up()["role"] == "leader"
        with sqlite3.connect(path, timeout=30) as conn:
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("CREATE TABLE burst (data BLOB)")
            conn.executemany("INSERT INTO burst VALUES (randomblob(8192))", [()] * 1000)
            conn.commit()
            conn.execute("DROP TABLE burst")
        wal = path.with_name(path.name + "-wal")
        grown = wal.stat().st_size
        assert grown > 8 * 1024 * 1024
        burst_at = time.time()
        wait_for(
            "the write-ahead log truncated",
            lambda: wal.stat().st_size <= 1024 * 1024,
            timeout=CHECKPOINT_EVERY_S + 5,
        )
        report(f"WAL of {grown // 2**20} MiB -> truncated", time.time() - burst_at)
        assert service.stop() == 0
    finally:
        service.close()
