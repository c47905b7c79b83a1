"""One component's state machine: what each event changes and the records it returns.

No database, no monitor, no clock of its own: each case passes ``now``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nanobot.heartbeat import component
from nanobot.heartbeat.component import STALE_REASON, ComponentState, Options
from nanobot.heartbeat.store import ChangeRow, ErrorRow
from nanobot.models import ComponentStatus

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
HEALTHY, ERROR = ComponentStatus.HEALTHY, ComponentStatus.ERROR


def _registered(**options: int) -> ComponentState:
    chosen = Options(
        failure_threshold=options.get("failures", 1), success_threshold=options.get("successes", 1)
    )
    comp, recorded = component.register(None, "db", T0, chosen)
    assert recorded == [ChangeRow("db", T0, None, HEALTHY, "registered")]
    return comp


def test_failures_below_the_threshold_record_errors_and_no_transition() -> None:
    comp = _registered(failures=2)
    assert component.fail(comp, T0, "first") == [ErrorRow("db", T0, "first")]
    assert comp.status is HEALTHY
    assert component.fail(comp, T0, "second") == [
        ErrorRow("db", T0, "second"),
        ChangeRow("db", T0, HEALTHY, ERROR, "second"),
    ]
    assert comp.status is ERROR


def test_a_success_resets_the_run_of_failures_and_recovers_at_its_threshold() -> None:
    comp = _registered(failures=1, successes=2)
    component.fail(comp, T0, "down")
    assert component.succeed(comp, T0, "heartbeat") == []
    assert component.succeed(comp, T0, "heartbeat") == [
        ChangeRow("db", T0, ERROR, HEALTHY, "heartbeat")
    ]


def test_staleness_is_recorded_once_per_episode_and_read_without_recording() -> None:
    comp = _registered(failures=5)
    late = T0 + timedelta(seconds=21)
    seen = component.view(comp, late, 20)
    assert (seen.status, seen.last_error, seen.errors) == (
        ERROR,
        STALE_REASON,
        ((late, STALE_REASON),),
    )
    assert (comp.status, comp.last_error, list(comp.errors)) == (HEALTHY, None, [])
    assert component.mark_stale(comp, late, 20) == [
        ErrorRow("db", late, STALE_REASON),
        ChangeRow("db", late, HEALTHY, ERROR, STALE_REASON),  # at once, whatever the threshold
    ]
    assert component.mark_stale(comp, late + timedelta(seconds=60), 20) == []
    assert component.succeed(comp, late, "heartbeat") == [
        ChangeRow("db", late, ERROR, HEALTHY, "heartbeat")
    ]
    assert component.overdue(comp, late + timedelta(seconds=20), 20) is None


def test_registering_again_records_nothing_and_a_stored_component_starts_from_its_status() -> None:
    comp = _registered()
    same, recorded = component.register(
        comp, "db", T0, Options(failure_threshold=3, stale_after=60)
    )
    assert same is comp
    assert recorded == []
    assert comp.failure_threshold == 3
    stored = ComponentState(name="old", status=ERROR, last_heartbeat=None, registered_at=T0)
    _, recorded = component.register(stored, "old", T0, Options())
    assert recorded == [ChangeRow("old", T0, ERROR, HEALTHY, "registered")]


def test_the_system_summary_counts_error_first_then_unknown() -> None:
    assert component.summarize([]).status is HEALTHY
    assert component.summarize([HEALTHY, ComponentStatus.UNKNOWN]).status is ComponentStatus.UNKNOWN
    summary = component.summarize([HEALTHY, ERROR, ComponentStatus.UNKNOWN])
    assert (summary.status, summary.counts()) == (
        ERROR,
        {"total": 3, "healthy": 1, "error": 1, "unknown": 1},
    )
