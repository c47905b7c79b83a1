"""The scheduler's faults on real services: a frozen leader, a stop before a burst, a kill -9 in
the lead window, a script next to the service, a task removed just before a kill -9.

Each case runs real ``python -m nanobot`` processes (tests/faults/harness.py) on a SQLite file
and on PostgreSQL, with ledger tasks whose runs write what they did; the ledger and
``task_runs`` are then checked against each other.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from faults.harness import (
    SLOT_TOLERANCE,
    Cluster,
    Ledger,
    OutcomeWatch,
    check_accounting,
    check_ledger,
    report,
    run_cli,
    task_runs,
    violated,
    wait_for,
)
from nanobot.cron import control, definitions
from nanobot.cron.manager import MARK_AHEAD
from nanobot.db import upgrade_database
from nanobot.models import Component, TaskRun, utcnow

TTL = 3.0


@pytest.fixture(autouse=True)
def migrated(db: Engine) -> None:
    """The database exists at head before tasks are added through the command line."""
    upgrade_database(db)


def _in_flight(ledger: Ledger, pid: int) -> bool:
    runs = [r for r in ledger.runs() if r.pid == pid]
    return bool(runs) and runs[-1].outcome == "unfinished"


def test_frozen_leader_neither_starts_nor_finishes_after_it_resumes(
    cluster: Cluster, db: Engine, ledger: Ledger
) -> None:
    """SIGSTOP the leader past its lease while a run is in flight, SIGCONT it after the standby
    took over: the old leader starts nothing more, the run it had in flight does not go on (it
    ends ``cancelled`` in the ledger at once), and the new leader's record of that run
    (``interrupted``) is not overwritten; every slot is accounted for, none twice."""
    ledger.add("beat", 0.5, seconds=0.4)
    cluster.start(2)
    old = cluster.wait_leader(10)
    new = next(n for n in cluster.nodes if n is not old)
    ledger.wait_runs(3, 15, task="beat")
    with OutcomeWatch(db) as watch:
        wait_for("a run in flight on the leader", lambda: _in_flight(ledger, old.pid), 10)
        frozen_at = old.freeze()
        new.wait_role("leader", timeout=3 * TTL)
        wait_for(
            "the new leader's runs",
            lambda: len([r for r in ledger.runs("beat") if r.pid == new.pid]) >= 4,
            15,
        )
        thawed_at = old.thaw()
        wait_for("the old leader stepping down", lambda: old.role() == "standby", 10)
        stepped = [e for e in old.events("service.leadership_lost") if e["at"] >= thawed_at - 0.5]
        assert stepped, old.output()
        report("SIGCONT -> the frozen leader stepped down", stepped[0]["at"] - thawed_at)
        ledger.wait_runs(len(ledger.runs("beat")) + 2, 10, task="beat")

        def standby_keeps_task_component() -> bool:
            with db.connect() as conn:
                found = conn.execute(
                    select(Component.id).where(
                        Component.name == "task:beat", Component.node == old.name
                    )
                )
                return found.first() is not None

        # A standby runs no task: the component it had for it goes (it would go stale there).
        wait_for("the standby's task component gone", lambda: not standby_keeps_task_component())
        # The old leader, a standby now, stops first: it must not take over again.
        assert old.stop() == 0
        assert new.stop() == 0
    rows = check_accounting(db, ["beat"])
    violated(not watch.overwritten(), f"outcomes overwritten: {watch.overwritten()}")
    mine = [r for r in ledger.runs("beat") if r.pid == old.pid]
    violated(all(r.start < frozen_at for r in mine), "the frozen leader started a run after")
    went_on = [r for r in mine if r.end is not None and r.end > thawed_at and r.outcome == "end"]
    violated(not went_on, f"runs of the frozen leader went on after it resumed: {went_on}")
    fenced = [r for r in mine if r.end is not None and r.end > thawed_at]
    assert fenced, "the run in flight at the freeze"
    assert all(r.outcome == "cancelled" for r in fenced)
    by_id = {r.id: r for r in rows}
    for run in fenced:
        assert by_id[run.run_id].outcome == "interrupted", by_id[run.run_id]
    events = old.events("cron.fenced_finish", "task.fenced", every_start=True)
    assert events, "the fenced run is logged"


BURST = 1000
# The burst's tasks run every BURST_EVERY seconds: the first instant teaches the scheduler what a
# pass costs per slot, so that it claims the second one well ahead (as under steady load).
BURST_EVERY = 8.0


def add_burst(db: Engine, ledger: Ledger, prefix: str, at: datetime) -> list[str]:
    """``BURST`` ledger tasks whose first slot is ``at`` (one insert: the command line would
    take minutes for a thousand)."""
    definition = definitions.definition_from_class(
        "x", "faults.ledger_task:LedgerTask", BURST_EVERY, ledger.kwargs()
    )
    values = control.definition_values(definition)
    now = utcnow()
    names = [f"{prefix}{i:04d}" for i in range(BURST)]
    with db.begin() as conn:
        control.insert_tasks(
            conn,
            [
                values
                | {
                    "name": name,
                    "paused": False,
                    "anchor_at": at,
                    "next_run_at": at,
                    "created_at": now,
                    "updated_at": now,
                    "version": 1,
                    "consecutive_failures": 0,
                }
                for name in names
            ],
        )
    return names


def check_burst(db: Engine, ledger: Ledger, names: list[str]) -> list[Any]:
    """check_ledger's rules for a thousand tasks, with the ledger read once: every slot
    accounted for once, no row left running, no claimed run executed twice, every success
    really ended, every ledger run belongs to a claimed row."""
    rows = check_accounting(db, names)
    by_id = {r.id: r for r in rows}
    runs = [r for r in ledger.runs() if r.task in set(names)]
    ids = [r.run_id for r in runs]
    violated(len(ids) == len(set(ids)), "a claimed run executed twice")
    violated(all(i in by_id for i in ids), "a run without its row")
    ended = {r.run_id for r in runs if r.outcome == "end"}
    unended = [r for r in rows if r.outcome == "success" and r.id not in ended]
    violated(not unended, f"rows recorded success that no run ended: {unended[:3]}")
    return rows


def act_once_claimed(db: Engine, at: datetime, *, margin: float = 0.0) -> float:
    """Return as soon as most of the burst at ``at`` is claimed, at least ``margin`` seconds
    before ``at`` (the fault is timed into the lead window: claimed, not yet due); how long
    before ``at``. Skips the test when this machine claimed the burst too late for that."""
    while True:
        left = (at - utcnow()).total_seconds()
        if left <= margin:
            pytest.skip(
                f"the burst was claimed less than {margin:.2f}s ahead of its instant on this "
                "machine: the fault cannot be timed inside the lead window"
            )
        if claimed_ahead(db, at):
            return left
        time.sleep(0.005)


def ran_at(db: Engine, at: datetime) -> int:
    """How many runs of the slot at ``at`` succeeded."""
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(TaskRun)
                .where(
                    TaskRun.scheduled_at.between(at - SLOT_TOLERANCE, at + SLOT_TOLERANCE),
                    TaskRun.outcome == "success",
                )
            ).scalar_one()
        )


def claimed_ahead(db: Engine, at: datetime) -> bool:
    """Most of the burst is claimed (and none of it can have started: its instant has not come)."""
    with db.connect() as conn:
        # By the index on scheduled_at: only the burst's tasks have a slot at that instant.
        count = conn.execute(
            select(func.count())
            .select_from(TaskRun)
            .where(TaskRun.scheduled_at.between(at - SLOT_TOLERANCE, at + SLOT_TOLERANCE))
        ).scalar_one()
    return count >= BURST // 2


@pytest.mark.timeout(150)
def test_stop_before_a_burst_releases_the_claims_and_the_restart_catches_up(
    cluster: Cluster, db: Engine, ledger: Ledger
) -> None:
    """A thousand tasks due at one instant T are claimed ahead of it; a SIGTERM before T and a
    restart after T: no slot is recorded ``cancelled`` (nor finished before it was due), every
    slot at T is caught up by the restarted service, none ran twice."""
    first = utcnow() + timedelta(seconds=8)
    names = add_burst(db, ledger, "b", first)
    at = first + timedelta(seconds=BURST_EVERY)
    # The default lease (a thousand runs at once hold a loaded 2-core machine for seconds) and
    # heartbeat (so that the burst is the scheduler's next instant: it looks one instant ahead).
    [node] = cluster.start(1, NANOBOT_SERVICE__LEASE_TTL="10", NANOBOT_HEARTBEAT__INTERVAL="30")
    node.wait_role("leader", timeout=10)
    # As in the report: SIGTERM just before the instant, once the burst is claimed ahead.
    act_once_claimed(db, at)
    node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    report("SIGTERM ahead of the burst's instant by", (at - utcnow()).total_seconds())
    assert node.wait_exit(30) == 0
    early = [r for r in task_runs(db, names) if r.scheduled_at == at]
    assert not [r for r in early if r.outcome == "cancelled"], "a slot not yet due was cancelled"
    assert node.events("cron.claims_released"), node.output()
    wait_for("the instant passed", lambda: utcnow() > at + timedelta(seconds=1), 20)
    node.start()
    node.wait_role("leader", timeout=15)
    wait_for("the burst's instant caught up", lambda: ran_at(db, at) == BURST, 40)
    assert node.stop() == 0
    rows = check_burst(db, ledger, names)
    assert {r.task_name for r in rows if r.scheduled_at == at and r.outcome == "success"} == set(
        names
    )
    bad = [r for r in rows if r.finished_at is not None and r.finished_at < r.scheduled_at]
    assert not bad, bad[:3]


@pytest.mark.timeout(150)
def test_kill_9_inside_the_lead_window_is_caught_up_not_interrupted(
    cluster: Cluster, db: Engine, ledger: Ledger
) -> None:
    """A service killed after claiming a burst ahead of its instant: at the restart the slots
    that never started are released and run, none is recorded interrupted."""
    first = utcnow() + timedelta(seconds=8)
    names = add_burst(db, ledger, "k", first)
    at = first + timedelta(seconds=BURST_EVERY)
    # The default lease (a thousand runs at once hold a loaded 2-core machine for seconds) and
    # heartbeat (so that the burst is the scheduler's next instant: it looks one instant ahead).
    [node] = cluster.start(1, NANOBOT_SERVICE__LEASE_TTL="10", NANOBOT_HEARTBEAT__INTERVAL="30")
    node.wait_role("leader", timeout=10)
    # Killed inside the lead window: the burst is claimed, not yet marked dispatched (which
    # happens MARK_AHEAD before the instant), its instant has not come.
    act_once_claimed(db, at, margin=MARK_AHEAD + 0.01)
    died = node.kill()
    assert datetime.fromtimestamp(died, UTC) < at, "killed after the instant: not this case"
    node.start()
    node.wait_role("leader", timeout=15)
    wait_for("the burst's instant caught up", lambda: ran_at(db, at) == BURST, 40)
    assert node.stop() == 0
    rows = check_burst(db, ledger, names)
    assert not [r for r in rows if r.outcome == "interrupted"]
    assert {r.task_name for r in rows if r.scheduled_at == at and r.outcome == "success"} == set(
        names
    )


SCRIPT = """
import asyncio, sys
from nanobot.cron import CronTask, get_cron_manager
from faults.ledger_task import LedgerTask


class Local(CronTask):  # lives in __main__: the service cannot build it
    async def run(self) -> None:
        return None


async def main() -> None:
    manager = get_cron_manager()
    manager.register_task("scripted", LedgerTask(0.5, path=sys.argv[1]))
    await manager.start_task("scripted")
    manager.register_task("local", Local(1))
    try:
        await manager.start_task("local")
    except Exception as exc:
        print("refused:", type(exc).__name__, exc, flush=True)
    print("client of:", manager.client_of, flush=True)
    await asyncio.sleep(3)
    await manager.shutdown()

asyncio.run(main())
"""


@pytest.mark.timeout(120)
def test_script_next_to_the_service_hands_its_task_over(
    cluster: Cluster, db: Engine, ledger: Ledger, tmp_path: Path
) -> None:
    """A script following the README's code example while the service runs does not schedule:
    the service runs the script's task (and the built-in heartbeat only once per slot), the
    script refuses a task the service could not build, and no run is recorded interrupted."""
    [node] = cluster.start(1)
    node.wait_role("leader", timeout=10)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = node.full_env()
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(ledger.path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        raise AssertionError(f"the script hung:\n{out[-3000:]}") from None
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: TaskNotStorableError" in done.stdout
    assert f"client of: {node.health()['holder']}" in done.stdout  # type: ignore[index]
    ledger.wait_runs(4, 15, task="scripted")
    assert node.stop() == 0
    assert ledger.pids("scripted") == {node.pid}
    rows = check_ledger(db, ledger, ["scripted"])
    assert not [r for r in rows if r.outcome == "interrupted"]
    assert not node.events("cron.runs_interrupted")
    heartbeat = [r for r in task_runs(db, ["heartbeat"]) if not r.manual]
    violated(len({r.scheduled_at for r in heartbeat}) == len(heartbeat), "a heartbeat slot twice")


def test_component_of_a_task_removed_before_a_kill_9_goes(
    cluster: Cluster, db: Engine, ledger: Ledger
) -> None:
    """A task removed just before a kill -9 leaves no ``task:<name>`` component behind once the
    service is back (the monitor had not written the removal yet)."""
    ledger.add("doomed", 0.5)
    [node] = cluster.start(1)
    node.wait_role("leader", timeout=10)
    ledger.wait_runs(2, 10, task="doomed")

    def component() -> bool:
        with db.connect() as conn:
            found = conn.execute(select(Component.id).where(Component.name == "task:doomed"))
            return found.first() is not None

    wait_for("the task's component stored", component, 10)
    code, out = run_cli("cron", "remove", "doomed", "--json")
    assert code == 0, out
    node.kill()
    assert component(), "the removal had not reached the components table: not this case"
    node.start()
    node.wait_role("leader", timeout=15)
    wait_for("the component gone", lambda: not component(), 10)
    code, status = run_cli("status", "--json")
    assert "task:doomed" not in {c["name"] for c in status["components"]}
    assert node.stop() == 0
