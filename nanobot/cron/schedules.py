"""Schedules: when a task runs. Pure: no I/O, no clock of its own (every "now" is an argument).

A task has one schedule of three kinds:

- :class:`IntervalSchedule`: every N seconds at a fixed rate, on the grid
  ``anchor + k * seconds``. The anchor is the task's state (when it was first started), not part
  of the schedule, so a stored task keeps its phase whatever else changes.
- :class:`CronSchedule`: a cron expression read in an IANA time zone, computed by ``cronsim``
  (written for healthchecks.io to match Debian cron), with ``zoneinfo`` and ``tzdata``.
- :class:`AtSchedule`: one instant; the task runs once, then it is done.

Daylight saving time follows Debian's cron, which cronsim implements for 5-field expressions:
a fixed time that falls in a skipped hour runs once, right after the gap; a fixed time in a
repeated hour runs once, at its first occurrence; an expression with a wildcard minute or hour
runs on every real instant that matches. nanobot adds two things of its own:

- A fire time is always strictly after the time it is asked from. cronsim, asked from inside a
  repeated hour (the second 01:00 of New York's 2026-11-01), answers with the first 01:30, which
  is in the past; it is stepped over, which is why a restart inside a repeated hour does not fire
  again.
- A 6-field expression (seconds first) gets the same DST rules: when its minute and hour are
  fixed, its minutes come from cronsim's 5-field evaluation and its seconds are added within
  each minute (cronsim itself applies Debian's rules to 5-field expressions only).

Every slot is an aware UTC ``datetime``: it is the slot's identity in ``task_runs``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from nanobot.exceptions import InvalidScheduleError
from nanobot.models import MisfirePolicy
from nanobot.times import positive_seconds

__all__ = [
    "DEFAULT_TIMEZONE",
    "MISSED_COUNT_MAX",
    "SHORTCUTS",
    "AtSchedule",
    "CronSchedule",
    "DueSlots",
    "IntervalSchedule",
    "ParsedAt",
    "Schedule",
    "ScheduleKind",
    "count_slots",
    "describe",
    "due_slots",
    "fire_times",
    "format_local",
    "grid_slot_at_or_after",
    "load_schedule",
    "next_after",
    "parse_at",
    "parse_cron",
    "parse_every",
    "resolve_schedule",
    "skip_grace",
    "slot_at_or_after",
    "zone",
]

DEFAULT_TIMEZONE: Final = "UTC"
# A slot under the SKIP policy runs only if it is reached within this share of the gap to the
# next slot (at most SKIP_GRACE_MAX seconds); later than that, it is recorded missed.
SKIP_GRACE_SHARE: Final = 0.5
SKIP_GRACE_MAX: Final = 60.0
# Missed cron slots are counted one by one up to this many (a minutely task down for a year
# would need half a million steps); beyond it the count is a lower bound and says so.
MISSED_COUNT_MAX: Final = 10_000

SHORTCUTS: Final[dict[str, str]] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class ScheduleKind(enum.StrEnum):
    """The kind of a task's schedule, as stored in ``tasks.schedule_kind``."""

    INTERVAL = "interval"
    CRON = "cron"
    AT = "at"


@dataclass(frozen=True, slots=True, kw_only=True)
class IntervalSchedule:
    """Every ``seconds`` at a fixed rate, on the grid of the task's anchor."""

    seconds: float

    def __post_init__(self) -> None:
        positive_seconds(self.seconds, "interval", InvalidScheduleError)

    @property
    def kind(self) -> ScheduleKind:
        return ScheduleKind.INTERVAL


@dataclass(frozen=True, slots=True, kw_only=True)
class CronSchedule:
    """A cron expression (as written, shortcuts kept) in an IANA time zone.

    Build it with :func:`parse_cron`, which validates; the constructor checks too.
    """

    expression: str
    timezone: str = DEFAULT_TIMEZONE

    def __post_init__(self) -> None:
        zone(self.timezone)
        _compiled(self.expression)

    @property
    def kind(self) -> ScheduleKind:
        return ScheduleKind.CRON


@dataclass(frozen=True, slots=True, kw_only=True)
class AtSchedule:
    """One instant (aware, stored in UTC); ``timezone`` is the zone it is shown in."""

    at: datetime
    timezone: str = DEFAULT_TIMEZONE

    def __post_init__(self) -> None:
        if not isinstance(self.at, datetime):
            raise InvalidScheduleError(f"at must be a datetime, got {self.at!r}")
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise InvalidScheduleError(
                f"at must be an aware datetime (read naive times with parse_at), got {self.at!r}"
            )
        zone(self.timezone)
        object.__setattr__(self, "at", self.at.astimezone(UTC))

    @property
    def kind(self) -> ScheduleKind:
        return ScheduleKind.AT


Schedule = IntervalSchedule | CronSchedule | AtSchedule


@dataclass(frozen=True, slots=True)
class DueSlots:
    """One job's slots from its first due slot up to now: the one to run, the missed ones."""

    run_slot: datetime | None
    missed_first: datetime | None
    missed_count: int
    # None: the schedule has no slot after these (a one-shot that came due).
    next_slot: datetime | None
    # True when missed_count is a lower bound (MISSED_COUNT_MAX reached).
    missed_capped: bool = False


@dataclass(frozen=True, slots=True)
class ParsedAt:
    """A one-shot instant read from text, and what the reader should be told about it."""

    schedule: AtSchedule
    # e.g. that an ambiguous local time was read as its first occurrence; None if nothing.
    note: str | None = None


# --- parsing and validation -------------------------------------------------------------------


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or :class:`InvalidScheduleError` naming it."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidScheduleError(f"a time zone must be an IANA name, got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidScheduleError(
            f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin or UTC"
        ) from None


_EVERY_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_every(text: str | float) -> IntervalSchedule:
    """``30s``, ``5m``, ``1h``, ``1h30m``, ``2d`` or a plain number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return IntervalSchedule(seconds=float(text))
    if not isinstance(text, str):
        raise InvalidScheduleError(f"an interval must be text such as 30s, 5m, 1h, got {text!r}")
    raw = text.strip().lower()
    pos = 0
    total = 0.0
    while pos < len(raw):
        match = _EVERY_PART.match(raw, pos)
        if match is None or match.end() == pos:
            break
        unit = match.group(2) or ("s" if pos == 0 and match.end() == len(raw) else None)
        if unit is None:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[unit]
        pos = match.end()
        while pos < len(raw) and raw[pos] == " ":
            pos += 1
    if not raw or pos != len(raw):
        raise InvalidScheduleError(
            f"invalid interval {text!r}: write a number with a unit, such as 30s, 5m, 1h or 1h30m"
        )
    return IntervalSchedule(seconds=total)


def _normalise(expression: str) -> str:
    return " ".join(expression.split())


@lru_cache(maxsize=1024)
def _compiled(expression: str) -> tuple[str, bool]:
    """The expression cronsim evaluates (shortcuts expanded) and whether it has seconds."""
    if not isinstance(expression, str) or not expression.strip():
        raise InvalidScheduleError(f"a cron expression must be non-empty text, got {expression!r}")
    text = _normalise(expression)
    lowered = text.lower()
    if lowered.startswith("@"):
        if lowered == "@reboot":
            raise InvalidScheduleError(
                "invalid cron expression '@reboot': nanobot has no reboot schedule; "
                "start the task instead"
            )
        if lowered not in SHORTCUTS:
            choices = ", ".join(SHORTCUTS)
            raise InvalidScheduleError(
                f"invalid cron expression {text!r}: unknown shortcut (use one of {choices})"
            )
        text = SHORTCUTS[lowered]
    fields = text.split()
    if len(fields) not in (5, 6):
        raise InvalidScheduleError(
            f"invalid cron expression {expression!r}: it has {len(fields)} field(s); write 5 "
            "(minute hour day-of-month month day-of-week) or 6 (seconds first)"
        )
    try:
        probe = CronSim(text, datetime(2000, 1, 1))
        next(probe)
    except CronSimError as exc:
        # cronsim says "Bad minute", "Bad day-of-month": the field that is wrong.
        reason = str(exc).lower() or "not understood"
        raise InvalidScheduleError(
            f"invalid cron expression {expression!r}: {reason} field"
        ) from None
    except StopIteration:
        raise InvalidScheduleError(
            f"invalid cron expression {expression!r}: it never fires"
        ) from None
    return text, len(fields) == 6


def parse_cron(expression: str, timezone: str | None = None) -> CronSchedule:
    """A validated cron schedule; ``timezone`` defaults to UTC (pass the configured default)."""
    tz = DEFAULT_TIMEZONE if timezone is None else timezone
    zone(tz)
    _compiled(expression)
    return CronSchedule(expression=_normalise(expression), timezone=tz)


_TIME_ONLY = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def _local(naive: datetime, tz: ZoneInfo, text: str) -> tuple[datetime, str | None]:
    """``naive`` read in ``tz``: refused if it does not exist, its first occurrence if it is
    ambiguous (with a note saying so)."""
    first = naive.replace(tzinfo=tz, fold=0)
    second = naive.replace(tzinfo=tz, fold=1)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != naive:
        raise InvalidScheduleError(
            f"{text!r} does not exist in {tz.key}: the clocks skip that time "
            "(daylight saving time begins); choose a time outside the gap"
        )
    if first.utcoffset() != second.utcoffset():
        note = (
            f"{text!r} occurs twice in {tz.key} (daylight saving time ends); "
            f"read as its first occurrence, {first.isoformat()}"
        )
        return first, note
    return first, None


def parse_at(value: str | datetime, timezone: str | None = None, *, now: datetime) -> ParsedAt:
    """A one-shot instant: ISO 8601 text or a ``datetime``; naive times are read in
    ``timezone`` (default UTC). ``HH:MM`` alone is the next such time in that zone. Refused if
    not after ``now``, if the local time does not exist; an ambiguous local time is its first
    occurrence, and the returned note says so."""
    tz_name = DEFAULT_TIMEZONE if timezone is None else timezone
    tz = zone(tz_name)
    note: str | None = None
    if isinstance(value, datetime):
        text = value.isoformat()
        if value.tzinfo is None or value.utcoffset() is None:
            instant, note = _local(value, tz, text)
        else:
            instant = value
    elif isinstance(value, str):
        text = value.strip()
        clock = _TIME_ONLY.match(text)
        if clock is not None:
            hour, minute, second = (int(g) if g else 0 for g in clock.groups())
            if hour > 23 or minute > 59 or second > 59:
                raise InvalidScheduleError(f"invalid time {text!r}: write HH:MM in 24-hour time")
            today = now.astimezone(tz).date()
            found: datetime | None = None
            for day in (today, today + timedelta(days=1), today + timedelta(days=2)):
                naive = datetime(day.year, day.month, day.day, hour, minute, second)
                try:
                    candidate, candidate_note = _local(naive, tz, naive.isoformat())
                except InvalidScheduleError:
                    continue
                if candidate > now:
                    found, note = candidate, candidate_note
                    break
            if found is None:  # pragma: no cover - two days always hold the time once
                raise InvalidScheduleError(f"no next occurrence of {text!r} in {tz_name}")
            instant = found
        else:
            candidate_text = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
            try:
                parsed = datetime.fromisoformat(candidate_text)
            except ValueError:
                raise InvalidScheduleError(
                    f"invalid time {text!r}: write ISO 8601 such as 2026-12-24T17:30, "
                    "2026-12-24T17:30+01:00 or 17:30"
                ) from None
            if parsed.tzinfo is None:
                instant, note = _local(parsed, tz, text)
            else:
                instant = parsed
    else:
        raise InvalidScheduleError(f"at must be a datetime or ISO 8601 text, got {value!r}")
    if instant <= now:
        raise InvalidScheduleError(
            f"time {instant.isoformat()} is in the past (now is "
            f"{now.astimezone(tz).isoformat(timespec='seconds')}): choose a later time"
        )
    return ParsedAt(AtSchedule(at=instant, timezone=tz_name), note)


def resolve_schedule(
    *,
    interval: float | str | None = None,
    cron: str | None = None,
    tz: str | None = None,
    at: str | datetime | None = None,
    default_tz: str = DEFAULT_TIMEZONE,
    now: datetime,
) -> ParsedAt | Schedule:
    """The one schedule that ``interval``, ``cron`` or ``at`` declares (exactly one of them).

    ``tz`` applies to ``cron`` and ``at`` only; ``default_tz`` is used when it is None. For
    ``at`` the result is a :class:`ParsedAt` (the schedule and a note), otherwise the schedule.
    """
    given = [n for n, v in (("interval", interval), ("cron", cron), ("at", at)) if v is not None]
    if len(given) > 1:
        raise InvalidScheduleError(
            f"a task has one schedule: {' and '.join(given)} were both given; keep one"
        )
    if tz is not None and interval is not None:
        raise InvalidScheduleError(
            "a time zone applies to cron and at schedules, not to an interval"
        )
    zone_name = tz if tz is not None else default_tz
    if cron is not None:
        return parse_cron(cron, zone_name)
    if at is not None:
        return parse_at(at, zone_name, now=now)
    if interval is None:
        raise InvalidScheduleError("no schedule: give an interval, a cron expression or a time")
    return parse_every(interval)


def load_schedule(
    kind: str | None,
    *,
    interval: float | None,
    cron: str | None,
    timezone: str | None,
    run_at: datetime | None,
) -> Schedule:
    """The schedule stored in a ``tasks`` row (a row from before schedules is an interval)."""
    match ScheduleKind(kind or ScheduleKind.INTERVAL):
        case ScheduleKind.INTERVAL:
            return IntervalSchedule(seconds=float(interval or 0))
        case ScheduleKind.CRON:
            return CronSchedule(expression=cron or "", timezone=timezone or DEFAULT_TIMEZONE)
        case ScheduleKind.AT:
            if run_at is None:
                raise InvalidScheduleError("a stored one-shot task has no run_at")
            if run_at.tzinfo is None:
                # SQLite hands back naive values for what was written in UTC.
                run_at = run_at.replace(tzinfo=UTC)
            return AtSchedule(at=run_at, timezone=timezone or DEFAULT_TIMEZONE)


# --- slot arithmetic --------------------------------------------------------------------------


def grid_slot_at_or_after(anchor: datetime, interval: float, when: datetime) -> datetime:
    """The first slot ``anchor + k * interval`` (k >= 0) that is not before ``when``."""
    if when <= anchor:
        return anchor
    k = math.ceil((when - anchor).total_seconds() / interval - 1e-9)
    return anchor + timedelta(seconds=k * interval)


@lru_cache(maxsize=1024)
def _seconds_of(expression: str) -> tuple[int, ...]:
    """The seconds of a minute that a 6-field expression's seconds field selects (by cronsim)."""
    seconds_field = expression.split()[0]
    start = datetime(2000, 1, 1)
    found: list[int] = []
    for t in CronSim(f"{seconds_field} * * * * *", start - timedelta(seconds=1)):
        if t.minute != 0 or t.hour != 0:
            break
        found.append(t.second)
    return tuple(found)


def _cron_iter(schedule: CronSchedule, after: datetime) -> Iterator[datetime]:
    """Fire times (aware UTC) strictly after ``after``, in order."""
    text, has_seconds = _compiled(schedule.expression)
    tz = zone(schedule.timezone)
    fields = text.split()
    start = after.astimezone(tz)
    if has_seconds and not fields[1].startswith("*") and not fields[2].startswith("*"):
        # Minutes from cronsim's Debian-compatible 5-field evaluation, seconds added within
        # each minute: the same DST rules as a 5-field expression.
        seconds = _seconds_of(text)
        minute_expr = " ".join(fields[1:])
        # A minute back in UTC (aware arithmetic in a zone would be wall-clock arithmetic).
        begin = (after - timedelta(minutes=1)).astimezone(tz).replace(second=0, microsecond=0)
        for minute in CronSim(minute_expr, begin):
            base = minute.astimezone(UTC)
            for s in seconds:
                t = base + timedelta(seconds=s)
                if t > after:
                    yield t
        return
    last: datetime | None = None
    for t in CronSim(text, start):
        result = t.astimezone(UTC)
        # cronsim asked from inside a repeated hour can answer with the first occurrence of a
        # fixed time, already past: step over it, so nothing fires twice.
        if result <= after or (last is not None and result <= last):
            continue
        last = result
        yield result


def next_after(
    schedule: Schedule, after: datetime, *, anchor: datetime | None = None
) -> datetime | None:
    """The first slot strictly after ``after`` (None: there is none). Interval schedules need
    the task's ``anchor`` (the grid's origin; defaults to ``after``)."""
    after = after.astimezone(UTC)
    if isinstance(schedule, IntervalSchedule):
        origin = after if anchor is None else anchor.astimezone(UTC)
        slot = grid_slot_at_or_after(origin, schedule.seconds, after)
        return slot if slot > after else slot + timedelta(seconds=schedule.seconds)
    if isinstance(schedule, AtSchedule):
        return schedule.at if schedule.at > after else None
    return next(_cron_iter(schedule, after), None)


def slot_at_or_after(
    schedule: Schedule, when: datetime, *, anchor: datetime | None = None
) -> datetime | None:
    """The first slot not before ``when`` (for a job that has none yet, or is resumed)."""
    when = when.astimezone(UTC)
    if isinstance(schedule, IntervalSchedule):
        return grid_slot_at_or_after(
            when if anchor is None else anchor.astimezone(UTC), schedule.seconds, when
        )
    return next_after(schedule, when - timedelta(microseconds=1))


def fire_times(
    schedule: Schedule, after: datetime, count: int, *, anchor: datetime | None = None
) -> list[datetime]:
    """The next ``count`` slots strictly after ``after``."""
    result: list[datetime] = []
    cursor = after
    while len(result) < count:
        slot = next_after(schedule, cursor, anchor=anchor)
        if slot is None:
            break
        result.append(slot)
        cursor = slot
    return result


def count_slots(
    schedule: Schedule,
    start: datetime,
    end: datetime,
    *,
    anchor: datetime | None = None,
    limit: int = MISSED_COUNT_MAX,
) -> int:
    """How many slots lie in ``[start, end]`` (at most ``limit``; interval: exact, O(1))."""
    if end < start:
        return 0
    if isinstance(schedule, IntervalSchedule):
        first = grid_slot_at_or_after(anchor or start, schedule.seconds, start)
        if first > end:
            return 0
        return math.floor((end - first).total_seconds() / schedule.seconds + 1e-9) + 1
    n = 0
    slot = slot_at_or_after(schedule, start)
    while slot is not None and slot <= end and n < limit:
        n += 1
        slot = next_after(schedule, slot)
    return n


def skip_grace(slot: datetime, next_slot: datetime | None) -> float:
    """How late a slot may still run under the SKIP policy: half the gap to the next slot, at
    most a minute (a one-shot: a minute)."""
    if next_slot is None:
        return SKIP_GRACE_MAX
    return min((next_slot - slot).total_seconds() * SKIP_GRACE_SHARE, SKIP_GRACE_MAX)


def _last_at_or_before(schedule: CronSchedule, after: datetime, now: datetime) -> datetime:
    """The last slot in ``(after, now]``, known to exist, found by widening windows."""
    width = timedelta(minutes=2)
    while True:
        start = max(after, now - width)
        last: datetime | None = None
        for t in _cron_iter(schedule, start):
            if t > now:
                break
            last = t
        if last is not None:
            return last
        width *= 4


def due_slots(
    schedule: Schedule,
    first_due: datetime,
    now: datetime,
    policy: MisfirePolicy,
    *,
    window: float | None = None,
) -> DueSlots:
    """Split the slots from ``first_due`` (a slot of ``schedule``) up to ``now`` into the one to
    run and the missed ones, and find the next slot.

    Fixed rate: the slots are the schedule's whatever the runs took, so nothing drifts. Under
    CATCH_UP_ONCE the latest due slot runs and the earlier ones are missed; under SKIP the
    latest runs only if it is reached within :func:`skip_grace`, else every one is missed.
    A catch-up ``window`` (seconds) bounds either policy: a latest slot reached later than
    that is missed too, with the others, and nothing runs.
    """
    first_due = first_due.astimezone(UTC)
    capped = False
    if isinstance(schedule, IntervalSchedule):
        k = math.floor((now - first_due).total_seconds() / schedule.seconds + 1e-9)
        k = max(k, 0)
        last_due = first_due + timedelta(seconds=k * schedule.seconds)
        next_slot: datetime | None = first_due + timedelta(seconds=(k + 1) * schedule.seconds)
        missed = k
    else:
        last_due = first_due
        missed = 0
        next_slot = next_after(schedule, first_due)
        while next_slot is not None and next_slot <= now:
            if missed >= MISSED_COUNT_MAX:
                assert isinstance(schedule, CronSchedule)
                last_due = _last_at_or_before(schedule, last_due, now)
                next_slot = next_after(schedule, last_due)
                capped = True
                break
            missed += 1
            last_due = next_slot
            next_slot = next_after(schedule, next_slot)
    late = (now - last_due).total_seconds()
    if (policy is MisfirePolicy.SKIP and late > skip_grace(last_due, next_slot)) or (
        window is not None and late > window
    ):
        return DueSlots(None, first_due, missed + 1, next_slot, capped)
    return DueSlots(last_due, first_due if missed else None, missed, next_slot, capped)


# --- words ------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{unit}" if n == 1 else f"{n} {unit}s"
    if seconds == int(seconds):
        n = int(seconds)
        return "second" if n == 1 else f"{n} seconds"
    return f"{seconds:g} seconds"


def format_local(instant: datetime, timezone: str) -> str:
    """``2026-03-08 03:00:00 EDT (-04:00)``: an instant on the clock of ``timezone``."""
    local = instant.astimezone(zone(timezone))
    offset = local.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}" if offset else "+00:00"
    return f"{local:%Y-%m-%d %H:%M:%S} {local.tzname()} ({offset})"


def describe(schedule: Schedule) -> str:
    """The schedule in words: ``every 5 minutes``, ``at 09:00 on Monday through Friday
    (Europe/Berlin)``, ``once at 2026-12-24 17:30:00 CET (+01:00) (Europe/Berlin)``."""
    if isinstance(schedule, IntervalSchedule):
        return f"every {_duration(schedule.seconds)}"
    if isinstance(schedule, AtSchedule):
        return f"once at {format_local(schedule.at, schedule.timezone)} ({schedule.timezone})"
    text, _ = _compiled(schedule.expression)
    words = CronSim(text, datetime(2000, 1, 1)).explain()
    # cronsim writes a sentence ("At 09:00 on ..."); here it follows "runs".
    return f"{words[:1].lower()}{words[1:]} ({schedule.timezone})"
