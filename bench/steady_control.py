"""How far the steady lateness figure moves by itself: an A/A control (a diagnostic).

``python -m bench.steady_control [SEQUENCE]`` runs the steady figure's windows (200 tasks at
1 s, 5 s warm-up, 20 s window, each in processes of its own) one after the other in the order
SEQUENCE gives: ``M`` and ``m`` are APScheduler's memory store (the same process, two pools),
``N`` is the nanobot service on SQLite. It prints each window's lateness p50 and p99 and each
pool's p99 over all its windows, as the figure pools them. ``M`` against ``m`` is the figure's
method comparing a process with itself: where that ratio is far from 1, the method cannot tell
a ratio of that size. Default sequence ``MNmMNmMNm`` (about 5 minutes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import percentile
from bench.service_steady import (
    INTERVAL,
    STEADY_TASKS,
    STEADY_WARMUP_S,
    STEADY_WINDOW_S,
    aps_steady,
    nanobot_steady,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sequence", nargs="?", default="MNmMNmMNm")
    args = parser.parse_args()
    if not args.sequence or set(args.sequence) - set("MmN"):
        parser.error(f"sequence {args.sequence!r}: use only the letters M, m and N")
    pools: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="nanobot-steady-control-") as tmp:
        for i, which in enumerate(args.sequence):
            home = Path(tmp) / f"{i}-{which}"
            home.mkdir()
            if which == "N":
                result = nanobot_steady(
                    home, STEADY_TASKS, INTERVAL, STEADY_WARMUP_S, STEADY_WINDOW_S, "sqlite"
                )
            else:
                result = aps_steady(home, STEADY_TASKS, INTERVAL, STEADY_WARMUP_S, STEADY_WINDOW_S)
            late = result["lateness"]
            pools.setdefault(which, []).extend(late)
            print(
                f"{which}: lateness p50 {1000 * percentile(late, 50):.2f} ms, "
                f"p99 {1000 * percentile(late, 99):.2f} ms ({len(late)} runs)",
                flush=True,
            )
    for which, late in pools.items():
        print(f"pool {which}: lateness p99 {1000 * percentile(late, 99):.2f} ms")
    if "M" in pools and "m" in pools:
        ratio = percentile(pools["m"], 99) / percentile(pools["M"], 99)
        print(f"A/A: pool m against pool M, p99 ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
