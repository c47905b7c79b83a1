"""The wording of alerts: titles, bodies and links for each kind of change.

Pure functions of a :class:`Change` (what the rules decided) and the time: no database, no
clock of their own. Bodies say what happened, since when, and the last error; titles fit a
phone's notification.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final
from urllib.parse import quote

from nanobot.alerts.alert import Alert, AlertKind, Severity, alert_key

HEALTHY: Final = "healthy"
# A grouped alert names at most this many members (and how many more there are).
GROUP_SHOWN: Final = 20


@dataclass(frozen=True, slots=True)
class Change:
    """One alertable change of one subject, before it becomes an alert."""

    key: str
    before: str
    after: str
    seq: int
    flips: int
    detail: str | None
    # When people were last told about this subject (the alert this change follows), if ever.
    told_at: datetime | None = None


def _since(change: Change, now: datetime, what: str) -> str:
    """``", 25 min after it was reported failing"``, or nothing if it never was."""
    if change.told_at is None:
        return ""
    seconds = max(0.0, (now - change.told_at).total_seconds())
    span = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    if seconds >= 7200:
        span = f"{seconds / 3600:.1f} h"
    return f", {span} after {what}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def link(base: str | None, path: str) -> str | None:
    """The dashboard page ``path`` under ``alerts.dashboard_url``, if one is configured."""
    return None if base is None else base + path


def task_alert(
    kind: AlertKind,
    change: Change,
    detail: str | None,
    now: datetime,
    *,
    after: int,
    base: str | None,
) -> Alert:
    """The alert about one task's change."""
    name = change.key.removeprefix("task:")
    title, severity, text = {
        AlertKind.TASK_FAILING: (
            f"nanobot: task {name} is failing",
            Severity.ERROR,
            f"Task {name} failed {after} time{'s' if after > 1 else ''} in a row"
            + (f". Last error: {detail}" if detail else "."),
        ),
        AlertKind.TASK_BROKEN: (
            f"nanobot: task {name} is broken",
            Severity.ERROR,
            f"Task {name} cannot be loaded, so it does not run: {detail or '-'}",
        ),
        AlertKind.TASK_RECOVERED: (
            f"nanobot: task {name} recovered",
            Severity.INFO,
            f"Task {name} succeeded again{_since(change, now, 'it was reported failing')}.",
        ),
        AlertKind.TASK_MENDED: (
            f"nanobot: task {name} is loaded again",
            Severity.INFO,
            f"Task {name} can be loaded again and runs on its schedule.",
        ),
        AlertKind.TASK_AUTO_PAUSED: (
            f"nanobot: task {name} was paused after its failures",
            Severity.ERROR,
            f"Task {name} does not run until someone resumes it (nanobot cron resume {name}): "
            f"{detail or 'paused after consecutive failures'}",
        ),
        AlertKind.TASK_RESUMED: (
            f"nanobot: task {name} was resumed",
            Severity.INFO,
            f"Task {name} runs on its schedule again"
            f"{_since(change, now, 'it was paused for its failures')}.",
        ),
        AlertKind.TASK_OVERDUE: (
            f"nanobot: task {name} is overdue",
            Severity.ERROR,
            f"{_sentence(detail or f'task {name} is overdue')}. Check that a node leads "
            "and that its scheduler is not blocked (nanobot status).",
        ),
        AlertKind.TASK_ON_TIME: (
            f"nanobot: task {name} is on time again",
            Severity.INFO,
            f"Task {name} is no longer overdue{_since(change, now, 'it was reported overdue')}.",
        ),
    }[kind]
    if change.flips > 1:
        text += f" It changed state {change.flips} times in the last cooldown."
    return Alert(
        key=alert_key(change.key, change.seq),
        kind=kind,
        subject=change.key,
        severity=severity,
        title=title,
        body=text,
        link=link(base, f"/tasks/{quote(name, safe='')}"),
        count=change.flips,
        created_at=now,
    )


def grouped_task_alert(
    kind: AlertKind,
    group: list[Change],
    details: dict[str, str | None],
    now: datetime,
    *,
    base: str | None,
) -> Alert:
    """One alert for tasks that changed the same way together, naming the first of them."""
    n = len(group)
    title, severity = {
        AlertKind.TASK_FAILING: (f"nanobot: {n} tasks are failing", Severity.ERROR),
        AlertKind.TASK_BROKEN: (f"nanobot: {n} tasks are broken", Severity.ERROR),
        AlertKind.TASK_RECOVERED: (f"nanobot: {n} tasks recovered", Severity.INFO),
        AlertKind.TASK_MENDED: (f"nanobot: {n} tasks are loaded again", Severity.INFO),
        AlertKind.TASK_AUTO_PAUSED: (
            f"nanobot: {n} tasks were paused after their failures",
            Severity.ERROR,
        ),
        AlertKind.TASK_RESUMED: (f"nanobot: {n} tasks were resumed", Severity.INFO),
        AlertKind.TASK_OVERDUE: (f"nanobot: {n} tasks are overdue", Severity.ERROR),
        AlertKind.TASK_ON_TIME: (f"nanobot: {n} tasks are on time again", Severity.INFO),
    }[kind]
    lines = [f"{n} tasks changed together ({kind.value}):"]
    for c in group[:GROUP_SHOWN]:
        detail = details.get(c.key)
        lines.append(f"- {c.key.removeprefix('task:')}" + (f": {detail}" if detail else ""))
    if n > GROUP_SHOWN:
        lines.append(f"... and {n - GROUP_SHOWN} more")
    members = tuple(c.key for c in group)
    return Alert(
        # The members and their sequence numbers identify the group: the same group always
        # gets the same key.
        key=alert_key("group", kind, *(f"{c.key}#{c.seq}" for c in group)),
        kind=kind,
        subject=f"tasks:{n}",
        severity=severity,
        title=title,
        body="\n".join(lines),
        link=link(base, "/tasks"),
        count=n,
        members=members,
        created_at=now,
    )


def health_alert(change: Change, now: datetime, *, base: str | None) -> Alert:
    """The alert about a component's or a node's status change."""
    family, _, where = change.key.partition(":")
    detail = f" Reason: {change.detail}" if change.detail else ""
    flips = (
        f" It changed state {change.flips} times during the last cooldown."
        if change.flips > 1
        else ""
    )
    if family == "system":
        node = where
        severity = {
            "healthy": Severity.INFO,
            "degraded": Severity.WARNING,
        }.get(change.after, Severity.ERROR)
        return Alert(
            key=alert_key(change.key, change.seq),
            kind=AlertKind.SYSTEM_STATUS,
            subject=change.key,
            severity=severity,
            title=f"nanobot: {node} is {change.after}",
            body=f"The status of node {node} went from {change.before} to {change.after}."
            + detail
            + flips,
            link=link(base, "/"),
            count=change.flips,
            created_at=now,
        )
    node, _, component = where.partition("/")
    if change.before == change.after:
        kind, severity = AlertKind.COMPONENT_FLAPPING, Severity.WARNING
        title = f"nanobot: component {component} on {node} is flapping"
        text = (
            f"Component {component} on node {node} changed state {change.flips} times "
            f"during the last cooldown; it is {change.after} now."
        )
    elif change.after == HEALTHY:
        kind, severity = AlertKind.COMPONENT_RECOVERED, Severity.INFO
        title = f"nanobot: component {component} on {node} recovered"
        text = (
            f"Component {component} on node {node} is healthy again"
            f"{_since(change, now, 'it was reported in error')}." + flips
        )
    else:
        kind, severity = AlertKind.COMPONENT_ERROR, Severity.ERROR
        title = f"nanobot: component {component} on {node} is in error"
        text = f"Component {component} on node {node} went to {change.after}." + detail + flips
    return Alert(
        key=alert_key(change.key, change.seq),
        kind=kind,
        subject=change.key,
        severity=severity,
        title=title,
        body=text,
        link=link(base, "/components"),
        count=change.flips,
        created_at=now,
    )
