"""What the command line, ``/status`` and monitoring scripts see: the state read from the database.

Every function here only reads, in one read transaction, with bounded queries: the latest
heartbeat of each node through the ``(node, at)`` index, the small ``components``, ``tasks`` and
``scheduler_lease`` tables, and at most :data:`DETAIL_ROWS` rows of error and status-change
history per component. Nothing scans ``task_runs`` or ``heartbeats`` as a whole, so the answer
stays fast with millions of history rows.

Whether the service runs is judged from the database alone, so that it works from any process:
a node is *running* when its newest heartbeat is younger than :data:`STALE_FACTOR` times the
interval it declared in that row (plus :data:`STALE_SLACK_S`); the service is running when some
node runs and some node holds the scheduling lease (a cleanly stopped service releases it, so it
reads as stopped at once, not only once its last heartbeat has aged).
"""

from __future__ import annotations

import enum
import functools
import importlib.metadata
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, Engine

from nanobot.config import get_config
from nanobot.db import read_transaction
from nanobot.heartbeat import store
from nanobot.heartbeat.store import TASK_COMPONENT_PREFIX, NodeHeartbeat
from nanobot.lease import read_lease
from nanobot.models import ComponentStatus, utcnow
from nanobot.times import iso

if TYPE_CHECKING:
    from nanobot.cron.control import TaskSummary

STALE_FACTOR: Final = 2.5
STALE_SLACK_S: Final = 1.0
DETAIL_ROWS: Final = 10


@functools.cache
def nanobot_version() -> str:
    """The installed version of nanobot.

    Read from the package metadata rather than ``nanobot.__version__``, which a stale editable
    install (one that maps ``nanobot`` as a namespace package) does not expose. Read once per
    process: the code that runs is the code that was imported, and ``/healthz`` names it in
    every answer (reading the metadata scans ``sys.path`` and parses a file: about 0.3 ms, and
    several waits for the interpreter lock while the scheduler's worker thread is busy).
    """
    try:
        return importlib.metadata.version("nanobot")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "0+unknown"


class SystemStatus(enum.StrEnum):
    """The overall verdict of :func:`build_status`."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNKNOWN = "unknown"
    ERROR = "error"


def exit_code(status: dict[str, Any]) -> int:
    """The exit code of ``nanobot status`` for a :func:`build_status` result.

    0 healthy, 1 degraded or unknown, 2 error or service down (3, state unreadable, is decided
    by the caller, which got no result at all).
    """
    if not status["service"]["running"] or status["status"] == SystemStatus.ERROR:
        return 2
    if status["status"] == SystemStatus.HEALTHY:
        return 0
    return 1


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else round((now - then).total_seconds(), 3)


def _node_json(row: NodeHeartbeat, now: datetime, leader_node: str | None) -> dict[str, Any]:
    age = _age(now, row.at)
    fresh = age is not None and age <= STALE_FACTOR * row.interval_s + STALE_SLACK_S
    return {
        "node": row.node,
        "fresh": fresh,
        "leader": row.node == leader_node,
        "last_heartbeat": iso(row.at),
        "age_s": age,
        "interval_s": row.interval_s,
        "status": row.status,
    }


def _read_state(conn: Connection, now: datetime, *, problems_only: bool = False) -> dict[str, Any]:
    """Everything the verdict weighs. ``problems_only`` leaves out the rows that cannot add a
    problem (healthy task components, tasks neither broken nor failed), which gives the same
    verdict and problems without reading every row of a system of many tasks."""
    heartbeats = store.latest_heartbeats(conn)
    lease = read_lease(conn)
    leader_held = lease is not None and lease.is_held(now)
    leader_node = lease.node if lease is not None and leader_held else None
    nodes = [_node_json(row, now, leader_node) for row in heartbeats.values()]
    running_nodes = {n["node"] for n in nodes if n["fresh"]}
    newest = max(heartbeats.values(), key=lambda r: r.at, default=None)

    components = [
        {
            "name": row.name,
            "node": row.node,
            "status": row.status,
            "last_heartbeat": iso(row.last_heartbeat),
            "age_s": _age(now, row.last_heartbeat),
            "last_error": row.last_error,
            # Components of a node that stopped beating are history, not current state.
            "current": row.node in running_nodes,
        }
        for row in store.list_components(conn, skip_healthy_tasks=problems_only)
    ]
    from nanobot.cron.control import read_summaries  # noqa: PLC0415 (loads the scheduler)

    tasks = read_summaries(conn, problems_only=problems_only)
    from nanobot.cron.taskcode import code_records  # noqa: PLC0415 (loads the scheduler)

    # The task code of the nodes that run now; a stopped node's record is history.
    code = code_records(conn, running_nodes)
    from nanobot.cron.overdue import overdue_from_config  # noqa: PLC0415 -- as in _schedule_json

    return {
        # The tasks tables only: status never reads run history (a run past its bound shows
        # through its overrunning component).
        "overdue": overdue_from_config(conn, get_config(), now, include_runs=False),
        "code": code,
        "nodes": nodes,
        "running_nodes": running_nodes,
        "lease": lease,
        "leader_held": leader_held,
        "newest": newest,
        "components": components,
        "tasks": tasks,
    }


def _service_problems(state: dict[str, Any]) -> list[str]:
    """No node beats, or nobody holds the scheduling lease."""
    problems: list[str] = []
    if not state["running_nodes"]:
        problems.append("service down: no node has written a heartbeat recently")
    lease = state["lease"]
    if lease is not None and lease.holder is None:
        problems.append(
            f"service stopped: the scheduling lease was released at {iso(lease.renewed_at)}"
        )
    elif not state["leader_held"]:
        problems.append("no node holds the scheduling lease: tasks are not being scheduled")
    return problems


def _component_errors(current: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The components in error: the service's own, then the tasks'.

    A task's component is in error after a failed or overrunning run: that is the task's
    problem (degraded), not the service's; an error here would fail /readyz and say "down"
    (exit 2) because one user command exited non-zero.
    """
    own: list[str] = []
    tasks: list[str] = []
    for c in current:
        if c["status"] != ComponentStatus.ERROR:
            continue
        problem = f"component {c['name']} on {c['node']} is in error: {c['last_error']}"
        (tasks if c["name"].startswith(TASK_COMPONENT_PREFIX) else own).append(problem)
    return own, tasks


def _task_problems(state: dict[str, Any]) -> list[str]:
    """Broken, auto-paused and failed tasks, and task code older than its file."""
    problems: list[str] = []
    task: TaskSummary
    for task in state["tasks"]:
        if task.broken:
            problems.append(f"task {task.name} is broken: {task.error}")
        elif task.auto_paused_at is not None:
            # Paused for its failures: nothing runs it until an operator resumes it.
            problems.append(f"task {task.name} was {task.pause_reason}")
        elif task.failed:
            problems.append(f"task {task.name} last ended {task.last_outcome}")
    for record in state["code"]:
        problem = record.problem()
        if problem:
            problems.append(problem)
    return problems


def verdict(state: dict[str, Any]) -> tuple[SystemStatus, list[str]]:
    """The system's status and its problems, from the state that :func:`build_status` read.

    A pure function of ``state`` (its keys: components, newest, running_nodes, lease,
    leader_held, tasks, code, overdue): the tests give it states that are hard to bring about.
    """
    current = [c for c in state["components"] if c["current"]]
    if state["newest"] is None:
        return SystemStatus.UNKNOWN, ["no heartbeat has been recorded yet: is the service started?"]
    own_errors, failing_tasks = _component_errors(current)
    problems = _service_problems(state) + own_errors
    # What should have happened by now and has not (nanobot.cron.overdue): degraded on its
    # own, and listed with the errors that are its likely cause.
    overdue = [item.describe() for item in state.get("overdue", [])]
    if problems:
        return SystemStatus.ERROR, problems + overdue
    unknown = [
        f"component {c['name']} on {c['node']} is unknown"
        for c in current
        if c["status"] == ComponentStatus.UNKNOWN
    ]
    if unknown:
        return SystemStatus.UNKNOWN, unknown + overdue
    problems = _task_problems(state) + failing_tasks + overdue
    if problems:
        return SystemStatus.DEGRADED, problems
    return SystemStatus.HEALTHY, []


def build_status(
    engine: Engine, *, now: datetime | None = None, problems_only: bool = False
) -> dict[str, Any]:
    """The state of the whole system, as ``nanobot status --json`` prints it.

    With ``problems_only`` (the dashboard, on systems of thousands of tasks), the same status
    and problems, but ``components`` lists only the service's own components and the task
    components that are not healthy, and ``tasks`` only the broken and failed tasks.

    Shape (every timestamp ISO-8601 with a UTC offset, every age in seconds)::

        {
          "status": "healthy" | "degraded" | "unknown" | "error",
          "problems": ["why the status is not healthy", ...],
          "checked_at": "...", "version": "0.1.0",
          "service": {
            "running": bool, "last_heartbeat": "..." | null, "age_s": float | null,
            "interval_s": float | null, "node": str | null,
            "leader": {"holder", "node", "epoch", "held", "acquired_at", "renewed_at",
                       "expires_at"} | null,
            "nodes": [{"node", "fresh", "leader", "last_heartbeat", "age_s", "interval_s",
                       "status"}]
          },
          "system": {"status", "components": {"total", "healthy", "error", "unknown"},
                     "last_heartbeat", "timestamp"} | null,
          "components": [{"name", "node", "status", "last_heartbeat", "age_s", "last_error",
                          "current"}],
          "tasks": [{"name", "task", "interval", "timeout", "paused", "next_run_at",
                     "last_run_at", "last_outcome", "consecutive_failures", "error", "broken",
                     "source", "pause_reason", "auto_paused_at"}],
          "code": [{"node", "kind" (module | task_file), "name", "file", "loaded_at", "error",
                    "newer_on_disk"}],
          "overdue": [{"task", "kind" (not_claimed | run_too_long), "expected_at", "late_s",
                       "grace_s"}]
        }
    """
    now = now or utcnow()
    with read_transaction(engine) as conn:
        state = _read_state(conn, now, problems_only=problems_only)
    return _assemble(state, now)


def _assemble(state: dict[str, Any], now: datetime) -> dict[str, Any]:
    newest = state["newest"]
    running = bool(state["running_nodes"]) and state["leader_held"]
    status, problems = verdict(state)
    lease = state["lease"]
    system = None
    if newest is not None:
        # The seed's get_system_status(), as recorded by the newest monitor cycle.
        system = {
            "status": newest.status,
            "components": {
                "total": newest.total,
                "healthy": newest.healthy,
                "error": newest.error,
                "unknown": newest.unknown,
            },
            "last_heartbeat": iso(newest.at),
            "timestamp": iso(now),
        }
    return {
        "status": status.value,
        "problems": problems,
        "checked_at": iso(now),
        "version": nanobot_version(),
        "service": {
            "running": running,
            "last_heartbeat": iso(newest.at) if newest is not None else None,
            "age_s": _age(now, newest.at) if newest is not None else None,
            "interval_s": newest.interval_s if newest is not None else None,
            "node": newest.node if newest is not None else None,
            "leader": (lease.to_json(now) | {"node": lease.node} if lease is not None else None),
            "nodes": state["nodes"],
        },
        "system": system,
        "components": state["components"],
        "tasks": [task.to_json() for task in state["tasks"]],
        "code": [record.to_json() for record in state["code"]],
        "overdue": [item.to_json() for item in state.get("overdue", [])],
    }


def service_running(engine: Engine, *, now: datetime | None = None) -> bool:
    """Whether the service runs, by the same rule as :func:`build_status`."""
    return bool(build_status(engine, now=now)["service"]["running"])


def build_heartbeat_status(
    engine: Engine,
    *,
    now: datetime | None = None,
    only: Callable[[dict[str, Any]], bool] | None = None,
    problems_only: bool = False,
) -> dict[str, Any]:
    """``nanobot heartbeat status --json``: :func:`build_status` without tasks, and for each
    component its last :data:`DETAIL_ROWS` errors and status changes, newest first.

    ``only`` keeps the components it returns true for (the dashboard leaves out thousands of
    healthy ``task:`` components, whose details would cost two statements each);
    ``problems_only`` does not even read them (as for :func:`build_status`).
    """
    now = now or utcnow()
    with read_transaction(engine) as conn:
        state = _read_state(conn, now, problems_only=problems_only)
        # The verdict still weighs every component; only the answer is narrowed.
        selected = [c for c in state["components"] if only is None or only(c)]
        for component in selected:
            name, node = component["name"], component["node"]
            errors = store.recent_errors(conn, name, node, DETAIL_ROWS)
            changes = store.recent_changes(conn, name, node, DETAIL_ROWS)
            component["errors"] = [{"at": iso(e.at), "error": e.error} for e in errors]
            component["status_changes"] = [
                {"at": iso(c.at), "from": c.from_status, "to": c.to_status, "reason": c.reason}
                for c in changes
            ]
    result = _assemble(state, now)
    del result["tasks"]
    result["components"] = selected
    return result
