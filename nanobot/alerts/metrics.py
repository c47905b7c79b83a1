"""The alerts' Prometheus metrics, on the service's private registry.

* ``nanobot_alerts_total{kind,result}``: delivery attempts made by this process, by alert kind and
  result (``sent``, ``failed`` and retried later, ``given_up``); kinds are a fixed enum, so the
  labels stay few;
* ``nanobot_alerts_pending``: deliveries waiting in the outbox (read at each scrape);
* ``nanobot_alerts_oldest_pending_age_seconds``: age of the oldest alert still pending somewhere.

The gauges read the database when the registry is collected: from a thread, as
:meth:`nanobot.metrics.Metrics.render` is.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine

from nanobot.alerts import store
from nanobot.alerts.alert import AlertKind
from nanobot.db import read_transaction
from nanobot.models import error_text
from nanobot.times import Clock

log = structlog.get_logger(__name__)


class _OutboxCollector:
    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with read_transaction(self.engine) as conn:
                pending, oldest = store.pending_stats(conn)
        except Exception as exc:
            # The scrape answers without these gauges; nanobot_database_up says why.
            log.warning("metrics.alerts_unreadable", error=error_text(exc))
            return
        gauge = GaugeMetricFamily(
            "nanobot_alerts_pending", "alert deliveries waiting in the outbox"
        )
        gauge.add_metric([], float(pending))
        yield gauge
        age = GaugeMetricFamily(
            "nanobot_alerts_oldest_pending_age_seconds",
            "age of the oldest alert not yet delivered to some destination (0 if none)",
        )
        age.add_metric(
            [], 0.0 if oldest is None else max(0.0, (self.clock() - oldest).total_seconds())
        )
        yield age


class AlertMetrics:
    """The counter of this process's attempts and the outbox gauges."""

    def __init__(self, registry: CollectorRegistry, engine: Engine, clock: Clock) -> None:
        self.attempts = Counter(
            "nanobot_alerts",
            "alert delivery attempts of this process, by kind and result",
            labelnames=["kind", "result"],
            registry=registry,
        )
        self._collector = _OutboxCollector(engine, clock)
        self._registry = registry
        registry.register(self._collector)

    def count(self, kind: AlertKind, result: str) -> None:
        self.attempts.labels(kind=kind.value, result=result).inc()

    def unregister(self) -> None:
        self._registry.unregister(self.attempts)
        self._registry.unregister(self._collector)
