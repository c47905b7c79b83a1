"""Where the service's CPU goes in the steady state (a diagnostic, not a figure of the table).

``python -m bench.callbacks [--tasks 200] [--window 20] [--set KEY=VALUE]`` runs the steady
figure's load (tasks at 1 s, their slots spread over the second) on the service at default
settings (or those given), in its own
process (:mod:`bench._callbacks_child`), and prints the thread CPU of each event-loop callback
and each worker-thread item over the window: per run, per second, per call; and the wall
time of the longest call and how many a second took over a millisecond (a loop callback that
long makes the starts due meanwhile late: the lateness p99). The rows are the
service's own callbacks, timed from inside; what they leave out of the process's CPU is the
loop's own select and wakeups, the kernel's part, and the threads of the log listener.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import compile_bytecode
from bench.proc import ServiceProcess, nanobot_db
from bench.service_steady import INTERVAL, STEADY_TASKS, STEADY_WARMUP_S, store_stamping_tasks
from bench.tasks import read_stamps


class InstrumentedService(ServiceProcess):
    """The service under ``child`` (:mod:`bench._callbacks_child`, which counts its callbacks,
    or :mod:`bench._late_starts_child`, which records them), writing to ``out``."""

    def __init__(
        self,
        home: Path,
        out: Path,
        settings: dict[str, str],
        child: str = "bench._callbacks_child",
    ) -> None:
        super().__init__(home, **settings)
        self.out = out
        self.child = child

    def start(self) -> InstrumentedService:
        compile_bytecode()  # as installed: see its docstring
        self.home.mkdir(parents=True, exist_ok=True)
        with self.stderr_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.child, str(self.out)],
                cwd=self.home,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        return self


@dataclass
class Window:
    """What one instrumented window gave: the child's JSON, the runs' stamps, when it began
    and ended (epoch) and the process's CPU seconds over it."""

    recorded: Any
    stamps: list[tuple[float, float]]
    began: float
    ended: float
    cpu: float


def run_window(
    tasks: int,
    window: float,
    home: Path,
    settings: dict[str, str] | None = None,
    child: str = "bench._callbacks_child",
) -> Window:
    """The steady figure's load on the service under ``child``, recorded over ``window``
    after the figure's warm-up; ``settings``: environment variables of the service
    (NANOBOT_...)."""
    out = home / "recorded.json"
    stamp = home / "stamps.txt"
    engine = nanobot_db(f"sqlite:///{home / 'nanobot.db'}")
    service = InstrumentedService(home, out, settings or {}, child)
    with service:
        service.start()
        service.wait_status("/healthz", 200)
        anchor0 = store_stamping_tasks(engine, tasks, INTERVAL, stamp)
        time.sleep(max(0.0, anchor0 + STEADY_WARMUP_S - time.time()))
        os.kill(service.pid, signal.SIGUSR1)
        began, cpu0 = time.time(), service.cpu()
        time.sleep(window)
        cpu1 = service.cpu()
        os.kill(service.pid, signal.SIGUSR2)
        ended = time.time()
        # The child writes a file beside OUT and renames it: once OUT is there it is whole.
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        service.stop()
    engine.dispose()
    return Window(json.loads(out.read_text()), read_stamps(stamp), began, ended, cpu1 - cpu0)


def measure(
    tasks: int, window: float, home: Path, settings: dict[str, str] | None = None
) -> tuple[float, dict[str, list[float]]]:
    """The process's CPU per run over ``window``, and ``{callback: [calls, cpu_seconds,
    longest_s, over_1ms]}``."""
    recorded = run_window(tasks, window, home, settings)
    return recorded.cpu / (tasks * window / INTERVAL), recorded.recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=STEADY_TASKS)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the service, e.g. cron.dispatch_ahead=0.25 (default settings if none)",
    )
    args = parser.parse_args()
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            parser.error(f"--set {item!r}: expected KEY=VALUE, as in cron.dispatch_ahead=0.25")
        settings["NANOBOT_" + key.upper().replace(".", "__")] = value
    with tempfile.TemporaryDirectory(prefix="nanobot-callbacks-") as tmp:
        per_run, stats = measure(args.tasks, args.window, Path(tmp), settings)
    runs = args.tasks * args.window / INTERVAL
    counted = sum(entry[1] for entry in stats.values())
    print(f"process CPU per run: {per_run * 1e3:.4f} ms ({args.tasks} tasks at 1 s)")
    print(f"counted in callbacks: {counted / runs * 1e3:.4f} ms per run")
    print(f"{'ms/run':>8} {'calls/s':>8} {'us/call':>8} {'max ms':>7} {'>1ms/s':>7}  callback")
    rows = sorted(stats.items(), key=lambda kv: -kv[1][1])[: args.rows]
    for key, (calls, cpu, longest, over) in rows:
        print(
            f"{cpu / runs * 1e3:8.4f} {calls / args.window:8.1f} {cpu / calls * 1e6:8.1f}"
            f" {longest * 1e3:7.2f} {over / args.window:7.2f}  {key}"
        )


if __name__ == "__main__":
    main()
