"""The outbox: every statement on ``alerts``, ``alert_deliveries`` and ``alert_subjects``.

An alert is inserted with one ``pending`` delivery per destination whose filter takes it, in the
caller's transaction (the one that records the rules' new state), so an alert exists if and only
if the state change that caused it was recorded. Its key is unique: a second insert of the same
transition (a retry after a crash, two leaders for a moment) is ignored.

Functions taking an ``Engine`` open their own transaction and do blocking I/O: call them from a
thread. Functions taking a ``Connection`` run in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Connection, Engine, Row, Table, and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from nanobot.alerts.alert import Alert, AlertKind, DeliveryState, Severity
from nanobot.alerts.destinations import Destination
from nanobot.db import read_transaction, write_transaction
from nanobot.models import AlertDelivery, AlertRecord, AlertSubject, bound_error

_ALERTS = cast(Table, AlertRecord.__table__)
_DELIVERIES = cast(Table, AlertDelivery.__table__)
_SUBJECTS = cast(Table, AlertSubject.__table__)
QUIET_STATES: Final = ("ok", "healthy")


@dataclass(frozen=True, slots=True)
class SubjectState:
    """What the rules last told about one subject (see :class:`nanobot.models.AlertSubject`)."""

    key: str
    alerted: str
    observed: str
    flips: int = 0
    seq: int = 0
    last_alert_at: datetime | None = None
    cursor_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Due:
    """A delivery whose next attempt is due, with its alert."""

    delivery_id: int
    destination: str
    attempts: int
    alert: Alert


@dataclass(frozen=True, slots=True)
class DeliveryView:
    destination: str
    state: DeliveryState
    attempts: int
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    sent_at: datetime | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class AlertView:
    id: int
    alert: Alert
    deliveries: tuple[DeliveryView, ...]


def _insert(conn: Connection, table: Table) -> Any:
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def _alert_from_row(row: Row[*tuple[Any, ...]]) -> Alert:
    return Alert(
        key=row.key,
        kind=AlertKind(row.kind),
        subject=row.subject,
        severity=Severity(row.severity),
        title=row.title,
        body=row.body,
        link=row.link,
        # By key: to the type checker row.count is the tuple's method, not the column.
        count=row._mapping["count"],
        members=tuple(row.members or ()),
        created_at=row.created_at,
    )


def write_alerts(
    conn: Connection,
    alerts: Sequence[Alert],
    destinations: Sequence[Destination],
    *,
    sent: Mapping[str, frozenset[str]] | None = None,
) -> list[int]:
    """Insert ``alerts`` and their pending deliveries; the ids of the alerts new to the outbox.

    ``sent`` maps alert keys to destinations that were sent the alert already (directly, while
    the outbox could not be written): those deliveries are recorded sent, with one attempt.
    """
    sent = sent or {}
    ids: list[int] = []
    for alert in alerts:
        stmt = (
            _insert(conn, _ALERTS)
            .values(
                key=alert.key,
                kind=alert.kind.value,
                subject=alert.subject,
                severity=alert.severity.value,
                title=alert.title,
                body=alert.body,
                link=alert.link,
                count=alert.count,
                members=list(alert.members),
                created_at=alert.created_at,
            )
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(_ALERTS.c.id)
        )
        alert_id = conn.execute(stmt).scalar()
        if alert_id is None:
            continue  # this transition is in the outbox already
        ids.append(int(alert_id))
        already = sent.get(alert.key, frozenset())
        rows = [
            {
                "alert_id": alert_id,
                "destination": d.name,
                "state": DeliveryState.SENT.value
                if d.name in already
                else DeliveryState.PENDING.value,
                "attempts": 1 if d.name in already else 0,
                "next_attempt_at": None if d.name in already else alert.created_at,
                "last_attempt_at": alert.created_at if d.name in already else None,
                "sent_at": alert.created_at if d.name in already else None,
            }
            for d in destinations
            if d.accepts(alert)
        ]
        if rows:
            conn.execute(_DELIVERIES.insert(), rows)
    return ids


def due(
    engine: Engine,
    *,
    now: datetime,
    destinations: Iterable[str],
    limit: int,
    kinds: Iterable[AlertKind] = (),
) -> list[Due]:
    """Pending deliveries due at ``now``, oldest first, at most ``limit`` per destination (so
    that the backlog of one destination never hides the others'), optionally only of ``kinds``."""
    only = [k.value for k in kinds]
    found: list[Due] = []
    with read_transaction(engine) as conn:
        for name in destinations:
            where = [
                _DELIVERIES.c.state == DeliveryState.PENDING.value,
                _DELIVERIES.c.destination == name,
                _DELIVERIES.c.next_attempt_at <= now,
            ]
            if only:
                where.append(_ALERTS.c.kind.in_(only))
            rows = conn.execute(
                select(
                    _DELIVERIES.c.id.label("delivery_id"),
                    _DELIVERIES.c.destination,
                    _DELIVERIES.c.attempts,
                    _ALERTS,
                )
                .join(_ALERTS, _ALERTS.c.id == _DELIVERIES.c.alert_id)
                .where(*where)
                .order_by(_DELIVERIES.c.next_attempt_at, _DELIVERIES.c.id)
                .limit(limit)
            ).all()
            found.extend(
                Due(
                    delivery_id=int(r.delivery_id),
                    destination=r.destination,
                    attempts=int(r.attempts),
                    alert=_alert_from_row(r),
                )
                for r in rows
            )
    return found


def record_attempt(
    engine: Engine,
    delivery_id: int,
    *,
    now: datetime,
    ok: bool,
    error: str | None = None,
    retry_at: datetime | None = None,
) -> DeliveryState:
    """Record one attempt: sent, or failed with ``error`` and retried at ``retry_at`` (given up
    when ``retry_at`` is None). The new state."""
    if ok:
        state = DeliveryState.SENT
        values: dict[str, Any] = {"sent_at": now, "next_attempt_at": None, "last_error": None}
    else:
        state = DeliveryState.PENDING if retry_at is not None else DeliveryState.FAILED
        values = {"next_attempt_at": retry_at, "last_error": bound_error(error)}
    with write_transaction(engine) as conn:
        conn.execute(
            update(_DELIVERIES)
            .where(
                _DELIVERIES.c.id == delivery_id,
                _DELIVERIES.c.state == DeliveryState.PENDING.value,
            )
            .values(
                state=state.value,
                attempts=_DELIVERIES.c.attempts + 1,
                last_attempt_at=now,
                **values,
            )
        )
    return state


def drop_unconfigured(engine: Engine, names: Iterable[str]) -> int:
    """Mark pending deliveries to destinations no longer configured as dropped."""
    with write_transaction(engine) as conn:
        result = conn.execute(
            update(_DELIVERIES)
            .where(
                _DELIVERIES.c.state == DeliveryState.PENDING.value,
                _DELIVERIES.c.destination.not_in(list(names)),
            )
            .values(state=DeliveryState.DROPPED.value, next_attempt_at=None)
        )
        return int(result.rowcount or 0)


def recent(engine: Engine, *, limit: int) -> list[AlertView]:
    """The newest ``limit`` alerts with their deliveries, newest first."""
    with read_transaction(engine) as conn:
        alerts = conn.execute(
            select(_ALERTS).order_by(_ALERTS.c.created_at.desc(), _ALERTS.c.id.desc()).limit(limit)
        ).all()
        ids = [a.id for a in alerts]
        deliveries: dict[int, list[DeliveryView]] = {i: [] for i in ids}
        if ids:
            for d in conn.execute(
                select(_DELIVERIES)
                .where(_DELIVERIES.c.alert_id.in_(ids))
                .order_by(_DELIVERIES.c.destination)
            ).all():
                deliveries[d.alert_id].append(
                    DeliveryView(
                        destination=d.destination,
                        state=DeliveryState(d.state),
                        attempts=d.attempts,
                        last_attempt_at=d.last_attempt_at,
                        next_attempt_at=d.next_attempt_at,
                        sent_at=d.sent_at,
                        last_error=d.last_error,
                    )
                )
    return [
        AlertView(id=a.id, alert=_alert_from_row(a), deliveries=tuple(deliveries[a.id]))
        for a in alerts
    ]


def pending_stats(conn: Connection) -> tuple[int, datetime | None]:
    """How many deliveries are pending, and when the oldest of their alerts was created."""
    row = conn.execute(
        select(func.count(), func.min(_ALERTS.c.created_at))
        .select_from(_DELIVERIES)
        .join(_ALERTS, _ALERTS.c.id == _DELIVERIES.c.alert_id)
        .where(_DELIVERIES.c.state == DeliveryState.PENDING.value)
    ).one()
    return int(row[0]), row[1]


def load_subjects(conn: Connection, prefix: str) -> dict[str, SubjectState]:
    rows = conn.execute(select(_SUBJECTS).where(_SUBJECTS.c.key.startswith(prefix))).all()
    return {
        r.key: SubjectState(
            key=r.key,
            alerted=r.alerted,
            observed=r.observed,
            flips=r.flips,
            seq=r.seq,
            last_alert_at=r.last_alert_at,
            cursor_at=r.cursor_at,
        )
        for r in rows
    }


def save_subjects(conn: Connection, states: Iterable[SubjectState], *, now: datetime) -> None:
    rows = [
        {
            "key": s.key,
            "alerted": s.alerted,
            "observed": s.observed,
            "flips": s.flips,
            "seq": s.seq,
            "last_alert_at": s.last_alert_at,
            "cursor_at": s.cursor_at,
            "updated_at": now,
        }
        for s in states
    ]
    if not rows:
        return
    stmt = _insert(conn, _SUBJECTS)
    stmt = stmt.on_conflict_do_update(
        index_elements=["key"],
        set_={
            c: getattr(stmt.excluded, c)
            for c in ("alerted", "observed", "flips", "seq", "last_alert_at", "cursor_at")
        }
        | {"updated_at": stmt.excluded.updated_at},
    )
    conn.execute(stmt, rows)


def prune(engine: Engine, *, now: datetime, retention_days: float) -> int:
    """Delete alerts older than the retention that nothing still has to deliver, with their
    deliveries, and quiet subject states as old; the number of alerts deleted."""
    cutoff = now - timedelta(days=retention_days)
    with write_transaction(engine) as conn:
        pending = (
            select(_DELIVERIES.c.alert_id)
            .where(_DELIVERIES.c.state == DeliveryState.PENDING.value)
            .scalar_subquery()
        )
        old = select(_ALERTS.c.id).where(
            _ALERTS.c.created_at < cutoff, _ALERTS.c.id.not_in(pending)
        )
        conn.execute(delete(_DELIVERIES).where(_DELIVERIES.c.alert_id.in_(old)))
        result = conn.execute(
            delete(_ALERTS).where(_ALERTS.c.created_at < cutoff, _ALERTS.c.id.not_in(pending))
        )
        conn.execute(
            delete(_SUBJECTS).where(
                and_(
                    _SUBJECTS.c.updated_at < cutoff,
                    _SUBJECTS.c.alerted == _SUBJECTS.c.observed,
                    # Only subjects at rest: one still failing must stay, or it would be
                    # alerted again as new.
                    _SUBJECTS.c.observed.in_(QUIET_STATES),
                    _SUBJECTS.c.flips == 0,
                )
            )
        )
        return int(result.rowcount or 0)
