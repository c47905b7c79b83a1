"""``LedgerTask``: a task whose every run writes what it did to a ledger file.

Importable by the services of the fault suite as ``faults.ledger_task:LedgerTask`` (tests/ is
on their PYTHONPATH). A run appends one JSON line when it starts and one when it ends
(``end``, ``cancelled`` or ``error``), each with the task, the run id (the ``task_runs`` row
that claimed the slot), the process id and the time; a process that dies mid-run leaves only
the start. Each line is a single ``write`` on a file opened with O_APPEND, so lines of
several processes never interleave.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import structlog

from nanobot.cron import CronTask


def _write(path: str, record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class LedgerTask(CronTask):
    """Writes ``start``, works ``seconds`` (asleep), writes ``end`` (or how it ended)."""

    def __init__(self, interval: float = 1, path: str = "ledger.jsonl", seconds: float = 0) -> None:
        super().__init__(interval)
        self.path = path
        self.seconds = seconds

    async def run(self) -> None:
        context = structlog.contextvars.get_contextvars()
        base = {
            "task": context.get("task"),
            "run_id": context.get("run_id"),
            "pid": os.getpid(),
            "start": time.time(),
        }
        _write(self.path, base | {"event": "start", "at": base["start"]})
        try:
            if self.seconds > 0:
                await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            _write(self.path, base | {"event": "cancelled", "at": time.time()})
            raise
        except BaseException:
            _write(self.path, base | {"event": "error", "at": time.time()})
            raise
        _write(self.path, base | {"event": "end", "at": time.time()})
