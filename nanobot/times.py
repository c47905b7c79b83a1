"""Time, with one home for each of its rules: the clock a component is given, an instant as
text, and a span of time in seconds.

Nothing here holds state; every function may be called from any thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import TypeGuard

from nanobot.exceptions import InvalidDurationError, NanobotError

# "Now" as a component sees it: an aware UTC datetime (tests pass a clock they move).
Clock = Callable[[], datetime]


def iso(value: datetime | None) -> str | None:
    """An instant as ISO 8601 text (None stays None)."""
    return value.isoformat() if value is not None else None


def is_positive_number(value: object) -> TypeGuard[int | float]:
    """An int or a float (not a bool), finite and greater than 0: the rule of every span of
    time nanobot is given (seconds, days)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


def positive_seconds(
    value: object, what: str, error: type[NanobotError] = InvalidDurationError
) -> float:
    """``value`` as a float if it is a positive number of seconds, else ``error`` (the caller's
    own type of the hierarchy) with a one-line message naming ``what`` and the value."""
    if not is_positive_number(value):
        raise error(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)
