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
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from lcic_guard.facts import Millis
from lcic_guard.policy import SUSPENSION_PRECEDENCE, AppStatus, Reason, Room, Segment

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
    """What the sidecar knows of one application (a decoded view)."""

    status: AppStatus | None  # None: the status table does not know it (R12)
    fetched_at: Millis  # when it was read from Redis or applied from the feed
    rooms: dict[str, Room | None] | None = None  # room id -> report (None: none)


# One packed record per application, so a million cached apps cost a few
# hundred bytes each and nothing for the garbage collector to walk:
# header (version, fetched_at, known, segment count), then per segment its
# start, reasons as bits, which optional times follow, and those times
# (grace end, suspension start, release, and the suspension's effective time
# only where it differs from its start).
_HEAD: Final = struct.Struct("<qqBB")
_SEG: Final = struct.Struct("<qHB")  # starts_at, reason bits, optional-time flags
_TIME: Final = struct.Struct("<q")
_REASON_BITS: Final = {r: 1 << i for i, r in enumerate(Reason)}
# Segments list reasons in R9 order with OVERDUE_GRACE last.
_CANONICAL: Final = (*SUSPENSION_PRECEDENCE, Reason.OVERDUE_GRACE)
_reasons_of_bits: dict[int, tuple[Reason, ...]] = {}
_SIZE_OF_FLAGS: Final = tuple(_SEG.size + _TIME.size * bin(f).count("1") for f in range(16))


def _bits(reasons: tuple[Reason, ...]) -> int:
    out = 0
    for r in reasons:
        out |= _REASON_BITS[r]
    return out


def _reasons(bits: int) -> tuple[Reason, ...]:
    reasons = _reasons_of_bits.get(bits)
    if reasons is None:
        reasons = tuple(r for r in _CANONICAL if bits & _REASON_BITS[r])
        _reasons_of_bits[bits] = reasons
    return reasons


def pack(status: AppStatus | None, fetched_at: Millis) -> bytes:
    if status is None:
        return _HEAD.pack(0, fetched_at, 0, 0)
    parts = [_HEAD.pack(status.version, fetched_at, 1, len(status.segments))]
    for seg in status.segments:
        effective = seg.effective_at if seg.effective_at != seg.suspended_at else None
        times = (seg.grace_ends_at, seg.suspended_at, seg.release_at, effective)
        flags = sum(1 << i for i, t in enumerate(times) if t is not None)
        parts.append(_SEG.pack(seg.starts_at, _bits(seg.reasons), flags))
        parts += [_TIME.pack(t) for t in times if t is not None]
    return b"".join(parts)


def unpack_segment(rec: bytes, offset: int) -> Segment:
    start, bits, flags = _SEG.unpack_from(rec, offset)
    pos = offset + _SEG.size
    times: list[Millis | None] = []
    for i in range(4):
        if flags & (1 << i):
            times.append(_TIME.unpack_from(rec, pos)[0])
            pos += _TIME.size
        else:
            times.append(None)
    effective = times[1] if times[3] is None else times[3]
    return Segment(start, _reasons(bits), times[0], times[1], times[2], effective)


def segment_span(rec: bytes, count: int, now: Millis) -> tuple[int, int]:
    """Where the segment in force at ``now`` lies in a packed record."""
    offset = _HEAD.size
    span = (offset, offset + _SIZE_OF_FLAGS[rec[offset + 10]])
    for _ in range(1, count):
        offset = span[1]
        if _TIME.unpack_from(rec, offset)[0] > now:
            break
        span = (offset, offset + _SIZE_OF_FLAGS[rec[offset + 10]])
    return span


def _spans(rec: bytes, count: int) -> list[int]:
    offsets, offset = [], _HEAD.size
    for _ in range(count):
        offsets.append(offset)
        offset += _SIZE_OF_FLAGS[rec[offset + 10]]
    return offsets


def unpack(app_id: str, rec: bytes) -> tuple[AppStatus | None, Millis]:
    version, fetched_at, known, count = _HEAD.unpack_from(rec)
    if not known:
        return None, fetched_at
    segments = tuple(unpack_segment(rec, offset) for offset in _spans(rec, count))
    # The account is not kept in the cache: no decision depends on it.
    return AppStatus(app_id, "", segments, version), fetched_at


class StatusCache:
    """A bounded LRU of packed status records by application id."""

    HEAD = _HEAD

    def __init__(self, capacity: int, max_age_ms: int) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = capacity
        self.max_age_ms = max_age_ms
        # A plain dict keeps insertion order: touching an entry re-inserts it,
        # and the first key is the least recently used.
        self._records: dict[str, bytes] = {}
        self._rooms: dict[str, dict[str, Room | None]] = {}
        # Set by the feed reader: while healthy, entries fetched after
        # ``synced_since`` are known current as of ``confirmed_at``.
        self.feed_healthy = False
        self.synced_since: Millis | None = None
        self.confirmed_at: Millis = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, app_id: str) -> bytes | None:
        """The packed record, marked as just used (the checks' fast path)."""
        rec = self._records.pop(app_id, None)
        if rec is not None:
            self._records[app_id] = rec
        return rec

    def fresh_at(self, fetched_at: Millis, now: Millis) -> bool:
        return (
            now - fetched_at <= self.max_age_ms
            and self.feed_healthy
            and self.synced_since is not None
            and fetched_at >= self.synced_since
        )

    def get(self, app_id: str) -> Entry | None:
        rec = self.lookup(app_id)
        if rec is None:
            return None
        status, fetched_at = unpack(app_id, rec)
        return Entry(status, fetched_at, self._rooms.get(app_id))

    def rooms_of(self, app_id: str) -> dict[str, Room | None] | None:
        return self._rooms.get(app_id)

    def _store(self, app_id: str, rec: bytes) -> None:
        self._records.pop(app_id, None)
        self._records[app_id] = rec
        if len(self._records) > self.capacity:
            oldest = next(iter(self._records))
            del self._records[oldest]
            self._rooms.pop(oldest, None)

    def put(
        self, app_id: str, status: AppStatus | None, now: Millis, *, replace: bool = False
    ) -> None:
        old = self._records.get(app_id)
        if not replace and old is not None:
            old_version, _, known, _ = _HEAD.unpack_from(old)
            if known and (status is None or status.version < old_version):
                # A slower read raced a newer feed entry: keep the newer record.
                # (A known app never becomes unknown, short of Redis losing its
                # data, which the feed reader detects and resyncs with `replace`.)
                self._store(app_id, self._touched(old, now))
                return
        self._store(app_id, pack(status, now))

    @staticmethod
    def _touched(rec: bytes, now: Millis) -> bytes:
        version, fetched_at, known, count = _HEAD.unpack_from(rec)
        return _HEAD.pack(version, max(fetched_at, now), known, count) + rec[_HEAD.size :]

    def put_room(self, app_id: str, room_id: str, room: Room | None) -> None:
        if app_id in self._records:
            self._rooms.setdefault(app_id, {})[room_id] = room

    def apply(self, app_id: str, status: AppStatus, now: Millis) -> bool:
        """Apply a record from the feed to a cached entry; True if it changed it.

        Entries not cached are left alone: they are read when first needed.
        """
        old = self._records.get(app_id)
        if old is None:
            return False
        version, _, known, _ = _HEAD.unpack_from(old)
        if known and version >= status.version:
            self._records[app_id] = self._touched(old, now)
            return False
        self._records[app_id] = pack(status, now)
        return True

    def forget_room(self, app_id: str, room_id: str) -> None:
        rooms = self._rooms.get(app_id)
        if rooms is not None:
            rooms.pop(room_id, None)

    def drop_rooms(self, app_id: str) -> None:
        self._rooms.pop(app_id, None)

    def is_fresh(self, entry: Entry, now: Millis) -> bool:
        return self.fresh_at(entry.fetched_at, now)

    def last_confirmed(self, entry: Entry) -> Millis:
        """Up to when the entry is known to have been current (for R13)."""
        if self.synced_since is not None and entry.fetched_at >= self.synced_since:
            return max(entry.fetched_at, self.confirmed_at)
        return entry.fetched_at

    def app_ids(self) -> list[str]:
        return list(self._records)


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
                self.cache.drop_rooms(app_id)  # rooms are re-read on demand
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
