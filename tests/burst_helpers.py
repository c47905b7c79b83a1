"""Stored tasks whose slots fall at one instant: a burst as the scheduler's lead sees one."""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import Engine

from nanobot.cron import control, definitions
from nanobot.cron.dispatch import COST_SAMPLE_MIN
from nanobot.db import write_transaction
from nanobot.models import TaskSource, utcnow

# A burst as the scheduler's lead sees one. A pass learns what it costs per slot from passes
# with at least COST_SAMPLE_MIN due slots, and claims an instant ahead by twice that cost per
# slot due then. These tasks are built in the pass that first claims them, each taking
# SLOW_BUILD_S: that pass costs about 20 ms a slot, and the next instant of the fifty is
# claimed about a second ahead (2 x 50 x ~10 ms), as the real cost of a pass over thousands
# of slots would make it. Building is cached: later passes cost what they really do.
SLOW_BUILD_S = 0.02
BURST_EVERY = 3.0


def store_burst(engine: Engine, prefix: str) -> list[str]:
    """COST_SAMPLE_MIN stored tasks (no process registers them) every BURST_EVERY seconds from
    one anchor, now: their slots fall at the same instants. Stored in one transaction, as one
    task file or one deployment would add them."""
    definition = definitions.definition_from_class(
        "burst",
        "cron_tasks:SlowToBuild",
        BURST_EVERY,
        {"label": prefix, "build_s": SLOW_BUILD_S},
    )
    names = [f"{prefix}{i:02d}" for i in range(COST_SAMPLE_MIN)]
    now = utcnow()
    with write_transaction(engine) as conn:
        for name in names:
            values = control.new_task_values(
                replace(definition, name=name),
                now,
                source=TaskSource.CLI,
                paused=False,
                started=True,
            )
            control.insert_task(conn, values)
    return names
