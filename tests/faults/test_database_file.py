"""The SQLite file under the running service (issue item 10).

Deleted or replaced while the service runs: SQLite goes on with the file it opened, and the
service used to stay healthy while everything it wrote was lost. Now, within one health cycle
(a lease period, 1 s here): status error, /readyz 503, scheduling stopped, a critical log line
``service.database_replaced``, and ``database.replaced`` on the bus. Restarted onto a new empty
file where the old one had tasks: status says so (``service.database_recreated``,
``database.recreated``) instead of presenting an empty system as healthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from faults.harness import Ledger, ServiceProcess, report, run_nanobot, wait_for
from nanobot.bus import get_bus
from nanobot.config import load_config
from nanobot.database_guard import DATABASE_REPLACED
from nanobot.db import create_db_engine, dispose_engines
from nanobot.models import apscheduler_jobs
from nanobot.service import Service

sqlite_only = pytest.mark.parametrize(
    "db_url", [pytest.param("sqlite", id="sqlite")], indirect=True
)
PERIOD = 1.0


def _file(db_url: str) -> Path:
    return Path(db_url.removeprefix("sqlite:///"))


def _service(tmp_path: Path, db_url: str) -> ServiceProcess:
    return ServiceProcess(
        home=tmp_path / "home", logs=tmp_path, env={"NANOBOT_DATABASE__URL": db_url}
    )


@pytest.mark.timeout(120)
@sqlite_only
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_database_file_deleted_or_replaced_is_detected_within_a_health_cycle(
    tmp_path: Path, db_url: str, ledger: Ledger, how: str
) -> None:
    """The file at the path is no longer the open one: within a period (+ slack) status is
    error naming the file, /readyz answers 503, the node stops scheduling (no run starts after
    it noticed), and the log says it once, loudly."""
    service = _service(tmp_path, db_url).start()
    try:
        assert service.wait_up()["role"] == "leader"
        ledger.add("tick", interval=0.2)
        ledger.wait_runs(3, timeout=10)
        path = _file(db_url)
        if how == "deleted":
            done_at = time.time()
            path.unlink()
        else:
            other = tmp_path / "other.db"
            sqlite3.connect(other).close()
            done_at = time.time()
            os.replace(other, path)

        def noticed() -> dict[str, Any] | None:
            events = service.events("service.database_replaced")
            return events[0] if events else None

        event = wait_for("the service notices", noticed, timeout=PERIOD + 3)
        report(f"database file {how} -> noticed", event["at"] - done_at)
        assert event["level"] == "critical"
        # A deleted file may already be replaced by the time it is noticed: a new connection of
        # the pool opens the path, and SQLite creates an empty file there.
        expected = {"deleted", "replaced"} if how == "deleted" else {"replaced"}
        assert event["reason"] in expected
        assert event["at"] - done_at <= PERIOD + 2
        _code, status = service.get("/status")
        assert status["status"] == "error"
        assert str(path) in status["problems"][0]
        assert event["reason"] in status["problems"][0]
        code, ready = service.get("/readyz")
        assert code == 503
        assert ready["ready"] is False
        wait_for("scheduling stops", lambda: service.role() == "standby", timeout=PERIOD + 3)
        stopped_at = time.time()
        # Nothing to wait for but time: the node must stay quiet.
        time.sleep(2 * PERIOD)
        late = [r for r in ledger.runs("tick") if r.start > stopped_at]
        assert late == [], "the node went on scheduling on a lost database"
        assert service.role() == "standby", "it does not compete for the lead again"
        assert len(service.events("service.database_replaced")) == 1, "said once, not each cycle"
        assert service.stop() == 0
    finally:
        service.close()


@pytest.mark.timeout(120)
@sqlite_only
def test_restart_onto_a_new_empty_database_says_so(
    tmp_path: Path, db_url: str, ledger: Ledger
) -> None:
    """The database with tasks is gone between two starts (its file deleted): the new start
    creates an empty one, and status (degraded, exit 1 of ``status``) and the log say that a
    new database was created where one with tasks had been, until tasks exist again."""
    service = _service(tmp_path, db_url).start()
    try:
        service.wait_up()
        ledger.add("tick", interval=60)
        ledger.wait_runs(1, timeout=10)
        wait_for("the marker remembers the task", lambda: _marker_tasks(tmp_path) >= 1, 5)
        assert service.stop() == 0
        path = _file(db_url)
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()
        dispose_engines()  # this process's pool would still read the deleted file
        service.start()
        service.wait_up()
        (event,) = service.events("service.database_recreated")
        assert event["level"] == "error"
        assert "had 1 stored task" in event["problem"]
        _code, status = service.get("/status")
        assert status["status"] != "healthy"
        assert any("new database file was created" in p for p in status["problems"])
        assert service.get("/readyz")[0] == 200, "an empty database is usable: ready, not healthy"
        ledger.add("tick", interval=60)

        def cleared() -> bool:
            return not any("new database" in p for p in service.get("/status")[1]["problems"])

        wait_for("the warning goes once tasks exist again", cleared, timeout=PERIOD + 4)
        assert service.stop() == 0
    finally:
        service.close()


def _marker_tasks(tmp_path: Path) -> int:
    try:
        return int(json.loads((tmp_path / "home" / "database.json").read_text())["tasks"])
    except (OSError, ValueError, KeyError):
        return 0


@sqlite_only
def test_database_replaced_is_published_on_the_bus(tmp_path: Path, db_url: str) -> None:
    """Subscribers of ``database.replaced`` (alerts) get the database, the reason and the node
    at the health cycle that notices it."""
    assert run_nanobot("db", "upgrade", env={"NANOBOT_DATABASE__URL": db_url}).returncode == 0
    received: list[Any] = []

    async def scenario() -> None:
        get_bus().subscribe(DATABASE_REPLACED, lambda _topic, payload: received.append(payload))
        service = Service(load_config())
        path = _file(db_url)
        await asyncio.to_thread(service.check_database_at_start)  # the watch of this file
        await service.health_cycle()
        assert received == []
        shutil.move(path, tmp_path / "moved.db")
        await service.health_cycle()

    asyncio.run(scenario())
    dispose_engines()
    (payload,) = received
    assert payload["reason"] == "deleted"
    assert payload["database"].endswith("nanobot.db")
    assert payload["node"]


@pytest.mark.timeout(120)
def test_job_rows_deleted_by_hand_are_made_again(
    tmp_path: Path, db_url: str, ledger: Ledger
) -> None:
    """Every row of the job table deleted with SQL by another process while the service runs:
    the leader keeps its jobs' next run times in memory, so it is the first pass that moves a
    job without a row that notices (a log line, nothing of that pass written); the task's row
    is applied again and the task goes on running, no run twice."""
    service = ServiceProcess(
        home=tmp_path / "home", logs=tmp_path, env={"NANOBOT_DATABASE__URL": db_url}
    ).start()
    engine = create_db_engine(db_url)
    try:
        assert service.wait_up()["role"] == "leader"
        ledger.add("tick", interval=0.2)
        ledger.wait_runs(3, timeout=10)
        with engine.begin() as conn:
            deleted = conn.execute(apscheduler_jobs.delete()).rowcount
        assert deleted >= 1
        done_at = time.time()
        before = len(ledger.runs("tick"))
        ledger.wait_runs(before + 3, timeout=10, task="tick")

        def noticed() -> list[dict[str, Any]]:
            return service.events("cron.job_table_changed", "cron.job_rows_missing")

        event = wait_for("the leader notices", noticed, timeout=5)[0]
        report("job rows deleted by hand -> noticed", event["at"] - done_at)
        assert not service.events("cron.pass_failed")
        with engine.connect() as conn:
            assert conn.execute(apscheduler_jobs.select()).first() is not None
        run_ids = [r.run_id for r in ledger.runs("tick")]
        assert len(run_ids) == len(set(run_ids))
        assert service.stop() == 0
    finally:
        service.close()
        engine.dispose()
