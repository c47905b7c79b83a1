"""The run state of each task (``task_state``): created and deleted with its task, and mirror
writes that never undo a change of the command line."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, func, select, text

from nanobot.cron import control, history
from nanobot.cron.history import Finish
from nanobot.cron.task import TaskDefinition
from nanobot.db import write_transaction
from nanobot.models import TaskOutcome, TaskStateRecord

SLOT = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
WAIT_S = 10.0


def _add(engine: Engine, name: str = "t") -> control.TaskInfo:
    return control.add_task(
        engine, TaskDefinition(name=name, task_class="cron_tasks:Counter", interval=60)
    )


def _state_names(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(TaskStateRecord.task_name)).scalars())


def test_a_task_has_its_state_row_from_creation_to_deletion(engine: Engine) -> None:
    """cron add and register_task (upsert) create the state row; removing the task deletes it."""
    _add(engine, "a")
    control.upsert_definition(
        engine, TaskDefinition(name="b", task_class="cron_tasks:Counter", interval=30)
    )
    assert sorted(_state_names(engine)) == ["a", "b"]
    info = control.get_task(engine, "b")
    assert (info.next_run_at, info.consecutive_failures) == (None, 0)
    control.remove_task(engine, "a")
    assert _state_names(engine) == ["b"]


def test_a_next_run_mirror_at_an_old_version_writes_nothing(engine: Engine) -> None:
    """The next-run mirror is written at the version the scheduler applied, and not after the
    command line changed the task: with the outcome, only the last-run mirror is written."""
    info = _add(engine)
    with write_transaction(engine) as conn:
        history.set_next_runs(conn, {"t": (SLOT, info.version)})
    assert control.get_task(engine, "t").next_run_at == SLOT
    paused = control.pause_task(engine, "t")
    assert paused.version == info.version + 1
    with write_transaction(engine) as conn:
        history.set_next_runs(conn, {"t": (SLOT + timedelta(hours=1), info.version)})
    assert control.get_task(engine, "t").next_run_at is None
    with write_transaction(engine) as conn:
        claimed = history.claim_slots(conn, [history.Claim("t", SLOT)], node="n")
    finish = Finish(
        task="t",
        run_id=claimed[("t", SLOT)],
        scheduled_at=SLOT,
        outcome=TaskOutcome.ERROR,
        started_at=SLOT,
        finished_at=SLOT + timedelta(seconds=1),
    )
    history.write_finishes(engine, [finish], next_runs={"t": (SLOT, info.version)})
    after = control.get_task(engine, "t")
    assert (after.last_outcome, after.consecutive_failures) == ("error", 1)
    assert after.next_run_at is None


def _wait_until_blocked(engine: Engine, pid: int) -> None:
    """Until the backend ``pid`` waits for a lock (bounded: no event tells it)."""
    deadline = time.monotonic() + WAIT_S
    query = text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid")
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query, {"pid": pid}).scalar() == "Lock":
                return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} never waited for a lock")


def _mirror_during_a_change(engine: Engine, mirror: Callable[[Connection], None]) -> None:
    """Run ``mirror`` in its own transaction while a command-line change of task t is written
    but not committed; commit the change once the mirror waits, then let the mirror end."""
    pid: list[int] = []
    started = threading.Event()
    failure: list[BaseException] = []

    def _run() -> None:
        try:
            with write_transaction(engine) as conn:
                pid.append(int(conn.execute(select(func.pg_backend_pid())).scalar_one()))
                started.set()
                mirror(conn)
        except BaseException as exc:  # reported in the test's thread
            failure.append(exc)
            started.set()

    with write_transaction(engine) as cli:
        assert control.change_task(
            cli, "t", {"paused": True, "next_run_at": None}, datetime.now(UTC)
        )
        thread = threading.Thread(target=_run, daemon=True)
        thread.start()
        assert started.wait(WAIT_S)
        assert not failure, failure
        _wait_until_blocked(engine, pid[0])
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert not failure, failure


@pytest.mark.parametrize("with_outcome", [False, True], ids=["next_only", "with_outcome"])
def test_a_mirror_waits_for_an_uncommitted_change_and_leaves_it(
    engine: Engine, with_outcome: bool
) -> None:
    """PostgreSQL: a next-run mirror that starts while the command line's change of the task
    is not committed yet waits for it, then sees the new version and leaves the next run as the
    command line wrote it (the outcome itself is still mirrored)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: the mirror cannot start in between")
    info = _add(engine)
    with write_transaction(engine) as conn:
        history.set_next_runs(conn, {"t": (SLOT, info.version)})
    later = SLOT + timedelta(minutes=1)

    def _mirror(conn: Connection) -> None:
        if not with_outcome:
            history.set_next_runs(conn, {"t": (later, info.version)})
            return
        # What write_finishes does for an outcome with its next run, in a transaction whose
        # backend the test can name.
        finish = Finish(
            task="t",
            run_id=1,
            scheduled_at=SLOT,
            outcome=TaskOutcome.SUCCESS,
            started_at=SLOT,
            finished_at=SLOT + timedelta(seconds=1),
        )
        history.mirror_outcomes(conn, [finish], {"t": (later, info.version)})

    _mirror_during_a_change(engine, _mirror)
    after = control.get_task(engine, "t")
    assert after.paused
    assert after.next_run_at is None
    if with_outcome:
        assert after.last_outcome == "success"
