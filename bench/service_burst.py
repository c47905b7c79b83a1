"""Figures ``burst`` and ``healthz``: N stored tasks due at one instant, on the real service.

Each run is a new process. nanobot: ``python -m nanobot`` at default settings
(:class:`bench.proc.ServiceProcess`) on SQLite or on PostgreSQL, with N tasks stored as
``nanobot cron add`` stores them (:func:`bench.common.insert_stored_tasks`), all with their
first slot at one instant after the service has started (``/healthz`` 200; a repetition where
it had not counts as not met), interval ``I`` (3, 5 and 8 s for N = 1000, 5000 and 20000).
Each run appends ``time.time()`` to a file as its first act (:class:`bench.tasks.StampFile`).
Measured: instant -> last start of the first burst after start, and of the next one, ``I``
later (steady). Afterwards every slot is checked to be
recorded ``success`` in ``task_runs``.

Baselines, each in a process of its own (:mod:`bench.aps_process`), same jobs, same instant:
APScheduler's MemoryJobStore (the target's reference) and, at N <= 5000, its stock
SQLAlchemyJobStore on SQLite with WAL and ``synchronous=NORMAL`` as nanobot's engine has.

Repetitions are interleaved (rep 1 of every configuration, then rep 2...): two, or
``BENCH_REPETITIONS``; each value is the median over repetitions, with the range of the
per-repetition ratios.

``healthz``: the same nanobot burst (SQLite; N = 5000 and 20000) while another process asks
``/healthz`` back to back (:class:`bench.proc.Prober`): the longest answer between half a
second before the instant and the end of the second burst, against the longest answer in the
idle second before.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from bench.common import Result, bench_home, epoch_to_dt, insert_stored_tasks, percentile
from bench.proc import (
    ApsProcess,
    Prober,
    ServiceProcess,
    aps_store,
    http_get,
    nanobot_db,
    pg_available,
    pg_schema,
)
from bench.tasks import read_stamps
from nanobot.models import TaskOutcome, TaskRun

LINE = len(b"%.6f %.6f\n" % (time.time(), time.time()))


def interval_for(n: int) -> float:
    return 3.0 if n <= 1000 else 5.0 if n <= 5000 else 8.0


def _stamps(path: Path) -> int:
    try:
        return os.stat(path).st_size // LINE
    except FileNotFoundError:
        return 0


def _wait_stamps(path: Path, count: int, until: float) -> int:
    while time.time() < until:
        got = _stamps(path)
        if got >= count:
            return got
        time.sleep(0.05)
    return _stamps(path)


def _bursts(path: Path, instant: float, interval: float, n: int) -> dict[str, Any]:
    # The first n starts are the first burst: a task's second run never starts before its
    # first, and a burst that is still starting one interval later has failed anyway.
    starts = sorted(t for t, _ in read_stamps(path))
    first, second = starts[:n], starts[n : 2 * n]
    return {
        "first": max(first) - instant if len(first) == n else None,
        "steady": max(second) - (instant + interval) if len(second) == n else None,
        "first_start": min(first) - instant if first else None,
        "starts": (len(first), len(second)),
    }


# Seconds from the start of a run's set-up (storing the tasks) until its service is started,
# learnt across runs.
_READY: dict[tuple[str, int], float] = {}


def _first_lead(n: int) -> float:
    """Seconds from the set-up's start to the instant before anything is learnt: enough for
    storing the tasks and starting the service (on a slow machine an empty service started in
    2.1 s, one with 5,000 tasks on PostgreSQL in 4 s, with 20,000 in 9 to 12 s)."""
    return 4.0 + (0.0008 if n <= 5000 else 0.001) * n


def nanobot_run(home: Path, n: int, *, database: str, probe: bool = False) -> dict[str, Any]:
    """One service process, two bursts of ``n``; ``database`` is ``sqlite`` or ``postgresql``.

    The burst is the first *after start*: its instant comes after the service says it is
    started (``/healthz`` 200: the leader's scheduler runs). ``ready_before`` says by how much;
    a run where it is not positive measured the start too, and its figure is not met.
    """
    interval = interval_for(n)
    stamp = home / "stamps.txt"
    setup = time.time()
    lead = max(_first_lead(n), 1.5 * _READY.get((database, n), 0.0) + 1.0)
    with _database(home, database) as url:
        engine = nanobot_db(url)
        instant = time.time() + lead
        insert_stored_tasks(
            engine,
            [f"t{i:06d}" for i in range(n)],
            task_class="bench.tasks:StampFile",
            interval=interval,
            kwargs_of=lambda _i: {"interval": interval, "path": str(stamp), "anchor": instant},
            anchor_of=lambda _i: epoch_to_dt(instant),
        )
        service = ServiceProcess(home, None if database == "sqlite" else url)
        with service:
            service.start()
            loaded = _wait_loaded(engine, n, instant + interval)
            ready = _wait_started(service, instant + interval)
            _READY[(database, n)] = ready - setup
            prober = None
            if probe:
                prober = Prober(service.port, home / "probe.txt", 0.0)
                prober.duration = instant + 2 * interval - time.time()
                prober.start()
            got = _wait_stamps(stamp, 2 * n, instant + 2 * interval + 60)
            samples = prober.samples() if prober is not None else []
            cpu = service.cpu()
            code = service.stop()
            lines = service.log_lines()
        with engine.connect() as conn:
            # The two bursts' slots, each recorded success (a later slot may have run too).
            recorded = conn.execute(
                select(func.count())
                .select_from(TaskRun)
                .where(
                    TaskRun.outcome == TaskOutcome.SUCCESS.value,
                    TaskRun.scheduled_at.in_(
                        [epoch_to_dt(instant), epoch_to_dt(instant + interval)]
                    ),
                )
            ).scalar_one()
        engine.dispose()
    result = _bursts(stamp, instant, interval, n)
    result.update(
        loaded_before=instant - loaded,
        ready_before=instant - ready,
        recorded=recorded,
        got=got,
        exit_code=code,
        cpu=cpu,
        log_lines=lines,
        samples=samples,
        instant=instant,
        interval=interval,
    )
    return result


def _wait_started(service: ServiceProcess, until: float) -> float:
    """When the service first answered ``/healthz`` 200 (polled every 20 ms), or ``until``."""
    while time.time() < until:
        if http_get(service.port, "/healthz", timeout=2.0) == 200:
            return time.time()
        time.sleep(0.02)
    return time.time()


def _wait_loaded(engine: Any, n: int, until: float) -> float:
    """When the service's job store held the ``n`` tasks (polled from here every 50 ms)."""
    while time.time() < until:
        with engine.connect() as conn:
            count = conn.execute(
                text("SELECT count(*) FROM apscheduler_jobs WHERE id LIKE 't0%'")
            ).scalar_one()
        if count >= n:
            return time.time()
        time.sleep(0.05)
    return time.time()


class _database:
    """A context giving nanobot's URL on a fresh SQLite file or PostgreSQL schema."""

    def __init__(self, home: Path, database: str) -> None:
        self.home = home
        self.database = database
        self._schema: Any = None

    def __enter__(self) -> str:
        if self.database == "sqlite":
            return f"sqlite:///{self.home / 'nanobot.db'}"
        self._schema = pg_schema()
        return str(self._schema.__enter__())

    def __exit__(self, *exc: object) -> None:
        if self._schema is not None:
            self._schema.__exit__(*exc)


def aps_run(home: Path, n: int, *, store: str) -> dict[str, Any]:
    """One APScheduler process, two bursts of ``n``; ``store`` is ``memory`` or ``stock``."""
    interval = interval_for(n)
    stamp = home / "stamps.txt"
    instant = time.time() + 2.0 + 0.0002 * n
    spec: dict[str, Any] = {"store": store, "stamp": str(stamp)}
    if store == "memory":
        spec["groups"] = [
            {"prefix": "t", "count": n, "interval": interval, "anchor": instant, "spread": 0.0}
        ]
    else:
        # The jobs are stored before the process starts, as by an earlier run; storing them
        # takes part of the lead, which is longer for that.
        instant += 1.0 + 0.0005 * n
        url = f"sqlite:///{home / 'aps.db'}"
        aps_store(url, [(f"t{i:06d}", interval, instant, (str(stamp), instant)) for i in range(n)])
        spec["url"] = url
    proc = ApsProcess(home, spec)
    with proc:
        proc.start()
        ready = proc.wait_ready()
        got = _wait_stamps(stamp, 2 * n, instant + 2 * interval + 120)
        cpu = proc.cpu()
        proc.stop()
    result = _bursts(stamp, instant, interval, n)
    result.update(loaded_before=instant - ready, got=got, cpu=cpu, recorded=None)
    return result


def _ratio_row(
    res: Result,
    measure: str,
    values: list[float | None],
    bases: list[float | None],
    base_label: str,
    target: str = "",
    limit: float | None = None,
    extra_ok: bool = True,
) -> None:
    pairs = [(v, b) for v, b in zip(values, bases, strict=False) if v is not None and b]
    ratios = [v / b for v, b in pairs]
    value = statistics.median([v for v, _ in pairs]) if pairs else None
    base = statistics.median([b for _, b in pairs]) if pairs else None
    if ratios:
        spread = f" (ratio {min(ratios):.2f}x-{max(ratios):.2f}x over {len(ratios)})"
    else:
        spread = " (no complete repetition)"
    met = None
    if limit is not None:
        met = bool(ratios) and statistics.median(ratios) <= limit and extra_ok
    res.add(measure + spread, value, "s", base_label, base, target, met)


def _run(quick: bool, res: Result) -> None:
    sizes = (1000, 5000) if quick else (1000, 5000, 20000)
    # Two interleaved repetitions keep the full run near 15 minutes; BENCH_REPETITIONS=3 (or
    # more) for a tighter range.
    reps = int(os.environ.get("BENCH_REPETITIONS", "1" if quick else "2"))
    databases = ["sqlite"] + (["postgresql"] if pg_available() else [])
    res.settings = {
        "N": list(sizes),
        "repetitions": reps,
        "interval_s": {n: interval_for(n) for n in sizes},
        "databases": databases,
    }
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with bench_home("burst") as base:
        for rep in range(reps):
            for n in sizes:
                configs = [f"nanobot-{d}" for d in databases] + ["aps-memory"]
                if n <= 5000 and rep == 0:
                    configs.append("aps-stock")
                for config in configs:
                    home = base / f"{config}-{n}-{rep}"
                    home.mkdir()
                    if config.startswith("nanobot-"):
                        r = nanobot_run(home, n, database=config.split("-", 1)[1])
                    else:
                        r = aps_run(home, n, store=config.split("-", 1)[1])
                    runs.setdefault((config, n), []).append(r)
    label = "APScheduler MemoryJobStore (own process)"
    for n in sizes:
        mem = runs[("aps-memory", n)]
        for phase, word in (("first", "first burst after start"), ("steady", "one interval later")):
            for database in databases:
                nb = runs[(f"nanobot-{database}", n)]
                complete = all(r["recorded"] == 2 * n for r in nb)
                early = all(r["ready_before"] > 0.3 for r in nb)
                _ratio_row(
                    res,
                    f"N={n} {word}, instant -> last start, nanobot service, {database}",
                    [r[phase] for r in nb],
                    [r[phase] for r in mem],
                    label,
                    "<= 2x memory, all recorded",
                    2.0,
                    complete and early,
                )
            if ("aps-stock", n) in runs:
                _ratio_row(
                    res,
                    f"N={n} {word}, instant -> last start, stock SQLAlchemyJobStore "
                    "(SQLite WAL, synchronous=NORMAL)",
                    [r[phase] for r in runs[("aps-stock", n)]],
                    [r[phase] for r in mem][:1],
                    label,
                )
        for database in databases:
            nb = runs[(f"nanobot-{database}", n)]
            res.notes.append(
                f"N={n}, nanobot on {database}: task_runs recorded success per run "
                f"{[r['recorded'] for r in nb]} (expected {2 * n}); stored tasks loaded "
                f"{[round(r['loaded_before'], 2) for r in nb]} s and the service started "
                f"{[round(r['ready_before'], 2) for r in nb]} s before the instant; first start "
                f"after the instant {[_ms(r['first_start']) for r in nb]}; log lines written "
                f"{[r['log_lines'] for r in nb]}; exit codes {[r['exit_code'] for r in nb]}."
            )
        res.notes.append(
            f"N={n}, APScheduler memory: first start after the instant "
            f"{[_ms(r['first_start']) for r in mem]}; ready "
            f"{[round(r['loaded_before'], 2) for r in mem]} s before the instant."
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f} ms"


def run(quick: bool) -> Result:
    res = Result("burst")
    _run(quick, res)
    return res


def run_healthz(quick: bool) -> Result:
    """``/healthz`` answer times during bursts of the service (SQLite), probed from outside."""
    res = Result("healthz")
    sizes = (5000,) if quick else (5000, 20000)
    res.settings = {"N": list(sizes), "database": "sqlite"}
    with bench_home("healthz") as base:
        for n in sizes:
            home = base / f"healthz-{n}"
            home.mkdir()
            r = nanobot_run(home, n, database="sqlite", probe=True)
            instant, interval = r["instant"], r["interval"]
            idle = [took for sent, took, _ in r["samples"] if instant - 1.5 < sent < instant - 0.5]
            busy = [
                (sent, took, status)
                for sent, took, status in r["samples"]
                if instant - 0.5 <= sent <= instant + interval + (r["steady"] or interval)
            ]
            worst = max((took for _, took, _ in busy), default=None)
            failed = sum(1 for *_, status in busy if status != 200)
            res.add(
                f"N={n} longest /healthz answer during two bursts "
                f"({len(busy)} probes, {failed} not 200)",
                worst,
                "s",
                "longest answer in the idle second before",
                max(idle, default=None),
                "<= 25 ms",
                worst is not None and worst <= 0.025 and failed == 0,
            )
            res.add(
                f"N={n} /healthz answer p99 during the bursts",
                percentile([t for _, t, _ in busy], 99) if busy else None,
                "s",
                "idle p99",
                percentile(idle, 99) if idle else None,
            )
            res.add(
                f"N={n} first burst instant -> last start, with the prober running",
                r["first"],
                "s",
            )
            if worst is not None:
                at = next(sent for sent, took, _ in busy if took == worst)
                res.notes.append(
                    f"N={n}: the longest answer was asked {at - instant:+.3f} s from the instant; "
                    f"last start of the first burst {_ms(r['first'])}, of the second "
                    f"{_ms(r['steady'])}; recorded {r['recorded']} of {2 * n}."
                )
    return res
