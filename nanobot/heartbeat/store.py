"""The heartbeat tables (``components``, ``component_errors``, ``component_status_changes``,
``heartbeats``): every statement on them, plain records in, plain records out.

The monitor keeps its state in memory and hands one :class:`Batch` per cycle to
:func:`write_batch`, which writes it in one transaction: the components that changed (an upsert
on ``(name, node)``), the components unregistered since the last cycle, new errors, new status
changes and one ``heartbeats`` row. :func:`load_state` reads a node's state back at start, and
:func:`prune` is what the scheduler's cleanup task calls to apply retention.

The readers of status, metrics, the dashboard and the alert rules take a connection, so that
they run inside their caller's read transaction: :func:`latest_heartbeats`,
:func:`latest_heartbeat`, :func:`list_components`, :func:`count_task_components`,
:func:`recent_errors`, :func:`recent_changes` and :func:`changes_since`. Each is bounded: the
history tables are read through their ``(node, at)`` or ``(component, node, at)`` indexes with a
``LIMIT``, or from a recent instant on the ``at`` index, never as a whole.

Everything here is synchronous and does blocking I/O: callers on the event loop use a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Connection, Engine, Row, Table, delete, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from nanobot.config import get_config
from nanobot.db import read_transaction, write_transaction
from nanobot.models import (
    Component,
    ComponentErrorRecord,
    ComponentStatus,
    ComponentStatusChange,
    Heartbeat,
    utcnow,
)

# Errors kept per component in memory and shown by get_component_status (the seed's bound).
ERRORS_SHOWN: Final = 10
# The name under which the system's own status transitions are stored in
# component_status_changes; no component may register under it.
SYSTEM_COMPONENT: Final = "(system)"
# The scheduler registers each task as the component ``task:<name>`` (section 5.2.3 of the
# seed); status, the alert rules and the dashboard tell them from the service's own by it.
TASK_COMPONENT_PREFIX: Final = "task:"

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


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeHeartbeat(HeartbeatRow):
    """A ``heartbeats`` row as read back: one cycle of the monitor of ``node``."""

    node: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeComponent(ComponentRow):
    """A ``components`` row as read back: one component's latest state on ``node``."""

    node: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeChange(ChangeRow):
    """A ``component_status_changes`` row as read back: one transition on ``node``."""

    node: str


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
        components = list_components(conn, node=node)
        error_rows = conn.execute(
            select(ranked.c.component, ranked.c.at, ranked.c.error)
            .where(ranked.c.rank <= errors_per_component)
            .order_by(ranked.c.component, ranked.c.at, ranked.c.rank.desc())
        ).all()
        newest = latest_heartbeat(conn, node)
    errors: dict[str, list[tuple[datetime, str]]] = {}
    for component, at, error in error_rows:
        errors.setdefault(component, []).append((at, error))
    return StoredState(
        components=tuple(
            StoredComponent(
                name=c.name,
                status=c.status,
                last_heartbeat=c.last_heartbeat,
                last_error=c.last_error,
                registered_at=c.registered_at,
                errors=tuple(errors.get(c.name, ())),
            )
            for c in components
        ),
        system_status=None if newest is None else newest.status,
    )


# --- readers (in the caller's transaction) --------------------------------------------------


def _node_heartbeat(row: Row[Any]) -> NodeHeartbeat:
    return NodeHeartbeat(
        at=row.at,
        status=row.status,
        interval_s=row.interval_s,
        total=row.total,
        healthy=row.healthy,
        error=row.error,
        unknown=row.unknown,
        node=row.node,
    )


def latest_heartbeats(conn: Connection) -> dict[str, NodeHeartbeat]:
    """The newest heartbeats row of each known node, by node name, in one statement.

    Nodes are those with components (a small table) plus the node of the newest row overall,
    which covers a node that has written heartbeats but no component yet. Each node's newest
    row is found by a correlated ``ORDER BY at DESC LIMIT 1`` on the (node, at) index, so the
    size of the history does not matter.
    """
    newest_node = select(_heartbeats.c.node).order_by(_heartbeats.c.at.desc()).limit(1)
    # UNION ALL: a node listed twice only repeats an id inside IN (...), and no temporary
    # B-tree is built to remove duplicates.
    known = select(_components.c.node).union_all(select(newest_node.scalar_subquery()))
    nodes = known.subquery("nodes")
    newest_id = (
        select(_heartbeats.c.id)
        .where(_heartbeats.c.node == nodes.c.node)
        .order_by(_heartbeats.c.at.desc())
        .limit(1)
        .correlate(nodes)
        .scalar_subquery()
    )
    rows = conn.execute(
        select(_heartbeats).where(_heartbeats.c.id.in_(select(newest_id).select_from(nodes)))
    ).all()
    return {row.node: _node_heartbeat(row) for row in sorted(rows, key=lambda r: r.node)}


def latest_heartbeat(conn: Connection, node: str) -> NodeHeartbeat | None:
    """The newest heartbeats row of ``node`` (one row through the (node, at) index)."""
    row = conn.execute(
        select(_heartbeats)
        .where(_heartbeats.c.node == node)
        .order_by(_heartbeats.c.at.desc(), _heartbeats.c.id.desc())
        .limit(1)
    ).one_or_none()
    return None if row is None else _node_heartbeat(row)


def list_components(
    conn: Connection, *, node: str | None = None, skip_healthy_tasks: bool = False
) -> list[NodeComponent]:
    """The components of ``node`` (None: of every node), by node then name.

    ``skip_healthy_tasks`` leaves out the healthy task components (``task:<name>``), which a
    system of thousands of tasks has thousands of and which add no problem to a status.
    """
    query = select(_components).order_by(_components.c.node, _components.c.name)
    if node is not None:
        query = query.where(_components.c.node == node)
    if skip_healthy_tasks:
        query = query.where(
            or_(
                ~_components.c.name.startswith(TASK_COMPONENT_PREFIX, autoescape=True),
                _components.c.status != ComponentStatus.HEALTHY.value,
            )
        )
    return [
        NodeComponent(
            name=row.name,
            status=row.status,
            last_heartbeat=row.last_heartbeat,
            last_error=row.last_error,
            registered_at=row.registered_at,
            updated_at=row.updated_at,
            node=row.node,
        )
        for row in conn.execute(query)
    ]


def count_task_components(conn: Connection) -> dict[str, int]:
    """How many task components (``task:<name>``) are in each status, on every node (one
    grouped count; a status no component is in is absent)."""
    rows = conn.execute(
        select(_components.c.status, func.count())
        .where(_components.c.name.startswith(TASK_COMPONENT_PREFIX, autoescape=True))
        .group_by(_components.c.status)
    ).all()
    return {status: int(n) for status, n in rows}


def recent_errors(conn: Connection, component: str, node: str, limit: int) -> list[ErrorRow]:
    """The newest ``limit`` errors of one component of one node, newest first."""
    rows = conn.execute(
        select(_errors.c.at, _errors.c.error)
        .where(_errors.c.component == component, _errors.c.node == node)
        .order_by(_errors.c.at.desc())
        .limit(limit)
    ).all()
    return [ErrorRow(component=component, at=r.at, error=r.error) for r in rows]


def recent_changes(conn: Connection, component: str, node: str, limit: int) -> list[ChangeRow]:
    """The newest ``limit`` status changes of one component of one node, newest first."""
    rows = conn.execute(
        select(_changes.c.at, _changes.c.from_status, _changes.c.to_status, _changes.c.reason)
        .where(_changes.c.component == component, _changes.c.node == node)
        .order_by(_changes.c.at.desc())
        .limit(limit)
    ).all()
    return [
        ChangeRow(
            component=component,
            at=r.at,
            from_status=r.from_status,
            to_status=r.to_status,
            reason=r.reason,
        )
        for r in rows
    ]


def changes_since(conn: Connection, after: datetime) -> list[NodeChange]:
    """The status changes later than ``after`` on every node, oldest first, except those of
    task components: a task's component changes at every failure, and its alerts come from
    the tasks table. Read from the ``at`` index, so only the recent rows are touched."""
    rows = conn.execute(
        select(
            _changes.c.component,
            _changes.c.node,
            _changes.c.at,
            _changes.c.from_status,
            _changes.c.to_status,
            _changes.c.reason,
        )
        .where(
            _changes.c.at > after,
            _changes.c.component.not_like(TASK_COMPONENT_PREFIX + "%"),
        )
        .order_by(_changes.c.at, _changes.c.id)
    ).all()
    return [
        NodeChange(
            component=r.component,
            at=r.at,
            from_status=r.from_status,
            to_status=r.to_status,
            reason=r.reason,
            node=r.node,
        )
        for r in rows
    ]


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
