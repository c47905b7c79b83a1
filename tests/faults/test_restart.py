"""Restart after a crash (issue item 5): a holder known to be dead does not hold the lease.

With a 15 s lease, a holder killed with SIGKILL used to keep the lease until it expired (10 to
15 s after the kill): nothing ran meanwhile. Now the restarted service (same home, so the same
node) sees that the holder's process is gone and leads at once; on SQLite, where every process
of the database shares this host, a standby of another home does the same at its next poll.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine

from faults.harness import Cluster, Ledger, check_ledger, report, wait_for

TTL = 15.0
PERIOD = TTL / 3
# The old behaviour could not lead before the lease expired: at least 2/3 ttl after the kill.
BEFORE_EXPIRY = TTL * 2 / 3


@pytest.mark.timeout(120)
def test_restart_after_kill_9_leads_without_waiting_for_the_lease(
    cluster: Cluster, db: Engine, ledger: Ledger
) -> None:
    """kill -9, then the same node started again at once: its first run comes as soon as it has
    started, well before the dead process's lease would expire; every slot is accounted for."""
    (node,) = cluster.start(1, NANOBOT_SERVICE__LEASE_TTL=str(TTL))
    ledger.add("tick", interval=0.5)
    ledger.wait_runs(2, timeout=10)
    old_pid = node.pid
    killed_at = node.kill()
    node.start()
    first = wait_for(
        "the restarted node runs the task",
        lambda: min((r.start for r in ledger.runs("tick") if r.pid == node.pid), default=None),
        timeout=BEFORE_EXPIRY + 5,
    )
    (starting,) = node.events("service.starting")
    report("kill -9 + restart on the same node -> first run (15 s lease)", first - killed_at)
    report("restart: process up (service.starting) -> first run", first - starting["at"])
    # The proof that it did not wait: the lease was taken from the dead holder while it was
    # still live (after its expiry it would be a plain acquire).
    (replaced,) = node.events("lease.dead_holder_replaced")
    assert replaced["dead"].endswith(f":{old_pid}")
    assert first - killed_at < TTL, "waited for the dead holder's lease"
    assert node.stop() == 0
    check_ledger(db, ledger, ["tick"], died={old_pid: killed_at})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "db_url", [pytest.param("sqlite", id="sqlite")], indirect=True
)  # fmt: skip
def test_sqlite_standby_takes_over_from_a_dead_leader_at_its_next_poll(
    cluster: Cluster, db: Engine, ledger: Ledger
) -> None:
    """SQLite: a standby of another home on this host sees that the leader's process is gone
    and leads at its next poll (ttl/3), not after the lease expires."""
    first, second = cluster.start(2, NANOBOT_SERVICE__LEASE_TTL=str(TTL))
    leader = cluster.wait_leader(10)
    standby = second if leader is first else first
    ledger.add("tick", interval=0.5)
    ledger.wait_runs(2, timeout=10)
    killed_at = leader.kill()
    cluster.wait_leader(PERIOD + 5, among=[standby])
    led_at = time.time()
    report("SQLite: kill -9 of the leader -> standby leads (15 s lease)", led_at - killed_at)
    assert led_at - killed_at < BEFORE_EXPIRY, "waited for the dead leader's lease to expire"
    wait_for("the standby runs the task", lambda: standby.pid in ledger.pids("tick"), 5)
    assert standby.events("lease.dead_holder_replaced")
    assert standby.stop() == 0
    check_ledger(db, ledger, ["tick"], died={leader.pid: killed_at})
