"""The scheduling lease: at most one process schedules tasks on a database at a time.

One row of ``scheduler_lease`` per lease name says who holds it (``holder``), since when, and
until when (``expires_at``). The holder renews it well before it expires; a process that cannot
renew stops scheduling at once. Any other process may take the lease once it has expired, and
``epoch`` then grows by one, so that a write made under an old epoch can be told apart (fenced).

Every change happens in :func:`nanobot.db.write_transaction`: ``BEGIN IMMEDIATE`` on SQLite,
which serialises writers of the file, and ``SELECT ... FOR UPDATE`` plus a compare-and-set on
``epoch`` on PostgreSQL, so two processes that try at the same moment never both win.

Time comes from the database where it has a clock of its own (PostgreSQL ``now()``), so that
nodes with skewed clocks agree on expiry; SQLite has none, and its processes share one machine
and so one clock. Tests inject ``clock``, which then replaces both.

The holder id must be unique per process, not per host: two services on one host must not
believe they both hold the lease. :func:`holder_id` gives ``<node>:<pid>``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from nanobot.db import read_transaction, write_transaction
from nanobot.models import SchedulerLease as LeaseRow
from nanobot.models import utcnow

log = structlog.get_logger(__name__)

SCHEDULER_LEASE: Final = "scheduler"

Clock = Callable[[], datetime]


def holder_id(node: str, pid: int | None = None) -> str:
    """The lease holder id of this process: its node name and process id."""
    return f"{node}:{os.getpid() if pid is None else pid}"


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """The stored state of one lease."""

    name: str
    holder: str | None
    epoch: int
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime | None

    def is_held(self, now: datetime) -> bool:
        """True if some holder owns the lease at ``now``."""
        return self.holder is not None and self.expires_at is not None and self.expires_at > now

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "epoch": self.epoch,
            "held": self.is_held(now),
            "acquired_at": _iso(self.acquired_at),
            "renewed_at": _iso(self.renewed_at),
            "expires_at": _iso(self.expires_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _row_info(row: Any) -> LeaseInfo:
    return LeaseInfo(
        name=row.name,
        holder=row.holder,
        epoch=row.epoch,
        acquired_at=row.acquired_at,
        renewed_at=row.renewed_at,
        expires_at=row.expires_at,
    )


def read_lease(conn: Connection, name: str = SCHEDULER_LEASE) -> LeaseInfo | None:
    """The stored state of lease ``name`` inside an open transaction (for status readers)."""
    row = conn.execute(select(LeaseRow.__table__).where(LeaseRow.name == name)).first()
    return None if row is None else _row_info(row)


class SchedulerLease:
    """A time-limited, renewable, exclusive lease stored in the database.

    The methods are synchronous and do database I/O: call them from a thread when an event
    loop is running. They never raise for a lost race: they answer False. Database errors
    propagate (the caller treats them as a failed renewal).
    """

    def __init__(
        self,
        engine: Engine,
        node: str,
        ttl: float,
        clock: Clock | None = None,
        *,
        name: str = SCHEDULER_LEASE,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl!r}")
        self.engine = engine
        self.node = node
        self.ttl = float(ttl)
        self.name = name
        self._clock = clock
        # What this process last knew it held: the epoch, and the expiry written by its last
        # successful acquire or renew.
        self.epoch: int | None = None
        self.expires_at: datetime | None = None
        # time.monotonic() just before the transaction that last set expires_at: a lower bound
        # of when the database started counting, free of any wall-clock skew.
        self._since: float | None = None

    # --- time ---------------------------------------------------------------------------------

    def _now(self, conn: Connection) -> datetime:
        if self._clock is not None:
            return self._clock()
        if conn.dialect.name == "postgresql":
            value = conn.execute(select(func.now())).scalar_one()
            assert isinstance(value, datetime)
            return value
        return utcnow()

    # --- operations ---------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired, or ours already. True if we hold it now."""
        started = time.monotonic()
        try:
            with write_transaction(self.engine) as conn:
                now = self._now(conn)
                expires = now + timedelta(seconds=self.ttl)
                row = conn.execute(
                    select(LeaseRow.__table__).where(LeaseRow.name == self.name).with_for_update()
                ).first()
                if row is None:
                    conn.execute(
                        insert(LeaseRow).values(
                            name=self.name,
                            holder=self.node,
                            epoch=1,
                            acquired_at=now,
                            renewed_at=now,
                            expires_at=expires,
                        )
                    )
                    epoch = 1
                else:
                    current = _row_info(row)
                    if current.holder == self.node:
                        # Ours already (perhaps expired, but nobody took it): same holder, same
                        # epoch.
                        epoch = current.epoch
                        values: dict[str, Any] = {"renewed_at": now, "expires_at": expires}
                    elif not current.is_held(now):
                        epoch = current.epoch + 1
                        values = {
                            "holder": self.node,
                            "epoch": epoch,
                            "acquired_at": now,
                            "renewed_at": now,
                            "expires_at": expires,
                        }
                    else:
                        return False
                    result = conn.execute(
                        update(LeaseRow)
                        .where(LeaseRow.name == self.name, LeaseRow.epoch == current.epoch)
                        .values(**values)
                    )
                    if result.rowcount != 1:
                        return False
        except IntegrityError:
            # Another process inserted the first row at the same moment, and won.
            return False
        previous, self.epoch, self.expires_at = self.epoch, epoch, expires
        self._since = started
        if previous != epoch:
            log.info("lease.acquired", lease=self.name, holder=self.node, epoch=epoch)
        return True

    def renew(self) -> bool:
        """Extend the lease we hold. False if it is no longer ours (or has expired)."""
        if self.epoch is None:
            return False
        started = time.monotonic()
        with write_transaction(self.engine) as conn:
            now = self._now(conn)
            expires = now + timedelta(seconds=self.ttl)
            result = conn.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    LeaseRow.holder == self.node,
                    LeaseRow.epoch == self.epoch,
                    LeaseRow.expires_at > now,
                )
                .values(renewed_at=now, expires_at=expires)
            )
            renewed = result.rowcount == 1
        if renewed:
            self.expires_at = expires
            self._since = started
            return True
        log.warning("lease.lost", lease=self.name, holder=self.node, epoch=self.epoch)
        self._forget()
        return False

    def _forget(self) -> None:
        self.epoch = None
        self.expires_at = None
        self._since = None

    def release(self) -> bool:
        """Give the lease up now, so that a standby can take it at once. False if not ours."""
        if self.epoch is None:
            return False
        with write_transaction(self.engine) as conn:
            now = self._now(conn)
            result = conn.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    LeaseRow.holder == self.node,
                    LeaseRow.epoch == self.epoch,
                )
                .values(holder=None, renewed_at=now, expires_at=now)
            )
            released = result.rowcount == 1
        if released:
            log.info("lease.released", lease=self.name, holder=self.node, epoch=self.epoch)
        self._forget()
        return released

    def holder(self) -> LeaseInfo | None:
        """The stored state of the lease, whoever holds it (None if never taken)."""
        with read_transaction(self.engine) as conn:
            return read_lease(conn, self.name)

    def seconds_left(self) -> float:
        """Seconds our lease still certainly lasts, by this process's monotonic clock; 0 if none.

        Answers without the database: the holder uses it to stop scheduling before its lease
        can expire when the database stops answering.
        """
        if self.epoch is None or self._since is None:
            return 0.0
        return max(0.0, self.ttl - (time.monotonic() - self._since))
