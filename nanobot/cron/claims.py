"""Claims that never started: released, their jobs moved back to their slots.

A slot is claimed (its ``task_runs`` row inserted) before it runs, often ahead of its instant.
A claim that never started, because this scheduler stops before its instant or a process died
before dispatching it, is *released* so that its slot runs at its instant or is caught up at
the next start, instead of being recorded as a run (see :mod:`nanobot.cron.history`).

Threads: the scheduler's worker thread (or the exiting main thread, when no loop runs), in a
transaction fenced by the lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import structlog
from sqlalchemy import Connection

from nanobot.cron import control, history
from nanobot.cron.aps_adapter import NanobotScheduler
from nanobot.cron.context import TASK_PREFIX, CronContext
from nanobot.cron.overlap import RunKind
from nanobot.cron.records import Launch
from nanobot.cron.registry import Registry
from nanobot.db import write_transaction
from nanobot.exceptions import NotLeaderError
from nanobot.heartbeat.store import drop_components
from nanobot.models import error_text

log = structlog.get_logger(__name__)


def release_unstarted(
    ctx: CronContext,
    registry: Registry,
    scheduler: NanobotScheduler | None,
    launches: list[Launch],
) -> None:
    """Release claims that never started (worker thread, or the exiting main thread).

    Their rows go and their jobs move back to them, in one transaction fenced by the
    lease, so that each slot runs at its instant or is caught up at the next start. A node
    that no longer leads only says they never started, for the next leader to release.
    """
    ids = [launch.run_id for launch in launches]
    try:
        with write_transaction(ctx.engine) as conn:
            ctx.check_fence(conn)
            released = history.release_claims(conn, ids)
            # A backfill's slot released is claimed again by the backfill, not requested.
            backfilled = {(x.name, x.slot) for x in launches if x.kind is RunKind.BACKFILL}
            stored = [
                r
                for r in released
                if r[0] not in registry.ephemeral and (r[0], r[1]) not in backfilled
            ]
            rewind(conn, scheduler, stored)
    except NotLeaderError:
        log.warning("cron.claims_left", count=len(ids), reason="this node no longer leads")
        try:
            history.undispatch(ctx.engine, ids)
        except Exception as exc:
            log.error("cron.release_failed", count=len(ids), error=error_text(exc))
        return
    except Exception as exc:
        log.error("cron.release_failed", count=len(ids), error=error_text(exc))
        return
    if released:
        log.info(
            "cron.claims_released",
            count=len(released),
            reason="claimed ahead of an instant that had not come",
        )


def rewind(
    conn: Connection,
    scheduler: NanobotScheduler | None,
    released: Sequence[tuple[str, datetime, bool]],
) -> None:
    """Move each job back to its earliest released slot, and restore the tasks' mirrors."""
    earliest: dict[str, datetime] = {}
    for name, slot, manual in released:
        if not manual and (name not in earliest or slot < earliest[name]):
            earliest[name] = slot
    if scheduler is not None and earliest:
        scheduler.rewind(conn, earliest)
    history.restore_slots(conn, released)


def recover(
    ctx: CronContext, registry: Registry, scheduler: NanobotScheduler, takeover: bool
) -> list[str]:
    """Before a scheduler's first pass: catch up the slots a gone process claimed but never
    dispatched, load the pending retries, and drop the components of tasks that no longer exist
    (returned, for the monitor to forget too)."""
    with write_transaction(ctx.engine) as conn:
        ctx.check_fence(conn)
        released = history.release_undispatched(conn, node=None if takeover else ctx.node)
        rewind(conn, scheduler, released)
        # The retries a gone leader (or this process before a restart) left pending.
        ctx.retries = history.pending_retries(conn)
        names = control.stored_names(conn)
        names.update(registry.ephemeral_names())
        orphans = drop_components(conn, TASK_PREFIX, names)
    if released:
        log.info(
            "cron.claims_released",
            count=len(released),
            reason="claimed but never dispatched by a process that is gone",
        )
    for component in orphans:
        log.info("cron.component_dropped", component=component, reason="its task is gone")
    return orphans
