"""The change feed reader: keeps the sidecar's cache current from the
reconciler's change feed, resubscribing (or re-reading every cached entry)
when the feed breaks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final, Protocol

from lcic_guard.domain.policy import AppStatus, Room
from lcic_guard.domain.time import Millis
from lcic_guard.logs import RateLimitedLog, describe_error
from lcic_guard.sidecar.cache import CircuitBreaker, StatusCache
from lcic_guard.store.connect import StoreError, store_refused, store_unreachable
from lcic_guard.store.feed import Change, stream_id_order
from lcic_guard.tasks import stop_task

log = logging.getLogger(__name__)

# Statuses re-read from Redis per pipelined read of the refresh (a few
# milliseconds of the loop's time each, so checks bridged to it wait little).
REFRESH_CHUNK = 500
# An overrun noticed later than this after its deadline was the event loop's
# delay, not Redis's silence.
LOOP_ON_TIME_S: Final = 0.1

# Store discontinuities (SPEC R10, R15): why the store may have lost writes
# it had acknowledged, as sent to watchers (StoreDiscontinuity.cause).
RUN_ID_CHANGED: Final = "run_id_changed"  # Redis restarted or failed over
VERSION_WENT_BACK: Final = "version_went_back"
STREAM_ID_WENT_BACK: Final = "stream_id_went_back"
NEW_GENERATION: Final = "new_generation"  # a new data set (ADR 0011)
DISCONTINUITIES: Final = (RUN_ID_CHANGED, VERSION_WENT_BACK, STREAM_ID_WENT_BACK, NEW_GENERATION)
# The table load each one causes (the cause label of lcic_guard_table_loads).
_LOAD_CAUSE: Final = {
    RUN_ID_CHANGED: "restart",
    VERSION_WENT_BACK: "rollback",
    STREAM_ID_WENT_BACK: "rollback",
    NEW_GENERATION: "generation",
}


class FeedStore(Protocol):
    """What the feed reader needs of the store."""

    async def changes_tail(self) -> str: ...

    async def feed_gap(self, after: str) -> bool: ...

    async def read_changes(self, after: str, block_ms: int, count: int = 1000) -> list[Change]: ...

    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]: ...

    async def read_versions(self, app_ids: Sequence[str]) -> list[int | None]: ...

    def scan_app_ids(self, count: int = 1000) -> AsyncIterator[list[str]]: ...

    async def ensure_generation(self) -> str: ...

    async def run_ids(self) -> frozenset[str]: ...


class ChangeFeedReader:
    """Loads the whole status table, then follows the change feed, keeping a
    :class:`StatusCache` a current replica of it.

    It also re-reads every held status from Redis within half of the
    cache's ``max_age``, a chunk at a time spread over that period, so that
    in steady state no entry ages past the bound and no check has to read
    Redis for it: the bound still holds, at a cost that follows the size of
    the table rather than the rate of checks.

    Every ``generation_check_ms``, and at every reconnection, it also looks
    for a *store discontinuity*, a sign that Redis may have lost writes it
    had acknowledged: a new generation id (Redis lost its data, or a
    snapshot was loaded into an emptied store), a new run id (Redis
    restarted or failed over), a change feed that ends before the position
    already read. So does a change whose version is older than the one held
    when Redis confirms it went backwards. Each is counted, logged, told to
    ``on_discontinuity`` (every watch stream, SPEC R15), and drops
    everything held and loads the table again. ``in_sync`` is False until
    the first load and during every reload (health says NOT_SERVING
    meanwhile).

    When the feed cannot reach Redis (refused, reset, or no answer within
    its blocking read), Redis is down: it opens ``breaker``, so that checks
    answer per R13 at once instead of each waiting to find that out.
    """

    def __init__(
        self,
        store: FeedStore,
        cache: StatusCache,
        clock: Callable[[], Millis],
        *,
        block_ms: int = 500,
        generation_check_ms: int = 500,
        on_change: Callable[[str, AppStatus | None], Awaitable[None] | None] | None = None,
        on_sync: Callable[[bool], Awaitable[None] | None] | None = None,
        on_discontinuity: Callable[[str, Millis], None] | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.clock = clock
        self.block_ms = block_ms
        self._overrun_late: float | None = None
        self.generation_check_ms = generation_check_ms
        self.on_change = on_change
        self.on_sync = on_sync
        self.on_discontinuity = on_discontinuity
        self.breaker = breaker
        self.last_id: str | None = None
        self.generation: str | None = None
        self.run_ids: frozenset[str] | None = None
        self.discontinuities: dict[str, int] = {}
        self.resyncs = 0
        self.resync_causes: dict[str, int] = {}
        self.applied = 0
        self.corrupt = 0
        self.in_sync = False
        self.synced = asyncio.Event()
        self._checked_generation_at = 0.0
        self.refreshed = 0  # statuses re-read by the refresh
        self._warn = RateLimitedLog(log)
        self._task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="lcic-guard-change-feed")
        self._refresh_task = asyncio.create_task(self.refresh(), name="lcic-guard-refresh")

    async def stop(self) -> None:
        await stop_task(self._refresh_task)
        await stop_task(self._task)

    def _healthy(self) -> bool:
        return self.in_sync and self.cache.feed_healthy

    async def refresh(self) -> None:
        """Re-read the held statuses, each within ``max_age / 2``, forever.

        A held record whose version Redis still has is only marked read now;
        another is read whole and replaces the one held unless that is newer
        (it came on the feed meanwhile). When Redis fails, the round stops; entries it did not reach
        age as before and are read by the checks that need them."""
        while True:
            period = self.cache.max_age_ms / 2000
            ids = self.cache.app_ids() if self._healthy() and period > 0 else []
            if not ids:
                await asyncio.sleep(min(period, 1.0) if period > 0 else 1.0)
                continue
            chunks = [ids[i : i + REFRESH_CHUNK] for i in range(0, len(ids), REFRESH_CHUNK)]
            for chunk in chunks:
                # Waiting first: what was just loaded or refreshed is fresh.
                await asyncio.sleep(period / len(chunks))
                if not self._healthy():
                    break
                now = self.clock()  # before the reads: the entry is at least this current
                cache = self.cache
                try:
                    # Versions first: most records are unchanged, and a
                    # version costs a fraction of decoding a record.
                    versions = await self.store.read_versions(chunk)
                    changed = [
                        a
                        for a, v in zip(chunk, versions, strict=True)
                        if v is None or v != cache.held_version(a)
                    ]
                    rows = await self.store.read_rows([(a, None) for a in changed])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._warn.warning(
                        "refresh", "refresh of cached statuses failed (%s)", describe_error(exc)
                    )
                    break
                for app_id, version in zip(chunk, versions, strict=True):
                    held = cache.held_version(app_id)
                    if held is not None and held == version:
                        cache.touch(app_id, now)
                        self.refreshed += 1
                for app_id, row in zip(changed, rows, strict=True):
                    if isinstance(row, Exception) or cache.held_version(app_id) is None:
                        continue  # left to age: a check reads it and counts what it finds
                    # Not older than what is held (a newer one came on the
                    # feed meanwhile): put keeps the newer one.
                    cache.put(app_id, row[0], now)
                    self.refreshed += 1

    async def _set_in_sync(self, value: bool) -> None:
        if value == self.in_sync:
            return
        self.in_sync = value
        if value:
            self.synced.set()
        if self.on_sync is not None:
            res = self.on_sync(value)
            if res is not None:
                await res

    async def _resync(self, cause: str) -> None:
        """Load the whole status table (up to the cache's capacity); ids held
        that the table no longer has are remembered as absent."""
        await self._set_in_sync(False)
        start = self.clock()
        cache = self.cache
        seen: set[str] = set()
        overflow = False
        cache.complete = False
        async for chunk in self.store.scan_app_ids():
            rows = await self.store.read_rows([(a, None) for a in chunk])
            now = self.clock()
            for app_id, row in zip(chunk, rows, strict=True):
                if isinstance(row, Exception):
                    # Left out: checks of it read Redis and get the failure
                    # mode, counted as an internal error, app by app.
                    self.corrupt += 1
                    log.warning("status of %s does not decode (%s); skipped", app_id, row)
                    cache.mark_corrupt(app_id)
                    continue
                status = row[0]
                if status is None:
                    continue  # registered, no status computed yet
                if len(seen) >= cache.capacity:
                    overflow = True
                    break
                seen.add(app_id)
                cache.drop_rooms(app_id)  # rooms are re-read on demand
                # Replace even a newer version: what Redis holds now is the
                # truth, and anything newer than this read is on the feed
                # after our position.
                cache.put(app_id, status, now, replace=True)
            if overflow:
                break
        now = self.clock()
        for app_id in cache.app_ids():
            if app_id not in seen and not overflow:
                cache.put(app_id, None, now, replace=True)
        cache.complete = not overflow
        if overflow:
            log.warning(
                "status table larger than --cache-size (%d): loaded that many, ids not held "
                "are read from Redis",
                cache.capacity,
            )
        cache.synced_since = start
        self.resyncs += 1
        self.resync_causes[cause] = self.resync_causes.get(cause, 0) + 1
        log.info(
            "status table loaded (%s): %d applications in %.2fs",
            cause,
            len(seen),
            (self.clock() - start) / 1000,
        )

    async def _check_store(self) -> str | None:
        """The discontinuity since the last look, if any (one cause, the
        widest: a new data set, then a restart, then a feed gone back)."""
        gen = await self.store.ensure_generation()
        run_ids = await self._read_run_ids()
        self._checked_generation_at = asyncio.get_running_loop().time()
        cause = None
        if self.generation is not None and gen != self.generation:
            log.warning(
                "Redis holds a new data set (generation %s, was %s): dropping %d statuses "
                "held and loading the table again; health NOT_SERVING until loaded",
                gen,
                self.generation,
                len(self.cache),
            )
            cause = NEW_GENERATION
        elif self.run_ids is not None and run_ids is not None and run_ids != self.run_ids:
            log.warning(
                "Redis restarted or failed over (run id %s, was %s): writes it had "
                "acknowledged may be lost; loading the table again; health NOT_SERVING "
                "until loaded",
                ",".join(sorted(run_ids)),
                ",".join(sorted(self.run_ids)),
            )
            cause = RUN_ID_CHANGED
        elif self.last_id is not None:
            tail = await self.store.changes_tail()
            if stream_id_order(tail) < stream_id_order(self.last_id):
                log.warning(
                    "the change feed ends at %s, before %s already read (Redis restored from "
                    "an older snapshot?): loading the table again; health NOT_SERVING until "
                    "loaded",
                    tail,
                    self.last_id,
                )
                cause = STREAM_ID_WENT_BACK
        self.generation = gen
        if run_ids is not None:
            self.run_ids = run_ids
        return cause

    async def _read_run_ids(self) -> frozenset[str] | None:
        try:
            return await self.store.run_ids()
        except StoreError as exc:
            if store_unreachable(exc):
                raise
            # Answered with an error (INFO forbidden to this user): restarts
            # are then seen only by the feed or a version going back.
            self._warn.warning("run-id", "cannot read Redis's run id (%s)", describe_error(exc))
            return None

    def _discontinuity(self, cause: str) -> None:
        """Count it and tell every watcher, before the table is reloaded."""
        self.discontinuities[cause] = self.discontinuities.get(cause, 0) + 1
        if self.on_discontinuity is not None:
            self.on_discontinuity(cause, self.clock())

    async def _reload(self, cause: str) -> None:
        """The store went back: drop everything held, load the table again."""
        self._discontinuity(cause)
        await self._set_in_sync(False)
        self.cache.clear()
        self.last_id = await self.store.changes_tail()
        await self._resync(_LOAD_CAUSE[cause])

    async def _went_back(self, app_id: str, held: int) -> bool:
        """A change older than what is held: did Redis itself go backwards?"""
        rows = await self.store.read_rows([(app_id, None)])
        row = rows[0]
        if isinstance(row, Exception):
            return False
        stored = row[0]
        stored_version = stored.version if stored is not None else 0
        if stored_version >= held:
            return False  # a late notice of an older write: nothing is lost
        log.warning(
            "status of %s went back from version %d to %d in Redis (restored from an older "
            "snapshot?): loading the table again; health NOT_SERVING until loaded",
            app_id,
            held,
            stored_version,
        )
        return True

    async def _connect(self) -> None:
        went_back = await self._check_store()
        if self.breaker is not None:
            # Redis answers again: checks read it (a reload below empties the cache).
            self.breaker.success()
        if went_back is not None:
            await self._reload(went_back)
        elif self.last_id is None or self.cache.synced_since is None:
            # The first load, or one a lost connection cut short.
            self.last_id = await self.store.changes_tail()
            await self._resync("start" if self.resyncs == 0 else "gap")
        elif await self.store.feed_gap(self.last_id):
            log.warning("change feed trimmed past our position; loading the table again")
            self.last_id = await self.store.changes_tail()
            await self._resync("gap")
        self.cache.feed_healthy = True
        self.cache.confirmed_at = self.clock()
        await self._set_in_sync(True)

    def _silent(self, exc: BaseException) -> bool:
        """The feed's blocking read overran while this process's event loop
        kept time: Redis is silent (frozen, partitioned). When the overrun
        was noticed late, the loop itself was busy (a large batch, a starved
        CPU) and the reply may be sitting unread: SPEC R13 forbids calling
        that down, so the checks' own reads judge it instead."""
        late, self._overrun_late = self._overrun_late, None
        return isinstance(exc, TimeoutError) and late is not None and late < LOOP_ON_TIME_S

    async def _follow(self) -> str | None:
        """One read of the feed; why the table must be loaded again, if it must."""
        assert self.last_id is not None
        # A Redis that stopped answering (frozen, partitioned) is noticed when
        # the blocking read overruns, not after the socket timeout. A timeout
        # scope rather than wait_for: Python 3.11's wait_for loses a
        # cancellation that lands as the read completes, and stop() would
        # then wait for this loop forever.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.block_ms / 1000 + 0.5
        try:
            async with asyncio.timeout_at(deadline):
                changes = await self.store.read_changes(self.last_id, self.block_ms)
        except TimeoutError:
            self._overrun_late = loop.time() - deadline
            raise
        now = self.clock()
        for change in changes:
            self.last_id = change.entry_id
            if change.status is not None:
                held = self.cache.held_version(change.app_id)
                if held is not None and change.status.version < held:
                    if await self._went_back(change.app_id, held):
                        return VERSION_WENT_BACK
                    continue
                if self.cache.apply(change.app_id, change.status, now):
                    self.applied += 1
            elif change.room_id is not None:
                self.cache.forget_room(change.app_id, change.room_id)
            if self.on_change is not None:
                res = self.on_change(change.app_id, change.status)
                if res is not None:
                    await res
        self.cache.confirmed_at = now
        due = self._checked_generation_at + self.generation_check_ms / 1000
        if asyncio.get_running_loop().time() >= due:
            return await self._check_store()
        return None

    async def run(self) -> None:
        backoff = 0.05
        connected = False
        warned = 0.0
        while True:
            try:
                if not connected:
                    await self._connect()
                    connected = True
                    backoff = 0.05
                    log.info("following the change feed from %s", self.last_id)
                cause = await self._follow()
                if cause == VERSION_WENT_BACK:
                    # A new data set, or a restart, says more of what went back.
                    cause = await self._check_store() or cause
                if cause is not None:
                    await self._reload(cause)
                    self.cache.confirmed_at = self.clock()
                    await self._set_in_sync(True)
            except asyncio.CancelledError:
                self.cache.feed_healthy = False
                raise
            except Exception as exc:
                if self.breaker is not None and (store_refused(exc) or self._silent(exc)):
                    # Before the cache stops being fresh: no check waits then.
                    self.breaker.trip(self.clock())
                mono = asyncio.get_running_loop().time()
                if connected or mono - warned >= 30:
                    warned = mono
                    log.warning(
                        "change feed lost (%s); answers are degraded until it is back",
                        describe_error(exc),
                    )
                connected = False
                self.cache.feed_healthy = False
                # Jittered, so that many sidecars do not reconnect in step;
                # capped low, so that answers are fresh soon after Redis is back.
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 0.5)
