"""Task definitions as they are given: a name, a class path and its arguments, a schedule and
the settings that override the class's own, validated into a
:class:`~nanobot.cron.task.TaskDefinition`.

The command line (``cron add``), the task file, the API and the manager validate here before
anything is stored (:mod:`nanobot.cron.control` owns the ``tasks`` table); the scheduler builds
stored tasks with :func:`build_task`. Nothing here touches the database. Every error is an
:class:`~nanobot.exceptions.InvalidTaskError` whose message names the bad value.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Final

from nanobot.cron import overlap as overlaps
from nanobot.cron.overlap import Overlap, check_overlap
from nanobot.cron.pings import check_ping_url
from nanobot.cron.retries import RetryBackoff, check_retries, parse_backoff
from nanobot.cron.schedules import IntervalSchedule, Schedule, describe
from nanobot.cron.task import (
    CronTask,
    TaskDefinition,
    check_failure_count,
    check_interval,
    nominal_period,
)
from nanobot.exceptions import InvalidTaskError
from nanobot.heartbeat.store import TASK_COMPONENT_PREFIX
from nanobot.models import NAME_MAX, MisfirePolicy, error_text

# A task is also the heartbeat component "task:<name>", whose name has NAME_MAX characters.
TASK_NAME_MAX: Final = NAME_MAX - len(TASK_COMPONENT_PREFIX)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidTaskError(f"a task name must be a non-empty string, got {name!r}")
    if len(name) > TASK_NAME_MAX:
        raise InvalidTaskError(f"a task name may have at most {TASK_NAME_MAX} characters")
    if name != name.strip():
        raise InvalidTaskError(f"a task name may not start or end with spaces: {name!r}")
    # A newline or other control character would split the lines of cron list, the log and
    # the alert messages that show the name.
    if not name.isprintable():
        raise InvalidTaskError(f"a task name may not hold control characters: {name!r}")
    return name


def import_task_class(path: str) -> type[CronTask]:
    """The class named by ``pkg.module:Class``, or :class:`InvalidTaskError` saying why not."""
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise InvalidTaskError(f"task class {path!r} must be written pkg.module:Class")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise InvalidTaskError(
            f"cannot import module {module_name!r} of task class {path!r}: {error_text(exc)}"
        ) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidTaskError(f"module {module_name!r} has no {qualname!r}") from None
    if not isinstance(obj, type) or not issubclass(obj, CronTask):
        raise InvalidTaskError(f"{path!r} is not a subclass of nanobot.cron.CronTask")
    return obj


def build_task(path: str, kwargs: dict[str, Any]) -> CronTask:
    """A new instance of the stored task ``path`` with its stored constructor arguments."""
    cls = import_task_class(path)
    if getattr(cls, "__abstractmethods__", None):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise InvalidTaskError(f"{path!r} is abstract: it does not implement {missing}")
    try:
        return cls(**kwargs)
    except InvalidTaskError:
        raise
    except Exception as exc:
        raise InvalidTaskError(
            f"{path!r} cannot be built with {kwargs!r}: {error_text(exc)}"
        ) from exc


def parse_kwargs(raw: str | None) -> dict[str, Any]:
    """Constructor arguments given as JSON text: an object, or an error that says so."""
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidTaskError(
            f"kwargs are not valid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise InvalidTaskError(f"kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _optional_seconds(value: Any, what: str) -> float | None:
    return None if value is None else check_interval(value, what)


def definition_from_class(
    name: str,
    path: str,
    interval: Any = None,
    kwargs: dict[str, Any] | None = None,
    *,
    schedule: Schedule | None = None,
    timeout: float | None = None,
    jitter: float | None = None,
    misfire_policy: MisfirePolicy | str | None = None,
    overlap: str | None = None,
    max_concurrent: int | None = None,
    pause_after_failures: int | None = None,
    ping_url: str | None = None,
    catch_up_window: float | None = None,
    retries: int | None = None,
    retry_backoff: RetryBackoff | str | None = None,
) -> TaskDefinition:
    """Validate a task given by class path (the command line's ``cron add``) and define it.

    The schedule is ``schedule``, or every ``interval`` seconds; ``timeout``, ``jitter`` and
    ``misfire_policy``, ``overlap`` (with ``max_concurrent``) and ``pause_after_failures``
    override the class's own when given.
    """
    if overlap is not None:
        # A bad policy or a contradiction is refused before anything is imported.
        check_overlap(overlap, max_concurrent)
    failures = check_failure_count(pause_after_failures)
    ping = check_ping_url(ping_url)
    window = _optional_seconds(catch_up_window, "catch_up_window")
    own_retries = None if retries is None else check_retries(retries)
    backoff = None if retry_backoff is None else parse_backoff(retry_backoff)
    check_name(name)
    if schedule is None:
        schedule = IntervalSchedule(seconds=check_interval(interval))
    elif interval is not None:
        raise InvalidTaskError("a task has one schedule: give an interval or a schedule, not both")
    kwargs = dict(kwargs or {})
    cls = import_task_class(path)
    params = inspect.signature(cls).parameters
    if isinstance(schedule, IntervalSchedule):
        seconds = schedule.seconds
        if "interval" in params:
            given = interval if interval is not None else seconds
            if isinstance(given, float) and given.is_integer():
                given = int(given)  # stored as the user wrote it: 10, not 10.0
            if "interval" in kwargs and kwargs["interval"] != given:
                raise InvalidTaskError(
                    f"kwargs give interval {kwargs['interval']!r} but --interval is {given!r}"
                )
            kwargs["interval"] = given
    else:
        seconds = nominal_period(schedule)
        if "interval" in kwargs:
            raise InvalidTaskError(
                f"kwargs give interval {kwargs['interval']!r} but the schedule is "
                f"{describe(schedule)}: keep one"
            )
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        raise InvalidTaskError("kwargs must be plain JSON data") from None
    task = build_task(path, kwargs)
    if misfire_policy is not None:
        try:
            policy = MisfirePolicy(misfire_policy)
        except ValueError:
            choices = ", ".join(p.value for p in MisfirePolicy)
            raise InvalidTaskError(
                f"misfire policy must be one of {choices}, got {misfire_policy!r}"
            ) from None
    else:
        policy = MisfirePolicy(task.misfire_policy)
    return TaskDefinition(
        name=name,
        task_class=path,
        interval=seconds,
        kwargs=kwargs,
        timeout=task.timeout if timeout is None else _optional_seconds(timeout, "timeout"),
        jitter=task.jitter if jitter is None else _optional_seconds(jitter, "jitter"),
        misfire_policy=policy,
        overlap=_chosen_overlap(task, overlap, max_concurrent),
        schedule=schedule,
        pause_after_failures=task.pause_after_failures if failures is None else failures,
        ping_url=task.ping_url if ping is None else ping,
        catch_up_window=task.catch_up_window if window is None else window,
        retries=task.retries if own_retries is None else own_retries,
        retry_backoff=(
            backoff
            if backoff is not None
            else None
            if task.retry_backoff is None
            else parse_backoff(task.retry_backoff)
        ),
    )


def _chosen_overlap(task: CronTask, policy: str | None, max_concurrent: int | None) -> Overlap:
    """The overlap given (``cron add --overlap``, a task-file key) over the class's own; a
    maximum given alone applies to a class whose own policy is allow."""
    own = overlaps.OverlapPolicy(task.overlap)
    if policy is None and max_concurrent is None:
        return Overlap(own, task.max_concurrent or 1)
    chosen = policy if policy is not None else own
    if max_concurrent is None and chosen == own:
        max_concurrent = task.max_concurrent if own is overlaps.OverlapPolicy.ALLOW else None
    return check_overlap(chosen, max_concurrent)
