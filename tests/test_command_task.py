"""A command task in this process (nanobot.cron.command): its arguments checked at
construction, and ``run()`` on real ``sh`` processes. The service's side (output stored with
the run, timeouts, shutdown) is tests/test_usertasks.py."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from nanobot.cron.command import OUTPUT_MAX, CommandTask
from nanobot.exceptions import CommandFailed, InvalidTaskError

WAIT = 10.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"command": "   "}, "command must not be empty"),
        ({"command": "echo 'unclosed"}, "cannot be split into words"),
        ({"command": []}, "a non-empty list of strings"),
        ({"command": ["", "x"]}, "a non-empty list of strings"),
        ({"command": 42}, "a non-empty list of strings"),
        ({"command": "true", "shell": "yes"}, "shell must be true or false"),
        ({"command": "true", "cwd": " "}, "cwd must be a folder"),
        ({"command": "true", "env": {"A": 1}}, "env must be a table of names to strings"),
        ({"command": "true", "env": ["A=1"]}, "env must be a table of names to strings"),
        ({"command": "true", "kill_grace": True}, "kill_grace must be a number of seconds"),
        ({"command": "true", "kill_grace": -1}, "kill_grace must be a number of seconds"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTaskError, match=message):
        CommandTask(60, **kwargs)


def test_the_command_is_split_into_words_unless_run_by_a_shell() -> None:
    assert CommandTask(60, "echo 'a b' c").command == ["echo", "a b", "c"]
    assert CommandTask(60, "echo $HOME | wc", shell=True).command == "echo $HOME | wc"
    assert CommandTask(60, ["echo", "a b"], shell=True).command == "echo 'a b'"
    assert CommandTask(60, "true", cwd="~").cwd == os.path.expanduser("~")


async def test_a_failing_command_raises_with_its_exit_code_and_last_line(tmp_path: Path) -> None:
    """The run fails with the exit code and the last non-empty line of its output; the folder
    and environment it was given are the ones it ran in."""
    task = CommandTask(
        60,
        'echo "in $(pwd) as $WHO"; echo; exit 3',
        shell=True,
        cwd=str(tmp_path),
        env={"WHO": "nanobot"},
    )
    with pytest.raises(CommandFailed) as caught:
        await asyncio.wait_for(task.run(), WAIT)
    assert caught.value.returncode == 3
    assert str(caught.value) == f"exit code 3: in {tmp_path} as nanobot"


async def test_a_command_that_cannot_start_fails_as_127(tmp_path: Path) -> None:
    task = CommandTask(60, [str(tmp_path / "no-such-program")])
    with pytest.raises(CommandFailed, match="exit code 127: cannot start the command") as caught:
        await asyncio.wait_for(task.run(), WAIT)
    assert caught.value.returncode == 127


async def test_a_command_that_succeeds_returns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    await asyncio.wait_for(CommandTask(60, ["sh", "-c", f"echo ok > {out}"]).run(), WAIT)
    assert out.read_text() == "ok\n"


async def test_output_past_the_cap_keeps_its_tail_for_the_last_line() -> None:
    """Several times OUTPUT_MAX of output: the run still reports the very last line."""
    lines = OUTPUT_MAX // 10 * 3
    task = CommandTask(
        60,
        [
            sys.executable,
            "-c",
            f"for i in range({lines}): print(f'line {{i:5}}')\nraise SystemExit(1)",
        ],
    )
    with pytest.raises(CommandFailed) as caught:
        await asyncio.wait_for(task.run(), WAIT)
    assert str(caught.value) == f"exit code 1: line {lines - 1:5}"


async def test_a_cancelled_run_terminates_the_group_then_kills_what_ignores_it(
    tmp_path: Path,
) -> None:
    """Cancelled (a timeout, a shutdown): SIGTERM to the command's process group, SIGKILL after
    kill_grace to what is still there; a child that ignores SIGTERM dies too."""
    pids = tmp_path / "pids"
    script = f"trap '' TERM; sleep 60 & echo $$ $! > {pids}; wait"
    task = CommandTask(60, script, shell=True, kill_grace=0.2)
    with structlog.testing.capture_logs() as logs:
        run = asyncio.create_task(task.run())
        async with asyncio.timeout(WAIT):
            while not (pids.exists() and pids.read_text().strip()):
                await asyncio.sleep(0.02)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, WAIT)
    events = [e["event"] for e in logs]
    assert events[:2] == ["command.terminating", "command.killed"]
    for pid in map(int, pids.read_text().split()):
        try:
            async with asyncio.timeout(WAIT):
                while _alive(pid):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pytest.fail(f"process {pid} of the cancelled command still runs after {WAIT} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
