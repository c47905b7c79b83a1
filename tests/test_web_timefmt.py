"""The dashboard's times and durations (nanobot.web.timefmt): pure functions, tested by table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from nanobot.web.timefmt import absolute, duration, relative, viewer_zone, zone_name

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("offset_s", "shown"),
    [
        (0.4, "now"),
        (-0.9, "now"),
        (5, "in 5 s"),
        (-89, "89 s ago"),
        (120, "in 2 min"),
        (-89 * 60, "89 min ago"),
        (3 * 3600, "in 3.0 h"),
        (-35 * 3600, "35.0 h ago"),
        (3 * 86400, "in 3.0 d"),
        (-40 * 86400, "40.0 d ago"),
    ],
)
def test_relative_picks_the_unit_by_distance_and_says_past_or_future(
    offset_s: float, shown: str
) -> None:
    """Seconds up to 90 s, minutes up to 90 min, hours up to 36 h, then days; 'in' for the
    future, 'ago' for the past, 'now' within a second."""
    assert relative(NOW + timedelta(seconds=offset_s), NOW) == shown


def test_no_time_shows_as_a_dash() -> None:
    """A task that never ran or has no next run shows '-' in every column."""
    assert relative(None, NOW) == "-"
    assert absolute(None) == "-"
    assert duration(None) == "-"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0042, "4.20 ms"),
        (0.25, "250 ms"),
        (1.5, "1.50 s"),
        (119, "119.00 s"),
        (150, "2.5 min"),
        (7199, "120.0 min"),
        (7200, "2.0 h"),
        (36 * 3600, "36.0 h"),
    ],
)
def test_duration_picks_the_unit_by_length(seconds: float, shown: str) -> None:
    """Milliseconds (two decimals under 10 ms), seconds under two minutes, minutes under two
    hours, then hours."""
    assert duration(seconds) == shown


def test_absolute_is_shown_in_the_given_zone_with_its_abbreviation() -> None:
    """The same instant in UTC and in Berlin (CET in November)."""
    assert absolute(NOW) == "2026-11-30 12:00:00 UTC"
    assert absolute(NOW, ZoneInfo("Europe/Berlin")) == "2026-11-30 13:00:00 CET"


@pytest.mark.parametrize(
    ("cookie", "zone"),
    [
        (None, "UTC"),
        ("", "UTC"),
        ("Europe/Berlin", "Europe/Berlin"),
        ("Mars/Olympus_Mons", "UTC"),
        ("../../etc/passwd", "UTC"),
        ("A" * 65, "UTC"),
    ],
)
def test_viewer_zone_falls_back_to_utc_for_a_missing_or_unknown_cookie(
    cookie: str | None, zone: str
) -> None:
    """The tz cookie names the viewer's zone; anything that is not a known zone name is UTC."""
    assert zone_name(viewer_zone(cookie)) == zone
