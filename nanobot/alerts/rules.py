"""The rules: which state transitions become alerts, with cooldown and grouping.

Alerts are derived from what the database records, never from every run: the tasks' mirror
(``task_state.consecutive_failures``, ``tasks.broken_reason``), the heartbeat monitor's persisted
status changes (``component_status_changes``, the system status included) and the scheduling
lease. :meth:`Rules.evaluate` reads them, compares them with what people were last told about
each subject (``alert_subjects``), and writes the resulting alerts to the outbox together with
the subjects' new state, in one transaction. Why that is safe across a crash: the facts are
durable before the rules read them, and the rules' state moves only in the transaction that
writes the alerts; a process killed before that commit leaves both unchanged, so the next
evaluation (on this leader after a restart, or on the next one) derives the same transition
with the same idempotency key. Nothing is lost between the state change and the outbox, and
nothing is written twice.

Per subject (a task, a component of a node, the system status of a node, the lead):

* a change is alerted at once unless the subject had an alert less than ``alerts.cooldown`` ago;
  then it is counted (``flips``) and, when the cooldown is over, one alert tells the current
  state and how many changes there were: a flapping component sends at most one alert per
  cooldown;
* task alerts are held ``alerts.group_window`` seconds after the first one appears; tasks of
  one kind changing together in that window (the database was down and 200 tasks failed) give
  one grouped alert naming them, not one per task.

Each task is also a component (``task:<name>``) that goes to error at its first failed run:
those components, and a system status in error only because of them, are left to the task
rules, so that ``alerts.after`` holds and one failing task is one alert, not three.

A task's state, by precedence: ``broken``, ``auto_paused`` (nanobot paused it after its failed
slots: ``tasks.auto_paused_at``), ``overdue`` (:func:`nanobot.cron.overdue.read_overdue` finds
it, from the database alone), ``failing``, ``ok``. Each change is a transition of the task's one
subject, so the cooldown, grouping and idempotency keys are the same for every kind: into
``auto_paused`` is ``task.auto_paused``, out of it (``cron resume``) ``task.resumed``; into
``overdue`` is ``task.overdue``, out of it (claimed at last) ``task.on_time``.

Thread ownership: a :class:`Rules` is used by one thread at a time (the alerter runs one
evaluation at a time, in a worker thread); :meth:`Rules.raise_alert` may be called from any
thread (a bounded, thread-safe deque).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Connection, Engine

from nanobot.alerts import messages, store
from nanobot.alerts.alert import Alert, AlertKind, Severity, alert_key
from nanobot.alerts.destinations import Destination
from nanobot.alerts.messages import Change
from nanobot.alerts.store import SubjectState
from nanobot.cron.control import alerting_summaries, existing_names
from nanobot.cron.history import last_failed_run
from nanobot.cron.overdue import Grace, read_overdue
from nanobot.db import read_transaction, write_transaction
from nanobot.heartbeat.store import SYSTEM_COMPONENT, TASK_COMPONENT_PREFIX, changes_since
from nanobot.lease import read_lease
from nanobot.models import utcnow

log = structlog.get_logger(__name__)

OK: Final = "ok"
FAILING: Final = "failing"
BROKEN: Final = "broken"
AUTO_PAUSED: Final = "auto_paused"
OVERDUE: Final = "overdue"
HEALTHY: Final = "healthy"
HELD: Final = "held"
RELEASED: Final = "released"
LEADER_KEY: Final = "leader"
# The newest status change the rules have read, across nodes.
HEALTH_CURSOR: Final = "_cursor:health"
# Status changes are re-read this far behind the cursor: nodes' clocks and commits are not in
# step; each subject's own cursor skips what was read already.
CHANGE_MARGIN: Final = timedelta(minutes=5)
_PENDING_MAX: Final = 100

# (state told before, state now) -> kind; a task's states are ok, failing and broken.
_TASK_KINDS: Final = {
    FAILING: AlertKind.TASK_FAILING,
    BROKEN: AlertKind.TASK_BROKEN,
    AUTO_PAUSED: AlertKind.TASK_AUTO_PAUSED,
    OVERDUE: AlertKind.TASK_OVERDUE,
}
# What leaving a state is called, when the state left says more than the state reached: a task
# resumed after an auto-pause is "resumed" even while its failures still count.
_LEFT_KINDS: Final = {
    AUTO_PAUSED: AlertKind.TASK_RESUMED,
    BROKEN: AlertKind.TASK_MENDED,
    OVERDUE: AlertKind.TASK_ON_TIME,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSettings:
    after: int = 1
    cooldown: timedelta = timedelta(minutes=5)
    group_window: timedelta = timedelta(seconds=10)
    dashboard_url: str | None = None
    # No leader for longer than this is alerted (by a standby).
    leaderless_after: timedelta = timedelta(seconds=20)
    # When a task is overdue (cron.overdue_grace_share, cron.overdue_grace_min,
    # cron.overrun_intervals), as status and /readyz say it.
    grace: Grace = dataclasses.field(default_factory=Grace)
    overrun_intervals: float = 3.0


def step(
    state: SubjectState, observed: str, *, now: datetime, cooldown: timedelta
) -> tuple[SubjectState, Change | None]:
    """Apply one observation to a subject: a change to alert now, or one counted for later."""
    if observed == state.observed:
        return state, None
    if state.last_alert_at is not None and now - state.last_alert_at < cooldown:
        return dataclasses.replace(state, observed=observed, flips=state.flips + 1), None
    if observed == state.alerted:
        # Back to what people were told, outside a cooldown (a change that was held): nothing.
        return dataclasses.replace(state, observed=observed, flips=0), None
    new = dataclasses.replace(
        state, alerted=observed, observed=observed, flips=0, seq=state.seq + 1, last_alert_at=now
    )
    return new, Change(state.key, state.alerted, observed, new.seq, 1, None, state.last_alert_at)


def settle(
    state: SubjectState, *, now: datetime, cooldown: timedelta
) -> tuple[SubjectState, Change | None]:
    """At the end of a cooldown, one alert for the changes it held back (if any)."""
    if state.flips == 0:
        return state, None
    if state.last_alert_at is not None and now - state.last_alert_at < cooldown:
        return state, None
    new = dataclasses.replace(
        state, alerted=state.observed, flips=0, seq=state.seq + 1, last_alert_at=now
    )
    return new, Change(
        state.key, state.alerted, state.observed, new.seq, state.flips, None, state.last_alert_at
    )


class Rules:
    """Evaluates the rules against one database and writes the alerts they give."""

    def __init__(
        self,
        engine: Engine,
        destinations: Sequence[Destination],
        settings: RuleSettings,
        *,
        holder: str | None = None,
    ) -> None:
        self.engine = engine
        self.destinations = tuple(destinations)
        self.settings = settings
        self.holder = holder
        self._held_since: datetime | None = None
        self._raised: deque[Alert] = deque(maxlen=_PENDING_MAX)

    # --- alerts from outside (bus events) ---------------------------------------------------

    def raised(self) -> list[Alert]:
        """The alerts raised and not yet written (a snapshot; any thread)."""
        return list(self._raised)

    def raise_alert(self, alert: Alert) -> None:
        """Queue an alert decided elsewhere (a database event); written by the next evaluation."""
        self._raised.append(alert)

    @property
    def held_until(self) -> datetime | None:
        """When task alerts held for grouping are due, if some are."""
        if self._held_since is None:
            return None
        return self._held_since + self.settings.group_window

    # --- evaluation -------------------------------------------------------------------------

    def evaluate(
        self, now: datetime, *, sent: Mapping[str, frozenset[str]] | None = None
    ) -> list[Alert]:
        """One evaluation in one transaction (blocking; call it from a thread): the new alerts.

        ``sent`` maps keys of raised alerts to the destinations that were sent them directly
        while the outbox could not be written: their deliveries are recorded sent.
        """
        raised: list[Alert] = []
        while self._raised:
            raised.append(self._raised.popleft())
        try:
            alerts = self._evaluate(raised, now, sent or {})
        except BaseException:
            # Not written: they go back, before anything raised meanwhile.
            self._raised.extendleft(reversed(raised))
            raise
        for alert in alerts:
            log.info(
                "alert.raised",
                kind=alert.kind.value,
                subject=alert.subject,
                severity=alert.severity.value,
                count=alert.count,
                key=alert.key,
            )
        return alerts

    def write_raised(
        self, now: datetime, *, sent: Mapping[str, frozenset[str]] | None = None
    ) -> list[Alert]:
        """Write only the raised alerts (on a standby, which evaluates no rule)."""
        raised: list[Alert] = []
        while self._raised:
            raised.append(self._raised.popleft())
        try:
            with write_transaction(self.engine) as conn:
                store.write_alerts(conn, raised, self.destinations, sent=sent)
        except BaseException:
            self._raised.extendleft(reversed(raised))
            raise
        return raised

    def _evaluate(
        self, raised: list[Alert], now: datetime, sent: Mapping[str, frozenset[str]]
    ) -> list[Alert]:
        with write_transaction(self.engine) as conn:
            alerts: list[Alert] = list(raised)
            changed: list[SubjectState] = []
            for part in (self._tasks, self._health, self._leadership):
                part_alerts, part_states = part(conn, now)
                alerts.extend(part_alerts)
                changed.extend(part_states)
            store.write_alerts(conn, alerts, self.destinations, sent=sent)
            store.save_subjects(conn, changed, now=now)
        return alerts

    def no_leader(self, now: datetime) -> Alert | None:
        """On a standby: an alert if nobody has held the lease for ``leaderless_after``."""
        # Read first: a standby asks every few seconds, and must not take SQLite's write lock
        # for a question whose answer is almost always "a leader is there".
        with read_transaction(self.engine) as conn:
            lease = read_lease(conn)
        if lease is None or lease.is_held(now):
            return None
        since = lease.expires_at or lease.renewed_at
        if since is not None and now - since < self.settings.leaderless_after:
            return None
        with write_transaction(self.engine) as conn:
            waited = "" if since is None else f" since {since:%Y-%m-%d %H:%M:%S} UTC"
            alert = Alert(
                key=alert_key(AlertKind.LEADER_NONE, lease.epoch),
                kind=AlertKind.LEADER_NONE,
                subject="leader",
                severity=Severity.CRITICAL,
                title="nanobot: no node is leading, no task is being scheduled",
                body=(
                    f"Nobody has held the scheduling lease{waited} (last holder: "
                    f"{lease.holder or 'released'}, epoch {lease.epoch}). Standby nodes are up "
                    "but none could take the lead: check the database and the nodes' logs."
                ),
                link=messages.link(self.settings.dashboard_url, "/"),
                created_at=now,
            )
            written = store.write_alerts(conn, [alert], self.destinations)
        return alert if written else None

    def mark_released(self) -> None:
        """This leader stops cleanly: the next leader's take-over is a hand-over, not alerted."""
        if self.holder is None:
            return
        with write_transaction(self.engine) as conn:
            state = store.load_subjects(conn, LEADER_KEY).get(LEADER_KEY)
            if state is not None and state.alerted == self.holder:
                store.save_subjects(
                    conn, [dataclasses.replace(state, observed=RELEASED)], now=utcnow()
                )

    # --- tasks ------------------------------------------------------------------------------

    def _observe_tasks(
        self, conn: Connection, now: datetime
    ) -> tuple[dict[str, str], dict[str, str | None]]:
        """What the database says of each task that is not OK: its observed state (broken >
        auto-paused > failing, and overdue where it is not worse) and the reason to show."""
        s = self.settings
        observed: dict[str, str] = {}
        reasons: dict[str, str | None] = {}
        for t in alerting_summaries(conn, failures=s.after):
            key = f"task:{t.name}"
            if t.error:
                observed[key], reasons[key] = BROKEN, t.error
            elif t.paused and t.auto_paused_at is not None:
                observed[key], reasons[key] = AUTO_PAUSED, t.pause_reason
            elif t.consecutive_failures >= s.after:
                observed[key] = FAILING
        for late in read_overdue(
            conn, now=now, grace=s.grace, overrun_intervals=s.overrun_intervals
        ):
            key = f"task:{late.task}"
            if observed.get(key, FAILING) == FAILING:
                observed[key] = OVERDUE
                reasons[key] = late.describe()
        return observed, reasons

    def _tasks(self, conn: Connection, now: datetime) -> tuple[list[Alert], list[SubjectState]]:
        s = self.settings
        observed, reasons = self._observe_tasks(conn, now)
        subjects = store.load_subjects(conn, "task:")
        keys = set(observed) | {
            k for k, st in subjects.items() if st.observed != OK or st.alerted != OK or st.flips
        }
        if not keys:
            self._held_since = None
            return [], []
        gone = {k for k in keys if k not in observed} - self._existing_tasks(conn, keys)
        changes: list[Change] = []
        states: list[SubjectState] = []
        for key in sorted(keys):
            state = subjects.get(key) or SubjectState(key=key, alerted=OK, observed=OK)
            if key in gone:
                # A removed task: its subject is closed without telling anyone it recovered.
                states.append(dataclasses.replace(state, alerted=OK, observed=OK, flips=0))
                continue
            new, change = step(state, observed.get(key, OK), now=now, cooldown=s.cooldown)
            if change is None:
                new, change = settle(new, now=now, cooldown=s.cooldown)
            if new != state:
                states.append(new)
            if change is not None:
                changes.append(change)
        if not changes:
            self._held_since = None
            return [], states
        if self._held_since is None:
            self._held_since = now
        if now - self._held_since < s.group_window:
            return [], []  # held for grouping: nothing is written, the next evaluation redoes it
        self._held_since = None
        return self._task_alerts(conn, changes, reasons, now), states

    @staticmethod
    def _existing_tasks(conn: Connection, keys: set[str]) -> set[str]:
        found = existing_names(conn, (k.removeprefix("task:") for k in keys))
        return {f"task:{n}" for n in found}

    def _last_error(self, conn: Connection, name: str) -> str | None:
        run = last_failed_run(conn, name)
        if run is None:
            return None
        slot = f"{run.scheduled_at:%Y-%m-%d %H:%M:%S}"
        return f"{run.outcome.value} (slot {slot} UTC): {run.error or '-'}"

    def _task_kind(self, change: Change) -> AlertKind:
        if change.before == AUTO_PAUSED and change.after in (OK, FAILING):
            return AlertKind.TASK_RESUMED
        if change.after in _TASK_KINDS:
            return _TASK_KINDS[change.after]
        return _LEFT_KINDS.get(change.before, AlertKind.TASK_RECOVERED)

    def _task_alerts(
        self,
        conn: Connection,
        changes: list[Change],
        reasons: dict[str, str | None],
        now: datetime,
    ) -> list[Alert]:
        by_kind: dict[AlertKind, list[Change]] = {}
        for change in changes:
            by_kind.setdefault(self._task_kind(change), []).append(change)
        alerts: list[Alert] = []
        for kind, group in by_kind.items():
            details = {
                c.key: (
                    reasons.get(c.key)
                    if kind in (AlertKind.TASK_BROKEN, AlertKind.TASK_AUTO_PAUSED)
                    or kind is AlertKind.TASK_OVERDUE
                    else self._last_error(conn, c.key.removeprefix("task:"))
                    if kind is AlertKind.TASK_FAILING
                    else None
                )
                for c in group[: messages.GROUP_SHOWN]
            }
            if len(group) == 1:
                alerts.append(
                    messages.task_alert(
                        kind,
                        group[0],
                        details[group[0].key],
                        now,
                        after=self.settings.after,
                        base=self.settings.dashboard_url,
                    )
                )
            else:
                alerts.append(
                    messages.grouped_task_alert(
                        kind, group, details, now, base=self.settings.dashboard_url
                    )
                )
        return alerts

    # --- components and the system status --------------------------------------------------

    def _health(self, conn: Connection, now: datetime) -> tuple[list[Alert], list[SubjectState]]:
        s = self.settings
        subjects = store.load_subjects(conn, "component:") | store.load_subjects(conn, "system:")
        cursor = store.load_subjects(conn, HEALTH_CURSOR).get(HEALTH_CURSOR)
        if cursor is None or cursor.cursor_at is None:
            # First evaluation on this database: history before it is not news.
            return [], [SubjectState(key=HEALTH_CURSOR, alerted=OK, observed=OK, cursor_at=now)]
        # Tasks' own components change at every failure: changes_since never reads them.
        rows = changes_since(conn, cursor.cursor_at - CHANGE_MARGIN)
        touched: dict[str, SubjectState] = {}
        changes: list[Change] = []
        reasons: dict[str, str | None] = {}
        newest = cursor.cursor_at
        for row in rows:
            newest = max(newest, row.at)
            to_status = row.to_status
            if row.component.startswith(TASK_COMPONENT_PREFIX):
                continue  # a task is a component too; the task rules (with `after`) tell it
            if row.component == SYSTEM_COMPONENT:
                key = f"system:{row.node}"
                if to_status == "error" and _only_tasks(row.reason):
                    # In error only because tasks failed: the task rules tell that, once.
                    to_status = HEALTHY
            else:
                key = f"component:{row.node}/{row.component}"
            state = touched.get(key) or subjects.get(key)
            if state is None:
                state = SubjectState(key=key, alerted=HEALTHY, observed=HEALTHY)
            if state.cursor_at is not None and row.at <= state.cursor_at:
                continue
            state = dataclasses.replace(state, cursor_at=row.at)
            if to_status != "unknown":
                state, change = step(state, to_status, now=now, cooldown=s.cooldown)
                if change is not None:
                    changes.append(dataclasses.replace(change, detail=row.reason))
                reasons[key] = row.reason
            touched[key] = state
        for key, state in subjects.items():
            current = touched.get(key, state)
            settled, change = settle(current, now=now, cooldown=s.cooldown)
            if change is not None:
                touched[key] = settled
                changes.append(dataclasses.replace(change, detail=reasons.get(key)))
        states = list(touched.values())
        if newest > cursor.cursor_at:
            states.append(dataclasses.replace(cursor, cursor_at=newest))
        alerts = [messages.health_alert(c, now, base=self.settings.dashboard_url) for c in changes]
        return alerts, states

    # --- leadership -------------------------------------------------------------------------

    def _leadership(
        self, conn: Connection, now: datetime
    ) -> tuple[list[Alert], list[SubjectState]]:
        lease = read_lease(conn)
        if lease is None or lease.holder is None:
            return [], []
        state = store.load_subjects(conn, LEADER_KEY).get(LEADER_KEY)
        if state is None:
            return [], [SubjectState(key=LEADER_KEY, alerted=lease.holder, observed=HELD)]
        if state.alerted == lease.holder:
            if state.observed != HELD:
                return [], [dataclasses.replace(state, observed=HELD)]
            return [], []
        new = dataclasses.replace(state, alerted=lease.holder, observed=HELD, seq=state.seq + 1)
        if state.observed == RELEASED:
            return [], [new]  # a clean hand-over (the last leader stopped): nothing to tell
        new = dataclasses.replace(new, last_alert_at=now)
        since = f"{lease.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if lease.acquired_at else "now"
        alert = Alert(
            key=alert_key(AlertKind.LEADER_FAILOVER, lease.epoch),
            kind=AlertKind.LEADER_FAILOVER,
            subject=f"node:{lease.holder.rsplit(':', 1)[0]}",
            severity=Severity.WARNING,
            title=f"nanobot: {lease.holder} took over the scheduler",
            body=(
                f"{state.alerted} stopped renewing the scheduling lease without releasing it "
                f"(a crash, a freeze or a lost database connection); {lease.holder} leads since "
                f"{since} (epoch {lease.epoch}). Runs in flight on the old leader were recorded "
                "interrupted."
            ),
            link=messages.link(self.settings.dashboard_url, "/"),
            created_at=now,
        )
        return [alert], [new]


def _only_tasks(reason: str | None) -> bool:
    """True if a system status reason (``"error: a, b"``) names task components only."""
    if not reason or ": " not in reason:
        return False
    names = reason.split(": ", 1)[1]
    if names.endswith(" more"):
        return False  # not every name is shown: another component may be among them
    return all(n.strip().startswith(TASK_COMPONENT_PREFIX) for n in names.split(","))


def settings_from(config: Any) -> RuleSettings:
    """The rules' settings from a :class:`nanobot.config.Config`."""
    ttl = float(config["service.lease_ttl"])
    return RuleSettings(
        after=int(config["alerts.after"]),
        cooldown=timedelta(seconds=float(config["alerts.cooldown"])),
        group_window=timedelta(seconds=float(config["alerts.group_window"])),
        dashboard_url=config["alerts.dashboard_url"],
        # The worst-case fail-over is about ttl + ttl/3; twice the ttl is past any normal one.
        leaderless_after=timedelta(seconds=2 * ttl),
        grace=Grace.from_config(config),
        overrun_intervals=float(config.get("cron.overrun_intervals", 3.0)),
    )
