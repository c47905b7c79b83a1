"""The scheduling lease of a manager used as a library, which takes and renews it itself.

In the service, the service holds the lease (:mod:`nanobot.lease`) and hands it to the manager
(``CronManager.use_lease``). A manager used as a library (a script calling
``get_cron_manager().register_task(...)`` and ``await start_task(...)``) takes the lease itself
when it is free, and keeps it renewed while it runs; when another process holds it (a running
service), the manager is a *client* of the control plane, and this module keeps trying to take
the lease, like a standby service, so that a script restarted after a crash schedules again
once the dead holder's lease has expired.

Threads: the event loop only. The lease itself, and the fence it gives every claiming
transaction, are set on the context (:attr:`CronContext.lease
<nanobot.cron.context.CronContext.lease>`, :attr:`~nanobot.cron.context.CronContext.fence`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from nanobot.config import get_config
from nanobot.cron.context import CronContext
from nanobot.lease import SchedulerLease, holder_id
from nanobot.models import error_text

log = structlog.get_logger(__name__)


class OwnLease:
    """Takes, renews and releases a library-use manager's own lease (event loop).

    ``start`` schedules once the lease is taken (a take-over: ``start(takeover=True)``);
    ``lost`` stops dispatching at once when the lease is lost.
    """

    def __init__(
        self,
        ctx: CronContext,
        *,
        start: Callable[[], Coroutine[Any, Any, None]],
        lost: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self._ctx = ctx
        self._start = start
        self._lost = lost
        # Whether the context's lease is this manager's own (released at shutdown).
        self.owned = False
        # The lease this manager tries to take, and the task that renews or takes it.
        self._candidate: SchedulerLease | None = None
        self.keeper: asyncio.Task[None] | None = None
        # The holder of the lease while this manager is a client of the control plane.
        self.client: str | None = None

    def use(self, lease: SchedulerLease) -> None:
        """Schedule under ``lease``, held and renewed by the caller (the service)."""
        self._ctx.lease = lease
        self.owned = False
        self._ctx.fence = lease.verify

    async def take(self) -> bool:
        """Take the scheduling lease if it is free. False: another process holds it, and this
        manager is its client until the lease is free (see _keep)."""
        lease = self._candidate
        if lease is None:
            engine = await asyncio.to_thread(self._ctx.open_engine)
            ttl = float(get_config().get("service.lease_ttl", 10.0))
            lease = self._candidate = SchedulerLease(engine, holder_id(self._ctx.node), ttl)
        if self.keeper is None:
            self.keeper = asyncio.get_running_loop().create_task(
                self._keep(lease), name="nanobot-cron-lease"
            )
        if await asyncio.to_thread(lease.try_acquire):
            self._adopt(lease)
            return True
        info = await asyncio.to_thread(lease.holder)
        holder = (info.holder if info is not None else None) or "another process"
        if self.client != holder:
            log.info(
                "cron.client_of_scheduler",
                node=self._ctx.node,
                scheduler=holder,
                consequence="tasks started here are stored and scheduled by that process",
            )
        self.client = holder
        return False

    def _adopt(self, lease: SchedulerLease) -> None:
        self._ctx.lease, self.owned, self._ctx.fence = lease, True, lease.verify
        self.client = None

    def _drop(self) -> None:
        self._ctx.lease, self._ctx.fence, self.owned = None, None, False

    async def _keep(self, lease: SchedulerLease) -> None:
        """Renew the lease every ttl/3; when it is lost, stop dispatching at once. While it is
        not held (lost, or held by another process: a client), try to take it at the same
        rate, and schedule once it is taken (the tasks only this process can build
        included)."""
        period = lease.ttl / 3
        while True:
            await asyncio.sleep(period)
            if self._ctx.lease is lease:
                if await _renewed(lease, period):
                    continue
                log.warning("cron.lease_lost", holder=lease.holder_id, action="stop dispatching")
                await self._lost()
                self._drop()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(period):
                        await asyncio.to_thread(lease.release)
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result of a
            # call that ends just as the task is cancelled, losing the cancellation, and
            # stop_keeping then waited for ever (a script's shutdown hung that way).
            try:
                async with asyncio.timeout(period):
                    acquired = await asyncio.to_thread(lease.try_acquire)
            except Exception as exc:
                log.warning("cron.lease_unavailable", error=error_text(exc))
                acquired = False
            if acquired:
                log.info("cron.lease_taken", holder=lease.holder_id, epoch=lease.epoch)
                self._adopt(lease)
                await asyncio.shield(self._start())

    async def stop_keeping(self) -> None:
        """Stop renewing or trying to take the lease (a shutdown begins)."""
        keeper, self.keeper = self.keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def release(self) -> None:
        """Release the lease if it is this manager's own (a shutdown ends)."""
        self._candidate = None
        lease = self._ctx.lease
        if self.owned and lease is not None:
            self._drop()
            try:
                await asyncio.to_thread(lease.release)
            except Exception as exc:
                log.warning("cron.lease_release_failed", error=error_text(exc))

    def release_at_exit(self) -> None:
        """At interpreter exit (no event loop any more): release this manager's own lease."""
        lease = self._ctx.lease
        if self.owned and lease is not None:
            self._ctx.lease, self.owned = None, False
            with contextlib.suppress(Exception):
                lease.release()


async def _renewed(lease: SchedulerLease, period: float) -> bool:
    """Renew ``lease`` within what is left of it; whether it is still held for a period."""
    renewed = False
    budget = lease.seconds_left() - period
    if budget > 0:
        try:
            async with asyncio.timeout(budget):
                renewed = await asyncio.to_thread(lease.renew)
        except Exception as exc:
            log.warning("cron.lease_renew_failed", error=error_text(exc))
    return renewed and lease.seconds_left() > period
