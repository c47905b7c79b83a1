"""The small chart of a task's page: one bar per run, its height the run's duration, its colour
the outcome. Laid out here (pure arithmetic), drawn by the template as inline SVG: no script,
no library, readable by a screen reader through each bar's title and the chart's summary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final

from nanobot.cron.control import RunInfo
from nanobot.web.timefmt import absolute, duration

WIDTH: Final = 600
HEIGHT: Final = 120
GAP: Final = 2
MIN_SLOTS: Final = 40
STUB: Final = 3.0  # height of a run without a duration (missed, skipped, running)


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    outcome: str
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    bars: list[Bar]
    width: int
    height: int
    max_duration: float
    summary: str


def layout(runs: list[RunInfo]) -> Chart | None:
    """The chart of ``runs`` (any order; drawn oldest left), or None with no runs."""
    if not runs:
        return None
    ordered = sorted(runs, key=lambda r: r.scheduled_at)
    longest = max((r.duration or 0.0 for r in ordered), default=0.0) or 1.0
    # Room for at least MIN_SLOTS bars: a few runs are drawn as narrow bars from the left.
    step = WIDTH / max(len(ordered), MIN_SLOTS)
    width = max(1.0, step - GAP)
    bars = []
    for i, run in enumerate(ordered):
        scaled = STUB if run.duration is None else (run.duration / longest) * (HEIGHT - 4)
        height = max(STUB, scaled)
        bars.append(
            Bar(
                x=round(i * step, 2),
                y=round(HEIGHT - height, 2),
                width=round(width, 2),
                height=round(height, 2),
                outcome=run.outcome.value,
                title=f"{absolute(run.scheduled_at)}: {run.outcome.value}, "
                f"{duration(run.duration)}",
            )
        )
    counts = Counter(r.outcome.value for r in ordered)
    summary = f"The last {len(ordered)} runs: " + ", ".join(
        f"{n} {outcome}" for outcome, n in counts.most_common()
    )
    summary += f"; the longest took {duration(max(r.duration or 0.0 for r in ordered))}."
    return Chart(bars=bars, width=WIDTH, height=HEIGHT, max_duration=longest, summary=summary)
