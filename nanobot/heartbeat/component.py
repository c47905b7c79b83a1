"""A component's health as a state machine: succeed, fail, go stale, and what each one changed.

:meth:`Options.checked` validates a registration (one clear error, nothing changed). The
functions here are pure in the sense that matters: they change only the
:class:`ComponentState` they are given, do no I/O, log nothing and read no clock (the caller
passes ``now``). Each returns the records of what it changed (:class:`ErrorRow` for an error
recorded, :class:`ChangeRow` for a status transition), in order; the monitor queues them to be
written and published, and logs them.

:func:`view` and :func:`summarize` read without changing anything: a component whose heartbeat
is older than its limit *reads* as stale at once (the seed counted it in error in the same call),
while only the monitor's cycle *records* it stale, once per episode.

Threads: a :class:`ComponentState` has no lock of its own. The monitor keeps every state in one
dict and calls these functions only while holding its lock, from the event loop (the cycle) or
from whichever thread calls its synchronous API.
"""

from __future__ import annotations

import reprlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from nanobot.exceptions import InvalidComponentError
from nanobot.heartbeat.runner import CheckSlot, HealthCheck
from nanobot.heartbeat.store import (
    ERRORS_SHOWN,
    SYSTEM_COMPONENT,
    ChangeRow,
    ComponentRow,
    ErrorRow,
)
from nanobot.models import NAME_MAX, ComponentStatus
from nanobot.times import positive_seconds

STALE_REASON: Final = "heartbeat timeout"

# What a change of state records, in the order it happened.
Recorded = ErrorRow | ChangeRow


@dataclass(eq=False, slots=True)
class ComponentState:
    """One component as the monitor knows it; changed only by this module's functions."""

    name: str
    status: ComponentStatus
    last_heartbeat: datetime | None
    registered_at: datetime
    errors: deque[tuple[datetime, str]] = field(default_factory=lambda: deque(maxlen=ERRORS_SHOWN))
    last_error: str | None = None
    # False for a component known only from the database (registered by an earlier process).
    registered: bool = False
    slot: CheckSlot | None = None
    failure_threshold: int = 1
    success_threshold: int = 1
    # Seconds without a heartbeat before it is stale; None: the monitor's default (2 x interval).
    stale_after: float | None = None
    failures: int = 0
    successes: int = 0
    # Recorded stale in the current episode (reset by the next success).
    stale: bool = False
    # Changed since its row was last taken for writing.
    dirty: bool = False

    def row(self, updated_at: datetime) -> ComponentRow:
        """Its ``components`` row."""
        return ComponentRow(
            name=self.name,
            status=self.status.value,
            last_heartbeat=self.last_heartbeat,
            last_error=self.last_error,
            registered_at=self.registered_at,
            updated_at=updated_at,
        )


@dataclass(frozen=True, slots=True)
class ComponentView:
    """What a component reads as at one instant (stale counted), changing nothing."""

    status: ComponentStatus
    last_heartbeat: datetime | None
    errors: tuple[tuple[datetime, str], ...]
    last_error: str | None
    registered: bool
    health_check: HealthCheck | None


@dataclass(frozen=True, slots=True)
class Summary:
    """The system status over the registered components: error if any is in error, healthy if
    all are healthy (or none is registered), otherwise unknown."""

    status: ComponentStatus
    total: int
    healthy: int
    error: int
    unknown: int

    def counts(self) -> dict[str, int]:
        return {
            "total": self.total,
            "healthy": self.healthy,
            "error": self.error,
            "unknown": self.unknown,
        }


# --- transitions ------------------------------------------------------------------------------


def _transition(
    comp: ComponentState,
    new: ComponentStatus,
    reason: str,
    now: datetime,
    *,
    first: bool = False,
) -> list[Recorded]:
    """Set the status; the transition record if it changed (from none for a ``first`` one)."""
    old = None if first else comp.status
    comp.status = new
    comp.dirty = True
    return [] if old is new else [ChangeRow(comp.name, now, old, new, reason)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """What a registration sets: the health check and the thresholds (see
    :meth:`nanobot.heartbeat.HeartbeatMonitor.register_component`)."""

    check: HealthCheck | None = None
    failure_threshold: int = 1
    success_threshold: int = 1
    stale_after: float | None = None

    @classmethod
    def checked(
        cls,
        name: object,
        check: object,
        *,
        failure_threshold: object = 1,
        success_threshold: object = 1,
        stale_after: object = None,
    ) -> Options:
        """The options of a registration of ``name``, or :class:`InvalidComponentError` with a
        one-line reason for the first bad value."""
        _check_name(name)
        if check is not None and not callable(check):
            raise InvalidComponentError(
                f"health check of component {name!r} is not callable: {reprlib.repr(check)}"
            )
        return cls(
            check=check,
            failure_threshold=_threshold("failure_threshold", failure_threshold),
            success_threshold=_threshold("success_threshold", success_threshold),
            stale_after=None
            if stale_after is None
            else positive_seconds(stale_after, "stale_after", InvalidComponentError),
        )


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InvalidComponentError(f"component name must be a non-empty string, got {name!r}")
    if len(name) > NAME_MAX:
        raise InvalidComponentError(
            f"component name {name[:40]!r}... is {len(name)} characters; "
            f"at most {NAME_MAX} are allowed"
        )
    if name == SYSTEM_COMPONENT:
        raise InvalidComponentError(f"{SYSTEM_COMPONENT!r} is reserved for the system's own status")


def _threshold(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidComponentError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


def register(
    comp: ComponentState | None, name: str, now: datetime, options: Options
) -> tuple[ComponentState, list[Recorded]]:
    """The component ``name`` (``comp``, or a new one) with its check and options set.

    A component not registered in this process yet (new, or known only from the database)
    becomes healthy and beating now: its registration is a sign of life. Registering again keeps
    the status and history, and records nothing.
    """
    first = comp is None
    if comp is None:
        comp = ComponentState(
            name=name, status=ComponentStatus.UNKNOWN, last_heartbeat=None, registered_at=now
        )
    comp.slot = None if options.check is None else CheckSlot(options.check, name)
    comp.failure_threshold = options.failure_threshold
    comp.success_threshold = options.success_threshold
    comp.stale_after = options.stale_after
    if comp.registered:
        return comp, []
    comp.registered = True
    comp.registered_at = now
    comp.last_heartbeat = now
    comp.failures = comp.successes = 0
    comp.stale = False
    return comp, _transition(comp, ComponentStatus.HEALTHY, "registered", now, first=first)


def unregister(comp: ComponentState, now: datetime) -> list[Recorded]:
    """The transition to unknown of a component that goes (none if it was unknown)."""
    if comp.status is ComponentStatus.UNKNOWN:
        return []
    return [ChangeRow(comp.name, now, comp.status, ComponentStatus.UNKNOWN, "unregistered")]


def succeed(comp: ComponentState, now: datetime, reason: str) -> list[Recorded]:
    """A sign of life: a heartbeat, a passed check. Healthy after ``success_threshold`` in a row."""
    comp.last_heartbeat = now
    comp.stale = False
    comp.failures = 0
    comp.successes += 1
    comp.dirty = True
    if comp.status is not ComponentStatus.HEALTHY and comp.successes >= comp.success_threshold:
        return _transition(comp, ComponentStatus.HEALTHY, reason, now)
    return []


def fail(
    comp: ComponentState, now: datetime, text: str, *, at_once: bool = False
) -> list[Recorded]:
    """An error, recorded; in error after ``failure_threshold`` in a row (or ``at_once``)."""
    comp.errors.append((now, text))
    comp.last_error = text
    comp.successes = 0
    comp.failures += 1
    comp.dirty = True
    recorded: list[Recorded] = [ErrorRow(comp.name, now, text)]
    if comp.status is not ComponentStatus.ERROR and (
        at_once or comp.failures >= comp.failure_threshold
    ):
        recorded += _transition(comp, ComponentStatus.ERROR, text, now)
    return recorded


# --- staleness --------------------------------------------------------------------------------


def stale_limit(comp: ComponentState, default: float) -> float:
    """Seconds without a heartbeat after which ``comp`` is stale."""
    return comp.stale_after if comp.stale_after is not None else default


def overdue(comp: ComponentState, now: datetime, default_limit: float) -> float | None:
    """How old the heartbeat of a registered component is when it is past its limit and not yet
    recorded stale in this episode; None otherwise."""
    if not comp.registered or comp.stale or comp.last_heartbeat is None:
        return None
    age = (now - comp.last_heartbeat).total_seconds()
    return age if age > stale_limit(comp, default_limit) else None


def mark_stale(comp: ComponentState, now: datetime, default_limit: float) -> list[Recorded]:
    """Put a component whose heartbeat is too old in error at once, once per episode."""
    if overdue(comp, now, default_limit) is None:
        return []
    comp.stale = True
    return fail(comp, now, STALE_REASON, at_once=True)


# --- reading ----------------------------------------------------------------------------------


def view(comp: ComponentState, now: datetime, default_limit: float) -> ComponentView:
    """``comp`` as it reads at ``now``: a component past its limit reads as the cycle will
    record it (in error, the stale reason its last error), without recording anything."""
    errors = tuple(comp.errors)
    status, last_error = comp.status, comp.last_error
    if overdue(comp, now, default_limit) is not None:
        status, last_error = ComponentStatus.ERROR, STALE_REASON
        errors = (*errors, (now, STALE_REASON))[-ERRORS_SHOWN:]
    return ComponentView(
        status=status,
        last_heartbeat=comp.last_heartbeat,
        errors=errors,
        last_error=last_error,
        registered=comp.registered,
        health_check=comp.slot.check if comp.slot is not None else None,
    )


def status_at(comp: ComponentState, now: datetime, default_limit: float) -> ComponentStatus:
    """The status ``comp`` reads as at ``now`` (:func:`view`'s, without copying its errors)."""
    if overdue(comp, now, default_limit) is not None:
        return ComponentStatus.ERROR
    return comp.status


def summarize(statuses: Iterable[ComponentStatus]) -> Summary:
    """The system status over the statuses of the registered components."""
    counts = dict.fromkeys(ComponentStatus, 0)
    for status in statuses:
        counts[status] += 1
    total = sum(counts.values())
    if counts[ComponentStatus.ERROR]:
        status = ComponentStatus.ERROR
    elif counts[ComponentStatus.HEALTHY] == total:
        status = ComponentStatus.HEALTHY
    else:
        status = ComponentStatus.UNKNOWN
    return Summary(
        status=status,
        total=total,
        healthy=counts[ComponentStatus.HEALTHY],
        error=counts[ComponentStatus.ERROR],
        unknown=counts[ComponentStatus.UNKNOWN],
    )


def system_reason(status: ComponentStatus, components: Iterable[ComponentState]) -> str:
    """Why the system has ``status``: the registered components that have it (10 named)."""
    if status is ComponentStatus.HEALTHY:
        return "all components healthy"
    names = sorted(c.name for c in components if c.registered and c.status is status)
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return f"{status.value}: {shown}"
