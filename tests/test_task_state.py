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


def test_a_batch_with_several_outcomes_of_a_task_mirrors_them_in_order(engine: Engine) -> None:
    """One batch of outcomes (on PostgreSQL one statement per round of distinct tasks) leaves
    each task's mirror as its outcomes one after another would: failures count up, a success
    resets them, a failed attempt that a retry follows does not count; the next run is written
    at the version applied only."""
    added = {name: _add(engine, name) for name in ("a", "b", "c")}
    versions = {name: info.version for name, info in added.items()}
    plan = {
        "a": [TaskOutcome.ERROR, TaskOutcome.ERROR, TaskOutcome.ERROR],
        "b": [TaskOutcome.ERROR, TaskOutcome.SUCCESS, TaskOutcome.ERROR],
        "c": [TaskOutcome.ERROR, TaskOutcome.ERROR, TaskOutcome.SUCCESS],
    }
    slots = [SLOT + timedelta(minutes=i) for i in range(3)]
    claims = [history.Claim(name, slot) for slot in slots for name in plan]
    with write_transaction(engine) as conn:
        ids = history.claim_slots(conn, claims, node="n")
    finishes = [
        Finish(
            task=name,
            run_id=ids[(name, slot)],
            scheduled_at=slot,
            outcome=plan[name][i],
            started_at=slot,
            finished_at=slot + timedelta(seconds=1),
            # c's second failure is an attempt that a retry follows: it does not count.
            final=not (name == "c" and i == 1),
        )
        for i, slot in enumerate(slots)
        for name in plan
    ]
    next_at = SLOT + timedelta(hours=1)
    history.write_finishes(
        engine,
        finishes,
        next_runs={"a": (next_at, versions["a"]), "b": (next_at, versions["b"] + 1)},
    )
    got = {name: control.get_task(engine, name) for name in plan}
    assert {n: (i.last_outcome, i.consecutive_failures) for n, i in got.items()} == {
        "a": ("error", 3),
        "b": ("error", 1),
        "c": ("success", 0),
    }
    assert {n: i.last_run_at for n, i in got.items()} == dict.fromkeys(plan, slots[2])
    # b's next run was given at a version it is not at, c's not at all: both keep theirs.
    assert (got["a"].next_run_at, got["b"].next_run_at, got["c"].next_run_at) == (
        next_at,
        added["b"].next_run_at,
        added["c"].next_run_at,
    )
    with engine.connect() as conn:
        outcomes = conn.execute(
            text("SELECT outcome, count(*) FROM task_runs GROUP BY outcome ORDER BY outcome")
        ).all()
    assert [tuple(r) for r in outcomes] == [("error", 7), ("success", 2)]


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
