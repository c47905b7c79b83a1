"""The task file: tasks declared in ``$NANOBOT_HOME/tasks.toml`` (``tasks.file``), like Celery
beat's ``beat_schedule`` or a crontab.

.. code-block:: toml

    [tasks.digest]
    task = "myapp.jobs:DigestTask"
    cron = "0 9 * * 1-5"
    tz = "Europe/Berlin"
    kwargs = { channel = "ops" }
    timeout = 60

    [tasks.backup]
    command = ["pg_dump", "-f", "/backups/app.sql", "app"]
    every = "1d"

:func:`read_task_file` validates the whole file first: a malformed file, an unknown key, a bad
value or an unimportable class raises :class:`~nanobot.exceptions.TaskFileError`, one line naming
the file, the task and the key, and nothing is applied. :func:`sync_task_file` then applies it in
one transaction, touching only tasks whose ``source`` is ``file``:

- a new task is stored and started (first run at once) unless ``paused = true``;
- an unchanged task is not written at all, so its ``next_run_at`` does not move;
- a changed task is updated; its next run stays where it was (a changed interval applies from
  that run on), so its phase is kept;
- a task no longer in the file is paused with the reason "removed from tasks.toml", never
  deleted: its history stays, and putting it back resumes it on its grid;
- a name also used by a task from the command line or from code is left alone and reported as a
  clash (:attr:`SyncResult.clashes`); the other tasks are applied.

A missing file changes nothing (an empty file removes every task of the file).

Functions here do blocking file and database I/O on the caller's thread.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Connection, Engine

from nanobot.config import Config
from nanobot.cron import control, definitions
from nanobot.cron.overlap import Overlap, check_overlap
from nanobot.cron.pings import check_ping_url
from nanobot.cron.retries import RetryBackoff, check_retries, parse_backoff
from nanobot.cron.schedules import (
    AtSchedule,
    IntervalSchedule,
    Schedule,
    parse_at,
    parse_cron,
    parse_every,
)
from nanobot.cron.task import TaskDefinition, check_failure_count, check_interval
from nanobot.db import write_transaction
from nanobot.exceptions import InvalidTaskError, TaskFileError
from nanobot.models import MisfirePolicy, TaskSource, utcnow

TASK_FILE_NAME: Final = "tasks.toml"
REMOVED_REASON: Final = "removed from tasks.toml"
PAUSED_REASON: Final = "paused in tasks.toml"
COMMAND_CLASS: Final = "nanobot.cron.command:CommandTask"

_SCHEDULE_KEYS: Final = ("every", "interval", "cron", "at")
_COMMON_KEYS: Final = frozenset(
    {
        *_SCHEDULE_KEYS,
        "tz",
        "kwargs",
        "timeout",
        "jitter",
        "misfire",
        "overlap",
        "max_concurrent",
        "paused",
        "pause_after_failures",
        "ping_url",
        "catch_up_window",
        "retries",
        "retry_backoff",
    }
)
_CLASS_KEYS: Final = frozenset({"task"})
_COMMAND_KEYS: Final = frozenset({"command", "shell", "cwd", "env", "kill_grace"})
_CLOCK_ONLY = re.compile(r"^\s*\d{1,2}:\d{2}(:\d{2})?\s*$")
# One-shot times are checked against the clock when a task is created, not at every sync: a
# file keeps declaring a one-shot task after its time has passed.
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def task_file_path(config: Config) -> Path:
    raw = config.get("tasks.file")
    return Path(raw).expanduser() if raw else config.home / TASK_FILE_NAME


@dataclass(frozen=True, slots=True)
class FileTask:
    """One task of the file, validated."""

    definition: TaskDefinition
    paused: bool


@dataclass(frozen=True, slots=True)
class SyncResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    clashes: list[str] = field(default_factory=list)

    def clash_error(self, path: Path) -> str | None:
        if not self.clashes:
            return None
        names = ", ".join(repr(n) for n in self.clashes)
        return (
            f"{path}: task {names} also added by the command line or by code; "
            "the file's definition is not applied: rename it in the file, or "
            "'nanobot cron remove' the other"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "resumed": self.resumed,
            "clashes": self.clashes,
        }


# Builds the one-line error of a key: fail("timeout", "must be ...").
_Fail = Callable[[str, str], TaskFileError]


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, str):
        try:
            value = parse_every(value).seconds
        except InvalidTaskError:
            raise InvalidTaskError(
                f"{what} must be seconds or a duration like '90s', '5m', '2h', '1d', got {value!r}"
            ) from None
    return check_interval(value, what)


def _schedule(body: dict[str, Any], fail: _Fail, default_tz: str) -> Schedule:
    given = [k for k in _SCHEDULE_KEYS if k in body]
    if len(given) != 1:
        raise fail(
            given[1] if len(given) > 1 else "every",
            "give exactly one schedule: every (or interval), cron or at",
        )
    key = given[0]
    value = body[key]
    if "tz" in body and key in ("every", "interval"):
        raise fail("tz", "a time zone applies to cron and at schedules, not to an interval")
    tz = body.get("tz")
    if tz is not None and not isinstance(tz, str):
        raise fail("tz", f"must be an IANA zone name such as Europe/Berlin, got {tz!r}")
    try:
        if key in ("every", "interval"):
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise InvalidTaskError(f"must be seconds or a duration like '5m', got {value!r}")
            return IntervalSchedule(seconds=_seconds(value, key))
        if key == "cron":
            if not isinstance(value, str):
                raise InvalidTaskError(f"must be a cron expression, got {value!r}")
            return parse_cron(value, tz or default_tz)
        if isinstance(value, str) and _CLOCK_ONLY.match(value):
            raise InvalidTaskError(
                f"{value!r} is a time of day: give a date and time, such as 2026-12-24T17:30"
            )
        if not isinstance(value, str | datetime):
            raise InvalidTaskError(f"must be a date and time, got {value!r}")
        return parse_at(value, tz or default_tz, now=_EPOCH).schedule
    except InvalidTaskError as exc:
        bad = "tz" if "time zone" in str(exc) and "tz" in body else key
        raise fail(bad, str(exc)) from None


def _accepts(cls: type, name: str) -> bool:
    params = inspect.signature(cls).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


@dataclass(frozen=True)
class _Options:
    """The scheduling options of a file's task, checked."""

    pause_after_failures: int | None
    ping_url: str | None
    catch_up_window: float | None
    # timeout, jitter and misfire_policy: given to the task's constructor as well.
    constructor: dict[str, Any]
    overlap: Overlap | None = None
    retries: int | None = None
    retry_backoff: RetryBackoff | None = None


def _check_keys(body: dict[str, Any], is_command: bool, fail: _Fail) -> None:
    allowed = _COMMON_KEYS | (_COMMAND_KEYS if is_command else _CLASS_KEYS)
    for key in body:
        if key not in allowed:
            if key in _COMMAND_KEYS or key in _CLASS_KEYS:
                raise fail(key, "a task has either 'task' (a class) or 'command', not both")
            known = ", ".join(sorted(allowed))
            raise fail(key, f"unknown key (known: {known})")
    if not is_command and "task" not in body:
        raise fail("task", "missing: give 'task = \"pkg.module:Class\"' or 'command = ...'")


def _options(body: dict[str, Any], fail: _Fail) -> _Options:
    def checked(key: str, check: Callable[[Any], Any]) -> Any:
        try:
            return check(body.get(key))
        except InvalidTaskError as exc:
            raise fail(key, str(exc)) from None

    def seconds(key: str) -> float | None:
        return checked(key, partial(_seconds, what=key)) if key in body else None

    # Scheduling options of the stored task, not constructor arguments.
    failures = checked("pause_after_failures", check_failure_count)
    ping_url = checked("ping_url", check_ping_url)
    window = seconds("catch_up_window")
    overlap = None
    if "overlap" in body or "max_concurrent" in body:
        try:
            overlap = check_overlap(body.get("overlap"), body.get("max_concurrent"))
        except InvalidTaskError as exc:
            raise fail("overlap" if "overlap" in body else "max_concurrent", str(exc)) from None
    retries = checked("retries", lambda value: None if value is None else check_retries(value))
    backoff = checked("retry_backoff", parse_backoff) if "retry_backoff" in body else None
    constructor: dict[str, Any] = {}
    for key in ("timeout", "jitter"):
        if key in body:
            constructor[key] = seconds(key)
    if "misfire" in body:
        try:
            constructor["misfire_policy"] = MisfirePolicy(body["misfire"]).value
        except ValueError:
            choices = ", ".join(p.value for p in MisfirePolicy)
            raise fail("misfire", f"must be one of {choices}, got {body['misfire']!r}") from None
    return _Options(failures, ping_url, window, constructor, overlap, retries, backoff)


def _command_kwargs(body: dict[str, Any], options: _Options, fail: _Fail) -> dict[str, Any]:
    if body.get("kwargs"):
        raise fail("kwargs", "a command task takes command, shell, cwd and env instead")
    kwargs = {k: body[k] for k in ("command", "shell", "cwd", "env", "kill_grace") if k in body}
    return kwargs | options.constructor


def _class_kwargs(
    task_class: str, kwargs: dict[str, Any], options: _Options, fail: _Fail
) -> dict[str, Any]:
    try:
        cls = definitions.import_task_class(task_class)
    except InvalidTaskError as exc:
        raise fail("task", str(exc)) from None
    for key in options.constructor:
        if not _accepts(cls, key):
            raise fail(
                "misfire" if key == "misfire_policy" else key,
                f"{task_class} does not take {key} in its constructor; "
                "set it as a class attribute instead",
            )
    return kwargs | options.constructor


def _definition(name: str, body: dict[str, Any], path: Path, default_tz: str) -> FileTask:
    def fail(key: str, message: str) -> TaskFileError:
        return TaskFileError(f"{path}: task {name!r}: key {key!r}: {message}")

    try:
        definitions.check_name(name)
    except InvalidTaskError as exc:
        raise TaskFileError(f"{path}: task {name!r}: {exc}") from None
    is_command = "command" in body
    _check_keys(body, is_command, fail)
    schedule = _schedule(body, fail, default_tz)
    kwargs = body.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise fail("kwargs", f"must be a table, got {kwargs!r}")
    paused = body.get("paused", False)
    if not isinstance(paused, bool):
        raise fail("paused", f"must be true or false, got {paused!r}")
    options = _options(body, fail)
    if is_command:
        task_class = COMMAND_CLASS
        kwargs = _command_kwargs(body, options, fail)
    else:
        task_class = body["task"]
        if not isinstance(task_class, str):
            raise fail("task", f"must be a string pkg.module:Class, got {task_class!r}")
        kwargs = _class_kwargs(task_class, dict(kwargs), options, fail)
    try:
        definition = definitions.definition_from_class(
            name,
            task_class,
            kwargs=kwargs,
            schedule=schedule,
            timeout=options.constructor.get("timeout"),
            jitter=options.constructor.get("jitter"),
            misfire_policy=options.constructor.get("misfire_policy"),
            overlap=options.overlap.policy.value if options.overlap is not None else None,
            max_concurrent=(
                options.overlap.max_concurrent if options.overlap is not None else None
            ),
            pause_after_failures=options.pause_after_failures,
            ping_url=options.ping_url,
            catch_up_window=options.catch_up_window,
            retries=options.retries,
            retry_backoff=options.retry_backoff,
        )
    except InvalidTaskError as exc:
        raise fail("command" if is_command else "kwargs", str(exc)) from None
    return FileTask(definition=definition, paused=paused)


def parse_task_file(text: str, path: Path, *, default_tz: str = "UTC") -> dict[str, FileTask]:
    """Validate the text of a task file: every task, or :class:`TaskFileError`.

    ``default_tz`` is the zone of cron and at schedules that give no ``tz``
    (``scheduler.timezone``).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskFileError(f"{path}: not valid TOML: {exc}") from None
    for key in data:
        if key != "tasks":
            raise TaskFileError(f"{path}: key {key!r}: unknown (tasks go in [tasks.NAME] tables)")
    tasks = data.get("tasks", {})
    if not isinstance(tasks, dict):
        raise TaskFileError(f"{path}: key 'tasks': must be tables [tasks.NAME]")
    result: dict[str, FileTask] = {}
    for name, body in tasks.items():
        if not isinstance(body, dict):
            raise TaskFileError(f"{path}: task {name!r}: must be a table [tasks.{name}]")
        result[name] = _definition(name, body, path, default_tz)
    return result


def read_task_file(path: Path, *, default_tz: str = "UTC") -> dict[str, FileTask] | None:
    """The validated tasks of the file, or None when there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"{path}: cannot be read: {exc}") from None
    return parse_task_file(text, path, default_tz=default_tz)


def _insert_new(conn: Connection, name: str, wanted: FileTask, now: datetime, path: Path) -> None:
    definition = wanted.definition
    schedule = definition.the_schedule
    if isinstance(schedule, AtSchedule) and schedule.at <= now:
        raise TaskFileError(
            f"{path}: task {name!r}: key 'at': time {schedule.at.isoformat()} is in "
            "the past: choose a later time"
        )
    control.insert_task(
        conn,
        control.new_task_values(
            definition,
            now,
            source=TaskSource.FILE,
            paused=wanted.paused,
            started=True,
            pause_reason=PAUSED_REASON if wanted.paused else None,
        ),
    )


def _definition_changes(
    current: control.StoredTask, definition: TaskDefinition, now: datetime
) -> dict[str, Any]:
    """The columns to write for a changed definition; empty when it is the stored one."""
    if current.definition.same_schedule_as(definition):
        return {}
    return control.redefined_values(
        current.definition, definition, next_run_at=current.next_run_at, now=now
    )


def _pause_changes(current: control.StoredTask, wanted: FileTask, now: datetime) -> dict[str, Any]:
    """The columns to write when the file pauses a task, or resumes one that it paused."""
    ours = current.pause_reason in (REMOVED_REASON, PAUSED_REASON)
    if wanted.paused and not current.paused:
        return {"paused": True, "next_run_at": None, "pause_reason": PAUSED_REASON}
    if not wanted.paused and current.paused and ours:
        values: dict[str, Any] = {"paused": False, "pause_reason": None}
        if current.anchor_at is None:
            values |= {
                "anchor_at": now,
                "next_run_at": control.first_run(wanted.definition.the_schedule, now),
            }
        return values
    return {}


def apply_tasks(
    engine: Engine, tasks: dict[str, FileTask], path: Path = Path(TASK_FILE_NAME)
) -> SyncResult:
    """Make the file's tasks in the database match ``tasks``, in one transaction.

    A new one-shot task whose time has passed is refused (:class:`TaskFileError`, nothing
    applied); one that exists already is left as it is (it ran, or is due).
    """
    result = SyncResult()
    now = utcnow()
    with write_transaction(engine) as conn:
        stored = control.stored_tasks(conn)
        for name, wanted in tasks.items():
            current = stored.get(name)
            if current is None:
                _insert_new(conn, name, wanted, now, path)
                result.created.append(name)
                continue
            if current.source != TaskSource.FILE.value:
                result.clashes.append(name)
                continue
            values = _definition_changes(current, wanted.definition, now)
            if values:
                result.updated.append(name)
            pausing = _pause_changes(current, wanted, now)
            if pausing.get("paused") is False:
                result.resumed.append(name)
            if values | pausing:
                control.change_task(conn, name, values | pausing, now)
            if name not in result.updated:
                result.unchanged.append(name)
        for name, current in stored.items():
            if name in tasks or current.source != TaskSource.FILE.value:
                continue
            if current.paused and current.pause_reason == REMOVED_REASON:
                continue
            control.change_task(
                conn,
                name,
                {"paused": True, "next_run_at": None, "pause_reason": REMOVED_REASON},
                now,
            )
            result.removed.append(name)
    return result


def sync_task_file(engine: Engine, path: Path, *, default_tz: str = "UTC") -> SyncResult | None:
    """Read, validate and apply the task file; None when there is no file.

    Raises :class:`TaskFileError` (nothing applied) when the file is not valid.
    """
    tasks = read_task_file(path, default_tz=default_tz)
    if tasks is None:
        return None
    return apply_tasks(engine, tasks, path)
