"""What every figure shares: result rows, the environment, the loop-held monitor, stores.

Each figure module has ``run(quick: bool) -> Result``. :mod:`bench.__main__` runs each figure in
its own child process (``python -m bench --child NAME``), so that one figure's threads, caches
and heap never bias the next one's numbers, and collects the rows into one table.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import functools
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine, create_engine, event, insert

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def compile_bytecode() -> None:
    """Write the bytecode of nanobot's and the benchmark's modules, as an installed package has it.

    ``pip install`` compiles a package's modules as it installs them, and Python writes the
    bytecode of any other module the first time it imports it, unless PYTHONDONTWRITEBYTECODE
    is set, as some shells and containers do. With it set, every start of the service compiled
    nanobot's modules from source again: 0.3-0.5 s of the start-up figure on a 2-core machine,
    which no installed service pays. Files already compiled are left as they are (a few ms).
    """
    for package in ("nanobot", "bench"):
        compileall.compile_dir(REPO / package, quiet=1)


# --- results ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure beside its baseline measured in the same run."""

    figure: str
    measure: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    met: bool | None = None  # None: informational, no target

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value


@dataclass
class Result:
    figure: str
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # markdown blocks: plans, profiles, caveats

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(self.figure, *args, **kwargs)
        self.rows.append(row)
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "settings": self.settings,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        return cls(
            figure=data["figure"],
            settings=data["settings"],
            rows=[Row(**r) for r in data["rows"]],
            notes=data["notes"],
        )


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        if abs(value) < 1:
            return f"{value * 1000:.1f} ms"
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.3g} ms"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "%":
        return f"{value:+.1f} %"
    if float(value).is_integer() and abs(value) < 1e12:
        return f"{int(value)}{(' ' + unit) if unit else ''}"
    return f"{value:.4g}{(' ' + unit) if unit else ''}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3g}x" if ratio < 100 else f"{ratio:.0f}x"


def verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: ""}[met]


HEADER = ("figure", "measure", "value", "baseline (same run)", "ratio", "target", "")


def table_cells(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    cells: list[tuple[str, ...]] = []
    for r in rows:
        base = f"{r.baseline}: {fmt(r.baseline_value, r.unit)}" if r.baseline else ""
        cells.append(
            (
                r.figure,
                r.measure,
                fmt(r.value, r.unit),
                base,
                fmt_ratio(r.ratio) if r.baseline else "",
                r.target,
                verdict(r.met),
            )
        )
    return cells


def text_table(rows: Sequence[Row]) -> str:
    cells = [HEADER, *table_cells(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(s.ljust(w) for s, w in zip(c, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER[:-1]) + " | met |", "|" + " --- |" * len(HEADER)]
    for c in table_cells(rows):
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in c) + " |")
    return "\n".join(lines)


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    k = (len(data) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# --- the environment -------------------------------------------------------------------------


def quiet_logging(log_file: Path) -> None:
    """nanobot's events at WARNING and above go to a file, nothing reaches the console.

    structlog's filtering logger drops lower levels without formatting them, so logging costs
    next to nothing here (a service at the default level INFO pays for one line per run).
    """
    handle = log_file.open("a", encoding="utf-8")  # open as long as the process
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=handle),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(handle)]
    root.setLevel(logging.WARNING)


@contextlib.contextmanager
def bench_home(name: str) -> Iterator[Path]:
    """A fresh NANOBOT_HOME for one figure: fresh SQLite files, logging off the console."""
    keep = os.environ.get("BENCH_KEEP_TMP")
    tmp = Path(tempfile.mkdtemp(prefix=f"nanobot-bench-{name}-"))
    os.environ["NANOBOT_HOME"] = str(tmp)
    os.environ["NANOBOT_LOGGING__LEVEL"] = "warning"
    os.environ.pop("NANOBOT_DATABASE__URL", None)
    from nanobot.config import reset_config

    reset_config()
    quiet_logging(tmp / "bench.log")
    try:
        yield tmp
    finally:
        from nanobot.db import dispose_engines

        dispose_engines()
        if not keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def nanobot_engine(path: Path) -> Engine:
    """nanobot's own engine on a fresh SQLite file (WAL, as nanobot configures it), migrated."""
    from nanobot.db import create_db_engine, upgrade_database

    engine = create_db_engine(f"sqlite:///{path}")
    upgrade_database(engine)
    return engine


def stock_engine(path: Path, *, wal: bool) -> Engine:
    """A plain SQLAlchemy engine as a user of APScheduler's stock SQLAlchemyJobStore has one:
    SQLite's default rollback journal, or WAL set by a connect event."""
    engine = create_engine(f"sqlite:///{path}")
    if wal:

        def _wal(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        event.listen(engine, "connect", _wal)
    return engine


def epoch_to_dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def insert_stored_tasks(
    engine: Engine,
    names: Sequence[str],
    *,
    task_class: str,
    interval: float,
    kwargs_of: Any,
    anchor_of: Any,
) -> None:
    """Store tasks as ``nanobot cron add`` (``control.add_task``) stores them, in one transaction.

    The rows are the ones ``control.add_task`` writes (started, version 1), except that its first
    slot (``anchor_at`` = ``next_run_at``) is the instant given instead of "now": that is how
    the benchmarks make many tasks due at one chosen instant. One ``executemany`` instead of N
    ``add_task`` calls only makes the setup quick; the scheduler cannot tell the difference.
    """
    from nanobot.db import write_transaction
    from nanobot.models import MisfirePolicy, Task, TaskStateRecord, utcnow

    now = utcnow()
    values = []
    states = []
    for i, name in enumerate(names):
        anchor = anchor_of(i)
        values.append(
            {
                "name": name,
                "task_class": task_class,
                "interval_s": float(interval),
                "kwargs": kwargs_of(i),
                "timeout_s": None,
                "jitter_s": None,
                "misfire_policy": MisfirePolicy.CATCH_UP_ONCE.value,
                "paused": False,
                "anchor_at": anchor,
                "created_at": now,
                "updated_at": now,
                "version": 1,
            }
        )
        states.append({"task_name": name, "next_run_at": anchor, "consecutive_failures": 0})
    with write_transaction(engine) as conn:
        for start in range(0, len(values), 5000):
            conn.execute(insert(Task), values[start : start + 5000])
            conn.execute(insert(TaskStateRecord), states[start : start + 5000])


# --- the event loop --------------------------------------------------------------------------


class LoopMonitor:
    """How long the event loop was held in one go, seen from a high-frequency ticker task.

    A task sleeps ``period`` seconds again and again; each time it wakes it records how much
    later than asked it woke. That lateness is the time the loop spent on something else
    without yielding (a callback, a synchronous database call, another thread holding the GIL),
    plus the loop's own overhead (well under a millisecond here).
    """

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.max_held = 0.0
        self.max_at = 0.0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.period
            await asyncio.sleep(self.period)
            late = loop.time() - asked
            self.samples += 1
            if late > self.max_held:
                self.max_held = late
                self.max_at = time.time()

    def start(self) -> LoopMonitor:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def reset(self) -> None:
        self.max_held = 0.0
        self.samples = 0

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.max_held


async def wait_for(predicate: Any, within: float, step: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``within`` seconds passed (benchmark plumbing only)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


def rss_mb() -> float:
    """Resident memory of this process (VmRSS of /proc/self/status), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def machine() -> dict[str, str]:
    import sqlite3
    from importlib.metadata import version

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = "?"
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    import subprocess

    head = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "nanobot commit": head or "?",
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": version("sqlalchemy"),
        "apscheduler": version("apscheduler"),
        "nanobot": version("nanobot"),
        "load average at start": load,
    }


# --- schedulers ------------------------------------------------------------------------------


def nanobot_manager(engine: Engine, *, poll_interval: float = 1.0) -> Any:
    """A CronManager on ``engine`` with its own (unstarted) heartbeat monitor and bus, so that
    nothing touches the process-wide defaults."""
    from nanobot.bus import MessageBus
    from nanobot.cron import CronManager
    from nanobot.heartbeat import HeartbeatMonitor

    bus = MessageBus()
    monitor = HeartbeatMonitor(bus, 30, engine=engine, node="bench")
    return CronManager(engine, node="bench", poll_interval=poll_interval, bus=bus, monitor=monitor)


def aps_scheduler(store: str, path: Path | None = None) -> Any:
    """APScheduler's own AsyncIOScheduler: ``memory``, or the stock SQLAlchemyJobStore on a
    SQLite file with the default journal (``sqlite``) or WAL (``sqlite-wal``).

    Jobs never misfire (``misfire_grace_time=None``) and coalesce, as nanobot's do.
    """
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    if store == "memory":
        jobstore: Any = MemoryJobStore()
    else:
        assert path is not None
        jobstore = SQLAlchemyJobStore(engine=stock_engine(path, wal=store == "sqlite-wal"))
    return AsyncIOScheduler(
        jobstores={"default": jobstore},
        job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        timezone=UTC,
    )


def aps_store_jobs(
    path: Path,
    *,
    wal: bool,
    jobs: Sequence[tuple[str, Any, tuple[Any, ...]]],
    func: str = "bench.tasks:stamp",
) -> None:
    """Put jobs in a stock SQLAlchemyJobStore table in one transaction.

    Each row is what ``SQLAlchemyJobStore.add_job`` writes (id, next run as a UTC timestamp,
    the pickled ``Job.__getstate__()``), built by a paused scheduler on a memory store; one
    transaction instead of one per job only makes the setup quick. ``jobs`` holds
    ``(id, trigger, args)``; ``func`` the job's function (default :func:`bench.tasks.stamp`).
    """
    import pickle

    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.util import datetime_to_utc_timestamp

    maker = BackgroundScheduler(
        jobstores={"default": MemoryJobStore()},
        job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        timezone=UTC,
    )
    maker.start(paused=True)
    try:
        for job_id, trigger, args in jobs:
            maker.add_job(func, trigger=trigger, args=args, id=job_id, name=job_id)
        rows = [
            {
                "id": job.id,
                "next_run_time": datetime_to_utc_timestamp(job.next_run_time),
                "job_state": pickle.dumps(job.__getstate__(), pickle.HIGHEST_PROTOCOL),
            }
            for job in maker.get_jobs()
        ]
    finally:
        maker.shutdown(wait=False)
    engine = stock_engine(path, wal=wal)
    store = SQLAlchemyJobStore(engine=engine)
    store.jobs_t.create(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(store.jobs_t.insert(), rows)
    engine.dispose()
