"""The changes an operator makes from the dashboard or the API, through the control plane.

Each goes through :mod:`nanobot.cron.control`, as the command line's do, so that the running
scheduler applies it within ``cron.poll_interval``, and each is logged as ``web.action`` with
the action, the task and who did it (the name of the token, never the token). A change that
fails raises the control plane's error before anything is written. A task of the task file is
changed or removed in that file only (:class:`TaskFromFileError`, a 409), as the file's sync
would undo the change.

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
from nanobot.exceptions import TaskError
from nanobot.models import TaskSource
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


class TaskFromFileError(TaskError):
    """A task of the task file is changed or removed there, not through the API."""

    def __init__(self, name: str, action: Action) -> None:
        super().__init__(
            f"task {name!r} comes from the task file: {action.value} it in tasks.toml "
            "(pause, resume and run now work here)"
        )
        self.name = name


def _not_from_file(engine: Engine, name: str, action: Action) -> None:
    if control.get_task(engine, name).source == TaskSource.FILE:
        raise TaskFromFileError(name, action)


def update(engine: Engine, definition: TaskDefinition, who: Principal, via: str) -> TaskInfo:
    _not_from_file(engine, definition.name, Action.UPDATE)
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
    _not_from_file(engine, name, Action.REMOVE)
    control.remove_task(engine, name)
    _logged(Action.REMOVE, name, who, via)
