"""Retries with backoff: the arithmetic of a slot's attempts. Pure: no I/O, no clock of its own.

A task with ``retries = N`` gets up to N more attempts of a slot whose run failed (``error`` or
``timeout``). Attempt ``k`` (1 is the slot's first run) that failed at ``t`` is followed by
attempt ``k + 1`` at ``t + delay(k)``, where::

    delay(k) = min(maximum, base * factor ** (k - 1)) + uniform(0, jitter)

so ``retries=3``, base 1 s, factor 2 gives attempts at t, t+1 s, t+3 s, t+7 s (each failing
instantly). The delay counts from the end of the failed attempt: an attempt never starts before
the previous one has stopped. A retry that would start at or after the task's next slot is not
run: the slot's remaining attempts are given up (:attr:`RetryVerdict.GIVEN_UP`), so that retries
never overlap the next slot.

The recorder (:mod:`nanobot.cron.recorder`) calls :func:`plan_retry` when it writes a failed
attempt's outcome and stores the resulting :class:`PendingRetry` on the task's row (it survives
a restart); the pass (:mod:`nanobot.cron.dispatch`) claims it like a slot when it is due (or
records it missed: :func:`retry_is_late`).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from nanobot.exceptions import InvalidTaskError
from nanobot.models import MisfirePolicy, TaskOutcome

# More would be a loop, not a retry: a task that needs more attempts needs a shorter interval.
MAX_RETRIES: Final = 100
# Outcomes of an attempt that a retry follows. An interrupted attempt (the process died) is not
# retried: the run may have done its work before the process died, and its slot's outcome stays
# interrupted. A cancelled one was stopped on purpose.
RETRIED: Final = frozenset({TaskOutcome.ERROR, TaskOutcome.TIMEOUT})
# A retry under misfire_policy "skip" runs only if reached within this many seconds of its time
# (a restart that took longer records it missed); under catch_up_once it runs however late,
# unless the task's catch_up_window says otherwise.
SKIP_GRACE_S: Final = 60.0

_PART: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
FORMAT_HELP: Final = "BASE,FACTOR,MAX[,JITTER] such as 1s,2,60s or 30s,2,1h,5s"


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    """How long to wait before each retry: ``base`` seconds after the first failed attempt,
    multiplied by ``factor`` after each further one, at most ``maximum`` seconds, plus up to
    ``jitter`` seconds at random."""

    base: float = 30.0
    factor: float = 2.0
    maximum: float = 3600.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for name, value, least in (
            ("base", self.base, 0.0),
            ("factor", self.factor, 1.0),
            ("maximum", self.maximum, 0.0),
            ("jitter", self.jitter, 0.0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidTaskError(f"retry_backoff {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < least:
                raise InvalidTaskError(
                    f"retry_backoff {name} must be a finite number >= {least:g}, got {value!r}"
                )
        if self.maximum < self.base:
            raise InvalidTaskError(
                f"retry_backoff maximum ({self.maximum:g}s) must not be below its base "
                f"({self.base:g}s)"
            )

    def delay(self, attempt: int, u: float = 0.0) -> float:
        """Seconds from the end of failed attempt ``attempt`` (1-based) to the next one;
        ``u`` in [0, 1) draws the jitter."""
        exponent = max(0, attempt - 1)
        # factor ** exponent overflows a float long before MAX_RETRIES with a big factor.
        try:
            raw = self.base * self.factor**exponent
        except OverflowError:
            raw = math.inf
        return min(self.maximum, raw) + self.jitter * min(max(u, 0.0), 1.0)

    def text(self) -> str:
        """The form ``cron add --retry-backoff`` and the task file take: ``1s,2,60s[,0.5s]``."""
        parts = [f"{_num(self.base)}s", _num(self.factor), f"{_num(self.maximum)}s"]
        if self.jitter:
            parts.append(f"{_num(self.jitter)}s")
        return ",".join(parts)

    def to_json(self) -> dict[str, float]:
        return {
            "base": self.base,
            "factor": self.factor,
            "maximum": self.maximum,
            "jitter": self.jitter,
        }


DEFAULT_BACKOFF: Final = RetryBackoff()


def _num(value: float) -> str:
    # Exact, and never in e-notation (which the parser does not read back).
    return str(int(value)) if float(value).is_integer() else format(value, "f").rstrip("0")


def _seconds(raw: str, what: str) -> float:
    match = _PART.match(raw)
    if match is None:
        raise InvalidTaskError(
            f"retry_backoff {what} must be seconds or a duration like 500ms, 30s, 5m, "
            f"got {raw.strip()!r} (format: {FORMAT_HELP})"
        )
    return float(match.group(1)) * _UNIT[match.group(2) or "s"]


def parse_backoff(value: Any) -> RetryBackoff:
    """A :class:`RetryBackoff` from ``"1s,2,60s[,0.5s]"`` (the command line, the task file, the
    stored column), a sequence of 3 or 4 numbers, or a RetryBackoff; else InvalidTaskError."""
    if isinstance(value, RetryBackoff):
        return value
    if isinstance(value, list | tuple):
        numbers = list(value)
        if len(numbers) not in (3, 4) or not all(
            isinstance(n, int | float) and not isinstance(n, bool) for n in numbers
        ):
            raise InvalidTaskError(
                f"retry_backoff must be 3 or 4 numbers (base, factor, max[, jitter]), got {value!r}"
            )
        return RetryBackoff(*(float(n) for n in numbers))
    if not isinstance(value, str):
        raise InvalidTaskError(f"retry_backoff must be text {FORMAT_HELP}, got {value!r}")
    parts = value.split(",")
    if len(parts) not in (3, 4):
        raise InvalidTaskError(f"retry_backoff must be {FORMAT_HELP}, got {value!r}")
    factor_text = parts[1].strip().removesuffix("x")
    try:
        factor = float(factor_text)
    except ValueError:
        raise InvalidTaskError(
            f"retry_backoff factor must be a number such as 2, got {parts[1].strip()!r}"
        ) from None
    return RetryBackoff(
        base=_seconds(parts[0], "base"),
        factor=factor,
        maximum=_seconds(parts[2], "maximum"),
        jitter=_seconds(parts[3], "jitter") if len(parts) == 4 else 0.0,
    )


def check_retries(value: Any, what: str = "retries") -> int:
    """A whole number of retries from 0 to :data:`MAX_RETRIES`, else InvalidTaskError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise InvalidTaskError(
            f"{what} must be a whole number from 0 to {MAX_RETRIES} (0: no retry), got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A task's retries: how many (0: none) and their backoff."""

    retries: int = 0
    backoff: RetryBackoff = DEFAULT_BACKOFF


NO_RETRIES: Final = RetryPolicy()


@dataclass(frozen=True, slots=True)
class PendingRetry:
    """The next attempt of a slot: attempt number ``attempt`` of slot ``slot``, due at ``at``."""

    task: str
    slot: datetime
    attempt: int
    at: datetime


class RetryVerdict(enum.StrEnum):
    """What follows a failed attempt."""

    RETRY = "retry"  # another attempt at PendingRetry.at
    EXHAUSTED = "exhausted"  # it was the last attempt
    GIVEN_UP = "given_up"  # the next slot comes first: the remaining attempts are not run


@dataclass(frozen=True, slots=True)
class RetryPlan:
    verdict: RetryVerdict
    retry: PendingRetry | None = None
    # GIVEN_UP: the attempt that would have come next, and when.
    would_be_at: datetime | None = None


def plan_retry(
    *,
    task: str,
    slot: datetime,
    attempt: int,
    outcome: TaskOutcome,
    failed_at: datetime,
    policy: RetryPolicy,
    next_slot: datetime | None,
    u: float = 0.0,
) -> RetryPlan | None:
    """What follows attempt ``attempt`` of ``slot`` that ended ``outcome`` at ``failed_at``;
    None when the outcome is not one that is retried (a success, a cancel...)."""
    if outcome not in RETRIED:
        return None
    if attempt > policy.retries:
        return RetryPlan(RetryVerdict.EXHAUSTED)
    at = failed_at + timedelta(seconds=policy.backoff.delay(attempt, u))
    if next_slot is not None and at >= next_slot:
        return RetryPlan(RetryVerdict.GIVEN_UP, would_be_at=at)
    return RetryPlan(RetryVerdict.RETRY, PendingRetry(task, slot, attempt + 1, at))


def given_up_text(attempt: int, retries: int, at: datetime, next_slot: datetime) -> str:
    """The history's detail of a slot whose remaining attempts were given up."""
    left = retries + 1 - attempt + 1
    return (
        f"retry given up: attempt {attempt} of {retries + 1} was due at {at.isoformat()}, "
        f"not before the next slot at {next_slot.isoformat()} ({left} attempt(s) not run)"
    )


def missed_text(attempt: int, at: datetime, late_s: float) -> str:
    return (
        f"attempt {attempt} was due at {at.isoformat()} and was reached {late_s:.0f}s late, "
        "past the task's misfire grace: not run"
    )


def retry_is_late(
    retry: PendingRetry, now: datetime, policy: MisfirePolicy, window: float | None
) -> float | None:
    """How late a due retry is (seconds) when it is too late to run (after a restart), by the
    task's misfire policy and catch-up window; None when it still runs."""
    late = (now - retry.at).total_seconds()
    if window is not None and window > 0 and late > window:
        return late
    if policy is MisfirePolicy.SKIP and late > SKIP_GRACE_S:
        return late
    return None
