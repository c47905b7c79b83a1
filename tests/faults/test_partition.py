"""PostgreSQL: a leader frozen, or cut off, inside a transaction (issue item 3).

The claim transaction reads the lease row FOR SHARE; a standby's acquire takes it FOR UPDATE.
With no limits, a leader stopped (SIGSTOP) or partitioned while that transaction was open
blocked every take-over for as long as it lasted (for a network cut: until the server's TCP
keepalive, two hours by default), and each timed-out acquire left a thread stuck. Every session
now has server-side limits (lock_timeout, idle_in_transaction_session_timeout,
statement_timeout, TCP keepalives), and a standby has at most one acquire in flight.

Fail-over bound checked here (3 s lease): ttl + ttl/3 + the new leader's start (4 s allowed, for a
loaded 2-core machine).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from faults.harness import (
    Cluster,
    Ledger,
    TcpProxy,
    pg_admin_url,
    pg_target,
    report,
    violated,
    wait_for,
)
from nanobot.db import SessionLimits, create_db_engine
from nanobot.lease import SchedulerLease

pytestmark = pytest.mark.postgres
postgres_only = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
TTL = 3.0
PERIOD = TTL / 3
TAKEOVER_BOUND = TTL + PERIOD + 4.0


def _backend_alive(db_url: str, pid: int) -> bool:
    admin = create_engine(pg_admin_url(db_url))
    try:
        with admin.connect() as conn:
            return bool(
                conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
                ).scalar_one()
            )
    finally:
        admin.dispose()


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


@postgres_only
@pytest.mark.timeout(60)
def test_a_session_idle_inside_a_transaction_is_ended_and_never_blocks_a_take_over(
    db_url: str, engine: Engine
) -> None:
    """A leader's session frozen after reading the lease row FOR SHARE (as inside a claim): a
    standby's acquire fails after lock_timeout instead of waiting, and the server ends the idle
    session within about ttl, freeing the row for the take-over."""
    limits = SessionLimits.for_lease(TTL, 60)
    leader_engine = create_db_engine(db_url, limits=limits)
    standby_engine = create_db_engine(db_url, limits=limits)
    try:
        leader = SchedulerLease(leader_engine, "frozen:1", TTL)
        assert leader.try_acquire()
        frozen = leader_engine.connect()
        frozen.begin()
        backend = frozen.execute(text("SELECT pg_backend_pid()")).scalar_one()
        frozen.execute(text("SELECT * FROM scheduler_lease FOR SHARE"))
        frozen_at = time.monotonic()

        standby = SchedulerLease(standby_engine, "standby:2", TTL)
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            standby.try_acquire()
        waited = time.monotonic() - started
        report("standby's acquire against a row locked by a frozen leader", waited)
        assert waited < PERIOD, "the acquire must end within the standby's poll"

        wait_for("the server ends the frozen session", lambda: not _backend_alive(db_url, backend),
                 timeout=TTL + 3)  # fmt: skip
        report("frozen session inside a transaction -> ended by the server",
               time.monotonic() - frozen_at)  # fmt: skip
        with pytest.raises(DBAPIError):
            frozen.execute(text("SELECT 1"))
        frozen.invalidate()
        wait_for("the standby takes the expired lease", standby.try_acquire, timeout=TTL + 2)
        assert time.monotonic() - frozen_at < TAKEOVER_BOUND
    finally:
        leader_engine.dispose()
        standby_engine.dispose()


@postgres_only
@pytest.mark.timeout(120)
def test_network_partition_of_the_leader_fails_over_within_the_bound_without_thread_leaks(
    cluster: Cluster, db_url: str, ledger: Ledger
) -> None:
    """The leader reaches PostgreSQL through a proxy that stops passing packets (a partition:
    both kernels still see open connections). Busy tasks keep a claim transaction open most
    of the time. A standby leads within ttl + ttl/3 (+ start); the partitioned node's thread
    count stays bounded; once the network is back it rejoins as a standby."""
    with TcpProxy(pg_target_host(db_url)) as proxy:
        old = cluster.add(NANOBOT_DATABASE__URL=proxy.url(db_url)).start()
        assert old.wait_up()["role"] == "leader"
        new = cluster.add().start()
        assert new.wait_up()["role"] == "standby"
        for i in range(10):
            ledger.add(f"busy{i}", interval=0.2)
        ledger.wait_runs(20, timeout=10)
        baseline = _threads(old.pid)
        cut_at = time.time()
        proxy.hold()
        cluster.wait_leader(TAKEOVER_BOUND, among=[new])
        led_at = time.time()
        report("partition of the leader -> standby leads", led_at - cut_at)
        first = wait_for(
            "the new leader runs tasks",
            lambda: min((r.start for r in ledger.runs() if r.pid == new.pid), default=None),
            timeout=5,
        )
        report("partition of the leader -> first run on the new leader", first - cut_at)
        # The partition lasts: the old node keeps trying; its threads must not pile up.
        peak = baseline
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, _threads(old.pid))
            time.sleep(0.5)
        print(f"\nMEASURED partitioned node: {peak - baseline} extra threads at peak")
        assert peak - baseline <= 8, f"threads piled up: {baseline} -> {peak}"
        old_runs = [r for r in ledger.runs() if r.pid == old.pid]
        violated(max(r.start for r in old_runs) < first, "the old leader ran after the new one led")
        proxy.restore()
        wait_for("the old node rejoins as a standby", lambda: old.role() == "standby", 30)
        # One leader again (whichever: on a loaded machine leadership may move once more).
        cluster.wait_leader(TAKEOVER_BOUND)


def pg_target_host(db_url: str) -> tuple[str, int]:
    return pg_target(db_url)


@postgres_only
@pytest.mark.timeout(120)
def test_frozen_leader_is_replaced_within_the_bound_wherever_it_froze(
    cluster: Cluster, ledger: Ledger
) -> None:
    """SIGSTOP of a busy leader (claim transactions open most of the time), twice, at different
    moments: each time a standby leads within the bound."""
    cluster.start(2)
    for i in range(10):
        ledger.add(f"busy{i}", interval=0.2)
    ledger.wait_runs(20, timeout=10)
    for attempt in range(2):
        leader = cluster.wait_leader(TAKEOVER_BOUND)
        others = [n for n in cluster.nodes if n is not leader]
        time.sleep(0.13 * (attempt + 1))  # a different moment of the claim cycle each time
        frozen_at = leader.freeze()
        try:
            cluster.wait_leader(TAKEOVER_BOUND, among=others)
            report(f"SIGSTOP of the leader (try {attempt + 1}) -> standby leads",
                   time.time() - frozen_at)  # fmt: skip
        finally:
            leader.thaw()
        leader.wait_role("standby", 15)  # the thawed node steps down
