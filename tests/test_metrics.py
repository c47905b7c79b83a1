"""The run counts of the metrics: the same exposition as prometheus_client's own metrics."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy import create_engine

from nanobot.metrics import DURATION_BUCKETS, DURATION_HELP, RUNS_HELP, Metrics

EVENTS: list[dict[str, Any]] = [
    {"task": "a", "outcome": "success", "duration": 0.25},
    {"task": "a", "outcome": "success", "duration": 0.01},  # on a bound: that bucket
    {"task": "a", "outcome": "error", "duration": 7200.0},  # past the last bound: +Inf
    {"task": "b", "outcome": "missed", "duration": None},  # no duration: counted only
    {"task": "b", "outcome": "success", "duration": 0},
    {"task": "c", "outcome": "nonsense", "duration": 1.0},  # ignored
]


def _counts_only(text: str) -> list[str]:
    # The run families without their _created samples (their values are creation times).
    return [
        line
        for line in text.splitlines()
        if ("nanobot_task_runs" in line or "nanobot_task_duration" in line)
        and not re.search(r"_created[{ ]", line)
    ]


def test_run_counts_expose_what_prometheus_client_would() -> None:
    """Counts, buckets (a value on a bound in that bucket), sums and label sets are those of a
    prometheus_client Counter and Histogram fed the same events; _created samples are there."""
    metrics = Metrics(create_engine("sqlite://"), "n1")
    reference = CollectorRegistry()
    runs = Counter(
        "nanobot_task_runs", RUNS_HELP, labelnames=["task", "outcome"], registry=reference
    )
    duration = Histogram(
        "nanobot_task_duration_seconds",
        DURATION_HELP,
        labelnames=["task"],
        buckets=DURATION_BUCKETS,
        registry=reference,
    )
    for event in EVENTS:
        metrics.on_task_finished("task.finished", event)
        if event["outcome"] == "nonsense":
            continue
        runs.labels(task=event["task"], outcome=event["outcome"]).inc()
        if event["duration"] is not None:
            duration.labels(task=event["task"]).observe(event["duration"])
    ours = generate_latest(metrics.registry).decode()
    assert _counts_only(ours) == _counts_only(generate_latest(reference).decode())
    assert 'nanobot_task_runs_created{outcome="missed",task="b"}' in ours
    assert 'nanobot_task_duration_seconds_created{task="a"}' in ours


def test_run_families_are_exposed_before_any_run() -> None:
    """With no run yet, the families are declared and have no sample (as before)."""
    metrics = Metrics(create_engine("sqlite://"), "n1")
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE nanobot_task_runs_total counter" in text
    assert "# TYPE nanobot_task_duration_seconds histogram" in text
    assert "nanobot_task_runs_total{" not in text
    assert "_created" not in text
