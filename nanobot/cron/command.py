"""``CommandTask``: a built-in task that runs a shell command, as cron, Dkron or Cronicle do.

``nanobot cron add backup --command 'pg_dump -f /backups/x.sql app' --interval 86400`` stores
``nanobot.cron.command:CommandTask`` with ``{"command": ...}``; the task file accepts
``command = [...]`` or a string. Options: ``cwd``, ``env`` (added to the service's environment),
``shell`` (run through ``/bin/sh -c``; otherwise a string is split into argv with
:func:`shlex.split` and run without a shell), ``kill_grace``.

A run:

- starts the command in a session and process group of its own, standard input from
  ``/dev/null``, standard output and error into one pipe;
- reads that pipe in chunks and keeps only the last :data:`OUTPUT_MAX` bytes, so ten megabytes
  of output cost no more memory than 64 KiB;
- exit code 0 is success; any other raises :class:`~nanobot.exceptions.CommandFailed` (the run is
  recorded ``error`` with the code and the last line of output);
- when cancelled (its timeout, ``cron remove``, a shutdown), sends SIGTERM to the whole group,
  waits up to ``kill_grace`` seconds for it to go (and its output to end), then sends SIGKILL to
  the group: a child that traps SIGTERM is gone by timeout + grace;
- stores the tail of the output with the run (``task_runs.output``, ``cron history --output``).

The command runs as the service's user, with its environment and its permissions.

Thread ownership: a run lives on the service's event loop; the output is written to the
database from a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Mapping
from typing import Any, Final

import structlog

from nanobot.config import get_config
from nanobot.cron import history
from nanobot.cron.task import CronTask
from nanobot.db import get_engine
from nanobot.exceptions import CommandFailed, InvalidTaskError
from nanobot.models import MisfirePolicy

log = structlog.get_logger(__name__)

# The tail of a command's output kept with its run.
OUTPUT_MAX: Final = 64 * 1024
_CHUNK: Final = 64 * 1024
_LAST_LINE_MAX: Final = 300
DEFAULT_KILL_GRACE: Final = 5.0


def _check_command(command: Any, shell: bool) -> list[str] | str:
    if isinstance(command, str):
        if not command.strip():
            raise InvalidTaskError("command must not be empty")
        if shell:
            return command
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise InvalidTaskError(
                f"command {command!r} cannot be split into words: {exc}"
            ) from None
        if not argv:
            raise InvalidTaskError("command must not be empty")
        return argv
    if (
        isinstance(command, list)
        and command
        and all(isinstance(word, str) for word in command)
        and command[0]
    ):
        return shlex.join(command) if shell else list(command)
    raise InvalidTaskError(
        f"command must be a string or a non-empty list of strings, got {command!r}"
    )


def _check_env(env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidTaskError(f"env must be a table of names to strings, got {env!r}")
    return dict(env)


class _Tail:
    """The last ``limit`` bytes of a stream, in a buffer that never grows past twice that."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.buffer += chunk
        if len(self.buffer) > 2 * self.limit:
            del self.buffer[: len(self.buffer) - self.limit]

    def text(self) -> str:
        data = bytes(self.buffer[-self.limit :])
        text = data.decode("utf-8", errors="replace")
        if self.total > len(data):
            return f"[... {self.total - len(data)} earlier bytes not kept]\n" + text
        return text

    def last_line(self) -> str:
        lines = [line.strip() for line in bytes(self.buffer[-4096:]).splitlines()]
        for line in reversed(lines):
            if line:
                text = line.decode("utf-8", errors="replace")
                return text[:_LAST_LINE_MAX]
        return ""


class CommandTask(CronTask):
    """Runs ``command`` every ``interval`` seconds; see the module's docstring."""

    def __init__(
        self,
        interval: float = 60,
        command: str | list[str] = "",
        *,
        shell: bool = False,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        kill_grace: float = DEFAULT_KILL_GRACE,
        timeout: float | None = None,
        jitter: float | None = None,
        misfire_policy: MisfirePolicy | str | None = None,
    ) -> None:
        super().__init__(interval, timeout=timeout, jitter=jitter, misfire_policy=misfire_policy)
        if not isinstance(shell, bool):
            raise InvalidTaskError(f"shell must be true or false, got {shell!r}")
        self.shell = shell
        self.command = _check_command(command, shell)
        if cwd is not None and (not isinstance(cwd, str) or not cwd.strip()):
            raise InvalidTaskError(f"cwd must be a folder, got {cwd!r}")
        self.cwd = os.path.expanduser(cwd) if cwd else None
        self.env = _check_env(env)
        if isinstance(kill_grace, bool) or not isinstance(kill_grace, int | float):
            raise InvalidTaskError(f"kill_grace must be a number of seconds, got {kill_grace!r}")
        if kill_grace < 0:
            raise InvalidTaskError(f"kill_grace must be a number of seconds, got {kill_grace!r}")
        self.kill_grace = float(kill_grace)

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {**os.environ, **self.env} if self.env else None
        common: dict[str, Any] = {
            "stdin": asyncio.subprocess.DEVNULL,
            "stdout": asyncio.subprocess.PIPE,
            "stderr": asyncio.subprocess.STDOUT,
            "cwd": self.cwd,
            "env": env,
            # A group of its own: a timeout kills the command and everything it started.
            "start_new_session": True,
        }
        if isinstance(self.command, str):
            return await asyncio.create_subprocess_shell(self.command, **common)
        return await asyncio.create_subprocess_exec(*self.command, **common)

    async def run(self) -> None:
        try:
            proc = await self._spawn()
        except OSError as exc:
            raise CommandFailed(127, f"cannot start the command: {exc}") from None
        tail = _Tail(OUTPUT_MAX)
        reader = asyncio.get_running_loop().create_task(self._read(proc, tail))
        try:
            # Shielded: a cancellation must not stop the reading, or a child blocked on a full
            # pipe would never see its SIGTERM through.
            await asyncio.shield(reader)
            returncode = await proc.wait()
        except asyncio.CancelledError:
            await self._kill(proc, reader)
            await self._store_output(tail)
            raise
        await self._store_output(tail)
        if returncode != 0:
            raise CommandFailed(returncode, tail.last_line())

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process, tail: _Tail) -> None:
        stream = proc.stdout
        assert stream is not None
        while chunk := await stream.read(_CHUNK):
            tail.add(chunk)

    async def _kill(self, proc: asyncio.subprocess.Process, reader: asyncio.Task[None]) -> None:
        """SIGTERM to the group; after ``kill_grace`` (or at once when it is gone), SIGKILL."""
        pgid = proc.pid  # the leader of its own session: the group's id is its pid
        log.info("command.terminating", pid=proc.pid, grace_s=self.kill_grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        waiter = asyncio.get_running_loop().create_task(proc.wait())
        # Gone when the leader has exited and nothing in the group holds the output open.
        _, pending = await asyncio.wait({reader, waiter}, timeout=self.kill_grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if pending:
            log.warning("command.killed", pid=proc.pid, signal="SIGKILL")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await asyncio.gather(reader, waiter)
        for task in (reader, waiter):
            if not task.done():
                task.cancel()

    async def _store_output(self, tail: _Tail) -> None:
        if not tail.total:
            return
        run_id = structlog.contextvars.get_contextvars().get("run_id")
        if not isinstance(run_id, int):
            return  # run outside the scheduler (a test calling run() directly)
        text = tail.text()
        # Shielded: the output of a cancelled run is worth keeping too.
        with contextlib.suppress(Exception):
            await asyncio.shield(asyncio.to_thread(_write_output, run_id, text))


def _write_output(run_id: int, text: str) -> None:
    history.write_output(get_engine(get_config()), run_id, text)
