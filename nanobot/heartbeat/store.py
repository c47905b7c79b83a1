"""Persistence of the heartbeat monitor: plain records in, plain records out.

The monitor keeps its state in memory and hands one :class:`Batch` per cycle to
:func:`write_batch`, which writes it in one transaction: the components that changed (an upsert
on ``(name, node)``), the components unregistered since the last cycle, new errors, new status
changes and one ``heartbeats`` row. :func:`load_state` reads a node's state back at start, and
:func:`prune` is what the scheduler's cleanup task calls to apply retention.

Everything here is synchronous and does blocking I/O: the monitor calls it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Connection, Engine, Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from nanobot.config import get_config
from nanobot.db import read_transaction, write_transaction
from nanobot.models import (
    Component,
    ComponentErrorRecord,
    ComponentStatusChange,
    Heartbeat,
    utcnow,
)

# Errors kept per component in memory and shown by get_component_status (the seed's bound).
ERRORS_SHOWN: Final = 10
# The name under which the system's own status transitions are stored in
# component_status_changes; no component may register under it.
SYSTEM_COMPONENT: Final = "(system)"

_components = cast(Table, Component.__table__)
_errors = cast(Table, ComponentErrorRecord.__table__)
_changes = cast(Table, ComponentStatusChange.__table__)
_heartbeats = cast(Table, Heartbeat.__table__)


@dataclass(frozen=True, slots=True)
class ComponentRow:
    """The latest state of one component, as written to ``components``."""

    name: str
    status: str
    last_heartbeat: datetime | None
    last_error: str | None
    registered_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ErrorRow:
    component: str
    at: datetime
    error: str


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One status transition; ``component`` is :data:`SYSTEM_COMPONENT` for the system's."""

    component: str
    at: datetime
    from_status: str | None
    to_status: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class HeartbeatRow:
    at: datetime
    status: str
    interval_s: float
    total: int
    healthy: int
    error: int
    unknown: int


@dataclass(slots=True)
class Batch:
    """Everything one cycle writes, in one transaction."""

    node: str
    deletes: list[str] = field(default_factory=list)
    components: list[ComponentRow] = field(default_factory=list)
    errors: list[ErrorRow] = field(default_factory=list)
    changes: list[ChangeRow] = field(default_factory=list)
    heartbeat: HeartbeatRow | None = None

    def __bool__(self) -> bool:
        return bool(
            self.deletes or self.components or self.errors or self.changes or self.heartbeat
        )


@dataclass(frozen=True, slots=True)
class StoredComponent:
    """A component as the database knows it, with its latest errors (oldest first)."""

    name: str
    status: str
    last_heartbeat: datetime | None
    last_error: str | None
    registered_at: datetime
    errors: tuple[tuple[datetime, str], ...]


@dataclass(frozen=True, slots=True)
class StoredState:
    components: tuple[StoredComponent, ...]
    # The system status of this node's latest heartbeats row, None if it never ran.
    system_status: str | None


def _upsert_components(conn: Any, node: str, rows: Sequence[ComponentRow]) -> None:
    values = [
        {
            "name": r.name,
            "node": node,
            "status": r.status,
            "last_heartbeat": r.last_heartbeat,
            "last_error": r.last_error,
            "registered_at": r.registered_at,
            "updated_at": r.updated_at,
        }
        for r in rows
    ]
    dialect = conn.dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(_components)
    elif dialect == "sqlite":
        stmt = sqlite.insert(_components)
    else:  # pragma: no cover - nanobot's engine factory only makes these two
        raise NotImplementedError(f"no upsert for dialect {dialect!r}")
    stmt = stmt.on_conflict_do_update(
        index_elements=["name", "node"],
        set_={
            "status": stmt.excluded.status,
            "last_heartbeat": stmt.excluded.last_heartbeat,
            "last_error": stmt.excluded.last_error,
            "registered_at": stmt.excluded.registered_at,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    conn.execute(stmt, values)


def write_batch(engine: Engine, batch: Batch) -> None:
    """Write one cycle's state in one write transaction (all of it, or none of it)."""
    if not batch:
        return
    with write_transaction(engine) as conn:
        if batch.deletes:
            conn.execute(
                delete(_components).where(
                    _components.c.node == batch.node, _components.c.name.in_(batch.deletes)
                )
            )
        if batch.components:
            _upsert_components(conn, batch.node, batch.components)
        if batch.errors:
            conn.execute(
                _errors.insert(),
                [
                    {"component": e.component, "node": batch.node, "at": e.at, "error": e.error}
                    for e in batch.errors
                ],
            )
        if batch.changes:
            conn.execute(
                _changes.insert(),
                [
                    {
                        "component": c.component,
                        "node": batch.node,
                        "at": c.at,
                        "from_status": c.from_status,
                        "to_status": c.to_status,
                        "reason": c.reason,
                    }
                    for c in batch.changes
                ],
            )
        if batch.heartbeat is not None:
            hb = batch.heartbeat
            conn.execute(
                _heartbeats.insert().values(
                    at=hb.at,
                    node=batch.node,
                    status=hb.status,
                    interval_s=hb.interval_s,
                    total=hb.total,
                    healthy=hb.healthy,
                    error=hb.error,
                    unknown=hb.unknown,
                )
            )


def load_state(
    engine: Engine, node: str, *, errors_per_component: int = ERRORS_SHOWN
) -> StoredState:
    """This node's components with their latest errors, and its latest system status."""
    ranked = (
        select(
            _errors.c.component,
            _errors.c.at,
            _errors.c.error,
            func.row_number()
            .over(
                partition_by=_errors.c.component,
                order_by=(_errors.c.at.desc(), _errors.c.id.desc()),
            )
            .label("rank"),
        )
        .where(_errors.c.node == node)
        .subquery()
    )
    with read_transaction(engine) as conn:
        rows = conn.execute(
            select(
                _components.c.name,
                _components.c.status,
                _components.c.last_heartbeat,
                _components.c.last_error,
                _components.c.registered_at,
            )
            .where(_components.c.node == node)
            .order_by(_components.c.name)
        ).all()
        error_rows = conn.execute(
            select(ranked.c.component, ranked.c.at, ranked.c.error)
            .where(ranked.c.rank <= errors_per_component)
            .order_by(ranked.c.component, ranked.c.at, ranked.c.rank.desc())
        ).all()
        system_status = conn.execute(
            select(_heartbeats.c.status)
            .where(_heartbeats.c.node == node)
            .order_by(_heartbeats.c.at.desc(), _heartbeats.c.id.desc())
            .limit(1)
        ).scalar_one_or_none()
    errors: dict[str, list[tuple[datetime, str]]] = {}
    for component, at, error in error_rows:
        errors.setdefault(component, []).append((at, error))
    return StoredState(
        components=tuple(
            StoredComponent(
                name=r.name,
                status=r.status,
                last_heartbeat=r.last_heartbeat,
                last_error=r.last_error,
                registered_at=r.registered_at,
                errors=tuple(errors.get(r.name, ())),
            )
            for r in rows
        ),
        system_status=system_status,
    )


def prune(
    engine: Engine,
    *,
    now: datetime | None = None,
    error_retention: timedelta | None = None,
    heartbeat_retention: timedelta | None = None,
) -> dict[str, int]:
    """Delete history past its retention, for every node; the number of rows deleted per table.

    Component errors and status changes older than ``error_retention`` (default
    ``heartbeat.error_retention_days``) and heartbeats rows older than ``heartbeat_retention``
    (default ``heartbeat.history_retention_days``) go. The ``components`` rows, the current
    state, are never pruned here.
    """
    now = now or utcnow()
    if error_retention is None or heartbeat_retention is None:
        config = get_config()
        if error_retention is None:
            error_retention = timedelta(days=float(config["heartbeat.error_retention_days"]))
        if heartbeat_retention is None:
            heartbeat_retention = timedelta(days=float(config["heartbeat.history_retention_days"]))
    for name, value in (
        ("error_retention", error_retention),
        ("heartbeat_retention", heartbeat_retention),
    ):
        if value <= timedelta(0):
            raise ValueError(f"{name} must be a positive duration, got {value!r}")
    error_cutoff = now - error_retention
    heartbeat_cutoff = now - heartbeat_retention
    with write_transaction(engine) as conn:
        counts = {
            "component_errors": conn.execute(
                delete(_errors).where(_errors.c.at < error_cutoff)
            ).rowcount,
            "component_status_changes": conn.execute(
                delete(_changes).where(_changes.c.at < error_cutoff)
            ).rowcount,
            "heartbeats": conn.execute(
                delete(_heartbeats).where(_heartbeats.c.at < heartbeat_cutoff)
            ).rowcount,
        }
    return {table: int(count) for table, count in counts.items()}


def drop_components(conn: Connection, prefix: str, keep: set[str]) -> list[str]:
    """In the caller's transaction, delete the components named ``prefix<x>`` on every node
    whose ``<x>`` is not in ``keep``; the names deleted.

    The scheduler calls it at start with ``task:`` and the tasks that exist, so that the
    component of a task removed just before a crash (whose removal the monitor had not yet
    written) does not stay in status forever.
    """
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    names = set(
        conn.execute(
            select(_components.c.name).where(_components.c.name.like(pattern, escape="\\"))
        ).scalars()
    )
    orphans = sorted(n for n in names if n[len(prefix) :] not in keep)
    for start in range(0, len(orphans), 500):
        conn.execute(
            delete(_components).where(_components.c.name.in_(orphans[start : start + 500]))
        )
    return orphans
