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
believe they both hold the lease. :func:`holder_id` gives ``<node>:<pid>``, and only this module
reads one apart (:func:`holder_node`, :attr:`LeaseInfo.node`).

A holder that is known to be dead does not keep the lease until it expires: when the holder is
this node (the same home, so the same host) or, on SQLite, any process of this host, and its
process no longer exists, the lease is taken at once (a restart right after ``kill -9`` leads
without waiting ``ttl``). A live process, even a frozen one, is never displaced this way.

Every acquisition by a process that does not already hold the lease gets a new epoch, also when
the row still names it (a re-acquire after a release or a loss): a release (or any write fenced
by epoch) that was delayed past it, for example one that timed out on a locked database and
completed later, cannot undo it.

On PostgreSQL the leader also holds :class:`AdvisoryLock`, a session-level advisory lock on a
connection of its own, which it checks every second or so. The lock makes the loss of the
leader's connection visible at once (a network cut, a database restart, a terminated backend),
where the row alone would only tell at the next renewal; the row stays the record of who leads
and the guard of the hand-over: a standby needs both, and the row is held until it expires or
is released, so a standby that takes the lock the moment the leader's session dies still waits
until the old leader has stepped down and released the row.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    bindparam,
    create_engine,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from nanobot.db import read_transaction, write_transaction
from nanobot.models import SchedulerLease as LeaseRow
from nanobot.models import error_text, utcnow
from nanobot.times import Clock, iso, positive_seconds

log = structlog.get_logger(__name__)

SCHEDULER_LEASE: Final = "scheduler"
# The first key of nanobot's two-key advisory locks ("nb"); the second is derived from the schema
# and the lease name, so that schemas of one database (tests, several deployments) do not meet.
# Migrations use the one-key form, which PostgreSQL keeps apart from the two-key form.
LOCK_CLASS_ID: Final = 0x6E62
# The lock connection's application_name is this prefix and the holder id, so that an operator
# (or a test) can find it in pg_stat_activity.
LOCK_APPLICATION_PREFIX: Final = "nanobot-lock:"


def _lock_not_available(exc: OperationalError) -> bool:
    """True for PostgreSQL's lock timeout (SQLSTATE 55P03), as ``lock_timeout`` raises it."""
    return getattr(exc.orig, "sqlstate", None) == "55P03"


def holder_id(node: str, pid: int | None = None) -> str:
    """The lease holder id of this process: its node name and process id."""
    return f"{node}:{os.getpid() if pid is None else pid}"


def _split_holder(holder: str) -> tuple[str, int] | None:
    # rpartition: the node name may hold colons (a default node name is "<host>:<hash>").
    node, sep, pid = holder.rpartition(":")
    if not sep or not pid.isdigit():
        return None
    return node, int(pid)


def holder_node(holder: str | None) -> str | None:
    """The node of a holder id made by :func:`holder_id`; an id of another form is its own node."""
    if holder is None:
        return None
    split = _split_holder(holder)
    return holder if split is None else split[0]


def process_exists(pid: int) -> bool:
    """True if a process ``pid`` exists on this host (a zombie or a frozen one included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def holder_is_dead(holder: str, own: str, *, same_host_database: bool) -> bool:
    """True if ``holder`` is certainly a process of this host that no longer exists.

    ``own`` is this process's holder id. The holder counts as local when its node is this
    process's node (one home, one host) or, with ``same_host_database`` (SQLite: every process
    of the file shares this host), when its node is any node named after this host. Anything
    else (another host, a pid of another process namespace) is never judged: it waits for the
    lease to expire.
    """
    theirs, mine = _split_holder(holder), _split_holder(own)
    if theirs is None or mine is None or theirs == mine:
        return False
    node, pid = theirs
    host = socket.gethostname()
    local = node == mine[0] or (
        same_host_database and (node == host or node.startswith(f"{host}:"))
    )
    return local and pid > 0 and not process_exists(pid)


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

    @property
    def node(self) -> str | None:
        """The node of the holder (None once released)."""
        return holder_node(self.holder)

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "epoch": self.epoch,
            "held": self.is_held(now),
            "acquired_at": iso(self.acquired_at),
            "renewed_at": iso(self.renewed_at),
            "expires_at": iso(self.expires_at),
        }


def _row_info(row: Row[*tuple[Any, ...]]) -> LeaseInfo:
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


# What every claiming transaction runs (SchedulerLease.verify), built once: many times a second.
_VERIFY: Final = select(LeaseRow.holder, LeaseRow.epoch, LeaseRow.expires_at).where(
    LeaseRow.name == bindparam("b_name")
)
# On PostgreSQL the row is locked FOR KEY SHARE, and the database's clock read with it. That
# lock holds up a take-over (whose acquire reads the row FOR UPDATE first) until the claiming
# transaction ends, and not the holder's own renewal (a plain UPDATE of columns outside the
# key): FOR SHARE held it up too, and a pass that claimed a burst of 20,000 slots for longer
# than the lock timeout (a ninth of the lease) made the leader's renewal fail and the leader
# step down in the middle of its burst.
_VERIFY_PG: Final = (
    select(LeaseRow.holder, LeaseRow.epoch, LeaseRow.expires_at, func.now().label("now"))
    .where(LeaseRow.name == bindparam("b_name"))
    .with_for_update(read=True, key_share=True)
)


class SchedulerLease:
    """A time-limited, renewable, exclusive lease stored in the database.

    The methods are synchronous and do database I/O: call them from a thread when an event
    loop is running. They never raise for a lost race: they answer False. Database errors
    propagate (the caller treats them as a failed renewal).
    """

    def __init__(
        self,
        engine: Engine,
        holder_id: str,
        ttl: float,
        clock: Clock | None = None,
        *,
        name: str = SCHEDULER_LEASE,
    ) -> None:
        self.ttl = positive_seconds(ttl, "lease ttl")
        self.engine = engine
        self.holder_id = holder_id
        self.name = name
        self._clock = clock
        # What this process last knew it held: the epoch, and the expiry written by its last
        # successful acquire or renew.
        self.epoch: int | None = None
        self.expires_at: datetime | None = None
        # time.monotonic() just before the transaction that last set expires_at: a lower bound
        # of when the database started counting, free of any wall-clock skew.
        self._since: float | None = None
        # After an acquire refused because another holder's lease was live: how many seconds
        # it had left (a standby can try again right after it expires rather than a poll later).
        self.refused_for: float | None = None

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
        """Take the lease if it is free, expired, or ours already. True if we hold it now.

        On PostgreSQL, the sessions that the previous holder left inside a transaction are
        ended when the lease is taken over from it, and when an acquire finds the row locked by
        one of them (see :meth:`_end_stale_sessions`); the acquire is then tried once more.
        """
        try:
            return self._try_acquire()
        except OperationalError as exc:
            if not _lock_not_available(exc) or not self._end_stale_sessions(taken_over=False):
                raise
        return self._try_acquire()

    def _end_stale_sessions(self, *, taken_over: bool) -> bool:
        """End the sessions that an expired holder left inside a transaction on this schema.

        PostgreSQL ends a session idle in a transaction after ``idle_in_transaction_session_
        timeout`` (one ttl, :class:`nanobot.db.SessionLimits`), which frees the rows a frozen
        leader locked. A leader cut off in the middle of a pipelined batch, behind a proxy or
        load balancer that keeps the TCP connection open, leaves the server waiting for the rest
        of a message instead: that wait is not "idle", the timeout never fires, the keepalives
        are answered, and its locks (the lease row read FOR KEY SHARE, ``task_runs`` rows it was
        updating) stayed until the statement timeout, a minute: no standby could lead, or the
        new leader's recovery could not mark the old runs interrupted (seen: no leader 12 s
        after the cut). Such sessions are ended here, only once the lease has expired by the
        database's clock (``taken_over``: this process has just taken it over), and only those
        that have sent nothing for longer than the renewal period: no live leader keeps a
        transaction waiting that long, and the holder has lost the lease anyway. True if a
        session was ended.
        """
        with write_transaction(self.engine) as conn:
            if conn.dialect.name != "postgresql":
                return False
            if not taken_over:
                row = conn.execute(
                    select(LeaseRow.__table__).where(LeaseRow.name == self.name)
                ).first()
                if row is None or _row_info(row).is_held(self._now(conn)):
                    return False
            stale = conn.execute(
                text(
                    "SELECT DISTINCT a.pid, a.state,"
                    " extract(epoch FROM now() - a.state_change) AS quiet"
                    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " JOIN pg_class c ON c.oid = l.relation"
                    " WHERE l.locktype = 'relation' AND l.granted"
                    " AND c.relnamespace = CAST(current_schema() AS regnamespace)"
                    " AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL"
                    " AND a.state <> 'active'"
                    " AND a.state_change < now() - make_interval(secs => :quiet)"
                ),
                {"quiet": self.ttl / 3},
            ).all()
            ended = []
            for pid, state, quiet in stale:
                if conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar():
                    ended.append(pid)
                    log.warning(
                        "lease.stale_session_ended",
                        lease=self.name,
                        pid=pid,
                        state=state,
                        quiet_s=round(float(quiet), 3),
                    )
        return bool(ended)

    def _try_acquire(self) -> bool:
        started = time.monotonic()
        self.refused_for = None
        taken_from: str | None = None
        try:
            with write_transaction(self.engine) as conn:
                if conn.dialect.name == "postgresql":
                    # A row locked by a leader frozen inside its claim transaction must not hold
                    # this poll: give up after a ninth of the lease and try at the next one.
                    conn.execute(
                        text("SELECT set_config('lock_timeout', :ms, true)"),
                        {"ms": str(max(1, int(self.ttl / 9 * 1000)))},
                    )
                now = self._now(conn)
                expires = now + timedelta(seconds=self.ttl)
                row = conn.execute(
                    select(LeaseRow.__table__).where(LeaseRow.name == self.name).with_for_update()
                ).first()
                if row is None:
                    conn.execute(
                        insert(LeaseRow).values(
                            name=self.name,
                            holder=self.holder_id,
                            epoch=1,
                            acquired_at=now,
                            renewed_at=now,
                            expires_at=expires,
                        )
                    )
                    epoch = 1
                else:
                    current = _row_info(row)
                    if current.holder == self.holder_id and current.epoch == self.epoch:
                        # Ours already (perhaps expired, but nobody took it): same holder, same
                        # epoch.
                        epoch = current.epoch
                        values: dict[str, Any] = {"renewed_at": now, "expires_at": expires}
                    elif (
                        current.holder == self.holder_id
                        or not current.is_held(now)
                        or self._holder_dead(conn, current.holder)
                    ):
                        if current.holder not in (None, self.holder_id) and current.is_held(now):
                            log.info(
                                "lease.dead_holder_replaced",
                                lease=self.name,
                                dead=current.holder,
                                holder=self.holder_id,
                            )
                        epoch = current.epoch + 1
                        taken_from = current.holder if current.holder != self.holder_id else None
                        values = {
                            "holder": self.holder_id,
                            "epoch": epoch,
                            "acquired_at": now,
                            "renewed_at": now,
                            "expires_at": expires,
                        }
                    else:
                        assert current.expires_at is not None
                        self.refused_for = (current.expires_at - now).total_seconds()
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
            log.info("lease.acquired", lease=self.name, holder=self.holder_id, epoch=epoch)
        if taken_from is not None and self.engine.dialect.name == "postgresql":
            # Before this process starts scheduling: what the old holder left locked must not
            # hold up the recovery of its runs.
            try:
                self._end_stale_sessions(taken_over=True)
            except DBAPIError as exc:
                log.warning(
                    "lease.stale_sessions_unchecked", lease=self.name, error=error_text(exc)
                )
        return True

    def _holder_dead(self, conn: Connection, holder: str | None) -> bool:
        if holder is None or self._clock is not None:
            # An injected clock means a test of expiry: leave the process table out of it.
            return False
        return holder_is_dead(
            holder, self.holder_id, same_host_database=conn.dialect.name == "sqlite"
        )

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
                    LeaseRow.holder == self.holder_id,
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
        log.warning("lease.lost", lease=self.name, holder=self.holder_id, epoch=self.epoch)
        self._forget()
        return False

    def verify(self, conn: Connection) -> bool:
        """Inside the caller's write transaction: True if this process still holds the lease.

        The scheduler calls it in the transaction that claims slots, so that a leader that was
        frozen past its lease (a paused VM, SIGSTOP) claims nothing once another node leads. On
        PostgreSQL the row is locked FOR KEY SHARE until that transaction ends, so a take-over
        (which reads the row FOR UPDATE) waits for it while this process's own renewal does
        not; on SQLite the write transaction's BEGIN IMMEDIATE serialises writers.
        """
        epoch = self.epoch
        if epoch is None:
            return False
        postgres = conn.dialect.name == "postgresql"
        row = conn.execute(_VERIFY_PG if postgres else _VERIFY, {"b_name": self.name}).first()
        if row is None:
            return False
        # On PostgreSQL the database's clock comes with the row (one round trip, not two).
        now = self._clock() if self._clock is not None else row.now if postgres else utcnow()
        return bool(
            row.holder == self.holder_id
            and row.epoch == epoch
            and row.expires_at is not None
            and row.expires_at > now
        )

    def _forget(self) -> None:
        self.epoch = None
        self.expires_at = None
        self._since = None

    def release(self) -> bool:
        """Give the lease up now, so that a standby can take it at once. False if not ours.

        This process stops believing it holds the lease before the database answers: an
        acquire made while this release waits (on a locked database, say) takes a new epoch,
        which this release, fenced by the old one, then leaves alone.
        """
        epoch = self.epoch
        if epoch is None:
            return False
        self._forget()
        with write_transaction(self.engine) as conn:
            now = self._now(conn)
            result = conn.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    LeaseRow.holder == self.holder_id,
                    LeaseRow.epoch == epoch,
                )
                .values(holder=None, renewed_at=now, expires_at=now)
            )
            released = result.rowcount == 1
        if released:
            log.info("lease.released", lease=self.name, holder=self.holder_id, epoch=epoch)
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


def lock_key(schema: str, name: str = SCHEDULER_LEASE) -> int:
    """The second key of the advisory lock of lease ``name`` in ``schema`` (0 to 2**31 - 1).

    Non-negative, so that it reads the same in ``pg_locks.objid`` (an unsigned oid).
    """
    return zlib.crc32(f"{schema}.{name}".encode()) & 0x7FFFFFFF


class AdvisoryLock:
    """A session-level PostgreSQL advisory lock held on a dedicated connection.

    The lock lives exactly as long as the connection's session: whatever ends the session (the
    process dies, the network is cut, the database restarts, an operator terminates the
    backend) frees it, and the holder learns it at its next :meth:`check`. The session is set
    up so that the server also ends it on its own when the holder goes silent:
    ``idle_session_timeout`` of ``ttl`` (PostgreSQL 14 and later) and TCP keepalives, so that a
    holder cut off from the database cannot keep the lock for longer than about ``ttl``.

    The methods are synchronous and do database I/O: call them from a thread. One runs at a
    time; :meth:`release` called while another waits on a silent server does not wait for it
    beyond ``timeout``: the waiting call closes the connection when it returns.
    """

    def __init__(
        self, engine: Engine, holder: str, ttl: float, *, name: str = SCHEDULER_LEASE
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError(f"advisory locks need PostgreSQL, not {engine.dialect.name}")
        self.ttl = positive_seconds(ttl, "lease ttl")
        self.holder = holder
        self.name = name
        self.application_name = (LOCK_APPLICATION_PREFIX + holder)[:63]
        period = max(1, math.ceil(self.ttl / 3))
        self._engine = create_engine(
            engine.url,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={
                "application_name": self.application_name,
                "connect_timeout": period,
                # Client side: a silent server fails a call within about ttl/3.
                "keepalives": 1,
                "keepalives_idle": period,
                "keepalives_interval": 1,
                "keepalives_count": 3,
                "tcp_user_timeout": period * 1000,
            },
        )
        self._conn: Connection | None = None
        self._key: int | None = None
        self._wanted = False
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        """True while this object believes it holds the lock (as of its last call)."""
        return self._conn is not None

    def try_acquire(self) -> bool:
        """Take the lock if no other session holds it. True if we hold it now.

        Database errors propagate (the lock is then not held).
        """
        self._wanted = True
        with self._mutex:
            if self._conn is not None:
                return self._check_locked()
            conn = self._engine.connect()
            try:
                key = lock_key(self._set_up(conn), self.name)
                got = conn.execute(
                    text("SELECT pg_try_advisory_lock(:a, :b)"), {"a": LOCK_CLASS_ID, "b": key}
                ).scalar_one()
            except BaseException:
                self._close_quietly(conn)
                raise
            if not got or not self._wanted:
                self._close_quietly(conn)
                return False
            self._conn, self._key = conn, key
        log.info(
            "lease.lock_acquired",
            lease=self.name,
            holder=self.holder,
            key=[LOCK_CLASS_ID, key],
            application_name=self.application_name,
        )
        return True

    def check(self) -> bool:
        """True if our session still holds the lock; False (and the connection closed) if not.

        A cheap query on the lock's own connection: an error (the session is gone) counts as
        the lock lost, and is logged.
        """
        with self._mutex:
            return self._check_locked()

    def release(self, timeout: float = 5.0) -> None:
        """Give the lock up: unlock and close the session. Never raises."""
        self._wanted = False
        if not self._mutex.acquire(timeout=timeout):
            # A call in progress waits on a silent server; it closes the session when it returns.
            log.warning("lease.lock_release_deferred", lease=self.name, holder=self.holder)
            return
        try:
            conn = self._conn
            if conn is None:
                return
            self._conn = None
            self._unlock(conn)
            log.info("lease.lock_released", lease=self.name, holder=self.holder)
        finally:
            self._mutex.release()

    def dispose(self) -> None:
        """Release the lock and drop the engine of the dedicated connection."""
        self.release()
        self._engine.dispose()

    # --- inside the mutex ---------------------------------------------------------------------

    def _set_up(self, conn: Connection) -> str:
        """Set the session up; the current schema (one round trip when the server accepts all).

        Server side: a session that stays idle (a holder that stopped checking) or whose peer
        is gone ends, and frees the lock, after about ttl. On an older server that refuses one
        of them (idle_session_timeout came with PostgreSQL 14), the others are set one by one.
        """
        ttl_ms = str(int(self.ttl * 1000))
        settings = {
            "idle_session_timeout": ttl_ms,
            "tcp_keepalives_idle": str(max(1, math.ceil(self.ttl / 3))),
            "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": "3",
            "statement_timeout": ttl_ms,
        }
        calls = ", ".join(f"set_config(:k{i}, :v{i}, false)" for i in range(len(settings)))
        params: dict[str, str] = {}
        for i, (key, value) in enumerate(settings.items()):
            params[f"k{i}"], params[f"v{i}"] = key, value
        try:
            return str(conn.execute(text(f"SELECT current_schema(), {calls}"), params).scalar_one())
        except DBAPIError:
            if conn.invalidated or conn.closed:
                raise
        for key, value in settings.items():
            try:
                conn.execute(text("SELECT set_config(:k, :v, false)"), {"k": key, "v": value})
            except DBAPIError as exc:
                if conn.invalidated or conn.closed:
                    raise
                log.warning(
                    "lease.lock_setting_refused",
                    setting=key,
                    error=error_text(exc).splitlines()[0],
                )
        return str(conn.execute(text("SELECT current_schema()")).scalar_one())

    def _check_locked(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        error: str | None = None
        try:
            held = bool(
                conn.execute(
                    text(
                        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                        " AND pid = pg_backend_pid() AND classid = :a AND objid = :b"
                        " AND objsubid = 2 AND granted)"
                    ),
                    {"a": LOCK_CLASS_ID, "b": self._key},
                ).scalar_one()
            )
        except DBAPIError as exc:
            error = error_text(exc).splitlines()[0]
            held = False
        if held and self._wanted:
            return True
        self._conn = None
        if held:
            # Released while this call waited on the server: finish the release now.
            self._unlock(conn)
        else:
            self._close_quietly(conn)
            if self._wanted:
                log.warning("lease.lock_lost", lease=self.name, holder=self.holder, error=error)
        return False

    def _unlock(self, conn: Connection) -> None:
        # An error means the session is gone, and the lock with it.
        with contextlib.suppress(DBAPIError):
            conn.execute(
                text("SELECT pg_advisory_unlock(:a, :b)"), {"a": LOCK_CLASS_ID, "b": self._key}
            )
        self._close_quietly(conn)

    @staticmethod
    def _close_quietly(conn: Connection) -> None:
        with contextlib.suppress(Exception):
            conn.close()
