"""What the service was doing when a run started late (a diagnostic, not a figure of the table).

``python -m bench.late_starts [--tasks 200] [--window 60]`` runs the steady figure's load (tasks
at 1 s, their slots spread over the second) on the service at default settings, in its own
process (:mod:`bench._late_starts_child`, which records the wall time of every event-loop
callback, thread-pool item and garbage collection), and takes the runs of the window that
started at or past the lateness p99. For each it looks at what ran in the process between the
run's slot and its start:

- ``pool``/``gc`` items overlapping that interval by more than 0.3 ms: another thread of the
  process held the interpreter lock, or might have, while the loop was due to start the run;
  printed with how often such a late start met each, beside the share of all time each covers
  (a kind that covers 1 % of the time but meets 10 % of the late starts delays starts);
- none: only the loop's own start of the run, late (the loop's timer fired late, with nothing
  else of the process running: the machine did not run the process's thread in time).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import tempfile
from pathlib import Path

from bench.callbacks import run_window
from bench.common import percentile
from bench.service_steady import INTERVAL, STEADY_TASKS

# An item must overlap a late start's interval by this much to be named as meeting it.
OVERLAP_S = 0.0003
# Runs this close to the window's edges are left out (the recording starts and stops there).
EDGE_S = 0.5

Event = tuple[float, float, str, str]


def record(tasks: int, window: float, home: Path) -> tuple[list[Event], list[tuple[float, float]]]:
    """The events recorded over ``window`` and the ``(lateness, slot)`` of every run in it."""
    recorded = run_window(tasks, window, home, child="bench._late_starts_child")
    events: list[Event] = [(e[0], e[1], e[2], e[3]) for e in recorded.recorded]
    began, ended = recorded.began + EDGE_S, recorded.ended - EDGE_S
    runs = []
    for start, anchor in recorded.stamps:
        if began <= start < ended:
            late = (start - anchor) % INTERVAL  # as the figure's (service_steady._lateness)
            runs.append((late, start - late))
    return events, runs


def _overlap(event: Event, lo: float, hi: float) -> float:
    return min(event[1], hi) - max(event[0], lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=STEADY_TASKS)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanobot-late-starts-") as tmp:
        events, runs = record(args.tasks, args.window, Path(tmp))
    lateness = [late for late, _slot in runs]
    p99 = percentile(lateness, 99)
    print(
        f"{len(runs)} runs: lateness p50 {1000 * percentile(lateness, 50):.2f} ms, "
        f"p99 {1000 * p99:.2f} ms, max {1000 * max(lateness):.2f} ms"
    )
    others = sorted(e for e in events if e[2] != "loop")
    began = [e[0] for e in others]
    longest = max((e[1] - e[0] for e in others), default=0.0)
    met: collections.Counter[str] = collections.Counter()
    late_runs = [(late, slot) for late, slot in runs if late >= p99]
    alone = 0
    for late, slot in late_runs:
        start = slot + late
        first = bisect.bisect_left(began, slot - longest)
        last = bisect.bisect_right(began, start)
        names = {
            f"{e[2]}: {e[3]}" for e in others[first:last] if _overlap(e, slot, start) > OVERLAP_S
        }
        met.update(names)
        alone += not names
    print(f"{len(late_runs)} runs started at or past the p99:")
    print(f"  {alone:5d} with nothing else of the process running between slot and start")
    if not met:
        return
    # The share of all time each kind covers, from the same recording.
    span = max(e[1] for e in events) - min(e[0] for e in events)
    covered: collections.defaultdict[str, float] = collections.defaultdict(float)
    for e in others:
        covered[f"{e[2]}: {e[3]}"] += e[1] - e[0]
    print("  late starts met   share of all time   item")
    for name, count in met.most_common():
        met_share = 100 * count / len(late_runs)
        share = 100 * covered[name] / span
        print(f"  {count:5d} ({met_share:4.1f} %)  {share:8.2f} %          {name}")


if __name__ == "__main__":
    main()
