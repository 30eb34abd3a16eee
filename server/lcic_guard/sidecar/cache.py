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

import logging
import struct
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, TypeAlias

from lcic_guard.domain.policy import SUSPENSION_PRECEDENCE, AppStatus, Reason, Room, Segment
from lcic_guard.domain.rooms import live_room
from lcic_guard.domain.time import Millis

log = logging.getLogger(__name__)


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


def segment_of(data: bytes) -> Segment:
    """Decode the segment in force from what :meth:`StatusCache.in_force`
    returned."""
    return unpack_segment(data, 0)


def timeline_of(data: bytes) -> tuple[Segment, ...]:
    """Decode what :meth:`StatusCache.in_force` returned: the segment in
    force and every one after it."""
    out, offset = [], 0
    while offset < len(data):
        out.append(unpack_segment(data, offset))
        offset += _SIZE_OF_FLAGS[data[offset + 10]]
    return tuple(out)


class Stale(Enum):
    """What :meth:`StatusCache.in_force` returns for a record held but not
    fresh: an enum of one member, so that ``held is STALE`` narrows
    :data:`InForce` for the type checker at no cost on the check path."""

    STALE = "stale"


STALE: Final = Stale.STALE
Held: TypeAlias = tuple[int, bytes]
"""A fresh record as a check needs it: its version, and the packed segment in
force and every one after it."""
InForce: TypeAlias = Held | Literal[Stale.STALE] | None
"""What :meth:`StatusCache.in_force` returns: :data:`Held`, :data:`STALE`, or
None when not held."""
UNKNOWN_HELD: Final[Held] = (0, b"")  # in_force of an app the status table does not know

ROOMS_PER_APP: Final = 256  # rooms remembered per application (LRU)
NEGATIVE_CAPACITY: Final = 100_000  # ids remembered as absent from the table (LRU)


class StatusCache:
    """A bounded LRU of packed status records by application id.

    Once the feed reader has loaded the whole status table into it (and kept
    it whole), the cache is a *complete replica*: an id it does not hold is
    not in the table, and is answered UNKNOWN_APPLICATION with no Redis read.

    Checks read it from the serving threads while the change feed writes it
    on the event loop's thread. Single dict operations are atomic; what is
    not is moving an entry to the LRU's end (remove, then insert again: a
    reader in between would find no record, which a complete replica answers
    UNKNOWN_APPLICATION), so that move and every replacement hold ``_lock``.
    """

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
        self._lock = threading.Lock()
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
        """The packed record, marked as just used (while the whole table is
        held nothing is evicted, so the order does not matter then: a plain
        read)."""
        records = self._records
        if self.complete:
            return records.get(app_id)
        with self._lock:
            rec = records.pop(app_id, None)
            if rec is not None:
                records[app_id] = rec
        return rec

    def in_force(self, app_id: str, now: Millis) -> InForce:
        """What a check needs of a held record: ``(version, packed segment in
        force at now and every one after it)`` when it is fresh
        (:data:`UNKNOWN_HELD` for an app the table does not know),
        :data:`STALE` when held but not fresh, None when not held. The two
        values are all an answer depends on (with the room for an enter
        check): the segments ahead because ``valid_until`` is the next one
        that answers otherwise. So they are what answers are memoized by."""
        rec = self.lookup(app_id)
        if rec is None:
            return None
        version, fetched_at, known, count = _HEAD.unpack_from(rec)
        if not self.fresh_at(fetched_at, now):
            return STALE
        if not known:
            return UNKNOWN_HELD
        offset, _ = segment_span(rec, count, now)
        return version, rec[offset:]

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
        records = self._records
        with self._lock:
            if self.complete and app_id in records:
                records[app_id] = rec  # in place: a lock-free reader never misses it
            else:
                records.pop(app_id, None)
                records[app_id] = rec
        self._absent.pop(app_id, None)
        self._corrupt.discard(app_id)
        if len(self._records) > self.capacity:
            if self.complete:
                # The table outgrew --cache-size: ids not held are read again
                # (said before the eviction, which a check may see at once).
                self.complete = False
                log.warning(
                    "status table larger than --cache-size (%d): ids not cached are read "
                    "from Redis",
                    self.capacity,
                )
            oldest = next(iter(self._records))
            with self._lock:
                del self._records[oldest]
            self._drop_rooms_of(oldest)
            self.evictions += 1

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

    def touch(self, app_id: str, now: Millis) -> None:
        """The held record was found current in Redis at ``now``."""
        old = self._records.get(app_id)
        if old is not None:
            self._records[app_id] = self._touched(old, now)  # in place, as apply()

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
        rooms[room_id] = live_room(room, now)
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
        # Not whole first: a check meanwhile must not answer an id missing
        # from a half-cleared table as unknown.
        self.complete = False
        self.synced_since = None
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

    def trip(self, now: Millis) -> None:
        """Open now: Redis was found down elsewhere (the change feed got no
        answer, or a refused or reset connection), so no check waits to find
        it out again."""
        if self.failures < self.threshold:
            self.failures = self.threshold
            self.trips += 1
        self.open_until = now + self.cooldown_ms

    def failure(self, now: Millis) -> None:
        self.failures += 1
        if self.failures == self.threshold:
            self.trips += 1
            self.open_until = now + self.cooldown_ms
