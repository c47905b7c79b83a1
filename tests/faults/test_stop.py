"""A clean stop of the leader with a run in flight (issue item 1).

Two services on one database (SQLite file, PostgreSQL schema), a 3 s lease, a grace of 20 s,
a task that works 6 s every second. SIGTERM to the leader while its run goes: the leader keeps
renewing its lease (and checking its lock) until that run has ended and been recorded, then
releases; the standby takes over only then. It used to lead 3.8 s after the signal while the
old run went on 5 s more.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine

from faults.harness import (
    Cluster,
    Ledger,
    OutcomeWatch,
    check_ledger,
    report,
    violated,
    wait_for,
)

TTL = 3.0
RUN_S = 6.0


@pytest.mark.timeout(120)
def test_clean_stop_with_a_run_in_flight_never_overlaps_the_standby(
    cluster: Cluster, db: Engine, ledger: Ledger
) -> None:
    """The standby's first run starts after the old leader's last run ended; that run ends
    normally within the grace (recorded success), and the stop exits 0."""
    env = {"NANOBOT_SERVICE__SHUTDOWN_GRACE": "20"}
    first, second = cluster.start(2, **env)
    leader = cluster.wait_leader(10)
    standby = second if leader is first else first
    with OutcomeWatch(db) as watch:
        ledger.add("long", interval=1, seconds=RUN_S)
        ledger.wait_runs(1, timeout=5)
        (run,) = ledger.runs("long")
        assert run.pid == leader.pid
        # Into the run, so that most of it is left when the signal comes.
        wait_for(
            "a second into the run", lambda: ledger.runs("long")[0].start + 1 <= time.time(), 3
        )
        stopped_at = time.time()
        assert leader.stop(timeout=60) == 0
        exited_at = time.time()
        wait_for("the standby runs the task", lambda: standby.pid in ledger.pids("long"), 15)
        assert standby.stop() == 0
    runs = ledger.runs("long")
    old = [r for r in runs if r.pid == leader.pid]
    new = [r for r in runs if r.pid == standby.pid]
    assert old[-1].outcome == "end", "the run in flight finished within the grace"
    assert old[-1].end is not None
    report("clean stop with a 6 s run in flight: SIGTERM -> leader exited", exited_at - stopped_at)
    report("clean stop: old run's end -> standby's first run", new[0].start - old[-1].end)
    violated(new[0].start >= old[-1].end, "the standby started while the old run still went")
    check_ledger(db, ledger, ["long"], watch=watch)
