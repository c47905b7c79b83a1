"""Prometheus metrics of one service process, on a registry of its own.

Two kinds of values:

* counted in this process from the bus's ``task.finished`` events:
  ``nanobot_task_runs_total{task,outcome}`` and the histogram
  ``nanobot_task_duration_seconds{task}`` (reset when the process restarts, as counters are);
* read from the database at each scrape (one read transaction, bounded queries), so that they
  hold whatever process wrote them: ``nanobot_task_next_run_timestamp_seconds{task}``,
  ``nanobot_task_last_success_timestamp_seconds{task}``, ``nanobot_task_paused{task}``,
  ``nanobot_task_auto_paused{task}``,
  ``nanobot_task_consecutive_failures{task}``, ``nanobot_component_up{component}`` (this node's
  components), ``nanobot_heartbeat_timestamp_seconds`` (this node's newest heartbeat) and
  ``nanobot_leader{node}`` (1 while this process holds the scheduling lease),
  ``nanobot_task_overdue`` (how many tasks are overdue, :mod:`nanobot.cron.overdue`) and
  ``nanobot_task_overdue_max_seconds`` (the worst lateness);
* read from this process's memory at each scrape: ``nanobot_event_loop_lag_seconds`` (the
  event loop's worst lag over the last health cycle), ``nanobot_task_run_age_seconds{task}``
  (how long the run in flight has been going) and ``nanobot_task_overrunning{task}`` (1 while
  that run is past its bound, ``cron.overrun_intervals`` intervals).

Labels are task names, outcomes, component names and the node: never run ids or error texts.
:meth:`Metrics.render` does database I/O; call it from a thread.

Threads: the bus subscriber (:meth:`Metrics.on_task_finished`) runs on the event loop and
:meth:`Metrics.render` in a scrape's thread; the counts they share are guarded by a lock.
"""

from __future__ import annotations

import bisect
import platform
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Info, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from sqlalchemy import Engine

from nanobot.config import get_config
from nanobot.cron.control import read_summaries
from nanobot.cron.manager import RunInFlight, runs_in_flight
from nanobot.cron.overdue import overdue_from_config
from nanobot.db import read_transaction
from nanobot.heartbeat import store
from nanobot.heartbeat.process import current_loop_lag
from nanobot.models import ComponentStatus, TaskOutcome, error_text
from nanobot.status import nanobot_version

log = structlog.get_logger(__name__)

DURATION_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
# The buckets' ``le`` labels as prometheus_client writes them ("0.01", "1.0", ...).
_BOUNDS: Final[tuple[str, ...]] = tuple(floatToGoString(b) for b in DURATION_BUCKETS)  # type: ignore[no-untyped-call]
RUNS_HELP: Final = "runs and missed or skipped slots recorded by this process, by outcome"
DURATION_HELP: Final = "duration of the task runs finished by this process"
_OUTCOMES: Final = frozenset(o.value for o in TaskOutcome)


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class _DatabaseCollector:
    """Gauges read from the database when the registry is collected."""

    def __init__(
        self,
        engine: Engine,
        node: str,
        is_leader: Callable[[], bool],
        runs: Callable[[], list[RunInFlight]],
    ) -> None:
        self.engine = engine
        self.node = node
        self.is_leader = is_leader
        self.runs = runs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        leader = GaugeMetricFamily(
            "nanobot_leader", "1 while this process holds the scheduling lease", labels=["node"]
        )
        leader.add_metric([self.node], 1.0 if self.is_leader() else 0.0)
        yield leader
        yield from _process_families(self.runs())
        try:
            families = self._read()
        except Exception as exc:
            # A scrape must answer even when the database does not: the gauges are left out,
            # and nanobot_database_up is 0.
            log.warning("metrics.database_unreadable", error=error_text(exc))
            up = GaugeMetricFamily("nanobot_database_up", "1 if the last scrape read the database")
            up.add_metric([], 0.0)
            yield up
            return
        up = GaugeMetricFamily("nanobot_database_up", "1 if the last scrape read the database")
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _read(self) -> list[GaugeMetricFamily]:
        next_run = GaugeMetricFamily(
            "nanobot_task_next_run_timestamp_seconds",
            "Unix time of the task's next scheduled run (absent while paused)",
            labels=["task"],
        )
        last_success = GaugeMetricFamily(
            "nanobot_task_last_success_timestamp_seconds",
            "Unix time at which the task's last successful run finished",
            labels=["task"],
        )
        paused = GaugeMetricFamily(
            "nanobot_task_paused", "1 if the task is paused", labels=["task"]
        )
        auto_paused = GaugeMetricFamily(
            "nanobot_task_auto_paused",
            "1 if nanobot paused the task for its consecutive failures (until resumed)",
            labels=["task"],
        )
        failures = GaugeMetricFamily(
            "nanobot_task_consecutive_failures",
            "failed runs of the task since its last success",
            labels=["task"],
        )
        component_up = GaugeMetricFamily(
            "nanobot_component_up",
            "1 if the component of this node is healthy, else 0",
            labels=["component"],
        )
        heartbeat = GaugeMetricFamily(
            "nanobot_heartbeat_timestamp_seconds", "Unix time of this node's newest heartbeat"
        )
        # A count and the worst lateness: no per-task series that come and go.
        overdue = GaugeMetricFamily(
            "nanobot_task_overdue",
            "tasks overdue now: a slot past its grace not claimed, or a run past its bound",
        )
        overdue_late = GaugeMetricFamily(
            "nanobot_task_overdue_max_seconds",
            "seconds the latest overdue task is past its expected instant (0: none overdue)",
        )
        with read_transaction(self.engine) as conn:
            # One statement for every task, the newest success included (a correlated
            # subquery per task on the (task_name, scheduled_at) index).
            for t in read_summaries(conn, last_success=True):
                paused.add_metric([t.name], 1.0 if t.paused else 0.0)
                auto_paused.add_metric([t.name], 0.0 if t.auto_paused_at is None else 1.0)
                failures.add_metric([t.name], float(t.consecutive_failures))
                if (ts := _ts(t.next_run_at)) is not None:
                    next_run.add_metric([t.name], ts)
                if (ts := _ts(t.last_success_at)) is not None:
                    last_success.add_metric([t.name], ts)
            for c in store.list_components(conn, node=self.node):
                component_up.add_metric(
                    [c.name], 1.0 if c.status == ComponentStatus.HEALTHY else 0.0
                )
            newest = store.latest_heartbeat(conn, self.node)
            if newest is not None:
                heartbeat.add_metric([], newest.at.timestamp())
            late = overdue_from_config(conn, get_config())
            overdue.add_metric([], float(len({item.task for item in late})))
            overdue_late.add_metric([], max((item.late_s for item in late), default=0.0))
        return [
            next_run,
            last_success,
            paused,
            auto_paused,
            failures,
            component_up,
            heartbeat,
            overdue,
            overdue_late,
        ]


def _process_families(runs: list[RunInFlight]) -> Iterator[GaugeMetricFamily]:
    """Gauges of this process's event loop and runs in flight (no database read)."""
    lag = current_loop_lag()
    if lag is not None:
        family = GaugeMetricFamily(
            "nanobot_event_loop_lag_seconds",
            "worst lag of this process's event loop over the last health cycle",
        )
        family.add_metric([], lag)
        yield family
    age = GaugeMetricFamily(
        "nanobot_task_run_age_seconds",
        "seconds the task's run in flight in this process has been going",
        labels=["task"],
    )
    overrunning = GaugeMetricFamily(
        "nanobot_task_overrunning",
        "1 while the task's run in flight is longer than its bound (cron.overrun_intervals)",
        labels=["task"],
    )
    for run in runs:
        age.add_metric([run.task], run.age_s)
        overrunning.add_metric([run.task], 1.0 if run.overrunning else 0.0)
    yield age
    yield overrunning


class _RunCounts:
    """``nanobot_task_runs_total`` and ``nanobot_task_duration_seconds``, counted in plain dicts.

    prometheus_client's ``Counter`` and ``Histogram`` keep a child object per label set with a
    value object and a lock per bucket: about 30 objects per task that the garbage collector
    scans at every full collection, and 75-115 us on the event loop for a task's first event
    (a burst's first runs make thousands). Here a task costs a list of bucket counts, and an
    event a dict update; the exposition is the same, ``_created`` samples included.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (task, outcome) -> count, and when that count was created (epoch seconds).
        self._runs: dict[tuple[str, str], int] = {}
        self._runs_created: dict[tuple[str, str], float] = {}
        # task -> [count per bucket (not cumulative; the last is +Inf), sum], and its creation.
        self._durations: dict[str, list[float]] = {}
        self._durations_created: dict[str, float] = {}

    def count(self, task: str, outcome: str, duration: float | None) -> None:
        key = (task, outcome)
        with self._lock:
            runs = self._runs.get(key)
            if runs is None:
                self._runs_created[key] = time.time()
                runs = 0
            self._runs[key] = runs + 1
            if duration is None:
                return
            row = self._durations.get(task)
            if row is None:
                row = self._durations[task] = [0.0] * (len(DURATION_BUCKETS) + 2)
                self._durations_created[task] = time.time()
            # A value equal to a bound belongs to that bound's bucket (le: less or equal).
            row[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
            row[-1] += duration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            runs = dict(self._runs)
            runs_created = dict(self._runs_created)
            durations = {task: list(row) for task, row in self._durations.items()}
            durations_created = dict(self._durations_created)
        doc = RUNS_HELP
        total = CounterMetricFamily("nanobot_task_runs", doc, labels=["task", "outcome"])
        for (task, outcome), value in runs.items():
            total.add_metric([task, outcome], value, created=runs_created[(task, outcome)])
        yield total
        doc = DURATION_HELP
        histogram = HistogramMetricFamily("nanobot_task_duration_seconds", doc, labels=["task"])
        created = GaugeMetricFamily("nanobot_task_duration_seconds_created", doc, labels=["task"])
        bounds = [*_BOUNDS, "+Inf"]
        for task, row in durations.items():
            cumulative = 0.0
            buckets = []
            for bound, n in zip(bounds, row[:-1], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            histogram.add_metric([task], buckets, row[-1])
            created.add_metric([task], durations_created[task])
        yield histogram
        if durations:
            yield created


class Metrics:
    """The metrics of this process. ``on_task_finished`` is the bus subscriber.

    ``is_leader`` says whether this process holds the lease; ``runs_in_flight`` gives its runs in
    flight (by default the process-wide manager's; a test passes its own manager's method).
    """

    def __init__(
        self,
        engine: Engine,
        node: str,
        *,
        is_leader: Callable[[], bool] = lambda: False,
        runs_in_flight: Callable[[], list[RunInFlight]] = runs_in_flight,
    ) -> None:
        # Not auto_describe: registering the collector must not read the database.
        self.registry = CollectorRegistry()
        self.counts = _RunCounts()
        self.registry.register(self.counts)
        build = Info("nanobot_build", "version of nanobot and of Python", registry=self.registry)
        build.info({"version": nanobot_version(), "python": platform.python_version()})
        self.registry.register(_DatabaseCollector(engine, node, is_leader, runs_in_flight))

    def on_task_finished(self, _topic: str, payload: Any) -> None:
        """Count one ``task.finished`` event; malformed events are logged and ignored."""
        if not isinstance(payload, dict):
            log.warning("metrics.bad_event", reason="payload is not a dict")
            return
        task = payload.get("task")
        outcome = payload.get("outcome")
        if not isinstance(task, str) or outcome not in _OUTCOMES:
            log.warning("metrics.bad_event", task=task, outcome=outcome)
            return
        duration = payload.get("duration")
        if isinstance(duration, int | float) and not isinstance(duration, bool) and duration >= 0:
            self.counts.count(task, outcome, float(duration))
        else:
            self.counts.count(task, outcome, None)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (reads the database)."""
        return generate_latest(self.registry)
