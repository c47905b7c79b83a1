"""Processes the service figures start: the service itself, its baselines and a prober.

- :class:`ServiceProcess`: ``python -m nanobot`` at default settings, as an operator runs it,
  on a temporary ``NANOBOT_HOME`` (SQLite) or a PostgreSQL schema of its own. Only three things
  differ from a bare ``python -m nanobot``: ``NANOBOT_HOME``, the HTTP port (a free one) and,
  for PostgreSQL, ``database.url``. Its standard error goes to a file, as a process manager's
  journal would take it; every other ``NANOBOT_*`` variable of the benchmark's own environment
  is removed.
- :class:`ApsProcess`: APScheduler 3's ``AsyncIOScheduler`` in a process of its own
  (:mod:`bench.aps_process`), memory store or stock ``SQLAlchemyJobStore``.
- :class:`Prober`: another process asking ``/healthz`` back to back (:mod:`bench.probe`).

Task runs in these processes append ``time.time()`` to a file as their first act
(:class:`bench.tasks.StampFile`, :func:`bench.tasks.stamp_file`); the figures read it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

from bench.common import REPO, compile_bytecode

PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any NANOBOT_* setting, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOBOT_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def http_get(port: int, path: str, timeout: float = 5.0) -> int | None:
    """The status code of GET ``path`` on 127.0.0.1:``port``; None if nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


# --- PostgreSQL --------------------------------------------------------------------------------


def pg_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards; yields nanobot's URL for it."""
    schema = f"nb_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def admin_engine() -> Engine:
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def nanobot_db(url: str) -> Engine:
    """nanobot's own engine on ``url``, migrated (what the service's first start does)."""
    from nanobot.db import create_db_engine, upgrade_database

    engine = create_db_engine(url)
    upgrade_database(engine)
    return engine


def stock_engine(url: str) -> Engine:
    """The engine a user of the stock SQLAlchemyJobStore would give it, configured as nanobot
    configures its own: on SQLite, WAL and ``synchronous=NORMAL``."""
    engine = create_engine(url)
    if url.startswith("sqlite"):

        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        event.listen(engine, "connect", _pragmas)
    return engine


# --- processes ---------------------------------------------------------------------------------


class _Process:
    proc: subprocess.Popen[bytes] | None = None
    started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait (SIGKILL after ``timeout``); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> _Process:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ServiceProcess(_Process):
    """``python -m nanobot`` on ``home`` (and ``url``, if given), at default settings."""

    def __init__(self, home: Path, url: str | None = None, **settings: str) -> None:
        self.home = home
        self.url = url
        self.port = free_port()
        self.stderr_path = home / f"service-{self.port}.stderr"
        env = {"NANOBOT_HOME": str(home), "NANOBOT_HTTP__PORT": str(self.port)}
        if url is not None:
            env["NANOBOT_DATABASE__URL"] = url
        env.update(settings)
        self.env = child_env(**env)

    def start(self) -> ServiceProcess:
        compile_bytecode()  # as installed: see its docstring
        self.home.mkdir(parents=True, exist_ok=True)
        stderr = self.stderr_path.open("ab")
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanobot"],
            cwd=self.home,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        stderr.close()
        return self

    def wait_status(self, path: str, status: int = 200, within: float = 120.0) -> float:
        """Poll ``path`` every 20 ms until it answers ``status``; when it did (epoch).

        One request at a time, each given 15 s: a shorter client timeout would leave the
        service's reads (``/readyz`` reads the database) piling up behind a slow start.
        """
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"the service exited ({self.proc.returncode}); its standard error ends:\n"
                    + self.stderr_tail()
                )
            if http_get(self.port, path, timeout=15.0) == status:
                return time.time()
            time.sleep(0.02)
        raise RuntimeError(
            f"{path} did not answer {status} within {within} s; the service's standard error "
            "ends:\n" + self.stderr_tail()
        )

    def stderr_tail(self, lines: int = 10) -> str:
        """The last lines the service wrote to standard error (its home is temporary: a
        failure must carry them)."""
        if not self.stderr_path.exists():
            return "(nothing)"
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    def log_lines(self) -> int:
        """Lines the service wrote to standard error and to its log file."""
        lines = 0
        for path in (self.stderr_path, self.home / "logs" / "nanobot.log"):
            if path.exists():
                with path.open("rb") as f:
                    lines += sum(1 for _ in f)
        return lines


class ApsProcess(_Process):
    """APScheduler 3 in a process of its own; see :mod:`bench.aps_process` for ``spec``."""

    def __init__(self, home: Path, spec: dict[str, Any]) -> None:
        self.home = home
        self.spec = dict(spec)
        self.ready_path = home / f"aps-{uuid.uuid4().hex[:8]}.ready"
        self.spec["ready"] = str(self.ready_path)

    def start(self) -> ApsProcess:
        compile_bytecode()
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.aps_process", json.dumps(self.spec)],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=(self.home / "aps.stderr").open("ab"),
        )
        return self

    def wait_ready(self, within: float = 120.0) -> float:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.ready_path.exists() and self.ready_path.read_text():
                return float(self.ready_path.read_text())
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"APScheduler process exited ({self.proc.returncode})")
            time.sleep(0.01)
        raise RuntimeError("APScheduler process not ready in time")


class Prober(_Process):
    """Asks ``/healthz`` back to back for ``duration`` seconds from another process."""

    def __init__(self, port: int, out: Path, duration: float) -> None:
        self.port = port
        self.out = out
        self.duration = duration

    def start(self) -> Prober:
        self.started_at = time.time()
        args = [str(self.port), str(self.out), str(self.duration)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.probe", *args],
            cwd=REPO,
            env=child_env(),
        )
        return self

    def samples(self, timeout: float = 120.0) -> list[tuple[float, float, int]]:
        """``(sent_at, answer_s, status)`` of every probe, once the prober ended."""
        assert self.proc is not None
        self.proc.wait(timeout)
        rows = []
        for line in self.out.read_text().splitlines():
            sent, took, status = line.split()
            rows.append((float(sent), float(took), int(status)))
        return rows


def aps_store(url: str, jobs: Sequence[tuple[str, float, float, tuple[Any, ...]]]) -> None:
    """Store APScheduler jobs in a stock SQLAlchemyJobStore table at ``url``, in one transaction.

    ``jobs`` holds ``(id, interval, anchor_epoch, args)`` for :func:`bench.tasks.stamp_file`;
    each row is what ``SQLAlchemyJobStore.add_job`` writes
    (see :func:`bench.common.aps_store_jobs`).
    """
    import pickle
    from datetime import UTC, datetime

    from apscheduler.job import Job
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger
    from apscheduler.util import datetime_to_utc_timestamp

    from bench.tasks import stamp_file

    maker = BackgroundScheduler(
        job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        timezone=UTC,
    )
    rows = []
    triggers: dict[tuple[float, float], IntervalTrigger] = {}
    for job_id, interval, anchor, args in jobs:
        trigger = triggers.get((interval, anchor))
        if trigger is None:
            trigger = triggers[(interval, anchor)] = IntervalTrigger(
                seconds=interval, start_date=datetime.fromtimestamp(anchor, UTC), timezone=UTC
            )
        job = Job(
            maker,
            func=stamp_file,
            trigger=trigger,
            args=args,
            kwargs={},
            id=job_id,
            name=job_id,
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
            next_run_time=trigger.start_date,
            executor="default",
        )
        rows.append(
            {
                "id": job_id,
                "next_run_time": datetime_to_utc_timestamp(job.next_run_time),
                "job_state": pickle.dumps(job.__getstate__(), pickle.HIGHEST_PROTOCOL),
            }
        )
    engine = stock_engine(url)
    store = SQLAlchemyJobStore(engine=engine)
    store.jobs_t.create(engine, checkfirst=True)
    with engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(store.jobs_t.insert(), rows[start : start + 5000])
    engine.dispose()
