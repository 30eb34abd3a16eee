"""The sidecar's in-process status cache, kept current by the change feed.

In steady state a check is answered from here with no Redis call: entries
are filled on first use and then replaced by the records the reconciler
publishes on the change feed. An entry is *fresh* while the feed is being
read without a gap and the entry is younger than ``max_age``; otherwise the
checker reads Redis again. When the feed breaks, the reader resubscribes
from where it stopped (or, if the feed was trimmed past that point, re-reads
every cached entry) and until then answers are marked degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lcic_guard.facts import Millis
from lcic_guard.policy import AppStatus, Room

if TYPE_CHECKING:
    from lcic_guard.store import Change

log = logging.getLogger(__name__)


class FeedStore(Protocol):
    """What the feed reader needs of the store."""

    async def changes_tail(self) -> str: ...

    async def feed_gap(self, after: str) -> bool: ...

    async def read_changes(self, after: str, block_ms: int, count: int = 1000) -> list[Change]: ...

    async def read_statuses(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None]]: ...


@dataclass(slots=True)
class Entry:
    """What the sidecar knows of one application."""

    status: AppStatus | None  # None: the status table does not know it (R12)
    fetched_at: Millis  # when it was read from Redis or applied from the feed
    rooms: dict[str, Room | None] | None = None  # room id -> report (None: none)


class StatusCache:
    """A bounded LRU of :class:`Entry` by application id."""

    def __init__(self, capacity: int, max_age_ms: int) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = capacity
        self.max_age_ms = max_age_ms
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        # Set by the feed reader: while healthy, entries fetched after
        # ``synced_since`` are known current as of ``confirmed_at``.
        self.feed_healthy = False
        self.synced_since: Millis | None = None
        self.confirmed_at: Millis = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, app_id: str) -> Entry | None:
        entry = self._entries.get(app_id)
        if entry is not None:
            self._entries.move_to_end(app_id)
        return entry

    def put(
        self, app_id: str, status: AppStatus | None, now: Millis, *, replace: bool = False
    ) -> Entry:
        old = self._entries.get(app_id)
        if (
            not replace
            and old is not None
            and old.status is not None
            and (status is None or status.version < old.status.version)
        ):
            # A slower read raced a newer feed entry: keep the newer record.
            # (A known app never becomes unknown, short of Redis losing its
            # data, which the feed reader detects and resyncs with `replace`.)
            old.fetched_at = now
            return old
        entry = Entry(status, now, old.rooms if old is not None else None)
        self._entries[app_id] = entry
        self._entries.move_to_end(app_id)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def put_room(self, app_id: str, room_id: str, room: Room | None) -> None:
        entry = self._entries.get(app_id)
        if entry is None:
            return
        if entry.rooms is None:
            entry.rooms = {}
        entry.rooms[room_id] = room

    def apply(self, app_id: str, status: AppStatus, now: Millis) -> bool:
        """Apply a record from the feed to a cached entry; True if it changed it.

        Entries not cached are left alone: they are read when first needed.
        """
        entry = self._entries.get(app_id)
        if entry is None:
            return False
        if entry.status is not None and entry.status.version >= status.version:
            entry.fetched_at = max(entry.fetched_at, now)
            return False
        entry.status = status
        entry.fetched_at = now
        return True

    def forget_room(self, app_id: str, room_id: str) -> None:
        entry = self._entries.get(app_id)
        if entry is not None and entry.rooms is not None:
            entry.rooms.pop(room_id, None)

    def is_fresh(self, entry: Entry, now: Millis) -> bool:
        if now - entry.fetched_at > self.max_age_ms:
            return False
        return (
            self.feed_healthy
            and self.synced_since is not None
            and entry.fetched_at >= self.synced_since
        )

    def last_confirmed(self, entry: Entry) -> Millis:
        """Up to when the entry is known to have been current (for R13)."""
        if self.synced_since is not None and entry.fetched_at >= self.synced_since:
            return max(entry.fetched_at, self.confirmed_at)
        return entry.fetched_at

    def app_ids(self) -> list[str]:
        return list(self._entries)


class CircuitBreaker:
    """Stops a check from waiting on a Redis that keeps failing.

    After ``threshold`` consecutive failures the breaker opens for
    ``cooldown_ms``: checks answer without trying Redis (R13). Then one
    check is let through; success closes it, failure opens it again.
    """

    def __init__(self, threshold: int = 3, cooldown_ms: int = 500) -> None:
        self.threshold = threshold
        self.cooldown_ms = cooldown_ms
        self.failures = 0
        self.open_until: Millis = 0
        self.trips = 0

    def allows(self, now: Millis) -> bool:
        if self.failures < self.threshold:
            return True
        if now >= self.open_until:
            # Half-open: let this one through, hold the others back.
            self.open_until = now + self.cooldown_ms
            return True
        return False

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def success(self) -> None:
        self.failures = 0

    def failure(self, now: Millis) -> None:
        self.failures += 1
        if self.failures == self.threshold:
            self.trips += 1
            self.open_until = now + self.cooldown_ms


class ChangeFeedReader:
    """Follows the change feed and keeps a :class:`StatusCache` current."""

    def __init__(
        self,
        store: FeedStore,
        cache: StatusCache,
        clock: Callable[[], Millis],
        *,
        block_ms: int = 1000,
        on_change: Callable[[str, AppStatus | None], Awaitable[None] | None] | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.clock = clock
        self.block_ms = block_ms
        self.on_change = on_change
        self.last_id: str | None = None
        self.resyncs = 0
        self.applied = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="lcic-guard-change-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _resync(self) -> None:
        """Re-read every cached entry; from now on entries are current."""
        start = self.clock()
        ids = self.cache.app_ids()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = await self.store.read_statuses([(a, None) for a in chunk])
            now = self.clock()
            for app_id, (status, _room) in zip(chunk, rows, strict=True):
                entry = self.cache.get(app_id)
                if entry is not None:
                    entry.rooms = None  # rooms are re-read on demand
                # Replace even a newer version: after Redis lost data (or was
                # rolled back) what it holds now is the truth, and anything
                # newer than this read is on the feed after our new position.
                self.cache.put(app_id, status, now, replace=True)
        self.cache.synced_since = start
        self.resyncs += 1

    async def _connect(self) -> None:
        if self.last_id is None:
            self.last_id = await self.store.changes_tail()
            await self._resync()
        elif await self.store.feed_gap(self.last_id):
            log.warning(
                "change feed trimmed past our position, or lost or rolled back by a Redis "
                "restart; re-reading the cache"
            )
            self.last_id = await self.store.changes_tail()
            await self._resync()
        self.cache.feed_healthy = True
        self.cache.confirmed_at = self.clock()

    async def run(self) -> None:
        backoff = 0.05
        connected = False
        while True:
            try:
                if not connected:
                    await self._connect()
                    connected = True
                    backoff = 0.05
                    log.info("following the change feed from %s", self.last_id)
                assert self.last_id is not None
                # A Redis that stopped answering (frozen, partitioned) is
                # noticed when the blocking read overruns, not after the
                # socket timeout and its retries.
                changes = await asyncio.wait_for(
                    self.store.read_changes(self.last_id, self.block_ms),
                    self.block_ms / 1000 + 0.5,
                )
                now = self.clock()
                for change in changes:
                    self.last_id = change.entry_id
                    if change.status is not None:
                        if self.cache.apply(change.app_id, change.status, now):
                            self.applied += 1
                    elif change.room_id is not None:
                        self.cache.forget_room(change.app_id, change.room_id)
                    if self.on_change is not None:
                        res = self.on_change(change.app_id, change.status)
                        if res is not None:
                            await res
                self.cache.confirmed_at = now
            except asyncio.CancelledError:
                self.cache.feed_healthy = False
                raise
            except Exception as exc:
                if connected or backoff == 0.05:
                    log.warning(
                        "change feed lost (%s: %s); answers are degraded until it is back",
                        type(exc).__name__,
                        exc,
                    )
                connected = False
                self.cache.feed_healthy = False
                # Jittered, so that many sidecars do not reconnect in step;
                # capped low, so that answers are fresh soon after Redis is back.
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 0.5)
