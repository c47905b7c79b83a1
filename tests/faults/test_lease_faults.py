"""Faults of the lease itself: a stale release (issue item 4), a dead holder on this node
(item 5, at the level of the lease; the restart scenario is in test_restart.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

from sqlalchemy import Engine, text

from nanobot.db import write_transaction
from nanobot.lease import SchedulerLease, holder_id, holder_is_dead, process_exists


def test_a_delayed_release_does_not_free_a_lease_taken_again(engine: Engine) -> None:
    """A release fenced by an older acquisition (it timed out, and its write lands after the
    process took the lease again) leaves the new acquisition alone: the re-acquire has a new
    epoch, and the release's WHERE compares the epoch it was made under."""
    lease = SchedulerLease(engine, "n1:100", 10)
    assert lease.try_acquire()
    first_epoch = lease.epoch
    # The state the stale release was made from: this process, the first acquisition.
    stale = SchedulerLease(engine, "n1:100", 10)
    stale.epoch, stale.expires_at = lease.epoch, lease.expires_at
    assert lease.release()
    assert lease.try_acquire(), "the same process takes the lease again"
    assert lease.epoch is not None
    assert first_epoch is not None
    assert lease.epoch > first_epoch, "a re-acquisition is a new epoch"
    assert not stale.release(), "the delayed release finds nothing of its own"
    info = lease.holder()
    assert info is not None
    assert (info.holder, info.epoch) == ("n1:100", lease.epoch)
    assert lease.renew(), "the lease taken again is still held"


def test_a_release_waiting_on_a_locked_database_cannot_undo_a_reacquire(engine: Engine) -> None:
    """The release stops believing it holds the lease before it writes: an acquire made while
    the release waits for the locked database takes a new epoch, whichever of the two then
    gets the database first. In the end the process holds the lease."""
    lease = SchedulerLease(engine, "n1:100", 10)
    assert lease.try_acquire()
    blocking = contextlib.ExitStack()
    # SQLite: the write lock of BEGIN IMMEDIATE; PostgreSQL: the lease row, locked FOR UPDATE.
    blocker = blocking.enter_context(write_transaction(engine))
    if engine.dialect.name == "postgresql":
        blocker.execute(text("SELECT * FROM scheduler_lease FOR UPDATE"))
    results: dict[str, bool] = {}
    release = threading.Thread(target=lambda: results.update(release=lease.release()))
    release.start()
    deadline = time.monotonic() + 5
    while lease.epoch is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lease.epoch is None, "the release forgot the lease before its write"
    acquire = threading.Thread(target=lambda: results.update(acquire=lease.try_acquire()))
    acquire.start()
    time.sleep(0.3)  # both wait on the lock now; the order they get it in is the database's
    blocking.close()
    release.join(15)
    acquire.join(15)
    assert results.get("acquire") is True, results
    info = lease.holder()
    assert info is not None
    assert info.holder == "n1:100"
    assert info.expires_at is not None
    assert lease.renew(), "the process still holds the lease it took again"


def test_a_dead_holder_of_this_node_is_replaced_at_once(engine: Engine) -> None:
    """The holder is this node (another pid, now gone): the lease is taken without waiting for
    its expiry; a live holder of this node, and a dead holder of another node on PostgreSQL,
    still wait."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    dead_pid = int(dead.stdout)
    assert not process_exists(dead_pid)
    node = "host-x:abcd1234"
    old = SchedulerLease(engine, holder_id(node, dead_pid), 30)
    assert old.try_acquire()
    new = SchedulerLease(engine, holder_id(node, os.getpid()), 30)
    assert new.try_acquire(), "the holder's process is gone: no wait for the 30 s expiry"
    info = new.holder()
    assert info is not None
    assert info.holder == holder_id(node, os.getpid())

    live = SchedulerLease(engine, holder_id(node, os.getppid()), 30)
    assert not live.try_acquire(), "a live process of this node keeps its lease"

    other_node = holder_id("elsewhere:00000001", dead_pid)
    assert not holder_is_dead(other_node, holder_id(node), same_host_database=False)
    assert not holder_is_dead(holder_id(node), holder_id(node), same_host_database=True)
