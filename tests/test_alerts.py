"""Alerts in one process on a real database: rules, outbox and delivery to a local HTTP sink.

Time is an injected clock; the sink is a real aiohttp server on 127.0.0.1 that records what it
accepts and can answer 500. Run outcomes and component status changes are written through the
scheduler's and the monitor's own persistence functions, as the service writes them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from alert_sink import Sink
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, func, inspect, select, text

from nanobot.alerts import Alert, AlertKind, Severity, alert_key
from nanobot.alerts.alerter import Alerter
from nanobot.alerts.destinations import Destination, parse_destinations
from nanobot.alerts.metrics import AlertMetrics
from nanobot.alerts.rules import Rules, RuleSettings
from nanobot.alerts.store import prune, recent, write_alerts
from nanobot.alerts.worker import Deliverer, RetryPolicy
from nanobot.bus import MessageBus
from nanobot.cli import cli
from nanobot.config import load_config
from nanobot.cron import control, history
from nanobot.database_guard import DATABASE_RECREATED, DATABASE_REPLACED
from nanobot.db import (
    alembic_config,
    create_db_engine,
    downgrade_database,
    upgrade_database,
    write_transaction,
)
from nanobot.exceptions import ConfigError
from nanobot.heartbeat.store import SYSTEM_COMPONENT, Batch, ChangeRow, write_batch
from nanobot.lease import SchedulerLease, read_lease
from nanobot.models import AlertRecord, Task, TaskOutcome, utcnow

T0 = datetime(2026, 11, 30, 3, 0, tzinfo=datetime.now().astimezone().tzinfo).astimezone()
NODE = "node-a"


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start.astimezone(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


def destination(sink: Sink, name: str = "hook", **filters: object) -> Destination:
    base = Destination(name=name, url=sink.url(name), shown=sink.url(name))
    return dataclasses.replace(base, **filters)  # type: ignore[arg-type]


def rules(engine: Engine, dests: list[Destination], **settings: object) -> Rules:
    values: dict[str, object] = {"cooldown": timedelta(minutes=5), "group_window": timedelta(0)}
    values.update(settings)
    return Rules(engine, dests, RuleSettings(**values), holder=f"{NODE}:1")  # type: ignore[arg-type]


def deliverer(engine: Engine, dests: list[Destination], clock: Clock, **kw: object) -> Deliverer:
    policy = RetryPolicy(
        base=timedelta(seconds=1), cap=timedelta(seconds=8), give_up_after=timedelta(hours=1)
    )
    return Deliverer(engine, dests, policy, clock=clock, **kw)  # type: ignore[arg-type]


def add_tasks(engine: Engine, *names: str) -> None:
    with write_transaction(engine) as conn:
        control.insert_tasks(
            conn,
            [
                {"name": n, "task_class": "cron_tasks:Noop", "interval_s": 60.0, "kwargs": {}}
                for n in names
            ],
        )


def record(engine: Engine, name: str, outcome: TaskOutcome, at: datetime, error: str = "") -> None:
    """One run of ``name`` at ``at``: claimed, then finished, as the scheduler records it."""
    with write_transaction(engine) as conn:
        ids = history.claim_slots(conn, [history.Claim(name, at)], node=NODE)
    history.write_finishes(
        engine,
        [
            history.Finish(
                task=name,
                run_id=ids[(name, at)],
                scheduled_at=at,
                outcome=outcome,
                started_at=at,
                finished_at=at + timedelta(seconds=1),
                error=error or None,
                node=NODE,
            )
        ],
    )


def change(engine: Engine, component: str, before: str, after: str, at: datetime) -> None:
    write_batch(engine, Batch(node=NODE, changes=[ChangeRow(component, at, before, after, "x")]))


def kinds(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(AlertRecord.kind).order_by(AlertRecord.id)).scalars())


async def test_five_failures_after_three_give_one_failing_then_one_recovered(
    engine: Engine, sink: Sink, clock: Clock
) -> None:
    """after=3: five failed runs raise exactly one task.failing; the next success one recovered."""
    dests = [destination(sink)]
    r = rules(engine, dests, after=3)
    d = deliverer(engine, dests, clock)
    add_tasks(engine, "billing")
    r.evaluate(clock())  # the first evaluation starts the health cursor
    for i in range(5):
        record(engine, "billing", TaskOutcome.ERROR, clock.advance(60), error=f"boom {i}")
        r.evaluate(clock())
        await d.deliver_due()
    assert sink.kinds() == ["task.failing"]
    failing = sink.accepted_raw()[0].body
    assert failing["subject"] == "task:billing"
    assert "boom 4" not in failing["message"]
    assert "boom 2" in failing["message"]
    record(engine, "billing", TaskOutcome.SUCCESS, clock.advance(400))
    r.evaluate(clock())
    record(engine, "billing", TaskOutcome.SUCCESS, clock.advance(60))
    r.evaluate(clock())
    await d.deliver_due()
    assert sink.kinds() == ["task.failing", "task.recovered"]
    keys = [x.key for x in sink.accepted_raw()]
    assert len(set(keys)) == 2
    assert all(keys)
    d.close()


async def test_fewer_failures_than_after_raise_nothing(engine: Engine, clock: Clock) -> None:
    """after=3: two failures then a success is not news."""
    r = rules(engine, [], after=3)
    add_tasks(engine, "t")
    for outcome in (TaskOutcome.ERROR, TaskOutcome.TIMEOUT, TaskOutcome.SUCCESS):
        record(engine, "t", outcome, clock.advance(60))
        assert r.evaluate(clock()) == []
    assert kinds(engine) == []


async def test_component_healthy_error_healthy_gives_two_alerts(
    engine: Engine, sink: Sink, clock: Clock
) -> None:
    """A component that goes to error and back gives component.error then component.recovered."""
    dests = [destination(sink)]
    r = rules(engine, dests)
    d = deliverer(engine, dests, clock)
    r.evaluate(clock())
    change(engine, "llm", "healthy", "error", clock.advance(10))
    r.evaluate(clock())
    change(engine, "llm", "error", "healthy", clock.advance(400))
    r.evaluate(clock())
    await d.deliver_due()
    assert sink.kinds() == ["component.error", "component.recovered"]
    assert sink.accepted_raw()[0].body["subject"] == f"component:{NODE}/llm"
    assert "7 min after it was reported in error" in sink.accepted_raw()[1].body["message"]
    assert r.evaluate(clock.advance(400)) == []
    d.close()


@pytest.mark.parametrize(
    ("flips", "last_kind", "text"),
    [
        (11, AlertKind.COMPONENT_FLAPPING, "10 times during the last cooldown; it is error now"),
        (
            10,
            AlertKind.COMPONENT_RECOVERED,
            "after it was reported in error. It changed state 9 times",
        ),
    ],
)
async def test_flapping_component_one_alert_per_cooldown_with_count(
    engine: Engine, clock: Clock, flips: int, last_kind: AlertKind, text: str
) -> None:
    """Flips inside one cooldown: the first is alerted, the rest become one alert when the
    cooldown ends, with their count and the state the component is in by then."""
    r = rules(engine, [], cooldown=timedelta(minutes=5))
    r.evaluate(clock())
    status = "healthy"
    for _ in range(flips):
        new = "error" if status == "healthy" else "healthy"
        change(engine, "llm", status, new, clock.advance(5))
        status = new
        r.evaluate(clock())
    assert kinds(engine) == ["component.error"]
    r.evaluate(clock.advance(240))
    assert kinds(engine) == ["component.error"]
    r.evaluate(clock.advance(60))
    alerts = [v.alert for v in recent(engine, limit=10)]
    assert [a.kind for a in alerts] == [last_kind, AlertKind.COMPONENT_ERROR]
    assert alerts[0].count == flips - 1
    assert text in alerts[0].body
    assert r.evaluate(clock.advance(300)) == []


async def test_two_hundred_tasks_failing_together_give_one_grouped_alert(
    engine: Engine, sink: Sink, clock: Clock
) -> None:
    """200 tasks failing within the group window: one alert naming them; recovery grouped too."""
    dests = [destination(sink)]
    r = rules(engine, dests, group_window=timedelta(seconds=10))
    d = deliverer(engine, dests, clock)
    names = [f"task-{i:03d}" for i in range(200)]
    add_tasks(engine, *names)
    for name in names[:50]:
        record(engine, name, TaskOutcome.ERROR, clock(), error="database is down")
    assert r.evaluate(clock()) == []  # held: more may come within the window
    for name in names[50:]:
        record(engine, name, TaskOutcome.ERROR, clock(), error="database is down")
    assert r.evaluate(clock.advance(5)) == []
    [grouped] = r.evaluate(clock.advance(6))
    assert grouped.kind is AlertKind.TASK_FAILING
    assert grouped.count == 200
    assert len(grouped.members) == 200
    assert "and 180 more" in grouped.body
    assert "database is down" in grouped.body
    for name in names:
        record(engine, name, TaskOutcome.SUCCESS, clock.advance(0.01) + timedelta(hours=1))
    r.evaluate(clock.advance(400))
    [recovered] = r.evaluate(clock.advance(11))
    assert recovered.kind is AlertKind.TASK_RECOVERED
    assert recovered.count == 200
    await d.deliver_due()
    assert sink.kinds() == ["task.failing", "task.recovered"]
    d.close()


async def test_sink_answering_500_gets_the_alert_later_with_attempts_recorded(
    engine: Engine, sink: Sink, clock: Clock
) -> None:
    """A destination failing for a while: retried with backoff, delivered once it answers, and
    'alerts list' shows the attempts and the last error; every attempt carries the same key."""
    dests = [destination(sink)]
    r = rules(engine, dests)
    d = deliverer(engine, dests, clock)
    add_tasks(engine, "t")
    record(engine, "t", TaskOutcome.ERROR, clock(), error="boom")
    r.evaluate(clock())
    sink.failing = True
    waits = []
    for _ in range(6):
        await d.deliver_due()
        [view] = recent(engine, limit=1)
        nxt = view.deliveries[0].next_attempt_at
        assert nxt is not None
        waits.append((nxt - clock()).total_seconds())
        assert await d.deliver_due() == 0  # not due yet: no attempt before the backoff
        clock.now = nxt
    assert waits == [1, 2, 4, 8, 8, 8]  # doubling, capped at retry_max
    sink.failing = False
    assert await d.deliver_due() == 1
    assert len(sink.received) == 7
    assert len({x.key for x in sink.received}) == 1
    assert len(sink.accepted()) == 1
    result = CliRunner().invoke(cli, ["alerts", "list", "--json"])
    assert result.exit_code == 0, result.output
    [listed] = json.loads(result.stdout)
    [delivery] = listed["deliveries"]
    assert delivery["state"] == "sent"
    assert delivery["attempts"] == 7
    assert delivery["last_error"] is None
    text = CliRunner().invoke(cli, ["alerts", "list"]).stdout
    assert "task.failing" in text
    assert "hook sent x7" in text
    d.close()


async def test_failing_destination_does_not_block_the_others(engine: Engine, clock: Clock) -> None:
    """One destination answering 500 for an hour: the other gets every alert at once, and the
    failing one is tried once per backoff, not once per alert."""
    good, bad = Sink(), Sink()
    try:
        bad.failing = True
        dests = [destination(good, "good"), destination(bad, "bad")]
        r = rules(engine, dests)
        d = deliverer(engine, dests, clock)
        add_tasks(engine, *(f"t{i}" for i in range(5)))
        r.evaluate(clock())
        for i in range(5):
            record(engine, f"t{i}", TaskOutcome.ERROR, clock.advance(1))
            r.evaluate(clock())
        await d.deliver_due()
        assert len(good.accepted()) == 5
        assert len(bad.received) == 1
        for _ in range(3600):
            clock.advance(1)
            if clock.now.second == 0:
                await d.deliver_due()
        # One attempt per backoff (capped at 8 s, tried at most once per pass of 60 s here).
        assert len(bad.received) <= 61
        views = recent(engine, limit=10)
        states = {
            (v.alert.subject, x.destination): x.state.value for v in views for x in v.deliveries
        }
        assert list(states.values()).count("sent") == 5
        d.close()
    finally:
        good.close()
        bad.close()


async def test_filters_route_by_kind_severity_and_subject(engine: Engine, clock: Clock) -> None:
    """Each destination gets the alerts its filter takes; the others are not even queued."""
    a, b = Sink(), Sink()
    try:
        dests = [
            destination(a, "tasks", kinds=("task.*",), subjects=("task:billing*",)),
            destination(b, "errors", min_severity=Severity.ERROR),
        ]
        r = rules(engine, dests)
        d = deliverer(engine, dests, clock)
        add_tasks(engine, "billing", "other")
        r.evaluate(clock())
        record(engine, "other", TaskOutcome.ERROR, clock.advance(1))
        r.evaluate(clock())
        record(engine, "billing", TaskOutcome.ERROR, clock.advance(1))
        r.evaluate(clock())
        record(engine, "billing", TaskOutcome.SUCCESS, clock.advance(400))
        r.evaluate(clock())
        await d.deliver_due()
        assert [x.body["subject"] for x in a.accepted_raw()] == ["task:billing", "task:billing"]
        assert sorted(b.kinds()) == ["task.failing", "task.failing"]
        d.close()
    finally:
        a.close()
        b.close()


async def test_key_is_written_once_whatever_the_retries(engine: Engine, clock: Clock) -> None:
    """An evaluation redone after a crash derives the same key: the outbox keeps one alert."""
    r1 = rules(engine, [])
    add_tasks(engine, "t")
    record(engine, "t", TaskOutcome.ERROR, clock())
    [first] = r1.evaluate(clock())
    # A second process that has not seen the first one's state would decide the same alert.
    with write_transaction(engine) as conn:
        assert write_alerts(conn, [first], []) == []
    assert kinds(engine) == ["task.failing"]


async def test_broken_task_and_back(engine: Engine, clock: Clock) -> None:
    """A task whose class cannot be imported: task.broken with the reason, then task.mended."""
    r = rules(engine, [])
    add_tasks(engine, "t")
    history.set_broken(engine, {"t": "ModuleNotFoundError: No module named 'gone'"})
    [alert] = r.evaluate(clock())
    assert alert.kind is AlertKind.TASK_BROKEN
    assert "gone" in alert.body
    history.set_broken(engine, {"t": None})
    [alert] = r.evaluate(clock.advance(400))
    assert alert.kind is AlertKind.TASK_MENDED


async def test_system_status_change_is_alerted(engine: Engine, clock: Clock) -> None:
    """The node's status going degraded is one system.status alert of severity warning."""
    r = rules(engine, [], dashboard_url="http://dash.example")
    r.evaluate(clock())
    change(engine, SYSTEM_COMPONENT, "healthy", "degraded", clock.advance(1))
    [alert] = r.evaluate(clock())
    assert alert.kind is AlertKind.SYSTEM_STATUS
    assert alert.severity is Severity.WARNING
    assert alert.subject == f"system:{NODE}"
    assert alert.link == "http://dash.example/"


def test_leader_failover_is_alerted_and_clean_hand_over_is_not(
    engine: Engine, clock: Clock
) -> None:
    """A new holder after the last one stopped renewing: leader.failover; after a clean stop
    (the leader marked its lease released) the next leader's take-over is not news."""
    a = SchedulerLease(engine, "a:1", 0.5)
    assert a.try_acquire()
    rules_a = Rules(engine, [], RuleSettings(), holder="a:1")
    assert rules_a.evaluate(clock()) == []
    # a crashes: it never renews nor releases, and its lease expires.
    b = SchedulerLease(engine, "b:2", 30)
    deadline = time.monotonic() + 5
    while not b.try_acquire():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rules_b = Rules(engine, [], RuleSettings(), holder="b:2")
    [alert] = rules_b.evaluate(clock.advance(1))
    assert alert.kind is AlertKind.LEADER_FAILOVER
    assert "a:1" in alert.body
    rules_b.mark_released()
    assert b.release()
    c = SchedulerLease(engine, "c:3", 30)
    assert c.try_acquire()
    assert Rules(engine, [], RuleSettings(), holder="c:3").evaluate(clock.advance(1)) == []


async def test_no_leader_for_longer_than_the_bound(engine: Engine, clock: Clock) -> None:
    """A standby sees nobody holding the lease past the bound: one leader.none per epoch."""
    lease = SchedulerLease(engine, "a:1", 10)
    assert lease.try_acquire()
    assert lease.release()
    r = Rules(engine, [], RuleSettings(leaderless_after=timedelta(seconds=20)), holder="s:2")
    assert r.no_leader(utcnow()) is None
    alert = r.no_leader(utcnow() + timedelta(seconds=21))
    assert alert is not None
    assert alert.kind is AlertKind.LEADER_NONE
    assert r.no_leader(utcnow() + timedelta(seconds=30)) is None
    assert kinds(engine) == ["leader.none"]


async def test_database_recreated_published_by_the_service_becomes_a_delivered_alert(
    engine: Engine, db_url: str, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's 'database.recreated' on the bus: the alerter writes it to the outbox and
    delivers it, and counts the delivery in nanobot_alerts_total."""
    monkeypatch.setenv("NANOBOT_ALERTS__DESTINATIONS", json.dumps([sink.url()]))
    bus = MessageBus()
    registry = CollectorRegistry()
    alerter = Alerter(
        load_config(), engine, holder="n:1", is_leader=lambda: True, registry=registry, bus=bus
    )
    await alerter.start()
    try:
        await bus.publish(
            DATABASE_RECREATED,
            {
                "database": "/data/nanobot.db",
                "node": "n",
                "reason": "empty_after_restart",
                "problem": "the database had 12 tasks, it has none",
            },
        )
        await alerter.run_once()
        [received] = sink.wait_for(1)
        assert received.body["kind"] == "database.created"
        assert "/data/nanobot.db" in received.body["message"]
        assert "12 tasks" in received.body["message"]
        text = generate_latest(registry).decode()
        assert 'nanobot_alerts_total{kind="database.created",result="sent"} 1.0' in text
        assert "nanobot_alerts_pending 0.0" in text
    finally:
        await alerter.stop()


async def test_database_replaced_is_sent_directly_by_a_standby_and_recorded_once(
    engine: Engine, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'database.replaced' reaches a node that no longer leads: it sends the alert itself, writes
    it to the outbox as sent, and a leader later does not send it again."""
    monkeypatch.setenv("NANOBOT_ALERTS__DESTINATIONS", json.dumps([sink.url()]))
    bus = MessageBus()
    leading = False
    alerter = Alerter(load_config(), engine, holder="n:1", is_leader=lambda: leading, bus=bus)
    await alerter.start()
    try:
        await bus.publish(
            DATABASE_REPLACED,
            {"database": "/data/nanobot.db", "node": "n", "reason": "deleted", "problem": "gone"},
        )
        await alerter.run_once()
        [received] = sink.accepted_raw()
        assert received.body["kind"] == "database.unusable"
        assert "was deleted while n ran on it" in received.body["message"]
        [view] = recent(engine, limit=5)
        assert view.alert.key == received.key
        assert [(d.state.value, d.attempts) for d in view.deliveries] == [("sent", 1)]
        leading = True
        await alerter.run_once()
        assert len(sink.received) == 1
    finally:
        await alerter.stop()


async def test_outbox_gauges_show_pending_and_oldest_age(engine: Engine, clock: Clock) -> None:
    """nanobot_alerts_pending and the oldest pending age come from the outbox at each scrape."""
    sink = Sink()
    try:
        dests = [destination(sink)]
        r = rules(engine, dests)
        add_tasks(engine, "t")
        record(engine, "t", TaskOutcome.ERROR, clock())
        r.evaluate(clock())
        registry = CollectorRegistry()
        AlertMetrics(registry, engine, lambda: clock.now + timedelta(seconds=90))
        text = generate_latest(registry).decode()
        assert "nanobot_alerts_pending 1.0" in text
        assert "nanobot_alerts_oldest_pending_age_seconds 90.0" in text
    finally:
        sink.close()


async def test_retention_keeps_pending_alerts(engine: Engine, clock: Clock) -> None:
    """Old delivered alerts are pruned; an old alert still pending somewhere is kept."""
    sink = Sink()
    try:
        dests = [destination(sink)]
        r = rules(engine, dests)
        add_tasks(engine, "a", "b")
        record(engine, "a", TaskOutcome.ERROR, clock())
        r.evaluate(clock())
        d = deliverer(engine, dests, clock)
        await d.deliver_due()
        d.close()
        record(engine, "b", TaskOutcome.ERROR, clock.advance(1))
        r.evaluate(clock())
        assert prune(engine, now=clock() + timedelta(days=31), retention_days=30) == 1
        assert [v.alert.subject for v in recent(engine, limit=5)] == ["task:b"]
    finally:
        sink.close()


def test_bad_destination_url_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """'nanobot run' with a destination Apprise cannot use: one line, exit 2, nothing started."""
    monkeypatch.setenv("NANOBOT_ALERTS__DESTINATIONS", '["slack://not-a-token"]')
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "alerts.destinations[0]" in lines[0]
    assert "slack://" in lines[0]
    assert "not-a-token" not in lines[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('[{"url": "json://h/x", "kinds": ["nope.*"]}]', "matches no alert kind"),
        ('[{"url": "json://h/x", "min_severity": "loud"}]', "min_severity must be one of"),
        ('[{"url": "json://h/x", "colour": "red"}]', "unknown key 'colour'"),
        (
            '["json://h/x", {"url": "json://h/y", "name": "json-a"}, {"url": "json://h/z", '
            '"name": "json-a"}]',
            "two destinations are named",
        ),
        ("[42]", "expected a URL or an object"),
    ],
)
def test_bad_destination_specs_are_refused(
    monkeypatch: pytest.MonkeyPatch, spec: str, message: str
) -> None:
    """Every malformed destination is refused with a message naming what is wrong."""
    monkeypatch.setenv("NANOBOT_ALERTS__DESTINATIONS", spec)
    with pytest.raises(ConfigError, match=message):
        parse_destinations(load_config())


def test_alerts_test_command_exit_code_says_whether_it_arrived(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'alerts test' exits 0 when the message arrived, 1 when refused, 2 for an unknown name."""
    monkeypatch.setenv(
        "NANOBOT_ALERTS__DESTINATIONS", json.dumps([{"name": "ops", "url": sink.url()}])
    )
    ok = CliRunner().invoke(cli, ["alerts", "test"])
    assert ok.exit_code == 0
    assert "ops: sent" in ok.stdout
    assert sink.accepted_raw()[0].body["kind"] == "test"
    sink.failing = True
    failed = CliRunner().invoke(cli, ["alerts", "test", "ops"])
    assert failed.exit_code == 1
    assert "ops: FAILED" in failed.stdout
    assert "500" in failed.stdout
    unknown = CliRunner().invoke(cli, ["alerts", "test", "nope"])
    assert unknown.exit_code == 2
    assert "unknown destination 'nope'" in unknown.stderr


def test_alert_record_refuses_bad_values() -> None:
    """A naive timestamp or an empty key is refused when the alert is built."""
    with pytest.raises(ValueError, match="naive"):
        Alert(
            key="k",
            kind=AlertKind.TEST,
            subject="s",
            severity=Severity.INFO,
            title="t",
            body="b",
            created_at=datetime(2026, 1, 1),
        )
    assert alert_key("x" * 500).startswith("nanobot:x")
    assert len(alert_key("x" * 500)) <= 400


def test_revision_0006_upgrades_a_database_with_rows_in_place(db_url: str) -> None:
    """A database at the revision before 0006, with tasks and runs, upgrades keeping every row
    and gains the empty outbox tables; downgrading removes only them."""
    previous = ScriptDirectory.from_config(alembic_config()).get_revision("0006").down_revision
    assert isinstance(previous, str)
    engine = create_db_engine(db_url)
    try:
        upgrade_database(engine, previous)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tasks (name, task_class, interval_s, kwargs, misfire_policy, "
                    "paused, consecutive_failures, version, created_at, updated_at) VALUES "
                    "('t', 'x:Y', 60, '{}', 'catch_up_once', false, 2, 1, :now, :now)"
                ),
                {"now": T0},
            )
        upgrade_database(engine, "0006")
        assert {"alerts", "alert_deliveries", "alert_subjects"} <= set(
            inspect(engine).get_table_names()
        )
        with engine.connect() as conn:
            # The schema of 0006 (the run state was in tasks then), not today's models.
            row = conn.execute(text("SELECT name, consecutive_failures FROM tasks")).one()
            assert tuple(row) == ("t", 2)
            assert conn.execute(select(func.count()).select_from(AlertRecord)).scalar() == 0
        downgrade_database(engine, previous)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Task)).scalar() == 1
        assert "alerts" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


async def test_task_components_are_left_to_the_task_rules(engine: Engine, clock: Clock) -> None:
    """A task's own component (task:<name>) and a system error caused only by tasks raise
    nothing; a system error naming another component does."""
    r = rules(engine, [])
    r.evaluate(clock())
    at = clock.advance(1)
    write_batch(
        engine,
        Batch(
            node=NODE,
            changes=[
                ChangeRow("task:fetch", at, "healthy", "error", "boom"),
                ChangeRow(SYSTEM_COMPONENT, at, "healthy", "error", "error: task:fetch"),
            ],
        ),
    )
    assert r.evaluate(clock()) == []
    write_batch(
        engine,
        Batch(
            node=NODE,
            changes=[ChangeRow(SYSTEM_COMPONENT, clock.advance(1), "error", "error", "error: llm")],
        ),
    )
    [alert] = r.evaluate(clock())
    assert alert.kind is AlertKind.SYSTEM_STATUS
    assert "llm" in alert.body


async def test_backlog_of_a_failing_destination_does_not_hide_the_others(
    engine: Engine, clock: Clock
) -> None:
    """A failing destination with a backlog larger than a pass: another destination's alert is
    still sent in the first pass."""
    good, bad = Sink(), Sink()
    try:
        bad.failing = True
        dests = [
            destination(bad, "bad", kinds=("task.*",)),
            destination(good, "good", kinds=("component.*",)),
        ]
        r = rules(engine, dests)
        d = deliverer(engine, dests, clock, batch=2)
        add_tasks(engine, *(f"t{i}" for i in range(6)))
        r.evaluate(clock())
        for i in range(6):
            record(engine, f"t{i}", TaskOutcome.ERROR, clock.advance(1))
            r.evaluate(clock())
        change(engine, "llm", "healthy", "error", clock.advance(1))
        r.evaluate(clock())
        assert await d.deliver_due() == 1
        assert good.kinds() == ["component.error"]
        assert len(bad.received) == 1
        d.close()
    finally:
        good.close()
        bad.close()


async def test_database_unusable_is_sent_directly_then_recorded_once_the_outbox_works(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'database.unusable' while the database cannot be opened: sent directly to the sink;
    when the database works again the alert is written to the outbox as already sent, and the
    sink is not sent it a second time."""
    blocker = tmp_path / "data"
    url = f"sqlite:///{blocker / 'nanobot.db'}"
    monkeypatch.setenv("NANOBOT_DATABASE__URL", url)
    monkeypatch.setenv(
        "NANOBOT_ALERTS__DESTINATIONS", json.dumps([{"name": "s", "url": sink.url()}])
    )
    engine = create_db_engine(url)
    blocker.rmdir()
    blocker.write_text("a file where the database folder should be")
    bus = MessageBus()
    alerter = Alerter(load_config(), engine, holder="n:1", is_leader=lambda: True, bus=bus)
    await alerter.start()
    try:
        await bus.publish("database.unusable", {"error": "unable to open database file"})
        with pytest.raises(Exception, match="unable to open database file"):
            await alerter.run_once()
        [received] = sink.accepted_raw()
        assert received.body["kind"] == "database.unusable"
        with pytest.raises(Exception, match="unable to open database file"):
            await alerter.run_once()
        assert len(sink.received) == 1  # sent once, not at every failed step
        blocker.unlink()
        blocker.mkdir()
        upgrade_database(engine)
        await alerter.run_once()
        [view] = recent(engine, limit=5)
        assert view.alert.key == received.key
        assert [(d.destination, d.state.value, d.attempts) for d in view.deliveries] == [
            ("s", "sent", 1)
        ]
        await alerter.run_once()
        assert len(sink.received) == 1
    finally:
        await alerter.stop()
        engine.dispose()


async def test_a_standby_delivers_only_the_no_leader_alert(
    engine: Engine, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a standby the alerter neither evaluates nor sends the leader's alerts; with nobody
    leading past the bound it raises leader.none and sends that one itself."""
    monkeypatch.setenv("NANOBOT_ALERTS__DESTINATIONS", json.dumps([sink.url()]))
    monkeypatch.setenv("NANOBOT_SERVICE__LEASE_TTL", "0.2")
    config = load_config()
    pending = Rules(engine, parse_destinations(config), RuleSettings(group_window=timedelta(0)))
    add_tasks(engine, "t")
    record(engine, "t", TaskOutcome.ERROR, datetime.now().astimezone())
    [failing] = pending.evaluate(datetime.now().astimezone())
    lease = SchedulerLease(engine, "gone:1", 0.2)
    assert lease.try_acquire()
    # The leader dies without releasing: nothing renews the lease.

    with engine.connect() as conn:
        info = read_lease(conn)
    assert info is not None
    assert info.expires_at is not None
    clock = Clock(info.expires_at - timedelta(seconds=0.1))
    alerter = Alerter(
        config, engine, holder="s:2", is_leader=lambda: False, bus=MessageBus(), clock=clock
    )
    try:
        await alerter.run_once()
        assert sink.received == []  # the lease only just expired: not yet past the bound
        clock.advance(1)
        await alerter.run_once()
        assert sink.kinds() == ["leader.none"]
        assert failing.key not in {r.key for r in sink.received}
    finally:
        await alerter.stop()


def test_alerts_list_without_a_database_exits_3() -> None:
    """'alerts list' before any database exists: one line, exit code 3, no database created."""
    result = CliRunner().invoke(cli, ["alerts", "list"])
    assert result.exit_code == 3
    assert "no database" in result.stderr
