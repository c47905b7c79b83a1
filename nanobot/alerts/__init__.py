"""Alerts that reach people: rules on state transitions, a durable outbox, Apprise delivery.

* :mod:`nanobot.alerts.alert`: the alert record, its kinds, severities and delivery states;
* :mod:`nanobot.alerts.rules`: which transitions become alerts, with cooldown and grouping;
* :mod:`nanobot.alerts.messages`: the title, body and link of each kind of alert;
* :mod:`nanobot.alerts.store`: the outbox tables;
* :mod:`nanobot.alerts.worker`: delivery with retries and bounded exponential backoff;
* :mod:`nanobot.alerts.destinations`: destination URLs, their filters, sending one alert;
* :mod:`nanobot.alerts.alerter`: all of it inside the service (leader only);
* :mod:`nanobot.alerts.metrics`: ``nanobot_alerts_total`` and the outbox gauges.

See docs/alerts.md.
"""

from __future__ import annotations

from nanobot.alerts.alert import Alert, AlertKind, DeliveryState, Severity, alert_key
from nanobot.alerts.destinations import Destination, parse_destinations

__all__ = [
    "Alert",
    "AlertKind",
    "DeliveryState",
    "Destination",
    "Severity",
    "alert_key",
    "parse_destinations",
]
