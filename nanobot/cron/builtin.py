"""The built-in tasks of the seed: ``cleanup`` and ``heartbeat``."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from nanobot.alerts.store import prune as prune_alerts
from nanobot.config import get_config
from nanobot.cron import history
from nanobot.cron.manager import get_cron_manager
from nanobot.cron.task import CronTask
from nanobot.db import get_engine
from nanobot.heartbeat import get_heartbeat_monitor
from nanobot.heartbeat.store import prune as prune_health
from nanobot.models import utcnow
from nanobot.session import get_session_manager

log = structlog.get_logger(__name__)


class CleanupTask(CronTask):
    """Removes expired sessions, and history and alerts older than the retention settings."""

    def __init__(self, interval: float = 3600) -> None:
        super().__init__(interval)

    async def run(self) -> None:
        removed = await asyncio.to_thread(self._cleanup)
        log.info("cleanup.finished", **removed)

    @staticmethod
    def _cleanup() -> dict[str, Any]:
        config = get_config()
        now = utcnow()
        removed: dict[str, Any] = {
            "sessions": get_session_manager().cleanup_expired_sessions(),
            "task_runs": history.prune(
                get_engine(),
                now=now,
                retention_days=float(config.get("cron.history_retention_days", 30.0)),
                max_rows=int(config.get("cron.history_max_rows", 1000)),
            ),
        }
        removed["alerts"] = prune_alerts(
            get_engine(), now=now, retention_days=float(config.get("alerts.retention_days", 30.0))
        )
        # Its retention defaults come from heartbeat.*_retention_days.
        removed.update(prune_health(get_engine(), now=now))
        return removed


class HeartbeatTask(CronTask):
    """Beats the ``cron`` component from inside the scheduler.

    Because the beat comes from a run that the scheduler dispatched, a scheduler that stops
    dispatching shows as stale, which a beat from a side thread would hide.
    """

    def __init__(self, interval: float = 30) -> None:
        super().__init__(interval)

    async def run(self) -> None:
        get_heartbeat_monitor().update_component_heartbeat("cron")


def register_builtin_tasks() -> None:
    """Register ``cleanup`` and ``heartbeat`` with intervals from configuration."""
    config = get_config()
    manager = get_cron_manager()
    manager.register_task("cleanup", CleanupTask(float(config.get("cron.cleanup_interval", 3600))))
    # As often as the monitor's own interval, so that `cron` never goes stale while it works.
    manager.register_task("heartbeat", HeartbeatTask(float(config.get("heartbeat.interval", 30))))
    log.info("cron.builtin_tasks_registered", tasks=["cleanup", "heartbeat"])
