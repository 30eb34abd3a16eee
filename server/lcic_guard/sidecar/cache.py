"""The sidecar's in-process status cache, a replica of the status table
kept current by the change feed.

In steady state a check is answered from here with no Redis call: the table
is loaded from the feed shards' snapshots, then every change the reconciler
writes arrives on the feed. An entry is *fresh* while its feed shard is
vouched for (read with no gap, confirmed by a progress mark within
``max_age``); otherwise the checker reads Redis for it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import Enum
from operator import itemgetter
from typing import Final, Literal, TypeAlias

from lcic_guard.domain.policy import AppStatus, Room
from lcic_guard.domain.rooms import live_room
from lcic_guard.domain.time import Millis
from lcic_guard.store.keys import FEED_SHARDS, feed_shard
from lcic_guard.store.packed import (
    HEAD,
    pack,
    segment_span,
    segment_starts,
    unpack,
)

log = logging.getLogger(__name__)

# What a snapshot entry's record starts with: a version, a fetched_at of 0
# and known (0 or 1) -- the stamp --, a segment count, then its feed shard.
# A misparsed or foreign entry fails this.
_STAMPS: Final = frozenset({b"\x00" * 8 + b"\x00", b"\x00" * 8 + b"\x01"})
_STAMP_AT: Final = itemgetter(slice(8, 17))
_SHARD_AT: Final = itemgetter(HEAD.size - 1)


def _loaded_shape(recs: list[bytes], shard: int) -> bool:
    """Every record of ``recs`` starts as a snapshot record of ``shard``:
    C-level maps, about 150 ms a million."""
    return not recs or (
        min(map(len, recs)) >= HEAD.size
        and set(map(_SHARD_AT, recs)) == {shard}
        and set(map(_STAMP_AT, recs)) <= _STAMPS
    )


def _readable_entries(chunk: list[bytes], shard: int) -> tuple[list[str], list[bytes]]:
    """The ids and records of the entries of ``chunk`` that have an id
    (UTF-8, before a NUL) and the shape :func:`_loaded_shape` checks, one
    at a time: the slow path, for a chunk that failed the fast one."""
    held: dict[str, bytes] = {}
    for v in chunk:
        app, sep, rec = v.partition(b"\0")
        try:
            app_id = app.decode()
        except UnicodeDecodeError:
            continue
        if sep and app_id and _loaded_shape([rec], shard):
            held[app_id] = rec
    return list(held), list(held.values())


# The fetched_at of a record loaded from its shard's snapshot (the snapshot
# stores 0): current as of the shard's last load and confirmations since.
LOADED: Final = 0


@dataclass(slots=True)
class Entry:
    """What the sidecar knows of one application (a decoded view)."""

    status: AppStatus | None  # None: the status table does not know it (R12)
    fetched_at: Millis  # when it was read from Redis or applied from the feed
    rooms: dict[str, Room | None] | None = None  # room id -> report (None: none)


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

    Freshness is per feed shard, proven from the feed (see
    :mod:`lcic_guard.sidecar.follower`): a shard is *vouched* while the feed
    is read, the shard is loaded (``synced_since``) and its sequence has been
    applied with no gap up to a progress mark or change confirmed within
    ``max_age``. A held record is fresh while its shard is vouched and it was
    fetched since that shard was last loaded; nothing is re-read in the
    background.

    Once the feed reader has loaded every shard (and nothing was evicted),
    the cache is a *complete replica*: an id it does not hold is not in the
    table, and is answered UNKNOWN_APPLICATION with no Redis read while its
    shard is vouched.

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
        self.refused_entries = 0  # snapshot entries not held: not records this version reads
        # Set by the feed reader: while it reads the feed, a shard loaded at
        # ``_synced_since[s]`` (None: not loaded, or being repaired) is
        # current as of ``_confirmed[s]``.
        self.feed_healthy = False
        self._synced_since: list[Millis | None] = [None] * FEED_SHARDS
        self._confirmed: list[Millis] = [0] * FEED_SHARDS
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

    # -- feed shards: what the feed reader proves -----------------------------

    def shard_loaded(self, shard: int, since: Millis) -> None:
        """The shard was loaded from a read that began at ``since``: records
        fetched since then are current as of then."""
        self._synced_since[shard] = since
        self._confirmed[shard] = max(self._confirmed[shard], since)

    def shard_unsynced(self, shard: int) -> None:
        """The shard cannot be vouched for (a gap, a reload): its records are
        read from Redis until it is loaded again."""
        self._synced_since[shard] = None

    def confirm(self, shard: int, at: Millis) -> None:
        """Every change of the shard up to a mark made at ``at`` is applied."""
        if at > self._confirmed[shard]:
            self._confirmed[shard] = at

    def vouched(self, shard: int, now: Millis) -> bool:
        return (
            self.feed_healthy
            and self._synced_since[shard] is not None
            and now - self._confirmed[shard] <= self.max_age_ms
        )

    def shard_state(self, shard: int) -> tuple[Millis | None, Millis]:
        """``(loaded since or None, confirmed as of)`` of a shard."""
        return self._synced_since[shard], self._confirmed[shard]

    @property
    def synced(self) -> bool:
        """Every shard is loaded (none being repaired)."""
        return all(s is not None for s in self._synced_since)

    @property
    def confirmed_at(self) -> Millis:
        """Up to when the whole replica is known current: its oldest shard's
        confirmation (0 while a shard is not loaded)."""
        if not self.synced:
            return 0
        return min(self._confirmed)

    # -- reads ----------------------------------------------------------------

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
        version, fetched_at, known, count, shard = HEAD.unpack_from(rec)
        synced = self._synced_since[shard]
        if (
            synced is None
            or (fetched_at < synced and fetched_at != LOADED)
            or now - self._confirmed[shard] > self.max_age_ms
            or not self.feed_healthy
        ):
            return STALE
        if not known:
            return UNKNOWN_HELD
        offset, _ = segment_span(rec, count, now)
        return version, rec[offset:]

    def _fresh(self, app_id: str, fetched_at: Millis, now: Millis) -> bool:
        synced = self._synced_since[feed_shard(app_id)]
        return synced is not None and fetched_at >= synced and self.vouched(feed_shard(app_id), now)

    def absent_fresh(self, app_id: str, now: Millis) -> bool:
        """Redis said it does not know ``app_id``, and that still holds."""
        seen = self._absent.get(app_id)
        return seen is not None and self._fresh(app_id, seen, now)

    def replica_answers_absent(self, app_id: str, now: Millis) -> bool:
        """``app_id`` is not held, and that says it is not in the table: the
        replica is whole and its shard vouched for."""
        return (
            self.complete and app_id not in self._corrupt and self.vouched(feed_shard(app_id), now)
        )

    @property
    def whole(self) -> bool:
        """The replica holds the whole table, every shard loaded and followed."""
        return self.complete and self.feed_healthy and self.synced

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
            shard = feed_shard(app_id)
            if (
                self.complete
                and self._synced_since[shard] is not None
                and app_id not in self._corrupt
            ):
                # Not in the whole table as last confirmed (R13: a last-seen
                # "not in the table" counts as a status).
                return Entry(None, self._confirmed[shard])
            return None
        status, fetched_at = unpack(app_id, rec)
        return Entry(status, fetched_at, self._rooms.get(app_id))

    def last_confirmed(self, app_id: str, entry: Entry) -> Millis:
        """Up to when the entry is known to have been current (for R13)."""
        shard = feed_shard(app_id)
        if entry.fetched_at == LOADED:
            # From the shard's last load, never replaced since: current as of
            # the shard's last confirmation (kept while it is reloaded).
            return self._confirmed[shard]
        synced = self._synced_since[shard]
        if synced is not None and entry.fetched_at >= synced:
            return max(entry.fetched_at, self._confirmed[shard])
        return entry.fetched_at

    def rooms_of(self, app_id: str) -> dict[str, Room | None] | None:
        return self._rooms.get(app_id)

    def held_version(self, app_id: str) -> int | None:
        rec = self._records.get(app_id)
        if rec is None:
            return None
        version, _, known, _, _ = HEAD.unpack_from(rec)
        return int(version) if known else None

    def transitions(self, app_id: str, after: Millis, until: Millis) -> list[Millis]:
        """The instants in (after, until] at which the held status changes."""
        rec = self._records.get(app_id)
        if rec is None:
            return []
        return [int(t) for t in segment_starts(rec) if after < t <= until]

    def app_ids(self) -> list[str]:
        return list(self._records)

    def shard_app_ids(self, shard: int) -> list[str]:
        """The ids held (or remembered as absent) in one feed shard."""
        return self.app_ids_by_shard()[shard]

    def app_ids_by_shard(self) -> list[list[str]]:
        """The ids held (or remembered as absent), by feed shard, in one pass."""
        out: list[list[str]] = [[] for _ in range(FEED_SHARDS)]
        for app_id, rec in list(self._records.items()):
            out[rec[HEAD.size - 1]].append(app_id)
        for app_id in list(self._absent):
            out[feed_shard(app_id)].append(app_id)
        return out

    # -- writes -----------------------------------------------------------------

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
        if self._absent:
            self._absent.pop(app_id, None)
        if self._corrupt:
            self._corrupt.discard(app_id)
        if len(records) > self.capacity:
            if self.complete:
                # The table outgrew --cache-size: ids not held are read again
                # (said before the eviction, which a check may see at once).
                self.complete = False
                log.warning(
                    "status table larger than --cache-size (%d): ids not cached are read "
                    "from Redis",
                    self.capacity,
                )
            oldest = next(iter(records))
            with self._lock:
                del records[oldest]
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
        """Hold what Redis said of ``app_id`` at ``now``. Without ``replace``,
        a newer record held (it came on the feed meanwhile) is kept."""
        old = self._records.get(app_id)
        if not replace and old is not None:
            old_version, _, known, _, _ = HEAD.unpack_from(old)
            if known and (status is None or status.version < old_version):
                # A slower read raced a newer feed entry: keep the newer record.
                # (A known app never becomes unknown, short of Redis losing its
                # data, which the feed reader detects and reloads with `replace`.)
                return
        if status is None:
            if old is None and self.replica_answers_absent(app_id, now):
                return  # the replica already answers it: nothing to remember
            self._store_absent(app_id, now)
            return
        self._store(app_id, pack(status, now, feed_shard(app_id)))

    def put_loaded(self, shard: int, chunks: list[list[bytes]]) -> dict[str, bytes]:
        """Hold feed shard ``shard``'s snapshot as read (each entry the app
        id, a NUL, then its packed record), replacing what is held, with the
        rooms held of those apps. Returns what it holds now, by id.

        The records keep the fetched_at of 0 the snapshot stores: it means
        "as of the shard's last load", which :meth:`shard_loaded` dates.
        Little but C-level work per record: a million load in about a second.

        An entry that is not what the reconciler writes (no NUL, an id that
        is not UTF-8, a record too short, of another shard or not stamped 0)
        is not held: the replica is then not whole, so a check of an id not
        held reads Redis rather than answer "unknown" from a table that may
        have lost it."""
        loaded: dict[str, bytes] = {}
        refused = 0
        for chunk in chunks:
            try:
                pairs = dict(v.split(b"\0", 1) for v in chunk)
                ids, recs = list(map(bytes.decode, pairs.keys())), list(pairs.values())
                fine = _loaded_shape(recs, shard)
            except (ValueError, UnicodeDecodeError):
                fine = False
            if not fine:
                ids, recs = _readable_entries(chunk, shard)
                refused += len(chunk) - len(ids)
            loaded.update(zip(ids, recs, strict=True))
        if refused:
            self.complete = False
            self.refused_entries += refused
            log.warning(
                "snapshot of feed shard %d: %d entries are not records this version reads "
                "(not held; ids not held are read from Redis)",
                shard,
                refused,
            )
        records = self._records
        with self._lock:
            records.update(loaded)
        if self._rooms:
            for app_id in loaded.keys() & self._rooms.keys():
                self._drop_rooms_of(app_id)
        if self._absent:
            for app_id in loaded.keys() & self._absent.keys():
                del self._absent[app_id]
        if self._corrupt:
            self._corrupt.difference_update(loaded)
        while len(records) > self.capacity:
            self.complete = False
            oldest = next(iter(records))
            with self._lock:
                del records[oldest]
            self._drop_rooms_of(oldest)
            self.evictions += 1
        return loaded

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
        """Apply a record from the feed; True if it changed what is held
        (an older or equal version, e.g. replayed after a snapshot, does not).

        An application not held is inserted: the replica stays whole."""
        old = self._records.get(app_id)
        if old is not None:
            version, _, known, _, _ = HEAD.unpack_from(old)
            if known and version >= status.version:
                return False
        self._store(app_id, pack(status, now, feed_shard(app_id)))
        return True

    def forget_room(self, app_id: str, room_id: str) -> None:
        rooms = self._rooms.get(app_id)
        if rooms is not None and rooms.pop(room_id, _MISSING) is not _MISSING:
            self.room_count -= 1

    def drop_rooms(self, app_id: str) -> None:
        self._drop_rooms_of(app_id)

    def clear(self) -> None:
        """Forget everything (tests, and a process that must start over)."""
        # Not whole first: a check meanwhile must not answer an id missing
        # from a half-cleared table as unknown.
        self.complete = False
        for shard in range(FEED_SHARDS):
            self._synced_since[shard] = None
        self._records.clear()
        self._rooms.clear()
        self._absent.clear()
        self._corrupt.clear()
        self.room_count = 0


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
