"""Periodic tasks: the seed's ``CronTask`` and ``CronManager`` on a persistent scheduler."""

from __future__ import annotations

from nanobot.cron.builtin import CleanupTask, HeartbeatTask, register_builtin_tasks
from nanobot.cron.manager import CronManager, get_cron_manager, reset_cron_manager
from nanobot.cron.task import CronTask
from nanobot.models import MisfirePolicy, TaskOutcome

__all__ = [
    "CleanupTask",
    "CronManager",
    "CronTask",
    "HeartbeatTask",
    "MisfirePolicy",
    "TaskOutcome",
    "get_cron_manager",
    "register_builtin_tasks",
    "reset_cron_manager",
]
