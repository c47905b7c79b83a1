"""Alerts end to end: the real service as a subprocess, a local HTTP sink, ``kill -9``.

The service runs with the suite's short heartbeat and lease, alert checks every 0.2 s and a
retry backoff of 0.2-0.5 s, so that nothing waits for the default minutes. Every wait is bounded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from alert_sink import Sink
from faults.harness import run_cli, wait_for
from test_service import Service

pytestmark = pytest.mark.slow


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.close()


def alert_env(sink: Sink) -> dict[str, str]:
    return {
        "NANOBOT_ALERTS__DESTINATIONS": json.dumps([{"name": "sink", "url": sink.url()}]),
        "NANOBOT_ALERTS__CHECK_INTERVAL": "0.2",
        "NANOBOT_ALERTS__GROUP_WINDOW": "0",
        "NANOBOT_ALERTS__RETRY_BASE": "0.2",
        "NANOBOT_ALERTS__RETRY_MAX": "0.5",
    }


def listed() -> list[dict[str, Any]]:
    code, data = run_cli("alerts", "list", "--json", "--limit", "100")
    assert code == 0, data
    assert isinstance(data, list)
    return data


def test_kill_9_between_event_and_send_delivers_once_after_restart(
    services: Callable[..., Service], sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alert is in the outbox but the sink answers 500; the leader is killed with SIGKILL;
    after a restart the same alert (same key) is delivered once, and only once."""
    env = alert_env(sink)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_cli("db", "upgrade")[0] == 0
    code, out = run_cli("cron", "add", "fetch", "--task", "alert_tasks:Failing", "--interval", "1")
    assert code == 0, out
    sink.failing = True
    first = services(**env)
    assert first.wait_healthy()["role"] == "leader"

    def attempted() -> dict[str, Any] | None:
        for alert in listed():
            if alert["kind"] == "task.failing" and alert["deliveries"][0]["attempts"] >= 2:
                return alert
        return None

    alert = wait_for("failed delivery attempts", attempted, timeout=20)
    assert alert["deliveries"][0]["state"] == "pending"
    assert "500" in alert["deliveries"][0]["last_error"]
    assert "upstream refused the request" in alert["body"]
    first.kill()
    refused = {r.key for r in sink.received}
    assert refused == {alert["key"]}

    sink.failing = False
    second = services(**env)
    second.wait_healthy(timeout=30)

    def delivered() -> dict[str, Any] | None:
        mine = [a for a in listed() if a["key"] == alert["key"]]
        return mine[0] if mine and mine[0]["deliveries"][0]["state"] == "sent" else None

    done = wait_for("the delivery after the restart", delivered, timeout=30)
    assert done["deliveries"][0]["attempts"] >= 3
    accepted = [r for r in sink.accepted_raw() if r.key == alert["key"]]
    assert len(accepted) == 1
    assert accepted[0].body["kind"] == "task.failing"
    assert accepted[0].body["subject"] == "task:fetch"
    # The task still fails under the new leader: that is not a new transition.
    failing = [a for a in listed() if a["kind"] == "task.failing"]
    assert len(failing) == 1
    # The new leader took over from a process that died: that is told too, once.
    wait_for(
        "the fail-over alert",
        lambda: [a for a in listed() if a["kind"] == "leader.failover"
                 and a["deliveries"][0]["state"] == "sent"],
        timeout=20,
    )  # fmt: skip
    assert second.stop() == 0
