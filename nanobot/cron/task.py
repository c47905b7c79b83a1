"""``CronTask``: the base class of every periodic task, as in the seed, plus what persistence needs.

A task is stored as plain data, never as a pickled instance: the import path of its class
(``pkg.module:Class``) and the arguments it was constructed with. ``CronTask.__new__`` captures
those arguments, so subclasses written against the seed (``super().__init__(interval)``) need
nothing more to survive a restart.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from nanobot.exceptions import InvalidTaskError
from nanobot.models import MisfirePolicy


def check_interval(value: Any, what: str = "interval") -> float:
    """A positive finite number of seconds, or :class:`InvalidTaskError` naming the value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTaskError(f"{what} must be a positive number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidTaskError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _check_optional_seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    return check_interval(value, what)


class CronTask(ABC):
    """Base class of periodic tasks: subclasses implement ``async run()``.

    Options beyond the seed, as class attributes or constructor keywords:

    - ``timeout``: seconds a run may take before it is cancelled and recorded as ``timeout``
      (None: the configured ``cron.default_timeout``, whose 0 means no limit).
    - ``jitter``: up to this many seconds added at random to each start, to spread load.
    - ``misfire_policy``: what to do with slots that passed while nothing ran them.
    """

    timeout: float | None = None
    jitter: float | None = None
    misfire_policy: MisfirePolicy = MisfirePolicy.CATCH_UP_ONCE

    _init_args: tuple[tuple[Any, ...], dict[str, Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> CronTask:
        self = super().__new__(cls)
        # Captured before any __init__ runs, so that another process can build the same task.
        self._init_args = (args, dict(kwargs))
        return self

    def __init__(
        self,
        interval: float = 60,
        *,
        timeout: float | None = None,
        jitter: float | None = None,
        misfire_policy: MisfirePolicy | str | None = None,
    ) -> None:
        self.interval = check_interval(interval)
        if timeout is not None:
            self.timeout = _check_optional_seconds(timeout, "timeout")
        else:
            self.timeout = _check_optional_seconds(type(self).timeout, "timeout")
        if jitter is not None:
            self.jitter = _check_optional_seconds(jitter, "jitter")
        if misfire_policy is not None:
            try:
                self.misfire_policy = MisfirePolicy(misfire_policy)
            except ValueError:
                choices = ", ".join(p.value for p in MisfirePolicy)
                raise InvalidTaskError(
                    f"misfire_policy must be one of {choices}, got {misfire_policy!r}"
                ) from None
        self.running = False
        self.task: asyncio.Task[Any] | None = None

    @abstractmethod
    async def run(self) -> None:
        """Do the work of one run."""

    def get_interval(self) -> float:
        return self.interval

    def is_running(self) -> bool:
        """True while the task is started (scheduled) in this process, as in the seed."""
        return self.running

    def set_running(self, running: bool) -> None:
        self.running = running

    def set_task(self, task: asyncio.Task[Any] | None) -> None:
        """The asyncio task of the run in flight, if any."""
        self.task = task

    def get_task(self) -> asyncio.Task[Any] | None:
        return self.task


@dataclass(frozen=True, slots=True)
class TaskDefinition:
    """What is stored of a task: enough to build and schedule it in any process."""

    name: str
    task_class: str
    interval: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    jitter: float | None = None
    misfire_policy: MisfirePolicy = MisfirePolicy.CATCH_UP_ONCE
    # Why the task cannot be rebuilt in another process, or None if it can.
    not_persistable: str | None = None

    def same_schedule_as(self, other: TaskDefinition) -> bool:
        return (
            self.task_class == other.task_class
            and self.interval == other.interval
            and self.kwargs == other.kwargs
            and self.timeout == other.timeout
            and self.jitter == other.jitter
            and self.misfire_policy == other.misfire_policy
        )


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _captured_kwargs(task: CronTask) -> tuple[dict[str, Any], str | None]:
    """The constructor arguments of ``task`` as keyword arguments, or why they cannot be."""
    args, kwargs = getattr(task, "_init_args", ((), {}))
    try:
        bound = inspect.signature(type(task)).bind(*args, **kwargs)
    except TypeError as exc:
        return {}, f"its constructor arguments cannot be bound: {exc}"
    result: dict[str, Any] = {}
    for pname, value in bound.arguments.items():
        kind = bound.signature.parameters[pname].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return {}, "its constructor takes *args, which cannot be stored by name"
        elif kind is inspect.Parameter.VAR_KEYWORD:
            result.update(value)
        else:
            result[pname] = value
    try:
        if json.loads(json.dumps(result)) != result:
            return {}, "its constructor arguments do not survive a JSON round trip"
    except (TypeError, ValueError):
        return {}, "its constructor arguments are not plain JSON data"
    return result, None


def definition_of(name: str, task: CronTask) -> TaskDefinition:
    """The storable definition of a registered task instance."""
    cls = type(task)
    path = class_path(cls)
    reason: str | None = None
    if cls.__module__ == "__main__":
        reason = (
            f"its class {cls.__qualname__} lives in __main__, which another process cannot import"
        )
    elif "<locals>" in cls.__qualname__:
        reason = f"its class {cls.__qualname__} is defined inside a function"
    kwargs, kwargs_reason = _captured_kwargs(task)
    reason = reason or kwargs_reason
    return TaskDefinition(
        name=name,
        task_class=path,
        interval=check_interval(task.get_interval()),
        kwargs=kwargs,
        timeout=task.timeout,
        jitter=task.jitter,
        misfire_policy=MisfirePolicy(task.misfire_policy),
        not_persistable=reason,
    )
