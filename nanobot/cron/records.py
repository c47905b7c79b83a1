"""The records the scheduler's modules hand to one another, and its lifecycle state.

Every record here is frozen (``Running`` is never changed once built, but not frozen: see
there): a record made by the worker thread (a claimed slot, a due retry) is handed to the event
loop as it is, never changed after. Pure data, no I/O.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from nanobot.cron.aps_adapter import JobState
from nanobot.cron.overlap import RunKind
from nanobot.cron.retries import PendingRetry
from nanobot.cron.task import CronTask
from nanobot.models import MisfirePolicy, TaskOutcome


class Lifecycle(enum.Enum):
    """Where a manager is in its life (event loop). Only ``RUNNING`` dispatches."""

    # Never started: nothing claimed, nothing to release.
    IDLE = "idle"
    # start() in progress: runs a dead process left are recorded, the stored tasks applied.
    STARTING = "starting"
    # The scheduler's passes claim slots and the loop starts them.
    RUNNING = "running"
    # A stop in progress: nothing more starts; runs in flight get their grace, then cancelled.
    STOPPING = "stopping"
    # Stopped (shutdown, or the lease lost): a slot that still reaches the loop is held back
    # and released, never started.
    STOPPED = "stopped"

    @property
    def closing(self) -> bool:
        """No slot may start: a stop is in progress or done."""
        return self in (Lifecycle.STOPPING, Lifecycle.STOPPED)


class DuePolicy(NamedTuple):
    """What the scheduler's ``due()`` needs of a task: its misfire policy and its catch-up
    window (0: none; the SKIP grace comes from the schedule).

    A named tuple rather than a dataclass: :meth:`NanobotScheduler.due
    <nanobot.cron.aps_adapter.NanobotScheduler.due>` takes ``(policy, window)`` pairs.
    """

    policy: MisfirePolicy
    window: float

    @classmethod
    def of(cls, policy: MisfirePolicy, window: float | None) -> DuePolicy:
        return cls(policy, window or 0.0)


@dataclass(frozen=True, slots=True)
class Launch:
    """A claimed slot handed from the worker thread to the event loop, its task built.

    ``dispatched`` is False for a slot claimed well ahead of its instant: it is marked in the
    database just before it starts (see :mod:`nanobot.cron.history`).
    """

    name: str
    slot: datetime
    run_id: int
    manual: bool
    task: CronTask | None
    build_error: str | None = None
    dispatched: bool = True
    # 1: the slot's run; 2...: its retries (nanobot.cron.retries).
    attempt: int = 1
    kind: RunKind = RunKind.SCHEDULED


@dataclass(frozen=True, slots=True)
class SlotToRun:
    """A slot a pass is about to claim, and what its launch needs once claimed (worker)."""

    task_class: str
    kwargs: dict[str, Any]
    manual: bool
    dispatched: bool
    kind: RunKind | None = None


@dataclass(frozen=True, slots=True)
class RunRequest:
    """A stored run-now request (``cron run``), claimed by the next pass as a manual run."""

    name: str
    requested_at: datetime
    task_class: str
    kwargs: dict[str, Any]
    forced: bool


# Not frozen: one is built per run on the event loop, in a burst thousands back to back, and a
# frozen dataclass's __init__ costs four times a plain one's. Never changed once built.
@dataclass(slots=True)
class Running:
    """A run in flight (event loop): its asyncio task, slot, monotonic start and interval."""

    run: asyncio.Task[None]
    slot: datetime
    started: float
    interval: float
    kind: RunKind


@dataclass(frozen=True, slots=True)
class RunInFlight:
    """A run of this process in flight, as status and metrics show it."""

    task: str
    run_id: int
    scheduled_at: datetime
    age_s: float
    bound_s: float | None
    overrunning: bool


@dataclass(frozen=True, slots=True)
class MissedRetry:
    """A due retry too late after a restart, by its task's misfire policy (``late`` s)."""

    retry: PendingRetry
    late: float


@dataclass(frozen=True, slots=True)
class GivenUpRetry:
    """A due retry whose task's next slot (``next_slot``) comes first: given up."""

    retry: PendingRetry
    next_slot: datetime


@dataclass(frozen=True, slots=True)
class DueRetries:
    """What a pass does with the pending retries that are due (worker thread)."""

    claims: list[PendingRetry] = field(default_factory=list)
    # Too late after a restart, by the task's misfire policy: recorded missed.
    missed: list[MissedRetry] = field(default_factory=list)
    # The task's next slot came first: the slot's remaining attempts are given up.
    given_up: list[GivenUpRetry] = field(default_factory=list)
    # Of a task removed, stopped or paused meanwhile: forgotten.
    dropped: list[PendingRetry] = field(default_factory=list)
    # The job of each retry to claim (its task class and arguments).
    jobs: dict[str, JobState] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.claims or self.missed or self.given_up or self.dropped)

    def settled(self) -> list[PendingRetry]:
        """The retries that settle their slot as failed without a run."""
        return [m.retry for m in self.missed] + [g.retry for g in self.given_up]

    def handled(self) -> list[PendingRetry]:
        """Every retry this pass handles, to clear from the tasks rows and the bookkeeping."""
        return self.claims + self.settled() + self.dropped


class HealthUpdate(NamedTuple):
    """A run's outcome for its task's heartbeat component, applied with its burst's others.

    A named tuple: one is built per run on the event loop, where it is the cheapest record."""

    name: str
    interval: float
    outcome: TaskOutcome
    error: str | None


@dataclass(frozen=True, slots=True)
class StoredOptions:
    """The stored timeout and jitter of a task (``cron add --timeout``, the API): options that
    a class path and its kwargs do not carry, applied to every instance built from them."""

    timeout: float | None
    jitter: float | None


@dataclass(frozen=True, slots=True)
class BuiltTask:
    """A task built from its stored class and arguments, kept until they change."""

    task_class: str
    kwargs_key: str
    task: CronTask
