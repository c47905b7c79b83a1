"""Times and durations as the pages show them: relative (``3 min ago``) and absolute, in UTC,
in the task's zone and in the viewer's.

The viewer's zone is the ``tz`` cookie, which the page's script sets from the browser's own
zone; without JavaScript the pages show UTC. Pure functions, no clock of their own.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

TZ_COOKIE: Final = "tz"


def viewer_zone(raw: str | None) -> tzinfo:
    """The zone named by the ``tz`` cookie, or UTC when it is missing or unknown."""
    if not raw or len(raw) > 64:
        return UTC
    try:
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def zone_name(zone: tzinfo) -> str:
    return "UTC" if zone is UTC else str(zone)


def relative(then: datetime | None, now: datetime) -> str:
    """``in 5 min``, ``3 h ago``, ``now``; ``-`` for no time."""
    if then is None:
        return "-"
    seconds = (then - now).total_seconds()
    s = abs(seconds)
    if s < 1:
        return "now"
    if s < 90:
        text = f"{s:.0f} s"
    elif s < 90 * 60:
        text = f"{s / 60:.0f} min"
    elif s < 36 * 3600:
        text = f"{s / 3600:.1f} h"
    else:
        text = f"{s / 86400:.1f} d"
    return f"in {text}" if seconds > 0 else f"{text} ago"


def absolute(then: datetime | None, zone: tzinfo = UTC) -> str:
    """``2026-11-30 14:05:09 CET``."""
    if then is None:
        return "-"
    local = then.astimezone(zone)
    return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or zone_name(zone))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
