"""The alert record: its kinds, severities and delivery states.

An :class:`Alert` is what people are told about one transition (or one group of transitions):
a stable ``kind``, the ``subject`` it is about, a ``severity``, a short ``title``, a ``body``
with the last error, an optional ``link`` to the dashboard page of the subject, and an
idempotency ``key``. The key is derived from the transition (the subject and the number of its
alert), never drawn at random, so the same transition always gets the same key: the outbox
stores it once and a receiver that stores keys sees it once, whatever is retried.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from nanobot.models import ALERT_KEY_MAX, ALERT_TITLE_MAX

# Bodies are cut to this many characters: a task that raises with a megabyte of message must
# not send a megabyte to a chat channel.
BODY_MAX: Final = 3000


class AlertKind(enum.StrEnum):
    """What an alert is about: stored in ``alerts.kind`` and used by destination filters."""

    TASK_FAILING = "task.failing"
    TASK_RECOVERED = "task.recovered"
    TASK_BROKEN = "task.broken"
    TASK_MENDED = "task.mended"
    # The task policies: raised by the rules from a task's auto-pause and overdue states.
    TASK_AUTO_PAUSED = "task.auto_paused"
    TASK_RESUMED = "task.resumed"
    TASK_OVERDUE = "task.overdue"
    TASK_ON_TIME = "task.on_time"
    COMPONENT_ERROR = "component.error"
    COMPONENT_RECOVERED = "component.recovered"
    COMPONENT_FLAPPING = "component.flapping"
    SYSTEM_STATUS = "system.status"
    LEADER_FAILOVER = "leader.failover"
    LEADER_NONE = "leader.none"
    DATABASE_CREATED = "database.created"
    DATABASE_UNUSABLE = "database.unusable"
    DATABASE_RECOVERED = "database.recovered"
    TEST = "test"


class Severity(enum.StrEnum):
    """How urgent an alert is; destinations filter on a minimum."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK: Final = {s: i for i, s in enumerate(Severity)}


class DeliveryState(enum.StrEnum):
    """The state of one alert's delivery to one destination: ``alert_deliveries.state``."""

    PENDING = "pending"  # not sent yet; tried again at next_attempt_at
    SENT = "sent"  # the destination accepted it
    FAILED = "failed"  # given up after alerts.give_up_after seconds of failures
    DROPPED = "dropped"  # the destination is no longer configured


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One alert, as written to the outbox."""

    key: str
    kind: AlertKind
    subject: str
    severity: Severity
    title: str
    body: str
    created_at: datetime
    link: str | None = None
    count: int = 1
    # The subjects a grouped alert stands for (its own subject otherwise); filters match on them.
    members: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.created_at.tzinfo is None:
            raise ValueError(f"naive datetime {self.created_at!r}: alerts are stamped in UTC")
        if not self.key or len(self.key) > ALERT_KEY_MAX:
            raise ValueError(f"alert key must have 1 to {ALERT_KEY_MAX} characters")
        if self.count < 1:
            raise ValueError(f"alert count must be >= 1, got {self.count}")
        object.__setattr__(self, "kind", AlertKind(self.kind))
        object.__setattr__(self, "severity", Severity(self.severity))
        object.__setattr__(self, "title", _cut(self.title, ALERT_TITLE_MAX))
        object.__setattr__(self, "body", _cut(self.body, BODY_MAX))
        object.__setattr__(self, "subject", _cut(self.subject, ALERT_KEY_MAX))
        if not self.members:
            object.__setattr__(self, "members", (self.subject,))

    @property
    def subjects(self) -> tuple[str, ...]:
        return self.members


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def alert_key(*parts: object) -> str:
    """An idempotency key from the parts that identify a transition; long ones are hashed."""
    key = "nanobot:" + ":".join(str(p) for p in parts)
    if len(key) <= ALERT_KEY_MAX:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return key[: ALERT_KEY_MAX - 34] + ":" + digest
