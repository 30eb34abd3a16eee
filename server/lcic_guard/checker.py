"""Answers checks: from the cache when it is fresh, else from Redis within a
sub-deadline, else from what was last seen (R13).

Knows nothing of gRPC. The store is anything with the two read methods of
:class:`StatusReader`, so a unit test can hand it a small fake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from lcic_guard.cache import (
    CircuitBreaker,
    Entry,
    StatusCache,
    segment_span,
    unpack_segment,
)
from lcic_guard.facts import Millis
from lcic_guard.policy import (
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Room,
    decide,
    decide_without_store,
    r4_r5_allowed,
)

log = logging.getLogger(__name__)

# Memoized decisions (by check, version and segment); cleared when full.
MEMO_SIZE = 8192


def wall_clock() -> Millis:
    return time.time_ns() // 1_000_000


class StatusReader(Protocol):
    async def read_status(
        self, app_id: str, room_id: str | None = None
    ) -> tuple[AppStatus | None, Room | None]: ...

    async def read_statuses(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None]]: ...


Row = tuple[AppStatus | None, Room | None]


@dataclass(frozen=True, slots=True)
class CheckRequest:
    check: Check
    app_id: str
    room_id: str | None = None


class Checker:
    """Turns check requests into decisions.

    A check is answered from the cache when its entry is fresh (no Redis
    call). Otherwise Redis is read, bounded by ``read_timeout`` seconds and
    skipped while the circuit breaker is open; when that fails the decision
    comes from the last status seen (:func:`decide_without_store`).
    """

    def __init__(
        self,
        reader: StatusReader,
        cfg: PolicyConfig,
        *,
        read_timeout: float = 0.005,
        clock: Callable[[], Millis] = wall_clock,
        cache: StatusCache | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.reader = reader
        self.cfg = cfg
        self.read_timeout = read_timeout
        self.clock = clock
        self.cache = cache if cache is not None else StatusCache(100_000, max_age_ms=60_000)
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.store_errors = 0
        self.store_reads = 0  # reads attempted (none while the breaker is open)
        self._reads: dict[tuple[str, str | None], asyncio.Future[Row]] = {}
        self._memo: dict[tuple[Check, int, bytes], Decision] = {}

    def check_cached(self, req: CheckRequest) -> Decision | None:
        """The decision from a fresh cache entry, or None (then :meth:`check`).

        Synchronous, so a cache hit costs no coroutine. A decision depends
        only on the check, the record's version and the segment in force
        (and, for a suspended app's classroom, the room), so answers are
        memoized by those: most checks only find their segment."""
        return self._from_cache(req, self.clock())

    def _from_cache(self, req: CheckRequest, now: Millis) -> Decision | None:
        cache = self.cache
        rec = cache.lookup(req.app_id)
        if rec is None:
            return None
        version, fetched_at, known, count = cache.HEAD.unpack_from(rec)
        if not cache.fresh_at(fetched_at, now):
            return None
        if known:
            offset, end = segment_span(rec, count, now)
            key = (req.check, version, rec[offset:end])
        else:
            key = (req.check, 0, b"")
        memo = self._memo.get(key)
        if memo is not None:
            cache.hits += 1
            return memo
        status = None
        room: Room | None = None
        if known:
            seg = unpack_segment(rec, offset)
            status = AppStatus(req.app_id, "", (seg,), version)
            if req.check is Check.ENTER_CLASSROOM and not r4_r5_allowed(seg):
                # Only a suspension makes the room matter (R6): not memoized.
                rooms = cache.rooms_of(req.app_id)
                if rooms is None or req.room_id not in rooms:
                    return None
                cache.hits += 1
                return decide(req.check, status, now, self.cfg, rooms[req.room_id or ""])
        decision = decide(req.check, status, now, self.cfg, room)
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = decision
        cache.hits += 1
        return decision

    def _room_key(self, req: CheckRequest) -> str | None:
        return req.room_id if req.check is Check.ENTER_CLASSROOM else None

    async def check(self, req: CheckRequest) -> Decision:
        return self.check_cached(req) or await self.check_uncached(req)

    async def check_uncached(self, req: CheckRequest) -> Decision:
        """The decision when the cache had none: Redis, else R13."""
        now = self.clock()
        self.cache.misses += 1
        if not self.breaker.allows(now):
            return self._fallback(req, now)
        try:
            status, room = await self._read(req.app_id, self._room_key(req))
        except Exception as exc:  # any store fault: R13, never an RPC error
            self._note_error(exc, now)
            return self._fallback(req, now)
        # The read's own callback (_keep) already filled the cache.
        return decide(req.check, status, self.clock(), self.cfg, room)

    async def check_many(self, reqs: Sequence[CheckRequest]) -> list[Decision]:
        """One pass over the cache; the misses in one pipelined read."""
        now = self.clock()
        out: list[Decision | None] = [self._from_cache(r, now) for r in reqs]
        missing = [i for i, d in enumerate(out) if d is None]
        if missing:
            self.cache.misses += len(missing)
            rows: list[tuple[AppStatus | None, Room | None]] | None = None
            if self.breaker.allows(now):
                keys = [(reqs[i].app_id, self._room_key(reqs[i])) for i in missing]
                self.store_reads += 1
                batch = asyncio.ensure_future(self.reader.read_statuses(keys))
                batch.add_done_callback(partial(self._batch_done, keys))
                try:
                    rows = await asyncio.wait_for(asyncio.shield(batch), self.read_timeout)
                except Exception as exc:
                    self._note_error(exc, now)
            now = self.clock()
            for n, i in enumerate(missing):
                if rows is None:
                    out[i] = self._fallback(reqs[i], now)
                else:
                    status, room = rows[n]
                    out[i] = decide(reqs[i].check, status, now, self.cfg, room)
        return [d for d in out if d is not None]

    async def _read(self, app_id: str, room_id: str | None) -> Row:
        """Read one app (and room) from Redis within the sub-deadline.

        The read itself is not cancelled at the deadline: it finishes in the
        background and fills the cache, so a late reply still serves the next
        check, and no connection is torn down mid-reply (cancelling a command
        makes redis-py drop its connection; under a slow Redis every check
        would then pay for a new one). Concurrent checks of the same app and
        room share one read.
        """
        key = (app_id, room_id)
        read = self._reads.get(key)
        if read is None:
            self.store_reads += 1
            read = asyncio.ensure_future(self.reader.read_status(app_id, room_id))
            self._reads[key] = read
            read.add_done_callback(partial(self._read_done, key))
        return await asyncio.wait_for(asyncio.shield(read), self.read_timeout)

    def _read_done(self, key: tuple[str, str | None], read: asyncio.Future[Row]) -> None:
        self._reads.pop(key, None)
        if not read.cancelled() and read.exception() is None:
            self._keep([key], [read.result()])

    def _batch_done(
        self, keys: list[tuple[str, str | None]], read: asyncio.Future[list[Row]]
    ) -> None:
        if not read.cancelled() and read.exception() is None:
            self._keep(keys, read.result())

    def _keep(self, keys: Sequence[tuple[str, str | None]], rows: Sequence[Row]) -> None:
        # Redis answered, if late: it is reachable, so close the breaker (a
        # frozen or dead Redis never gets here, and keeps it open).
        self.breaker.success()
        now = self.clock()
        for (app_id, room_id), (status, room) in zip(keys, rows, strict=True):
            self.cache.put(app_id, status, now)
            if room_id is not None:
                self.cache.put_room(app_id, room_id, room)

    def _fallback(self, req: CheckRequest, now: Millis) -> Decision:
        entry: Entry | None = self.cache.get(req.app_id)
        if entry is None:
            return decide_without_store(req.check, None, None, now, self.cfg)
        seen_at = self.cache.last_confirmed(entry)
        room = None
        if req.room_id and entry.rooms is not None:
            room = entry.rooms.get(req.room_id)
        if entry.status is None and now - seen_at <= self.cfg.stale_bound_ms:
            # Known to be unknown: still R12, but say the answer is not fresh.
            return decide(req.check, None, now, self.cfg, degraded=True)
        return decide_without_store(req.check, entry.status, seen_at, now, self.cfg, room)

    def remember_room(self, app_id: str, room_id: str, room: Room | None) -> None:
        """A report went through this sidecar: the room is read again on use."""
        self.cache.forget_room(app_id, room_id)

    def _note_error(self, exc: BaseException, now: Millis) -> None:
        self.store_errors += 1
        self.breaker.failure(now)
        if self.store_errors == 1 or self.store_errors % 1000 == 0:
            log.warning(
                "status store unavailable (%s: %s); answering per R13 (errors so far: %d)",
                type(exc).__name__,
                exc,
                self.store_errors,
            )
