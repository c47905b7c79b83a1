"""The changes an operator makes from the dashboard or the API, through the control plane.

Each goes through :mod:`nanobot.cron.control`, as the command line's do, so that the running
scheduler applies it within ``cron.poll_interval``, and each is logged as ``web.action`` with
the action, the task and who did it (the name of the token, never the token). A change that
fails raises the control plane's error before anything is written.

Synchronous, with database I/O: the handlers call these in a thread.
"""

from __future__ import annotations

import enum
from typing import Any

import structlog
from sqlalchemy import Engine

from nanobot.cron import control
from nanobot.cron.control import TaskInfo
from nanobot.cron.task import TaskDefinition
from nanobot.web.tokens import Principal

log = structlog.get_logger(__name__)


class Action(enum.StrEnum):
    """What an operator did: the ``action`` field of ``web.action``."""

    CREATE = "create"
    UPDATE = "update"
    PAUSE = "pause"
    RESUME = "resume"
    RUN = "run"
    REMOVE = "remove"


def _logged(action: Action, name: str, who: Principal, via: str, **fields: Any) -> None:
    log.info("web.action", action=action.value, task=name, by=who.name, via=via, **fields)


def create(
    engine: Engine, definition: TaskDefinition, who: Principal, via: str, *, paused: bool
) -> TaskInfo:
    info = control.add_task(engine, definition, paused=paused)
    _logged(Action.CREATE, definition.name, who, via, task_class=definition.task_class)
    return info


def update(engine: Engine, definition: TaskDefinition, who: Principal, via: str) -> TaskInfo:
    outcome, info = control.upsert_definition(engine, definition, create=False)
    _logged(Action.UPDATE, definition.name, who, via, outcome=outcome)
    return info


def pause(engine: Engine, name: str, who: Principal, via: str) -> TaskInfo:
    info = control.pause_task(engine, name)
    _logged(Action.PAUSE, name, who, via)
    return info


def resume(engine: Engine, name: str, who: Principal, via: str) -> TaskInfo:
    info = control.resume_task(engine, name)
    _logged(Action.RESUME, name, who, via)
    return info


def run_now(engine: Engine, name: str, who: Principal, via: str) -> TaskInfo:
    info = control.request_run(engine, name)
    _logged(Action.RUN, name, who, via)
    return info


def remove(engine: Engine, name: str, who: Principal, via: str) -> None:
    control.remove_task(engine, name)
    _logged(Action.REMOVE, name, who, via)
