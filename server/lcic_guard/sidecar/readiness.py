"""Readiness that means fresh: health follows the reconciler's heartbeat.

Every reconciler replica writes its clock (ms) to ``lcic:guard:heartbeat``
on each tick of its deadline loop. A sidecar whose statuses come from a
reconciler that stopped (or from a Redis it cannot read) would answer from
ever older data while its probe still passed; with this task the gRPC health
service says NOT_SERVING while the newest heartbeat seen is older than
``max_age_ms`` (or none was ever written), and SERVING again once it is
fresh. Checks are still answered meanwhile: health is what a load balancer
or an orchestrator acts on.

While Redis cannot be read the last heartbeat seen keeps ageing, so a Redis
outage longer than the bound also turns health NOT_SERVING.

With ``follows_feed``, health is also NOT_SERVING until the sidecar holds
the whole status table, and again whenever it loads it anew (Redis lost its
data or went backwards): the change-feed reader tells :meth:`Readiness.feed_synced`.
``max_age_ms = 0`` then means "the table only, no heartbeat".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from lcic_guard.domain.time import Millis
from lcic_guard.sidecar.server import RunningServer
from lcic_guard.store.coordination import Coordination
from lcic_guard.store.status import Store
from lcic_guard.tasks import stop_task

log = logging.getLogger(__name__)


class Readiness:
    """Polls the heartbeat and sets the server's health accordingly."""

    def __init__(
        self,
        store: Store,
        server: RunningServer,
        max_age_ms: int,
        clock: Callable[[], Millis],
        *,
        interval_s: float | None = None,
        read_timeout_s: float = 1.0,
        follows_feed: bool = False,
    ) -> None:
        if max_age_ms <= 0 and not follows_feed:
            raise ValueError("max_age_ms must be positive (0 disables: do not build one)")
        self.follows_feed = follows_feed
        self.feed_in_sync = False
        self.coord = Coordination(store)
        self.server = server
        self.max_age_ms = max_age_ms
        self.clock = clock
        # Often enough to notice within a fifth of the bound, at most once a second.
        self.interval_s = (
            interval_s
            if interval_s is not None
            else min(1.0, max(0.05, (max_age_ms or 1000) / 5000))
        )
        self.read_timeout_s = read_timeout_s
        self.last_heartbeat: Millis | None = None
        self.serving: bool | None = None
        self.read_errors = 0
        self.stopped = False
        self._task: asyncio.Task[None] | None = None

    async def feed_synced(self, in_sync: bool) -> None:
        """The change-feed reader's word: it holds the whole status table
        (or no longer does). Health follows at once."""
        self.feed_in_sync = in_sync
        await self.check_once()

    def age_ms(self, now: Millis) -> Millis | None:
        return None if self.last_heartbeat is None else now - self.last_heartbeat

    async def check_once(self) -> bool:
        """Read the heartbeat, set health; True if serving."""
        if self.stopped:
            return False  # shutting down: nothing turns health back on
        if self.max_age_ms <= 0:
            return await self._set(True, None)
        try:
            async with asyncio.timeout(self.read_timeout_s):  # not wait_for: see follower.py
                beat = await self.coord.last_heartbeat()
            if beat is not None:
                self.last_heartbeat = max(beat, self.last_heartbeat or beat)
        except Exception as exc:  # the last one seen keeps ageing
            self.read_errors += 1
            if self.read_errors == 1 or self.read_errors % 100 == 0:
                log.warning("readiness: cannot read the reconciler heartbeat (%s)", exc)
        age = self.age_ms(self.clock())
        return await self._set(age is not None and age <= self.max_age_ms, age)

    async def _set(self, fresh: bool, age: Millis | None) -> bool:
        if self.follows_feed and not self.feed_in_sync:
            if self.serving is not False:
                await self.server.set_serving(False)
                if self.serving is None:  # every start: loading is normal, not a warning
                    log.info("readiness: loading the status table: NOT_SERVING until loaded")
                else:
                    log.warning("readiness: reloading the status table: health NOT_SERVING")
                self.serving = False
            return False
        if fresh != self.serving:
            await self.server.set_serving(fresh)
            if fresh and age is None:
                log.info("readiness: status table loaded: SERVING")
            elif fresh:
                log.info("readiness: reconciler heartbeat is fresh (%d ms old): SERVING", age)
            else:
                shown = "never written" if age is None else f"{age / 1000:.1f}s old"
                log.warning(
                    "readiness: reconciler heartbeat %s (bound %.1fs): health NOT_SERVING",
                    shown,
                    self.max_age_ms / 1000,
                )
            self.serving = fresh
        return fresh

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_once()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="lcic-guard-readiness")

    async def stop(self) -> None:
        self.stopped = True
        await stop_task(self._task)
        self._task = None
