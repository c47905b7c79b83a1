"""The fault harness: real services, real databases, and the ways operators break them.

Used by the fault suite (``tests/faults/``) and by the end-to-end tests of ``tests/`` (which
import their service helpers from here):

- :class:`ServiceProcess`: one ``python -m nanobot`` subprocess on a given NANOBOT_HOME and
  database, with the suite's fast settings (1 s heartbeat, 0.2 s poll, 3 s lease, JSON logs);
  ``start`` again after a stop or a kill restarts the same node; ``freeze``/``thaw`` send
  SIGSTOP/SIGCONT; ``events`` reads its JSON log lines.
- :class:`Cluster`: several nodes on one database, each with a home of its own.
- :class:`TcpProxy`: a TCP proxy on 127.0.0.1 in front of PostgreSQL that can cut every
  connection (and refuse new ones), or hold them silent, and then let traffic through again.
- :func:`tmpfs`: a small tmpfs mount for a full disk (skips the test, with the reason, where it
  cannot be mounted).
- :class:`Ledger` with the task :class:`faults.ledger_task.LedgerTask`: what each run really did,
  written by the run itself (pid, task, run id, start, end), checked by :func:`check_ledger`
  against ``task_runs``; :class:`OutcomeWatch` samples ``task_runs`` while a scenario runs to
  catch a recorded outcome that is later overwritten.

Every wait has a deadline: :func:`wait_for` fails the test with what it was waiting for.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine
from sqlalchemy import select as sql_select
from sqlalchemy.engine import make_url

from nanobot.cli import cli
from nanobot.models import Task, TaskRun

FAULTS = Path(__file__).parent
TESTS = FAULTS.parent
REPO = TESTS.parent
T = TypeVar("T")

# The suite's fast settings: a 1 s heartbeat, a 0.2 s scheduler poll, a 3 s lease (a standby
# polls every 1 s), JSON logs that the tests read back.
BASE_ENV = {
    "NANOBOT_HEARTBEAT__INTERVAL": "1",
    "NANOBOT_CRON__POLL_INTERVAL": "0.2",
    "NANOBOT_SERVICE__LEASE_TTL": "3",
    "NANOBOT_LOGGING__FORMAT": "json",
}
SLOT_TOLERANCE = timedelta(milliseconds=2)


class SafetyViolation(AssertionError):
    """A promise of the service broken: two leaders at once, a slot run or recorded twice, runs
    of one task overlapping across processes, a slot unaccounted for, an outcome overwritten.

    CI reruns a scenario that failed (`.ci/run`: its time bounds are measured on real processes
    on a 2-core machine), but never one that raised this (``--rerun-except SafetyViolation``): a
    double run that shows once in three tries is a double run, not a slow machine. A missed time
    bound stays a plain AssertionError.
    """


def violated(ok: object, message: str) -> None:
    """Raise :class:`SafetyViolation` with ``message`` unless ``ok``."""
    if not ok:
        raise SafetyViolation(message)


# --- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 10.0) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def http(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_cli(*args: str) -> tuple[int, Any]:
    """Run a command in this process; its exit code and its stdout parsed as JSON if it is."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    try:
        return result.exit_code, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result.exit_code, result.stdout + result.stderr


def run_nanobot(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m nanobot ARGS`` in a subprocess (exit codes and stderr as an operator sees
    them); ``env`` is added to this process's environment."""
    full = dict(os.environ) | (env or {})
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    return subprocess.run(
        [sys.executable, "-m", "nanobot", *args],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def log_events(path: Path, *names: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``path`` whose event is one of ``names`` (all if none), in order;
    each with ``at``, its timestamp in seconds since the epoch."""
    events: list[dict[str, Any]] = []
    if not path.exists():
        return events
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not names or event.get("event") in names:
            event["at"] = datetime.fromisoformat(event["timestamp"]).timestamp()
            events.append(event)
    return events


def report(what: str, seconds: float) -> None:
    """Print a measured figure (shown with ``-s``; docs/faults.md quotes them)."""
    sys.stdout.write(f"\nMEASURED {what}: {seconds:.2f}s\n")


def lines(path: Path, word: str | None = None) -> list[list[str]]:
    """The whitespace-split lines of ``path`` (those whose first word is ``word``)."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if word is None or r[0] == word]


def add_task(name: str, task: str, interval: float, **kwargs: Any) -> None:
    """``nanobot cron add NAME --task TASK --interval INTERVAL --kwargs KWARGS``."""
    code, out = run_cli(
        "cron", "add", name, "--task", task, "--interval", str(interval),
        "--kwargs", json.dumps(kwargs), "--json",
    )  # fmt: skip
    assert code == 0, out


def add_append(name: str, path: Path, interval: float) -> None:
    """A task that appends ``run <time> <pid>`` to ``path`` at every run."""
    add_task(name, "e2e_tasks:AppendLine", interval, path=str(path))


def runs_file(path: Path) -> list[tuple[float, int]]:
    """``(time, pid)`` of every run an AppendLine task recorded in ``path``."""
    return [(float(r[1]), int(r[2])) for r in lines(path, "run") if len(r) == 3]


# --- the service as a process -------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """One service; ``start`` again after a stop or a kill restarts the same node (same home).

    ``env`` is added to :data:`BASE_ENV` and this process's environment; ``home`` becomes
    NANOBOT_HOME and a free port the HTTP port (unless ``env`` names one).
    """

    home: Path
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    label: str = "service"
    base_env: dict[str, str] = field(default_factory=lambda: dict(BASE_ENV))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0
    name: str | None = None
    _log: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def full_env(self) -> dict[str, str]:
        full = dict(os.environ) | self.base_env | self.env
        full["NANOBOT_HOME"] = str(self.home)
        full.setdefault("NANOBOT_HTTP__PORT", str(self.port))
        full["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
        return full

    def start(self) -> ServiceProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.close_log()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logs / f"{self.label}-{self.starts}.log"
        self.starts += 1
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanobot"],
            env=self.full_env(),
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> dict[str, Any] | None:
        """The /healthz document when it answers 200, else None."""
        if not self.alive():
            return None
        try:
            status, body = http(self.base + "/healthz", timeout=2)
        except OSError:
            return None
        if status != 200:
            return None
        data: dict[str, Any] = json.loads(body)
        self.name = data["node"]
        return data

    def get(self, path: str) -> tuple[int, Any]:
        """GET ``path`` of the endpoint: the status code and the body as JSON (or bytes)."""
        status, body = http(self.base + path)
        try:
            return status, json.loads(body)
        except json.JSONDecodeError:
            return status, body

    def role(self) -> str | None:
        health = self.health()
        return None if health is None else str(health["role"])

    def wait_up(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until /healthz answers as leader or standby; fail at once if the process exits."""

        def check() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.label} exited {self.proc.returncode}:\n{self.output()}"
                )
            health = self.health()
            return health if health and health["role"] in ("leader", "standby") else None

        return wait_for(f"{self.label} up", check, timeout)

    wait_healthy = wait_up

    def wait_role(self, role: str, timeout: float = 10.0) -> None:
        wait_for(f"{self.label} {role}", lambda: self.role() == role, timeout)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> float:
        """SIGKILL (a frozen process dies too); the time it was sent."""
        assert self.proc is not None
        at = time.time()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return at

    def send(self, sig: int) -> None:
        """Send ``sig`` without waiting for its effect."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (SIGTERM: a clean stop) and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def freeze(self) -> float:
        """SIGSTOP: the process stops where it is, with its connections open. The time sent."""
        assert self.proc is not None
        at = time.time()
        os.kill(self.proc.pid, signal.SIGSTOP)
        return at

    def thaw(self) -> float:
        """SIGCONT; the time it was sent."""
        assert self.proc is not None
        at = time.time()
        os.kill(self.proc.pid, signal.SIGCONT)
        return at

    def output(self, tail: int = 4000) -> str:
        if self._log is not None:
            self._log.flush()
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]

    def events(self, *names: str, every_start: bool = False) -> list[dict[str, Any]]:
        """Log events of the current start (of every start with ``every_start``)."""
        if self._log is not None:
            self._log.flush()
        if self.log_path is None:
            return []
        if not every_start:
            return log_events(self.log_path, *names)
        return [
            e
            for i in range(self.starts)
            for e in log_events(self.logs / f"{self.label}-{i}.log", *names)
        ]

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Kill whatever still runs (thawing it first) and close the log."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.thaw()
            self.kill()
        self.close_log()


class Cluster:
    """Services on one database, each with a NANOBOT_HOME (so a node name) of its own."""

    def __init__(self, root: Path, url: str, **env: str) -> None:
        self.root = root
        self.url = url
        self.env = env
        self.nodes: list[ServiceProcess] = []

    def add(self, **env: str) -> ServiceProcess:
        index = len(self.nodes)
        node = ServiceProcess(
            home=self.root / f"home{index}",
            logs=self.root,
            label=f"node{index}",
            env={"NANOBOT_DATABASE__URL": self.url} | self.env | env,
        )
        self.nodes.append(node)
        return node

    def start(self, count: int, **env: str) -> list[ServiceProcess]:
        started = [self.add(**env).start() for _ in range(count)]
        for node in started:
            node.wait_up()
        return started

    def leaders(self) -> list[ServiceProcess]:
        return [n for n in self.nodes if n.role() == "leader"]

    def wait_leader(
        self, timeout: float, *, among: list[ServiceProcess] | None = None
    ) -> ServiceProcess:
        def one() -> ServiceProcess | None:
            leaders = [n for n in (among or self.nodes) if n.role() == "leader"]
            violated(len(leaders) <= 1, f"two leaders: {[n.label for n in leaders]}")
            return leaders[0] if leaders else None

        return wait_for("a leader", one, timeout)

    def kill_all(self) -> None:
        for node in self.nodes:
            node.close()


# --- a TCP proxy for connection cuts ------------------------------------------------------------


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (host, port), run by threads of its own.

    - :meth:`cut`: every open connection is reset (RST) and new ones are refused, as when a
      firewall rejects the database or the server host is gone;
    - :meth:`hold`: connections stay open but nothing passes either way (a partition where
      packets are dropped; the peers' kernels still see an open connection);
    - :meth:`restore`: traffic passes again (held connections resume; after a cut, new ones
      are accepted).

    Use as a context manager; ``url(db_url)`` rewrites a database URL to go through it.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._refusing = False
        self._holding = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="tcp-proxy-accept", daemon=True
        )
        self._accept_thread.start()

    def url(self, db_url: str) -> str:
        """``db_url`` with its host and port replaced by the proxy's."""
        return make_url(db_url).set(host="127.0.0.1", port=self.port).render_as_string(False)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Reset every connection and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._refusing = True
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def hold(self) -> None:
        """Stop forwarding in both directions, keeping every connection open."""
        self._holding.set()

    def restore(self) -> None:
        with self._lock:
            self._refusing = False
        self._holding.clear()

    def close(self) -> None:
        self._closed.set()
        self._holding.clear()
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._accept_thread.join(5)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._closed.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            thread = threading.Thread(
                target=self._pump, args=(client, upstream), name="tcp-proxy-pump", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed.is_set():
                if self._holding.is_set():
                    time.sleep(0.05)
                    continue
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in readable:
                    if self._holding.is_set():
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))
            client.close()
            upstream.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the peer sees 'connection reset' at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


# --- a small tmpfs for a full disk --------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (created), unmounted afterwards.

    Skips the test, with the reason, where it cannot be mounted (not root, no mount command, a
    container without CAP_SYS_ADMIN).
    """
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command: cannot make a small tmpfs for the full-disk case")
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs on {path}: {result.stderr.strip() or result.stdout}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10, check=False)


def fill(path: Path, leave: int = 0, chunk: int = 64 * 1024) -> Path:
    """Fill the file system of ``path`` with a file ``path/fill`` until at most ``leave`` bytes
    are free (0: until ENOSPC); the file, which freeing the space removes."""
    filler = path / "fill"
    with filler.open("wb") as handle:
        while True:
            free = shutil.disk_usage(path).free
            if free <= leave:
                break
            try:
                handle.write(b"\0" * min(chunk, max(1, free - leave)))
                handle.flush()
            except OSError:
                break
    return filler


# --- the run ledger -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerRun:
    """One run as the task itself saw it."""

    task: str
    run_id: int | None
    pid: int
    start: float
    end: float | None  # None: the process died (or was cut off) before the run ended
    outcome: str  # "end", "cancelled", "error" or "unfinished"


class Ledger:
    """The file that :class:`faults.ledger_task.LedgerTask` appends to (one JSON line per
    start and per end of a run), read back as :class:`LedgerRun` records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def kwargs(self, seconds: float = 0.0, **extra: Any) -> dict[str, Any]:
        """The task's constructor arguments: write here, work ``seconds`` per run."""
        return {"path": str(self.path), "seconds": seconds} | extra

    def add(self, name: str, interval: float, seconds: float = 0.0, **extra: Any) -> None:
        """``cron add`` a ledger task (through the command line, as an operator would)."""
        add_task(name, "faults.ledger_task:LedgerTask", interval, **self.kwargs(seconds, **extra))

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def runs(self, task: str | None = None) -> list[LedgerRun]:
        starts: dict[tuple[int, int | None, str, float], dict[str, Any]] = {}
        ends: dict[tuple[int, int | None, str, float], dict[str, Any]] = {}
        for e in self.entries():
            key = (e["pid"], e.get("run_id"), e["task"], e["start"])
            (starts if e["event"] == "start" else ends)[key] = e
        runs = []
        for key, s in starts.items():
            end = ends.get(key)
            runs.append(
                LedgerRun(
                    task=s["task"],
                    run_id=s.get("run_id"),
                    pid=s["pid"],
                    start=s["start"],
                    end=None if end is None else end["at"],
                    outcome="unfinished" if end is None else end["event"],
                )
            )
        runs.sort(key=lambda r: r.start)
        return [r for r in runs if task is None or r.task == task]

    def pids(self, task: str | None = None) -> set[int]:
        return {r.pid for r in self.runs(task)}

    def wait_runs(self, count: int, timeout: float, *, task: str | None = None) -> None:
        wait_for(f"{count} ledger runs", lambda: len(self.runs(task)) >= count, timeout)


class OutcomeWatch:
    """Samples ``task_runs`` every ``period`` seconds in a thread of its own, remembering the
    first final outcome (anything but ``running``) each row showed; :meth:`overwritten` lists
    rows whose final outcome later changed (a fenced-off node overwriting the new leader's
    record). Stop it (or leave the ``with`` block) before the engine is disposed."""

    def __init__(self, engine: Engine, period: float = 0.1) -> None:
        self.engine = engine
        self.period = period
        self.first: dict[int, str] = {}
        self.changes: list[tuple[int, str, str, str]] = []  # id, task, first, later
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outcome-watch", daemon=True)

    def __enter__(self) -> OutcomeWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(10)
            self.sample()

    def sample(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(sql_select(TaskRun.id, TaskRun.task_name, TaskRun.outcome)).all()
        for row in rows:
            if row.outcome == "running":
                continue
            first = self.first.setdefault(row.id, row.outcome)
            if first != row.outcome and (row.id, first, row.outcome) not in {
                (c[0], c[2], c[3]) for c in self.changes
            }:
                self.changes.append((row.id, row.task_name, first, row.outcome))

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            # A database that does not answer for a moment (the fault under test) is not a
            # failure of the watch; the next sample sees the row again.
            with contextlib.suppress(Exception):
                self.sample()

    def overwritten(self) -> list[tuple[int, str, str, str]]:
        return list(self.changes)


def task_runs(engine: Engine, names: list[str] | None = None) -> list[Any]:
    """The rows of ``task_runs`` (of the tasks ``names``), by task and slot."""
    query = sql_select(TaskRun.__table__).order_by(TaskRun.task_name, TaskRun.scheduled_at)
    if names is not None:
        query = query.where(TaskRun.task_name.in_(names))
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def check_accounting(engine: Engine, names: list[str], *, finished: bool = True) -> list[Any]:
    """Every slot of each task's grid, from its anchor to its last recorded slot, is one row:
    a run (success, error, ...) or skipped slot exactly once, or inside exactly one missed row
    (``slots`` consecutive slots from its ``scheduled_at``); never two rows for one slot.

    ``finished``: every service has stopped, so no row may still say ``running``.
    Returns the rows.
    """
    with engine.connect() as conn:
        tasks = {
            t.name: t
            for t in conn.execute(
                sql_select(Task.name, Task.anchor_at, Task.interval_s).where(Task.name.in_(names))
            ).all()
        }
    rows = task_runs(engine, names)
    problems: list[str] = []
    for name in names:
        task = tasks[name]
        interval = timedelta(seconds=task.interval_s)
        own = [r for r in rows if r.task_name == name and not r.manual]
        assert own, f"task {name} never ran"
        slots = [r.scheduled_at for r in own]
        violated(len(slots) == len(set(slots)), f"task {name}: a slot recorded twice")
        expected = task.anchor_at
        for row in own:
            if abs(row.scheduled_at - expected) > SLOT_TOLERANCE:
                kind = "unaccounted" if row.scheduled_at > expected else "covered twice"
                problems.append(
                    f"{name}: slot {expected.isoformat()} {kind} "
                    f"(next row at {row.scheduled_at.isoformat()}, {row.outcome})"
                )
            if finished and row.outcome == "running":
                problems.append(f"{name}: slot {row.scheduled_at.isoformat()} still running")
            if row.outcome != "missed":
                assert row.slots == 1, row
            expected = row.scheduled_at + row.slots * interval
    violated(not problems, "\n".join(problems[:20]))
    return rows


def check_no_overlap_across_nodes(rows: list[Any]) -> None:
    """Successful runs, in the order they started, form blocks by node; each block finished
    before the next node's first run started: two nodes never ran tasks at the same time."""
    ran = sorted((r for r in rows if r.outcome == "success"), key=lambda r: r.started_at)
    blocks: list[tuple[str, datetime, datetime]] = []  # node, first start, last finish
    for r in ran:
        if blocks and blocks[-1][0] == r.node:
            node, first, last = blocks[-1]
            blocks[-1] = (node, first, max(last, r.finished_at))
        else:
            blocks.append((r.node, r.started_at, r.finished_at))
    for (a, _, a_last), (b, b_first, _) in itertools.pairwise(blocks):
        violated(a_last <= b_first, f"{a} still ran until {a_last} when {b} started at {b_first}")


def executions_match_claims(rows: list[Any], out: Path) -> None:
    """No slot executed twice: the runs a task really made (lines in ``out``) are at least its
    successes and at most its claimed slots."""
    claimed = [r for r in rows if r.outcome not in ("missed", "skipped")]
    success = [r for r in rows if r.outcome == "success"]
    executed = len(runs_file(out))
    violated(
        len(success) <= executed <= len(claimed),
        f"runs executed {executed}: fewer than the successes ({len(success)}) or more than the "
        f"claimed slots ({len(claimed)})",
    )


def check_ledger(
    engine: Engine,
    ledger: Ledger,
    names: list[str],
    *,
    finished: bool = True,
    died: dict[int, float] | None = None,
    watch: OutcomeWatch | None = None,
) -> list[Any]:
    """The run ledger against ``task_runs``:

    - every slot of each task's grid is accounted for exactly once (:func:`check_accounting`;
      with ``finished``, no row is left ``running``);
    - every run in the ledger belongs to a claimed row of its task, and no row was executed
      twice (by one process or by two);
    - no two runs of one task overlap in time across processes (a run of a process that died,
      ``died`` maps its pid to when, ends then at the latest; an unfinished run of a process
      not in ``died`` overlaps whatever started after it);
    - a row recorded ``success`` was really run to its end by some process;
    - with ``watch``: no final outcome was overwritten afterwards.

    Returns the rows.
    """
    died = died or {}
    rows = check_accounting(engine, names, finished=finished)
    by_id = {r.id: r for r in rows}
    problems: list[str] = []
    for name in names:
        runs = ledger.runs(name)
        seen: dict[int, LedgerRun] = {}
        for run in runs:
            if run.run_id is None:
                problems.append(f"{name}: a run by pid {run.pid} without a run id")
                continue
            row = by_id.get(run.run_id)
            if row is None or row.task_name != name:
                problems.append(f"{name}: run id {run.run_id} (pid {run.pid}) has no row")
            if run.run_id in seen:
                problems.append(
                    f"{name}: run id {run.run_id} executed twice "
                    f"(pids {seen[run.run_id].pid} and {run.pid})"
                )
            seen[run.run_id] = run
        for a, b in itertools.pairwise(runs):
            if a.pid == b.pid:
                continue
            end = a.end if a.end is not None else died.get(a.pid, float("inf"))
            if end > b.start:
                problems.append(
                    f"{name}: pid {a.pid}'s run (start {a.start:.3f}, end {end:.3f}) overlaps "
                    f"pid {b.pid}'s run (start {b.start:.3f})"
                )
        ended = {r.run_id for r in runs if r.outcome == "end"}
        for row in rows:
            if row.task_name == name and row.outcome == "success" and row.id not in ended:
                problems.append(f"{name}: row {row.id} says success but no run ended it")
    if watch is not None:
        for row_id, task, first, later in watch.overwritten():
            problems.append(f"{task}: row {row_id} recorded {first}, later overwritten to {later}")
    violated(not problems, "\n".join(problems[:20]))
    return rows


# --- PostgreSQL helpers -------------------------------------------------------------------------


def pg_admin_url(db_url: str) -> str:
    """The URL without the schema option (for pg_stat_activity and pg_terminate_backend)."""
    return db_url.split("?")[0]


def pg_target(db_url: str) -> tuple[str, int]:
    url = make_url(db_url)
    return (url.host or "127.0.0.1", url.port or 5432)
