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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from lcic_guard.domain.policy import SUSPENSION_PRECEDENCE, AppStatus, Reason, Room, Segment
from lcic_guard.domain.time import Millis
from lcic_guard.ratelimit import describe_error

if TYPE_CHECKING:
    from lcic_guard.store.status import Change

log = logging.getLogger(__name__)


class FeedStore(Protocol):
    """What the feed reader needs of the store."""

    async def changes_tail(self) -> str: ...

    async def feed_gap(self, after: str) -> bool: ...

    async def read_changes(self, after: str, block_ms: int, count: int = 1000) -> list[Change]: ...

    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]: ...

    def scan_app_ids(self, count: int = 1000) -> AsyncIterator[list[str]]: ...

    async def ensure_generation(self) -> str: ...


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


ROOMS_PER_APP: Final = 256  # rooms remembered per application (LRU)
NEGATIVE_CAPACITY: Final = 100_000  # ids remembered as absent from the table (LRU)


class StatusCache:
    """A bounded LRU of packed status records by application id.

    Once the feed reader has loaded the whole status table into it (and kept
    it whole), the cache is a *complete replica*: an id it does not hold is
    not in the table, and is answered UNKNOWN_APPLICATION with no Redis read.
    """

    HEAD = _HEAD

    def __init__(
        self,
        capacity: int,
        max_age_ms: int,
        *,
        rooms_per_app: int = ROOMS_PER_APP,
        negative_capacity: int = NEGATIVE_CAPACITY,
    ) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = capacity
        self.max_age_ms = max_age_ms
        self.rooms_per_app = rooms_per_app
        self.negative_capacity = negative_capacity
        # A plain dict keeps insertion order: touching an entry re-inserts it,
        # and the first key is the least recently used.
        self._records: dict[str, bytes] = {}
        self._rooms: dict[str, dict[str, Room | None]] = {}
        # Ids Redis said it does not know, when it said so (R12, R13).
        self._absent: dict[str, Millis] = {}
        # Ids whose stored status does not decode: never answered as absent.
        self._corrupt: set[str] = set()
        # Set by the feed reader: while healthy, entries fetched after
        # ``synced_since`` are known current as of ``confirmed_at``.
        self.feed_healthy = False
        self.synced_since: Millis | None = None
        self.confirmed_at: Millis = 0
        # True while the whole status table is held (loaded, nothing evicted).
        self.complete = False
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.room_evictions = 0
        self.negative_evictions = 0
        self.room_count = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def absent_count(self) -> int:
        return len(self._absent)

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

    def replica_answers_absent(self) -> bool:
        """An id not held is not in the table: the replica is whole and current."""
        return self.complete and self.feed_healthy and self.synced_since is not None

    def mark_corrupt(self, app_id: str) -> None:
        if len(self._corrupt) >= NEGATIVE_CAPACITY:
            self.complete = False  # too many to list: read what is not held
            return
        self._corrupt.add(app_id)

    def is_corrupt(self, app_id: str) -> bool:
        return app_id in self._corrupt

    def absent_since(self, app_id: str) -> Millis | None:
        """When Redis last said it does not know ``app_id`` (None: never)."""
        return self._absent.get(app_id)

    def get(self, app_id: str) -> Entry | None:
        rec = self.lookup(app_id)
        if rec is None:
            seen = self._absent.get(app_id)
            if seen is not None:
                return Entry(None, seen)
            if self.complete and self.synced_since is not None and app_id not in self._corrupt:
                # Not in the whole table as last confirmed (R13: a last-seen
                # "not in the table" counts as a status).
                return Entry(None, self.confirmed_at)
            return None
        status, fetched_at = unpack(app_id, rec)
        return Entry(status, fetched_at, self._rooms.get(app_id))

    def rooms_of(self, app_id: str) -> dict[str, Room | None] | None:
        return self._rooms.get(app_id)

    def _drop_rooms_of(self, app_id: str) -> None:
        rooms = self._rooms.pop(app_id, None)
        if rooms:
            self.room_count -= len(rooms)

    def _store(self, app_id: str, rec: bytes) -> None:
        self._records.pop(app_id, None)
        self._absent.pop(app_id, None)
        self._corrupt.discard(app_id)
        self._records[app_id] = rec
        if len(self._records) > self.capacity:
            oldest = next(iter(self._records))
            del self._records[oldest]
            self._drop_rooms_of(oldest)
            self.evictions += 1
            if self.complete:
                # The table outgrew --cache-size: ids not held are read again.
                self.complete = False
                log.warning(
                    "status table larger than --cache-size (%d): ids not cached are read "
                    "from Redis",
                    self.capacity,
                )

    def _store_absent(self, app_id: str, now: Millis) -> None:
        if self._records.pop(app_id, None) is not None:
            self._drop_rooms_of(app_id)
        self._absent.pop(app_id, None)
        self._absent[app_id] = now
        if len(self._absent) > self.negative_capacity:
            del self._absent[next(iter(self._absent))]
            self.negative_evictions += 1

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
        if status is None:
            if self.replica_answers_absent() and old is None:
                return  # the replica already answers it: nothing to remember
            self._store_absent(app_id, now)
            return
        self._store(app_id, pack(status, now))

    @staticmethod
    def _touched(rec: bytes, now: Millis) -> bytes:
        version, fetched_at, known, count = _HEAD.unpack_from(rec)
        return _HEAD.pack(version, max(fetched_at, now), known, count) + rec[_HEAD.size :]

    def put_room(self, app_id: str, room_id: str, room: Room | None, now: Millis = 0) -> None:
        if app_id not in self._records:
            return
        rooms = self._rooms.setdefault(app_id, {})
        old = rooms.pop(room_id, _MISSING)
        if old is not _MISSING:
            self.room_count -= 1
        if room is not None and room.ended_at is not None and room.ended_at <= now:
            # Ended: no longer protected, so it is answered like no report.
            room = None
        rooms[room_id] = room
        self.room_count += 1
        if len(rooms) > self.rooms_per_app:
            # Prefer forgetting rooms with nothing reported: re-reading one
            # costs a read, and a reported room is what R6 protects.
            victim = next((k for k, v in rooms.items() if v is None), None)
            if victim is None:
                victim = next(iter(rooms))
            del rooms[victim]
            self.room_count -= 1
            self.room_evictions += 1

    def apply(self, app_id: str, status: AppStatus, now: Millis) -> bool:
        """Apply a record from the feed; True if it changed what is held.

        An application not held is inserted: the replica stays whole."""
        old = self._records.get(app_id)
        if old is not None:
            version, _, known, _ = _HEAD.unpack_from(old)
            if known and version >= status.version:
                self._records[app_id] = self._touched(old, now)
                return False
        self._store(app_id, pack(status, now))
        return True

    def transitions(self, app_id: str, after: Millis, until: Millis) -> list[Millis]:
        """The instants in (after, until] at which the held status changes."""
        rec = self._records.get(app_id)
        if rec is None:
            return []
        _, _, known, count = _HEAD.unpack_from(rec)
        if not known:
            return []
        out = []
        for offset in _spans(rec, count):
            start = _SEG.unpack_from(rec, offset)[0]
            if after < start <= until:
                out.append(int(start))
        return out

    def held_version(self, app_id: str) -> int | None:
        rec = self._records.get(app_id)
        if rec is None:
            return None
        version, _, known, _ = _HEAD.unpack_from(rec)
        return int(version) if known else None

    def forget_room(self, app_id: str, room_id: str) -> None:
        rooms = self._rooms.get(app_id)
        if rooms is not None and rooms.pop(room_id, _MISSING) is not _MISSING:
            self.room_count -= 1

    def drop_rooms(self, app_id: str) -> None:
        self._drop_rooms_of(app_id)

    def clear(self) -> None:
        """Forget everything (the data set Redis holds was replaced)."""
        self._records.clear()
        self._rooms.clear()
        self._absent.clear()
        self._corrupt.clear()
        self.room_count = 0
        self.complete = False
        self.synced_since = None

    def last_confirmed(self, entry: Entry) -> Millis:
        """Up to when the entry is known to have been current (for R13)."""
        if self.synced_since is not None and entry.fetched_at >= self.synced_since:
            return max(entry.fetched_at, self.confirmed_at)
        return entry.fetched_at

    def app_ids(self) -> list[str]:
        return list(self._records)


_MISSING: Final[Room] = Room(-1)


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
    """Loads the whole status table, then follows the change feed, keeping a
    :class:`StatusCache` a current replica of it.

    Every ``generation_check_ms`` it also reads the store's generation id: a
    new one (Redis lost its data, or a snapshot was loaded into an emptied
    store) drops everything held and loads the table again; so does a change
    whose version is older than the one held when Redis confirms it went
    backwards. ``in_sync`` is False until the first load and during every
    reload (health says NOT_SERVING meanwhile).
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
    ) -> None:
        self.store = store
        self.cache = cache
        self.clock = clock
        self.block_ms = block_ms
        self.generation_check_ms = generation_check_ms
        self.on_change = on_change
        self.on_sync = on_sync
        self.last_id: str | None = None
        self.generation: str | None = None
        self.resyncs = 0
        self.resync_causes: dict[str, int] = {}
        self.applied = 0
        self.corrupt = 0
        self.in_sync = False
        self.synced = asyncio.Event()
        self._checked_generation_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="lcic-guard-change-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

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

    async def _check_generation(self) -> bool:
        """True if the store holds a new data set (everything held is dropped)."""
        gen = await self.store.ensure_generation()
        self._checked_generation_at = asyncio.get_running_loop().time()
        if self.generation is None or gen == self.generation:
            self.generation = gen
            return False
        log.warning(
            "Redis holds a new data set (generation %s, was %s): dropping %d statuses held "
            "and loading the table again; health NOT_SERVING until loaded",
            gen,
            self.generation,
            len(self.cache),
        )
        self.generation = gen
        await self._set_in_sync(False)
        self.cache.clear()
        return True

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
        new_generation = await self._check_generation()
        if self.last_id is None or new_generation:
            self.last_id = await self.store.changes_tail()
            await self._resync("start" if self.resyncs == 0 else "generation")
        elif await self.store.feed_gap(self.last_id):
            log.warning(
                "change feed trimmed past our position, or lost or rolled back by a Redis "
                "restart; loading the table again"
            )
            self.last_id = await self.store.changes_tail()
            await self._resync("gap")
        self.cache.feed_healthy = True
        self.cache.confirmed_at = self.clock()
        await self._set_in_sync(True)

    async def _follow(self) -> str | None:
        """One read of the feed; why the table must be loaded again, if it must."""
        assert self.last_id is not None
        # A Redis that stopped answering (frozen, partitioned) is noticed when
        # the blocking read overruns, not after the socket timeout.
        changes = await asyncio.wait_for(
            self.store.read_changes(self.last_id, self.block_ms),
            self.block_ms / 1000 + 0.5,
        )
        now = self.clock()
        for change in changes:
            self.last_id = change.entry_id
            if change.status is not None:
                held = self.cache.held_version(change.app_id)
                if held is not None and change.status.version < held:
                    if await self._went_back(change.app_id, held):
                        return "rollback"
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
        if asyncio.get_running_loop().time() >= due and await self._check_generation():
            return "generation"
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
                if cause == "rollback" and await self._check_generation():
                    cause = "generation"  # what went back was a whole new data set
                if cause is not None:
                    await self._set_in_sync(False)
                    self.cache.clear()
                    self.last_id = await self.store.changes_tail()
                    await self._resync(cause)
                    self.cache.confirmed_at = self.clock()
                    await self._set_in_sync(True)
            except asyncio.CancelledError:
                self.cache.feed_healthy = False
                raise
            except Exception as exc:
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
