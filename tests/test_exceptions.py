"""The exception hierarchy: one base, the builtin a caller would catch, messages in words."""

from __future__ import annotations

import pytest

from nanobot.exceptions import (
    CommandFailed,
    NanobotError,
    TaskError,
    TaskExistsError,
    UnknownSessionError,
    UnknownTaskError,
)


def test_unknown_task_is_a_key_error_said_in_words() -> None:
    """Caught as KeyError or NanobotError; its message names the task without KeyError's
    quoting of the argument's repr."""
    with pytest.raises(KeyError) as caught:
        raise UnknownTaskError("nightly")
    error = caught.value
    assert isinstance(error, NanobotError)
    assert isinstance(error, UnknownTaskError)
    assert str(error) == "unknown task 'nightly'"
    assert error.name == "nightly"


def test_task_exists_says_the_way_out() -> None:
    error = TaskExistsError("nightly")
    assert isinstance(error, ValueError)
    assert isinstance(error, TaskError)
    assert str(error) == "task 'nightly' exists already: remove it first, or choose another name"


@pytest.mark.parametrize(
    ("code", "last_line", "message"),
    [
        (3, "disk full", "exit code 3: disk full"),
        (1, "", "exit code 1"),
        (-9, "", "killed by signal 9"),
        (-15, "partial output", "killed by signal 15: partial output"),
    ],
)
def test_command_failed_names_the_exit_code_or_the_signal(
    code: int, last_line: str, message: str
) -> None:
    """A negative return code is the signal that killed the command (subprocess's convention)."""
    error = CommandFailed(code, last_line)
    assert str(error) == message
    assert error.returncode == code


def test_unknown_session_shows_only_the_start_of_the_secret_id() -> None:
    """A session id is a secret: the message, which may reach a log, holds its first 6 characters
    only."""
    secret = "s3cr3t-0123456789abcdef"
    error = UnknownSessionError(secret)
    assert str(error) == "unknown or expired session 's3cr3t'..."
    assert secret not in str(error)
    assert error.session_id == secret
    assert isinstance(error, KeyError)
