"""The one exception hierarchy of nanobot.

Every error nanobot raises derives from :class:`NanobotError` and, where a caller would
naturally catch a builtin, from that builtin too (``KeyError`` for an unknown name,
``ValueError`` for a bad value). Messages name the bad value and, where there is one, the way out.
"""

from __future__ import annotations


class NanobotError(Exception):
    """Base of every error raised by nanobot."""


class InvalidDurationError(NanobotError, ValueError):
    """A span of time that is not a positive, finite number of seconds."""


class ConfigError(NanobotError, ValueError):
    """The configuration could not be loaded: a malformed file, an unknown key, a bad value."""


class DatabaseError(NanobotError):
    """The database could not be reached or is not usable by this version of nanobot."""


class SchemaTooNewError(DatabaseError):
    """The database was migrated by a newer nanobot than this one."""


class EngineNotOpenError(DatabaseError, RuntimeError):
    """The scheduler's database was used before it was opened and migrated (``open_engine``)."""


class JobTableChangedError(DatabaseError):
    """The job table lost rows that this node's scheduler holds (a write that was not its own):
    the pass is rolled back and the scheduler reads the table again."""


class TaskError(NanobotError):
    """Base of the scheduler's errors."""


class UnknownTaskError(TaskError, KeyError):
    """No task of that name is registered or stored."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        # KeyError.__str__ would quote the repr of the argument; say it in words instead.
        return f"unknown task {self.name!r}"


class TaskExistsError(TaskError, ValueError):
    """A task of that name is stored already."""

    def __init__(self, name: str) -> None:
        super().__init__(f"task {name!r} exists already: remove it first, or choose another name")
        self.name = name


class InvalidTaskError(TaskError, ValueError):
    """A task definition is invalid: a bad interval, an unimportable class, bad arguments."""


class TaskCodeError(TaskError):
    """A task module could not be imported."""


class TaskFileError(TaskError, ValueError):
    """The task file is malformed: bad TOML, an unknown key, a bad value, a clash of names."""


class CommandFailed(TaskError):
    """A command task's process exited with a code other than 0."""

    def __init__(self, returncode: int, last_line: str) -> None:
        text = f"exit code {returncode}"
        if returncode < 0:
            text = f"killed by signal {-returncode}"
        super().__init__(text + (f": {last_line}" if last_line else ""))
        self.returncode = returncode


class TaskNotStorableError(TaskError, RuntimeError):
    """A task that only this process could build was started while another process schedules.

    Its class lives in ``__main__`` or in a function, or its arguments are not JSON data, so the
    scheduling process cannot run it.
    """


class InvalidScheduleError(InvalidTaskError):
    """A schedule is invalid: a bad cron expression, an unknown time zone, a time in the past."""


class ComponentError(NanobotError):
    """Base of the heartbeat monitor's errors."""


class InvalidComponentError(ComponentError, ValueError):
    """A component registration is invalid, for example a health check that is not callable."""


class NoRunningLoopError(ComponentError, RuntimeError):
    """The heartbeat monitor needs a running event loop and none is running."""


class SessionError(NanobotError):
    """Base of the session store's errors."""


class UnknownSessionError(SessionError, KeyError):
    """No live session has that id: it never existed, was deleted, or has expired."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        # A session id is a secret: a message that may reach a log shows only its start.
        return f"unknown or expired session {self.session_id[:6]!r}..."


class InvalidSessionError(SessionError, ValueError):
    """Bad input to the session store: data that is not a JSON object, a ttl that is not > 0."""


class NotLeaderError(NanobotError):
    """This node does not hold the scheduling lease."""
