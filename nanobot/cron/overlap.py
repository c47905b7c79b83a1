"""Overlap policies: what becomes of a slot that comes while the task's previous run still goes.

Pure decisions, no I/O and no clock: the launcher (:mod:`nanobot.cron.launcher`, on the event
loop, where the runs in flight are known) asks :func:`decide` for each claimed slot it is about
to start, and the command line asks it whether ``nanobot cron run NAME`` can do anything. Every
slot is claimed (its ``task_runs`` row inserted) before this decision, so that whatever is
decided, the slot runs at most once and ends as one row.

- ``skip`` (the default): the slot is recorded ``skipped``; the run in flight goes on.
- ``buffer_one``: the slot is held and started right after the run in flight ends; a further
  slot that comes while one is held is recorded ``skipped``.
- ``cancel_previous``: the run in flight is cancelled (recorded ``cancelled``); the slot starts
  once it has stopped.
- ``allow``: the slot starts beside it, up to ``max_concurrent`` runs at once; beyond that it
  is recorded ``skipped``.

A forced run (``nanobot cron run NAME --force``) and the runs of a backfill ignore the policy:
the operator asked for them (a backfill bounds its own concurrency).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from nanobot.exceptions import InvalidTaskError

# The default maximum of concurrent runs of an ``allow`` task, when none is given.
DEFAULT_MAX_CONCURRENT: Final = 2
# A bound on max_concurrent: far above any sane use, low enough that a typo is caught.
MAX_CONCURRENT_LIMIT: Final = 1000


class OverlapPolicy(enum.StrEnum):
    """What a slot that comes while the previous run still goes does: stored in
    ``tasks.overlap_policy``."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    CANCEL_PREVIOUS = "cancel_previous"
    ALLOW = "allow"


class RunKind(enum.StrEnum):
    """Why a claimed slot runs: its schedule, ``cron run`` (forced or not), or a backfill."""

    SCHEDULED = "scheduled"
    MANUAL = "manual"
    FORCED = "forced"
    BACKFILL = "backfill"


class Action(enum.StrEnum):
    """The decision for one claimed slot."""

    START = "start"
    SKIP = "skip"
    BUFFER = "buffer"
    CANCEL_AND_START = "cancel_and_start"


@dataclass(frozen=True, slots=True)
class Overlap:
    """A task's overlap policy; ``max_concurrent`` is 1 except under ``allow``."""

    policy: OverlapPolicy = OverlapPolicy.SKIP
    max_concurrent: int = 1

    def __post_init__(self) -> None:
        if self.policy is not OverlapPolicy.ALLOW and self.max_concurrent != 1:
            raise InvalidTaskError(
                f"max_concurrent {self.max_concurrent} applies to the overlap policy allow "
                f"only, not {self.policy.value}"
            )
        if not 1 <= self.max_concurrent <= MAX_CONCURRENT_LIMIT:
            raise InvalidTaskError(
                f"max_concurrent must be a whole number from 1 to {MAX_CONCURRENT_LIMIT}, "
                f"got {self.max_concurrent!r}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"overlap": self.policy.value, "max_concurrent": self.max_concurrent}

    def describe(self) -> str:
        if self.policy is OverlapPolicy.ALLOW:
            return f"allow (at most {self.max_concurrent} at once)"
        return self.policy.value


DEFAULT: Final = Overlap()


def check_overlap(policy: Any, max_concurrent: Any = None) -> Overlap:
    """The overlap of a task definition (a keyword, a class attribute, an option or a task-file
    key), or :class:`InvalidTaskError` in one line. ``policy`` None means ``skip``;
    ``max_concurrent`` None means 1, or :data:`DEFAULT_MAX_CONCURRENT` under ``allow``."""
    if policy is None:
        chosen = OverlapPolicy.SKIP
    else:
        try:
            chosen = OverlapPolicy(policy)
        except ValueError:
            choices = ", ".join(p.value for p in OverlapPolicy)
            raise InvalidTaskError(f"overlap must be one of {choices}, got {policy!r}") from None
    if max_concurrent is None:
        count = DEFAULT_MAX_CONCURRENT if chosen is OverlapPolicy.ALLOW else 1
    elif isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
        raise InvalidTaskError(f"max_concurrent must be a whole number, got {max_concurrent!r}")
    else:
        count = max_concurrent
        if chosen is not OverlapPolicy.ALLOW:
            raise InvalidTaskError(
                f"max_concurrent applies to the overlap policy allow only, not {chosen.value}: "
                "give --overlap allow, or drop --max-concurrent"
            )
    return Overlap(chosen, count)


def stored(policy: str | None, max_concurrent: int | None) -> Overlap:
    """The overlap of a ``tasks`` row (NULL columns: the default, ``skip``)."""
    if policy is None:
        return DEFAULT
    return Overlap(OverlapPolicy(policy), max_concurrent or 1)


def decide(overlap: Overlap, kind: RunKind, *, running: int, buffered: bool) -> Action:
    """What to do with a claimed slot of ``kind``, given the task's runs in flight that the
    policy counts (``running``: those of its schedule and of ``cron run``; a backfill's runs
    are not counted) and whether a slot is already held to run after them (``buffered``)."""
    if kind in (RunKind.FORCED, RunKind.BACKFILL) or running <= 0:
        return Action.START
    policy = overlap.policy
    if policy is OverlapPolicy.SKIP:
        return Action.SKIP
    if policy is OverlapPolicy.BUFFER_ONE:
        return Action.SKIP if buffered else Action.BUFFER
    if policy is OverlapPolicy.CANCEL_PREVIOUS:
        return Action.CANCEL_AND_START
    return Action.START if running < overlap.max_concurrent else Action.SKIP


def skip_reason(overlap: Overlap, *, buffered: bool) -> str:
    """The error text of a slot recorded ``skipped`` by the policy."""
    if overlap.policy is OverlapPolicy.BUFFER_ONE and buffered:
        return "the previous run was still going and a slot was already buffered (buffer_one)"
    if overlap.policy is OverlapPolicy.ALLOW:
        return (
            f"{overlap.max_concurrent} runs were still going, the most the policy allows "
            f"(allow, max_concurrent {overlap.max_concurrent})"
        )
    return "the previous run was still going"


CANCELLED_BY_NEXT: Final = "cancelled by the next slot (overlap policy cancel_previous)"
