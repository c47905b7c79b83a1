"""Overdue tasks: the dead man's switch inside nanobot.

A failed run shows itself; a scheduler that stopped dispatching (a frozen leader, a lost lease
nobody took, a saturated loop) shows nothing, because nothing runs. This module finds what
should have happened by now and has not, from the database alone, so that any process (a
standby, ``nanobot status``, a scrape of ``/metrics``) sees it:

- ``not_claimed``: a started task whose next slot is more than its grace in the past and that
  no scheduler claimed. The leader writes ``task_state.next_run_at`` with the outcome of the run
  it claimed (not at the claim), so the slot there may be claimed already, and later ones too
  (a long run, the last runs of a large burst, outcomes written late): then the task's next
  slot is expected at most one interval after the latest slot claimed (for a cron schedule the
  interval is its longest gap), and is overdue a grace after that.
- ``run_too_long``: a run recorded ``running`` (dispatched) for longer than its expected bound
  plus the grace. The bound is the task's timeout if it has one, else ``cron.overrun_intervals``
  times its interval (no bound when that is 0).

The grace of a task is ``cron.overdue_grace_share`` of its interval (a cron task: its longest
gap), and at least ``cron.overdue_grace_min`` seconds. A paused task is never overdue.

:func:`read_overdue` is a pure read with the instant passed in. :class:`OverdueWatch` runs on
the event loop of the service (every node, leader or standby: a frozen leader cannot report
itself) and publishes the changes on the bus: ``task.overdue`` when a task becomes overdue,
``task.overdue_cleared`` when it no longer is. Its database reads run in a thread.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Connection, Engine

from nanobot.bus import MessageBus
from nanobot.config import Config
from nanobot.cron.control import due_before
from nanobot.cron.history import started_before
from nanobot.db import read_transaction
from nanobot.models import error_text, utcnow

log = structlog.get_logger(__name__)

OVERDUE: Final = "task.overdue"
OVERDUE_CLEARED: Final = "task.overdue_cleared"
DEFAULT_GRACE_SHARE: Final = 0.1
DEFAULT_GRACE_MIN: Final = 5.0
# Tasks that become overdue (or stop being) at one check are logged one line each up to this
# many, the rest in one line with their count: a frozen leader with 20,000 tasks is one fact,
# not 20,000 warnings. Every one is still published on the bus.
LOG_EACH_MAX: Final = 20
# A check waits at least this many times its own duration before the next: with 20,000 tasks
# in a late burst each check read 20,000 rows, took a second of a loaded machine and ran every
# second, competing with the burst it was watching. The watch takes a tenth of the time at most;
# a grace is five seconds or more, so a slower check still tells within a few of them.
CHECK_PACE: Final = 9.0


class OverdueKind(enum.StrEnum):
    """Why a task is overdue (logged and published)."""

    NOT_CLAIMED = "not_claimed"  # its slot passed and no scheduler claimed it
    RUN_TOO_LONG = "run_too_long"  # its run has gone past its expected bound


@dataclass(frozen=True, slots=True)
class Grace:
    """How late a slot or a run may be before its task is overdue."""

    share: float = DEFAULT_GRACE_SHARE
    minimum: float = DEFAULT_GRACE_MIN

    def of(self, interval: float) -> float:
        return max(self.minimum, self.share * interval)

    @classmethod
    def from_config(cls, config: Config) -> Grace:
        return cls(
            share=float(config.get("cron.overdue_grace_share", DEFAULT_GRACE_SHARE)),
            minimum=float(config.get("cron.overdue_grace_min", DEFAULT_GRACE_MIN)),
        )


@dataclass(frozen=True, slots=True)
class Overdue:
    """One overdue task: since when it is expected (the slot, or the end of the run's bound),
    and how late it is now (seconds past that instant)."""

    task: str
    kind: OverdueKind
    expected_at: datetime
    late_s: float
    grace_s: float

    def describe(self) -> str:
        if self.kind is OverdueKind.NOT_CLAIMED:
            return (
                f"task {self.task} is overdue: its slot of {self.expected_at.isoformat()} is "
                f"{self.late_s:.0f}s late and no scheduler claimed it"
            )
        return (
            f"task {self.task} is overdue: its run has gone {self.late_s:.0f}s past its "
            f"expected end ({self.expected_at.isoformat()})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "kind": self.kind.value,
            "expected_at": self.expected_at.isoformat(),
            "late_s": round(self.late_s, 3),
            "grace_s": self.grace_s,
        }


def read_overdue(
    conn: Connection,
    *,
    now: datetime,
    grace: Grace,
    overrun_intervals: float,
    include_runs: bool = True,
) -> list[Overdue]:
    """Every overdue task at ``now``, by task name (a task overdue both ways is listed twice).

    ``include_runs=False`` reads the ``tasks`` table only (``not_claimed``), for ``status``,
    which never reads run history; a run past its bound shows there through its overrunning
    component (``cron.overrun_intervals``) as long as its node beats.
    """
    found: list[Overdue] = []
    # Only slots past the smallest grace can be overdue: the database filters the rest.
    horizon = now - timedelta(seconds=grace.minimum)
    for task in due_before(conn, horizon):
        expected = task.next_run_at
        if task.last_claimed is not None:
            if task.interval <= 0:
                continue  # a one-shot's claimed run: only its bound can make it overdue
            expected = task.last_claimed + timedelta(seconds=task.interval)
        allowed = grace.of(task.interval)
        late = (now - expected).total_seconds()
        if late > allowed:
            found.append(Overdue(task.name, OverdueKind.NOT_CLAIMED, expected, late, allowed))
    if not include_runs:
        found.sort(key=lambda o: o.task)
        return found
    for run in started_before(conn, horizon):
        bound = run.timeout or overrun_intervals * run.interval
        if bound <= 0:
            continue
        allowed = grace.of(run.interval)
        expected = run.started_at + timedelta(seconds=bound)
        late = (now - expected).total_seconds()
        if late > allowed:
            found.append(Overdue(run.task, OverdueKind.RUN_TOO_LONG, expected, late, allowed))
    found.sort(key=lambda o: (o.task, o.kind.value))
    return found


def overdue_from_config(
    conn: Connection, config: Config, now: datetime | None = None, *, include_runs: bool = True
) -> list[Overdue]:
    """:func:`read_overdue` with the configured grace and bound."""
    return read_overdue(
        conn,
        now=now or utcnow(),
        grace=Grace.from_config(config),
        overrun_intervals=float(config.get("cron.overrun_intervals", 3.0)),
        include_runs=include_runs,
    )


class OverdueWatch:
    """Publishes ``task.overdue`` and ``task.overdue_cleared`` as tasks become and stop being
    overdue, checking every ``period`` seconds, or less often while a check takes long
    (:data:`CHECK_PACE`) (event loop; reads in a thread)."""

    def __init__(
        self,
        engine: Engine,
        bus: MessageBus,
        config: Config,
        *,
        node: str,
        period: float,
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._config = config
        self._node = node
        self._period = period
        self._current: dict[tuple[str, OverdueKind], Overdue] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="nanobot-overdue"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def next_check_in(self, took: float) -> float:
        """Seconds from the end of a check that took ``took`` seconds to the next check."""
        return max(self._period, CHECK_PACE * took)

    async def _loop(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.check()
            except Exception as exc:
                # The database may be unreachable: other checks say so; try again later.
                log.warning("cron.overdue_check_failed", error=error_text(exc))
            await asyncio.sleep(self.next_check_in(time.monotonic() - began))

    def _read(self) -> list[Overdue]:
        with read_transaction(self._engine) as conn:
            return overdue_from_config(conn, self._config)

    async def check(self) -> list[Overdue]:
        """Read once, publish the changes since the last check; what is overdue now."""
        found = await asyncio.to_thread(self._read)
        now = {(o.task, o.kind): o for o in found}
        new = [item for key, item in now.items() if key not in self._current]
        gone = [item for key, item in self._current.items() if key not in now]
        self._current = now
        for item in new[:LOG_EACH_MAX]:
            log.warning(
                "task.overdue", task=item.task, kind=item.kind.value, late_s=round(item.late_s, 3)
            )
        if len(new) > LOG_EACH_MAX:
            log.warning("task.overdue_more", count=len(new) - LOG_EACH_MAX, overdue=len(now))
        for item in gone[:LOG_EACH_MAX]:
            log.info("task.overdue_cleared", task=item.task, kind=item.kind.value)
        if len(gone) > LOG_EACH_MAX:
            log.info("task.overdue_cleared_more", count=len(gone) - LOG_EACH_MAX, overdue=len(now))
        node = {"node": self._node}
        await self._bus.publish_many(OVERDUE, [item.to_json() | node for item in new])
        await self._bus.publish_many(
            OVERDUE_CLEARED,
            [{"task": item.task, "kind": item.kind.value} | node for item in gone],
        )
        return found
