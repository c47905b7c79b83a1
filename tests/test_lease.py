"""The scheduling lease: exclusive, renewable, expiring, fenced by epoch, race-free."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from nanobot.db import create_db_engine, write_transaction
from nanobot.lease import AdvisoryLock, SchedulerLease, holder_id, lock_key


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_first_acquirer_wins_and_others_wait(engine: Engine) -> None:
    """Only one holder at a time; the other is refused while the lease is live."""
    clock = FakeClock()
    a = SchedulerLease(engine, "a:1", 10, clock)
    b = SchedulerLease(engine, "b:2", 10, clock)
    assert a.try_acquire()
    assert not b.try_acquire()
    info = b.holder()
    assert info is not None
    assert info.holder == "a:1"
    assert info.epoch == 1
    assert info.is_held(clock.now)


def test_renewal_keeps_the_lease_and_expiry_hands_it_over(engine: Engine) -> None:
    """A renewed lease stays; an expired one goes to the next acquirer with a new epoch."""
    clock = FakeClock()
    a = SchedulerLease(engine, "a:1", 10, clock)
    b = SchedulerLease(engine, "b:2", 10, clock)
    assert a.try_acquire()
    clock.advance(8)
    assert a.renew()
    clock.advance(8)
    assert not b.try_acquire()  # renewed at 8 s, so live until 18 s
    clock.advance(3)
    assert b.try_acquire()
    info = b.holder()
    assert info is not None
    assert (info.holder, info.epoch) == ("b:2", 2)
    assert not a.renew(), "the old holder must learn it lost the lease"
    assert a.epoch is None


def test_reacquiring_own_lease_keeps_the_epoch(engine: Engine) -> None:
    """The same holder taking its lease again is not a change of holder."""
    clock = FakeClock()
    a = SchedulerLease(engine, "a:1", 10, clock)
    assert a.try_acquire()
    assert a.try_acquire()
    info = a.holder()
    assert info is not None
    assert info.epoch == 1


def test_release_lets_a_standby_take_over_at_once(engine: Engine) -> None:
    """After release, another process acquires without waiting for expiry."""
    clock = FakeClock()
    a = SchedulerLease(engine, "a:1", 10, clock)
    b = SchedulerLease(engine, "b:2", 10, clock)
    assert a.try_acquire()
    assert a.release()
    info = b.holder()
    assert info is not None
    assert info.holder is None
    assert not info.is_held(clock.now)
    assert b.try_acquire()
    assert not a.release(), "releasing a lease one does not hold changes nothing"
    info = b.holder()
    assert info is not None
    assert info.holder == "b:2"


def test_seconds_left_counts_down_and_is_zero_without_lease(engine: Engine) -> None:
    """The holder knows, without the database, how long its lease certainly lasts."""
    a = SchedulerLease(engine, "a:1", 10)
    assert a.seconds_left() == 0.0
    assert a.try_acquire()
    assert 9.0 < a.seconds_left() <= 10.0
    a.release()
    assert a.seconds_left() == 0.0


def test_real_clock_expiry(engine: Engine) -> None:
    """With the database's clock (PostgreSQL now()) a short lease expires and moves."""
    a = SchedulerLease(engine, "a:1", 0.2)
    b = SchedulerLease(engine, "b:2", 0.2)
    assert a.try_acquire()
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while not b.try_acquire():
        assert datetime.now(UTC) < deadline, "the lease never expired"
    info = b.holder()
    assert info is not None
    assert info.holder == "b:2"


def _contend(
    lease: SchedulerLease,
    barrier: threading.Barrier,
    results: list[bool],
    i: int,
    errors: list[BaseException],
) -> None:
    try:
        barrier.wait()
        results[i] = lease.try_acquire()
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_acquirers_never_both_win(db_url: str, engine: Engine) -> None:
    """Many processes (one engine and thread each) race for a free lease: exactly one wins.

    Repeated over several rounds, each starting with the lease expired, so both the first
    insert and the take-over of an expired row are raced.
    """
    contenders = 8
    engines = [create_db_engine(db_url) for _ in range(contenders)]
    try:
        for round_no in range(5):
            clock = FakeClock()
            clock.advance(round_no * 100)
            leases = [
                SchedulerLease(e, holder_id(f"n{i}", round_no), 10, clock)
                for i, e in enumerate(engines)
            ]
            barrier = threading.Barrier(contenders)
            results: list[bool] = [False] * contenders
            errors: list[BaseException] = []
            threads = [
                threading.Thread(target=_contend, args=(leases[i], barrier, results, i, errors))
                for i in range(contenders)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors
            assert sum(results) == 1, f"round {round_no}: winners {results}"
            info = leases[0].holder()
            assert info is not None
            assert info.holder == leases[results.index(True)].holder_id
            assert info.epoch == round_no + 1
    finally:
        for e in engines:
            e.dispose()


# --- the PostgreSQL advisory lock ---------------------------------------------------------------


# Advisory locks are PostgreSQL's; on SQLite the lease row alone decides.
postgres_only = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


def _terminate(engine: Engine, application_name: str) -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": application_name},
            ).scalar_one()
        )


@postgres_only
def test_advisory_lock_is_exclusive_and_released(engine: Engine) -> None:
    """One session holds the lock; release hands it to the next at once."""
    a = AdvisoryLock(engine, "a:1", 3)
    b = AdvisoryLock(engine, "b:2", 3)
    try:
        assert a.try_acquire()
        assert a.try_acquire(), "taking a lock one holds again is a success"
        assert not b.try_acquire()
        assert not b.held
        assert a.check()
        a.release()
        assert not a.held
        assert not a.check()
        assert b.try_acquire()
    finally:
        a.dispose()
        b.dispose()


@postgres_only
def test_advisory_lock_lost_with_its_session(engine: Engine) -> None:
    """A terminated lock connection (found by its application_name) is seen at the next check,
    and the lock is free for another session at once."""
    a = AdvisoryLock(engine, "a:1", 3)
    b = AdvisoryLock(engine, "b:2", 3)
    try:
        assert a.try_acquire()
        assert a.application_name == "nanobot-lock:a:1"
        assert _terminate(engine, a.application_name) == 1
        assert not a.check()
        assert not a.held
        assert b.try_acquire()
    finally:
        a.dispose()
        b.dispose()


@postgres_only
def test_advisory_lock_of_a_silent_holder_is_freed_by_the_server(engine: Engine) -> None:
    """A holder that stops checking (stuck, or cut off) loses the lock after about ttl: the
    server ends its idle session (idle_session_timeout)."""
    a = AdvisoryLock(engine, "a:1", 0.5)
    b = AdvisoryLock(engine, "b:2", 0.5)
    try:
        assert a.try_acquire()
        deadline = time.monotonic() + 10
        while not b.try_acquire():
            assert time.monotonic() < deadline, "the silent holder kept the lock"
            time.sleep(0.1)
        assert not a.check()
    finally:
        a.dispose()
        b.dispose()


def test_advisory_lock_keys_differ_by_schema_and_lease() -> None:
    """Schemas of one database (and leases of one schema) have locks of their own."""
    keys = {lock_key("public"), lock_key("nb_1"), lock_key("public", "other")}
    assert len(keys) == 3
    assert all(0 <= k < 2**31 for k in keys)


def test_advisory_lock_refuses_sqlite(tmp_path: Path) -> None:
    eng = create_db_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with pytest.raises(ValueError, match="PostgreSQL"):
            AdvisoryLock(eng, "a:1", 3)
    finally:
        eng.dispose()


def test_verify_inside_a_transaction(engine: Engine) -> None:
    """verify() says, inside the caller's transaction, whether this process still holds the
    lease: true for the holder, false for another node and after the lease moved on."""
    first = SchedulerLease(engine, "a:1", 30)
    second = SchedulerLease(engine, "b:2", 30)
    assert first.try_acquire()
    with write_transaction(engine) as conn:
        assert first.verify(conn)
        assert not second.verify(conn)
    assert first.release()
    assert second.try_acquire()
    with write_transaction(engine) as conn:
        assert not first.verify(conn)
        assert second.verify(conn)


@postgres_only
def test_a_claim_transaction_holds_up_a_take_over_but_not_the_holders_renewal(
    engine: Engine,
) -> None:
    """verify() keeps the lease row locked until the claiming transaction ends: a standby's
    acquire (which reads the row FOR UPDATE) waits for it and gives up at its lock timeout,
    while the holder's own renewal, on another connection, goes through at once. With the
    row locked FOR SHARE the renewal waited too: a pass that claimed a burst for longer than
    the lock timeout made the leader's renewal fail, and the leader step down mid-burst."""
    leader = SchedulerLease(engine, "leader:1", 9.0)  # lock timeouts of ttl / 9 = 1 s
    standby = SchedulerLease(engine, "standby:2", 9.0)
    assert leader.try_acquire()
    with write_transaction(engine) as claiming:
        assert leader.verify(claiming)
        with pytest.raises(OperationalError, match="lock timeout"):
            standby.try_acquire()
        started = time.monotonic()
        assert leader.renew()
        assert time.monotonic() - started < 0.5
        assert leader.verify(claiming)


@postgres_only
def test_a_session_left_in_a_transaction_past_the_lease_is_ended_by_the_next_leader(
    engine: Engine,
) -> None:
    """A leader cut off in the middle of a pipelined batch leaves its session waiting for the
    rest of a message, which PostgreSQL's idle-in-transaction timeout does not end (simulated by
    switching that timeout off for the session). Once the lease has expired and the session has
    been silent for a ttl, a standby's acquire ends it and leads; before that it does not."""
    ttl = 1.0
    leader = SchedulerLease(engine, "cut-off:1", ttl)
    standby = SchedulerLease(engine, "standby:2", ttl)
    # The lease runs out a ttl after it was taken, a little before the session has been silent
    # for a ttl: the lower bound counts from here.
    taken_at = time.monotonic()
    assert leader.try_acquire()
    stuck = engine.connect()
    stuck.begin()
    stuck.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))
    backend = stuck.execute(text("SELECT pg_backend_pid()")).scalar_one()
    stuck.execute(text("SELECT * FROM scheduler_lease FOR SHARE"))
    silent_from = time.monotonic()
    deadline = silent_from + 10
    try:
        # The lease is still held: the row stays locked and the session is left alone.
        with pytest.raises(OperationalError, match="lock timeout"):
            standby.try_acquire()
        acquired = False
        while not acquired:
            assert time.monotonic() < deadline, "the stuck session kept the lease row"
            with contextlib.suppress(OperationalError):
                acquired = standby.try_acquire()
        assert time.monotonic() - taken_at >= ttl
        assert time.monotonic() - silent_from < ttl + 2
        assert _gone(engine, backend), "the stuck session was not ended"
        assert standby.epoch == 2
    finally:
        stuck.invalidate()


def _gone(engine: Engine, pid: int, within: float = 5.0) -> bool:
    """Whether the backend ``pid`` has exited, within ``within`` seconds: pg_terminate_backend
    returns once the backend is signalled, and it exits a moment later."""
    deadline = time.monotonic() + within
    while True:
        with engine.connect() as conn:
            alive = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
            ).scalar_one()
        if alive == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


@postgres_only
def test_taking_over_an_expired_lease_ends_what_its_holder_left_in_a_transaction(
    engine: Engine,
) -> None:
    """The old leader's session stuck inside a transaction that updated a run (not the lease
    row) would block the new leader's recovery of that run: taking the expired lease over ends
    it. A session of the same schema that is not inside a transaction is left alone."""
    ttl = 1.0
    leader = SchedulerLease(engine, "cut-off:1", ttl)
    standby = SchedulerLease(engine, "standby:2", ttl)
    assert leader.try_acquire()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO task_runs (task_name, scheduled_at, attempt, outcome, slots, manual)"
                " VALUES ('t', now(), 1, 'running', 1, false)"
            )
        )
    stuck = engine.connect()
    stuck.begin()
    stuck.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))
    backend = stuck.execute(text("SELECT pg_backend_pid()")).scalar_one()
    stuck.execute(text("UPDATE task_runs SET error = 'half-written' WHERE task_name = 't'"))
    bystander = engine.connect()
    bystander.execute(text("SELECT 1 FROM task_runs LIMIT 1"))
    bystander.commit()
    bystander_pid = bystander.execute(text("SELECT pg_backend_pid()")).scalar_one()
    bystander.commit()
    try:
        deadline = time.monotonic() + 10
        while not standby.try_acquire():
            assert time.monotonic() < deadline, "the expired lease was never taken"
            time.sleep(0.1)
        assert _gone(engine, backend), "the old holder's stuck session still holds the run"
        assert not _gone(engine, bystander_pid, within=0.0)
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '500ms'"))
            conn.execute(text("UPDATE task_runs SET outcome = 'interrupted' WHERE task_name = 't'"))
    finally:
        stuck.invalidate()
        bystander.close()
