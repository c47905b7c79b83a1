"""Schedules, pure: DST as Debian's cron does it, one-shot times, parsing, words; property tests.

Every "now" here is an argument (the injected clock); no test reads the real clock.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanobot.cron.schedules import (
    MISSED_COUNT_MAX,
    AtSchedule,
    CronSchedule,
    IntervalSchedule,
    ParsedAt,
    ScheduleKind,
    count_slots,
    describe,
    due_slots,
    fire_times,
    format_local,
    grid_slot_at_or_after,
    load_schedule,
    next_after,
    parse_at,
    parse_cron,
    parse_every,
    resolve_schedule,
    slot_at_or_after,
)
from nanobot.exceptions import InvalidScheduleError, InvalidTaskError
from nanobot.models import MisfirePolicy


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local_day(schedule: CronSchedule, day: date) -> list[datetime]:
    """The fire times (UTC) whose local date in the schedule's zone is ``day``."""
    tz = ZoneInfo(schedule.timezone)
    start = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)
    result = []
    for t in fire_times(schedule, start - timedelta(seconds=1), 200):
        if t.astimezone(tz).date() != day:
            break
        result.append(t)
    return result


# --- DST: the examples ----------------------------------------------------------------


def test_new_york_skipped_hour_runs_once_right_after_the_gap() -> None:
    """`30 2 * * *` in New York runs once on 2026-03-08, at 03:00 EDT = 07:00 UTC."""
    schedule = parse_cron("30 2 * * *", "America/New_York")
    assert local_day(schedule, date(2026, 3, 8)) == [utc(2026, 3, 8, 7, 0)]
    # and on the days around it at 02:30 local as usual
    assert local_day(schedule, date(2026, 3, 7)) == [utc(2026, 3, 7, 7, 30)]
    assert local_day(schedule, date(2026, 3, 9)) == [utc(2026, 3, 9, 6, 30)]


def test_new_york_repeated_hour_runs_once_at_first_occurrence() -> None:
    """`30 1 * * *` runs once on 2026-11-01, at 05:30 UTC (EDT), not again at 06:30 UTC."""
    schedule = parse_cron("30 1 * * *", "America/New_York")
    assert local_day(schedule, date(2026, 11, 1)) == [utc(2026, 11, 1, 5, 30)]
    assert next_after(schedule, utc(2026, 11, 1, 5, 30)) == utc(2026, 11, 2, 6, 30)


@pytest.mark.parametrize(
    ("day", "expected"),
    [(date(2026, 3, 8), 23), (date(2026, 11, 1), 25), (date(2026, 6, 1), 24)],
)
def test_new_york_hourly_runs_on_every_real_hour(day: date, expected: int) -> None:
    """`0 * * * *` runs 23 times on the spring-forward day and 25 on the fall-back day."""
    schedule = parse_cron("0 * * * *", "America/New_York")
    fires = local_day(schedule, day)
    assert len(fires) == expected
    assert len(set(fires)) == expected


@pytest.mark.parametrize(
    "now",
    [
        utc(2026, 11, 1, 5, 45),
        utc(2026, 11, 1, 6, 0),
        utc(2026, 11, 1, 6, 29),
        utc(2026, 11, 1, 6, 30),
    ],
)
def test_asked_from_inside_the_repeated_hour_nothing_fires_again(now: datetime) -> None:
    """From anywhere in the repeated hour (EDT or EST), the next 01:30 is the next day's."""
    schedule = parse_cron("30 1 * * *", "America/New_York")
    assert next_after(schedule, now) == utc(2026, 11, 2, 6, 30)
    assert slot_at_or_after(schedule, now) == utc(2026, 11, 2, 6, 30)


def test_restart_inside_repeated_hour_counts_no_missed_slot() -> None:
    """The slot claimed at 05:30 UTC leads to the next day's: a pass at 06:40 UTC (01:40 EST)
    finds nothing due and nothing missed."""
    schedule = parse_cron("30 1 * * *", "America/New_York")
    nxt = next_after(schedule, utc(2026, 11, 1, 5, 30))
    assert nxt is not None
    assert nxt > utc(2026, 11, 1, 6, 40)
    assert count_slots(schedule, utc(2026, 11, 1, 5, 31), utc(2026, 11, 1, 6, 40)) == 0


# --- DST elsewhere ----------------------------------------------------------------------------


def test_southern_hemisphere_sydney() -> None:
    """Sydney springs forward on 2026-10-04 (02:00 -> 03:00) and falls back on 2026-04-05
    (03:00 -> 02:00): 02:30 runs once at 03:00 AEDT, 02:30 once at its first (AEDT) occurrence."""
    daily = parse_cron("30 2 * * *", "Australia/Sydney")
    assert local_day(daily, date(2026, 10, 4)) == [utc(2026, 10, 3, 16, 0)]  # 03:00 +11:00
    assert local_day(daily, date(2026, 4, 5)) == [utc(2026, 4, 4, 15, 30)]  # 02:30 +11:00
    hourly = parse_cron("0 * * * *", "Australia/Sydney")
    assert len(local_day(hourly, date(2026, 10, 4))) == 23
    assert len(local_day(hourly, date(2026, 4, 5))) == 25


def test_half_hour_zones() -> None:
    """Kolkata (+05:30, no DST) and Adelaide (+09:30/+10:30): local times are kept exactly."""
    kolkata = parse_cron("0 9 * * *", "Asia/Kolkata")
    assert next_after(kolkata, utc(2026, 1, 1)) == utc(2026, 1, 1, 3, 30)
    adelaide = parse_cron("30 2 * * *", "Australia/Adelaide")
    # Adelaide springs forward 2026-10-04 02:00 -> 03:00 (+10:30)
    assert local_day(adelaide, date(2026, 10, 4)) == [utc(2026, 10, 3, 16, 30)]
    assert len(local_day(parse_cron("*/30 * * * *", "Australia/Adelaide"), date(2026, 4, 5))) == 50


def test_lord_howe_thirty_minute_shift() -> None:
    """Lord Howe moves its clocks by 30 minutes: on 2026-10-04 02:00 -> 02:30 (+10:30 ->
    +11:00); on 2026-04-05 02:00 -> 01:30 (+11:00 -> +10:30)."""
    zone_name = "Australia/Lord_Howe"
    skipped = parse_cron("15 2 * * *", zone_name)  # 02:15 does not exist that day
    assert local_day(skipped, date(2026, 10, 4)) == [utc(2026, 10, 3, 15, 30)]  # 02:30 +11:00
    repeated = parse_cron("45 1 * * *", zone_name)  # 01:45 happens twice
    assert local_day(repeated, date(2026, 4, 5)) == [utc(2026, 4, 4, 14, 45)]  # first, +11:00
    every_quarter = parse_cron("*/15 * * * *", zone_name)
    assert len(local_day(every_quarter, date(2026, 10, 4))) == 96 - 2
    assert len(local_day(every_quarter, date(2026, 4, 5))) == 96 + 2


def test_six_field_expressions_follow_the_same_dst_rules() -> None:
    """With seconds, a fixed time still runs once in a repeated hour and once after a gap."""
    repeated = parse_cron("10 30 1 * * *", "America/New_York")
    assert local_day(repeated, date(2026, 11, 1)) == [utc(2026, 11, 1, 5, 30, 10)]
    skipped = parse_cron("*/20 30 2 * * *", "America/New_York")
    assert local_day(skipped, date(2026, 3, 8)) == [
        utc(2026, 3, 8, 7, 0, 0),
        utc(2026, 3, 8, 7, 0, 20),
        utc(2026, 3, 8, 7, 0, 40),
    ]
    every = parse_cron("*/15 * * * * *", "UTC")
    assert fire_times(every, utc(2026, 1, 1), 3) == [
        utc(2026, 1, 1, 0, 0, 15),
        utc(2026, 1, 1, 0, 0, 30),
        utc(2026, 1, 1, 0, 0, 45),
    ]


def test_names_and_shortcuts() -> None:
    """Month and day names and @daily-style shortcuts mean what cron means by them."""
    weekdays = parse_cron("0 9 * * mon-fri", "Europe/Berlin")
    # 2026-01-03 is a Saturday: the next run is Monday 09:00 CET
    assert next_after(weekdays, utc(2026, 1, 3)) == utc(2026, 1, 5, 8, 0)
    assert next_after(parse_cron("@daily"), utc(2026, 1, 1, 0, 0, 1)) == utc(2026, 1, 2)
    assert next_after(parse_cron("@monthly"), utc(2026, 1, 1)) == utc(2026, 2, 1)
    assert next_after(parse_cron("@hourly"), utc(2026, 1, 1)) == utc(2026, 1, 1, 1)
    assert next_after(parse_cron("0 0 1 JAN *"), utc(2026, 1, 1)) == utc(2027, 1, 1)


# --- one-shot ---------------------------------------------------------------------------------


def test_at_parses_naive_times_in_the_zone_and_refuses_the_gap() -> None:
    """A naive time is local to the zone; a time in the spring-forward gap is refused."""
    now = utc(2026, 1, 1)
    parsed = parse_at("2026-12-24T17:30", "Europe/Berlin", now=now)
    assert parsed == ParsedAt(AtSchedule(at=utc(2026, 12, 24, 16, 30), timezone="Europe/Berlin"))
    with pytest.raises(InvalidScheduleError, match="does not exist in America/New_York"):
        parse_at("2026-03-08T02:30", "America/New_York", now=now)
    ambiguous = parse_at("2026-11-01 01:30", "America/New_York", now=now)
    assert ambiguous.schedule.at == utc(2026, 11, 1, 5, 30)
    assert ambiguous.note is not None
    assert "first occurrence" in ambiguous.note


def test_at_accepts_offsets_z_and_clock_times() -> None:
    """An offset wins over the zone; ``HH:MM`` is the next such time on the zone's clock."""
    now = utc(2026, 6, 1, 20, 0)  # 22:00 in Berlin
    assert parse_at("2026-06-02T08:00+02:00", "UTC", now=now).schedule.at == utc(2026, 6, 2, 6)
    assert parse_at("2026-06-02T08:00Z", None, now=now).schedule.at == utc(2026, 6, 2, 8)
    assert parse_at("17:30", "Europe/Berlin", now=now).schedule.at == utc(2026, 6, 2, 15, 30)
    assert parse_at("23:30", "Europe/Berlin", now=now).schedule.at == utc(2026, 6, 1, 21, 30)


@pytest.mark.parametrize(
    ("value", "zone_name", "message"),
    [
        ("2025-12-31T23:59", "UTC", "is in the past"),
        ("2026-01-01T00:00", "UTC", "is in the past"),
        ("tomorrow", "UTC", "invalid time 'tomorrow'"),
        ("25:00", "UTC", "invalid time '25:00'"),
        ("2026-06-01T10:00", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("2026-03-29T02:30", "Europe/Berlin", "does not exist in Europe/Berlin"),
    ],
)
def test_at_bad_inputs(value: str, zone_name: str, message: str) -> None:
    """Each bad one-shot time is refused with one line that names the problem."""
    with pytest.raises(InvalidScheduleError, match=message) as info:
        parse_at(value, zone_name, now=utc(2026, 1, 1))
    assert "\n" not in str(info.value)


def test_at_due_slots_run_once_then_nothing() -> None:
    """A one-shot that came due runs once (or is missed under SKIP when late); no next slot."""
    at = AtSchedule(at=utc(2026, 1, 1, 12))
    late = utc(2026, 1, 2)
    assert due_slots(at, at.at, late, MisfirePolicy.CATCH_UP_ONCE).run_slot == at.at
    assert due_slots(at, at.at, late, MisfirePolicy.CATCH_UP_ONCE).next_slot is None
    skipped = due_slots(at, at.at, late, MisfirePolicy.SKIP)
    assert (skipped.run_slot, skipped.missed_count) == (None, 1)
    assert next_after(at, at.at) is None
    assert slot_at_or_after(at, at.at) == at.at


# --- cron validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "zone_name", "message"),
    [
        ("61 * * * *", "UTC", "invalid cron expression '61 \\* \\* \\* \\*': bad minute field"),
        ("* * *", "UTC", "has 3 field"),
        ("0 0 30 2 *", "UTC", "bad day-of-month"),
        ("@reboot", "UTC", "no reboot schedule"),
        ("@fortnightly", "UTC", "unknown shortcut"),
        ("", "UTC", "non-empty"),
        ("0 9 * * *", "Europe/Atlantis", "unknown time zone 'Europe/Atlantis'"),
        ("0 9 * * *", "", "IANA name"),
    ],
)
def test_cron_bad_inputs(expression: str, zone_name: str, message: str) -> None:
    """Each bad expression or zone is refused with one line naming it."""
    with pytest.raises(InvalidScheduleError, match=message) as info:
        parse_cron(expression, zone_name)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, InvalidTaskError)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("45", 45), (90, 90)],
)
def test_parse_every(text: str | int, seconds: float) -> None:
    """Intervals are written with units (or as plain seconds)."""
    assert parse_every(text) == IntervalSchedule(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5x", "m", "-5m", "0s", "1h 2", "five"])
def test_parse_every_bad(text: str) -> None:
    """A bad interval is refused with one line."""
    with pytest.raises(InvalidScheduleError):
        parse_every(text)


def test_resolve_refuses_contradictions() -> None:
    """One schedule per task: interval with cron, cron with at, or a zone on an interval fail."""
    now = utc(2026, 1, 1)
    with pytest.raises(InvalidScheduleError, match="interval and cron were both given"):
        resolve_schedule(interval=60, cron="* * * * *", now=now)
    with pytest.raises(InvalidScheduleError, match="cron and at were both given"):
        resolve_schedule(cron="* * * * *", at="2027-01-01T00:00", now=now)
    with pytest.raises(InvalidScheduleError, match="not to an interval"):
        resolve_schedule(interval=60, tz="Europe/Berlin", now=now)
    resolved = resolve_schedule(cron="0 9 * * *", default_tz="Europe/Berlin", now=now)
    assert resolved == CronSchedule(expression="0 9 * * *", timezone="Europe/Berlin")


def test_load_schedule_reads_stored_columns() -> None:
    """A row without a kind (written before schedules) is an interval."""
    assert load_schedule(None, interval=10, cron=None, timezone=None, run_at=None) == (
        IntervalSchedule(seconds=10)
    )
    naive = datetime(2026, 1, 1, 12)
    loaded = load_schedule("at", interval=0, cron=None, timezone="Asia/Tokyo", run_at=naive)
    assert loaded == AtSchedule(at=utc(2026, 1, 1, 12), timezone="Asia/Tokyo")
    assert loaded.kind is ScheduleKind.AT


def test_describe() -> None:
    """Schedules in words, with the zone they are read in."""
    assert describe(parse_cron("0 9 * * 1-5", "Europe/Berlin")) == (
        "at 09:00 on Monday through Friday (Europe/Berlin)"
    )
    assert describe(IntervalSchedule(seconds=300)) == "every 5 minutes"
    assert describe(IntervalSchedule(seconds=1)) == "every second"
    assert describe(IntervalSchedule(seconds=2.5)) == "every 2.5 seconds"
    once = AtSchedule(at=utc(2026, 12, 24, 16, 30), timezone="Europe/Berlin")
    assert describe(once) == "once at 2026-12-24 17:30:00 CET (+01:00) (Europe/Berlin)"
    assert format_local(utc(2026, 3, 8, 7), "America/New_York") == (
        "2026-03-08 03:00:00 EDT (-04:00)"
    )


# --- slot arithmetic moved from the APScheduler adapter ---------------------------------------


@pytest.mark.parametrize(
    ("first", "now", "policy", "expected"),
    [
        # (first due, now) in seconds from 0, interval 10: (run, missed first, missed, next)
        (0, 0, MisfirePolicy.CATCH_UP_ONCE, (0, None, 0, 10)),
        (0, 9.9, MisfirePolicy.CATCH_UP_ONCE, (0, None, 0, 10)),
        (0, 10, MisfirePolicy.CATCH_UP_ONCE, (10, 0, 1, 20)),
        (0, 1000.5, MisfirePolicy.CATCH_UP_ONCE, (1000, 0, 100, 1010)),
        (0, 1, MisfirePolicy.SKIP, (0, None, 0, 10)),
        (0, 1000.5, MisfirePolicy.SKIP, (1000, 0, 100, 1010)),
        (0, 1006, MisfirePolicy.SKIP, (None, 0, 101, 1010)),
    ],
)
def test_due_slots_interval_table(
    first: float, now: float, policy: MisfirePolicy, expected: tuple[float | None, ...]
) -> None:
    """Slots split into one to run and the missed ones, on a fixed grid (grace 5 s for SKIP)."""
    t0 = utc(2026, 1, 1)

    def at(s: float | None) -> datetime | None:
        return None if s is None else t0 + timedelta(seconds=s)

    result = due_slots(
        IntervalSchedule(seconds=10.0), t0 + timedelta(seconds=first), at(now) or t0, policy
    )
    run, missed_first, missed, nxt = expected
    assert (result.run_slot, result.missed_first, result.missed_count, result.next_slot) == (
        at(run),
        at(missed_first),
        missed,
        at(nxt),
    )


def test_due_slots_cron_counts_missed_slots_by_the_schedule() -> None:
    """After downtime, missed slots are the schedule's own (23 on a spring-forward day)."""
    hourly = parse_cron("0 * * * *", "America/New_York")
    first = utc(2026, 3, 8, 5)  # 00:00 EST
    now = utc(2026, 3, 9, 4, 0, 10)  # 00:00:10 EDT on the 9th
    result = due_slots(hourly, first, now, MisfirePolicy.CATCH_UP_ONCE)
    assert result.run_slot == utc(2026, 3, 9, 4)
    assert result.missed_first == first
    assert result.missed_count == 23
    assert result.next_slot == utc(2026, 3, 9, 5)
    skipped = due_slots(hourly, first, utc(2026, 3, 9, 4, 31), MisfirePolicy.SKIP)
    assert (skipped.run_slot, skipped.missed_count) == (None, 24)


def test_due_slots_count_is_bounded() -> None:
    """A minutely task down for a year counts MISSED_COUNT_MAX slots (a lower bound, flagged)
    and still runs the latest slot and finds the right next one."""
    minutely = parse_cron("* * * * *")
    result = due_slots(
        minutely, utc(2025, 1, 1), utc(2026, 1, 1, 0, 0, 30), MisfirePolicy.CATCH_UP_ONCE
    )
    assert result.missed_capped
    assert result.missed_count == MISSED_COUNT_MAX
    assert result.run_slot == utc(2026, 1, 1)
    assert result.next_slot == utc(2026, 1, 1, 0, 1)


def test_grid_slot_at_or_after() -> None:
    """Resuming finds the next slot of the original grid, never one before now."""
    t0 = utc(2026, 1, 1)
    assert grid_slot_at_or_after(t0, 10, t0 - timedelta(seconds=5)) == t0
    assert grid_slot_at_or_after(t0, 10, t0 + timedelta(seconds=10)) == t0 + timedelta(seconds=10)
    assert grid_slot_at_or_after(t0, 10, t0 + timedelta(seconds=11)) == t0 + timedelta(seconds=20)


# --- properties -------------------------------------------------------------------------------

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Australia/Adelaide",
    "Asia/Kolkata",
    "America/Santiago",
    "Pacific/Chatham",
    "America/St_Johns",
    "Europe/London",
    "Africa/Casablanca",
]
START = utc(2026, 1, 1)
END = utc(2028, 1, 1)


@cache
def transitions(zone_name: str) -> tuple[datetime, ...]:
    """The instants in 2026-2027 at which the zone's offset changes (to the hour)."""
    tz = ZoneInfo(zone_name)
    found = []
    t = START
    offset = t.astimezone(tz).utcoffset()
    while t < END:
        t += timedelta(hours=1)
        now_offset = t.astimezone(tz).utcoffset()
        if now_offset != offset:
            found.append(t)
            offset = now_offset
    return tuple(found)


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    single = st.integers(low, high).map(str)
    listed = st.lists(st.integers(low, high), min_size=2, max_size=3, unique=True).map(
        lambda xs: ",".join(map(str, sorted(xs)))
    )
    ranged = st.tuples(st.integers(low, high), st.integers(low, high)).map(
        lambda ab: f"{min(ab)}-{max(ab)}"
    )
    return st.one_of(single, listed, ranged)


fixed_minute = st.integers(0, 59).map(str)
fixed_hour = st.integers(0, 23).map(str)
days = st.one_of(st.just("*"), _field(1, 28))
months = st.one_of(st.just("*"), st.just("*"), _field(1, 12))
weekdays = st.one_of(st.just("*"), _field(0, 6))
fixed_time = st.builds(
    lambda m, h, d, mo, w: f"{m} {h} {d} {mo} {w}", fixed_minute, fixed_hour, days, months, weekdays
)
any_expression = st.builds(
    lambda m, h, d, mo, w: f"{m} {h} {d} {mo} {w}",
    st.one_of(fixed_minute, _field(0, 59), st.sampled_from(["*/15", "*/20", "*/30", "*"])),
    st.one_of(fixed_hour, _field(0, 23), st.sampled_from(["*", "*/2", "*/3"])),
    days,
    months,
    weekdays,
)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _windows(zone_name: str) -> list[tuple[datetime, datetime]]:
    """Two days around each offset change, and a plain week."""
    spans = [(t - timedelta(days=1), t + timedelta(days=1)) for t in transitions(zone_name)]
    return [*spans, (utc(2026, 7, 1), utc(2026, 7, 8))]


@PROPERTY
@given(expression=any_expression, zone_name=st.sampled_from(ZONES))
def test_property_fire_times_strictly_increase(expression: str, zone_name: str) -> None:
    """Around every offset change of two years (and in a plain week), each fire time is
    strictly after the one before and after the time it was asked from."""
    schedule = parse_cron(expression, zone_name)
    for begin, end in _windows(zone_name):
        previous = begin
        for _ in range(3000):
            t = next_after(schedule, previous)
            if t is None or t > end:
                break
            assert t > previous
            previous = t


@PROPERTY
@given(expression=fixed_time, zone_name=st.sampled_from(ZONES))
def test_property_fixed_time_fires_at_most_once_per_local_date(
    expression: str, zone_name: str
) -> None:
    """Over two years, an expression with a fixed minute and hour fires at most once on any
    local date of its zone (no double fire when clocks go back), in increasing order."""
    schedule = parse_cron(expression, zone_name)
    tz = ZoneInfo(zone_name)
    seen: set[date] = set()
    previous = START
    while True:
        t = next_after(schedule, previous)
        if t is None or t >= END:
            break
        assert t > previous
        day = t.astimezone(tz).date()
        assert day not in seen
        seen.add(day)
        previous = t


@PROPERTY
@given(
    interval=st.floats(0.5, 86400 * 3, allow_nan=False),
    offset=st.floats(0, 86400 * 30, allow_nan=False),
    late=st.floats(0, 86400 * 10, allow_nan=False),
    policy=st.sampled_from(list(MisfirePolicy)),
)
def test_property_interval_slots_match_the_grid(
    interval: float, offset: float, late: float, policy: MisfirePolicy
) -> None:
    """Interval slots are today's grid: anchor + k * interval, whatever the lateness."""
    anchor = START
    schedule = IntervalSchedule(seconds=interval)
    first_due = grid_slot_at_or_after(anchor, interval, anchor + timedelta(seconds=offset))
    now = first_due + timedelta(seconds=late)
    result = due_slots(schedule, first_due, now, policy)
    # the previous implementation's arithmetic, kept here as the reference
    k = max(math.floor((now - first_due).total_seconds() / interval + 1e-9), 0)
    last_due = first_due + timedelta(seconds=k * interval)
    assert result.next_slot == first_due + timedelta(seconds=(k + 1) * interval)
    if policy is MisfirePolicy.CATCH_UP_ONCE:
        assert result.run_slot == last_due
        assert result.missed_count == k
    nxt = next_after(schedule, now, anchor=anchor)
    assert nxt is not None
    steps = (nxt - anchor).total_seconds() / interval
    assert abs(steps - round(steps)) < 1e-6
    assert nxt > now
    assert nxt - timedelta(seconds=interval) <= now + timedelta(microseconds=1)
