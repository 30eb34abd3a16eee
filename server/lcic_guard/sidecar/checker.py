"""Answers checks: from the cache when it is fresh, else from Redis within a
sub-deadline, else from what was last seen (R13).

Knows nothing of gRPC. The store is anything with the two read methods of
:class:`StatusReader`, so a unit test can hand it a small fake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol

from lcic_guard.domain.policy import (
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Room,
    decide,
    decide_without_store,
    r4_r5_allowed,
)
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.ratelimit import RateLimitedLog, describe_error
from lcic_guard.sidecar.cache import (
    CircuitBreaker,
    Entry,
    StatusCache,
    segment_span,
    unpack,
    unpack_segment,
)

log = logging.getLogger(__name__)

# Memoized decisions (by check, version and segment); cleared when full.
MEMO_SIZE = 8192


class StatusReader(Protocol):
    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]: ...


Row = tuple[AppStatus | None, Room | None]
RowOrError = Row | Exception

# Extra time a batch's pipelined read gets per application it has to read:
# a cold or expired batch of 1,000 is a bigger reply, not a sign that Redis
# is down.
PER_MISS_S: Final = 0.00005


@dataclass(frozen=True, slots=True)
class CheckRequest:
    check: Check
    app_id: str
    room_id: str | None = None


def bounded_room(room: Room | None, cfg: PolicyConfig) -> Room | None:
    """R6: protection never outlasts started_at + the maximum class length,
    whatever scheduled end was reported (the room's scheduled end is what
    protection reads, so it is cut to fit)."""
    if room is None or room.scheduled_end is None:
        return room
    latest = room.started_at + cfg.max_class_ms - cfg.overrun_ms
    if room.scheduled_end <= latest:
        return room
    return Room(room.started_at, max(room.started_at, latest), room.ended_at)


class Checker:
    """Turns check requests into decisions.

    A check is answered from the cache when its entry is fresh, or, when the
    cache is a complete current replica and does not hold the app, as
    UNKNOWN_APPLICATION (no Redis call either way). Otherwise Redis is read:
    after ``read_timeout`` seconds (plus :data:`PER_MISS_S` per read of a
    batch) a check with a status seen within the stale bound answers from it,
    degraded; one with none keeps waiting up to ``store_down_timeout``. Only
    then, or on a refused or reset connection, or while the circuit breaker
    is open, does the check's failure mode answer (R13), and that is counted.
    """

    def __init__(
        self,
        reader: StatusReader,
        cfg: PolicyConfig,
        *,
        read_timeout: float = 0.005,
        store_down_timeout: float = 0.25,
        clock: Callable[[], Millis] = wall_clock,
        cache: StatusCache | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.reader = reader
        self.cfg = cfg
        self.read_timeout = read_timeout
        self.store_down_timeout = max(store_down_timeout, read_timeout)
        self.clock = clock
        self.cache = cache if cache is not None else StatusCache(100_000, max_age_ms=60_000)
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.store_errors = 0
        self.store_reads = 0  # reads attempted (none while the breaker is open)
        self.failure_mode_answers: dict[tuple[str, str], int] = {}
        self.internal_errors = 0
        self._reads: dict[tuple[str, str | None], asyncio.Future[RowOrError]] = {}
        self._memo: dict[tuple[Check, int, bytes], Decision] = {}
        self._warn = RateLimitedLog(log)

    def check_cached(self, req: CheckRequest) -> Decision | None:
        """The decision from a fresh cache entry, or None (then :meth:`check`).

        Synchronous, so a cache hit costs no coroutine. A decision depends
        only on the check, the record's version and the segment in force
        with the ones after it (its ``valid_until`` is the next one that
        answers otherwise; and, for a suspended app's classroom, on the
        room), so answers are memoized by those: most checks only find their
        segment. Any memo of answers, serialized or not, must be keyed by
        all of that: ``valid_until`` is derived from the same record."""
        try:
            return self._from_cache(req, self.clock())
        except Exception as exc:
            return self._internal_error(req, exc, self.clock())

    def _unknown(self, req: CheckRequest) -> Decision:
        key = (req.check, 0, b"")
        memo = self._memo.get(key)
        if memo is None:
            memo = self._memo[key] = decide(req.check, None, 0, self.cfg)
        self.cache.hits += 1
        return memo

    def _from_cache(self, req: CheckRequest, now: Millis) -> Decision | None:
        cache = self.cache
        rec = cache.lookup(req.app_id)
        if rec is None:
            if cache.replica_answers_absent() and not cache.is_corrupt(req.app_id):
                return self._unknown(req)  # R12, from a whole and current replica
            seen = cache.absent_since(req.app_id)
            if seen is not None and cache.fresh_at(seen, now):
                return self._unknown(req)
            return None
        version, fetched_at, known, count = cache.HEAD.unpack_from(rec)
        if not cache.fresh_at(fetched_at, now):
            return None
        if known:
            offset, _ = segment_span(rec, count, now)
            # The answer's valid_until reads the timeline ahead as well, so
            # the key holds the segment in force and every one after it.
            key = (req.check, version, rec[offset:])
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
            status, _ = unpack(req.app_id, rec)
            if req.check is Check.ENTER_CLASSROOM and not r4_r5_allowed(seg):
                # Only a suspension makes the room matter (R6): not memoized.
                rooms = cache.rooms_of(req.app_id)
                if rooms is None or req.room_id not in rooms:
                    return None
                cache.hits += 1
                return decide(
                    req.check,
                    status,
                    now,
                    self.cfg,
                    bounded_room(rooms[req.room_id or ""], self.cfg),
                )
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

    def _usable_last_seen(self, req: CheckRequest, now: Millis) -> bool:
        entry = self.cache.get(req.app_id)
        return (
            entry is not None and now - self.cache.last_confirmed(entry) <= self.cfg.stale_bound_ms
        )

    async def check_uncached(self, req: CheckRequest) -> Decision:
        """The decision when the cache had none: Redis, else R13."""
        now = self.clock()
        self.cache.misses += 1
        if not self.breaker.allows(now):
            return self._fallback(req, now)
        key = (req.app_id, self._room_key(req))
        read = self._read_future(key)
        try:
            try:
                row = await asyncio.wait_for(asyncio.shield(read), self.read_timeout)
            except TimeoutError:
                if self._usable_last_seen(req, self.clock()):
                    return self._fallback(req, self.clock())
                # Nothing to go on: a slow Redis is not a down Redis.
                row = await asyncio.wait_for(
                    asyncio.shield(read), self.store_down_timeout - self.read_timeout
                )
        except Exception as exc:  # any store fault: R13, never an RPC error
            self._note_error(exc, now)
            return self._fallback(req, now)
        # The read's own callback (_keep) already filled the cache.
        return self._decide_row(req, row, self.clock())

    def _decide_row(self, req: CheckRequest, row: RowOrError, now: Millis) -> Decision:
        """One item's decision; an item that cannot be decided gets its failure
        mode, alone."""
        try:
            if isinstance(row, Exception):
                raise row
            status, room = row
            return decide(req.check, status, now, self.cfg, bounded_room(room, self.cfg))
        except Exception as exc:
            return self._internal_error(req, exc, now)

    def _internal_error(self, req: CheckRequest, exc: BaseException, now: Millis) -> Decision:
        self.internal_errors += 1
        self._warn.warning(
            f"internal:{req.app_id}",
            "cannot decide %s for %s (%s: %s); answered by the failure mode",
            req.check.value,
            req.app_id,
            type(exc).__name__,
            exc,
        )
        return self._failure_mode(req, now, None)

    async def check_many(self, reqs: Sequence[CheckRequest]) -> list[Decision]:
        """One pass over the cache; the misses in one pipelined read."""
        now = self.clock()
        out: list[Decision | None] = []
        for r in reqs:
            try:
                out.append(self._from_cache(r, now))
            except Exception as exc:
                out.append(self._internal_error(r, exc, now))
        missing = [i for i, d in enumerate(out) if d is None]
        if missing:
            self.cache.misses += len(missing)
            rows: list[RowOrError] | None = None
            if self.breaker.allows(now):
                keys = [(reqs[i].app_id, self._room_key(reqs[i])) for i in missing]
                self.store_reads += 1
                batch = asyncio.ensure_future(self.reader.read_rows(keys))
                batch.add_done_callback(partial(self._batch_done, keys))
                budget = self.read_timeout + PER_MISS_S * len(missing)
                try:
                    try:
                        rows = await asyncio.wait_for(asyncio.shield(batch), budget)
                    except TimeoutError:
                        later = self.clock()
                        if all(self._usable_last_seen(reqs[i], later) for i in missing):
                            rows = None
                        else:
                            rows = await asyncio.wait_for(
                                asyncio.shield(batch), max(self.store_down_timeout - budget, 0.001)
                            )
                except Exception as exc:
                    self._note_error(exc, now)
            now = self.clock()
            for n, i in enumerate(missing):
                if rows is None:
                    out[i] = self._fallback(reqs[i], now)
                else:
                    out[i] = self._decide_row(reqs[i], rows[n], now)
        return [d for d in out if d is not None]

    def _read_future(self, key: tuple[str, str | None]) -> asyncio.Future[RowOrError]:
        """One read of an app (and room), shared by concurrent checks of it.

        The read is never cancelled at a deadline: it finishes in the
        background and fills the cache, so a late reply still serves the next
        check, and no connection is torn down mid-reply (cancelling a command
        makes redis-py drop its connection; under a slow Redis every check
        would then pay for a new one).
        """
        read = self._reads.get(key)
        if read is None:
            self.store_reads += 1
            read = asyncio.ensure_future(self._read_one(key))
            self._reads[key] = read
            read.add_done_callback(partial(self._read_done, key))
        return read

    async def _read_one(self, key: tuple[str, str | None]) -> RowOrError:
        rows = await self.reader.read_rows([key])
        return rows[0]

    def _read_done(self, key: tuple[str, str | None], read: asyncio.Future[RowOrError]) -> None:
        self._reads.pop(key, None)
        self._finished(read, [key])

    def _batch_done(
        self, keys: list[tuple[str, str | None]], read: asyncio.Future[list[RowOrError]]
    ) -> None:
        self._finished(read, keys)

    def _finished(self, read: asyncio.Future[Any], keys: list[tuple[str, str | None]]) -> None:
        if read.cancelled():
            return
        exc = read.exception()
        if exc is not None:
            # The check may have given up on this read already (a timeout):
            # say what Redis actually answered, e.g. a refused password.
            self._warn.warning("read-failed", "status store read failed: %s", describe_error(exc))
            return
        result = read.result()
        self._keep(keys, result if isinstance(result, list) else [result])

    def _keep(self, keys: Sequence[tuple[str, str | None]], rows: Sequence[RowOrError]) -> None:
        # Redis answered, if late: it is reachable, so close the breaker (a
        # frozen or dead Redis never gets here, and keeps it open).
        self.breaker.success()
        now = self.clock()
        for (app_id, room_id), row in zip(keys, rows, strict=True):
            if isinstance(row, Exception):
                continue
            status, room = row
            self.cache.put(app_id, status, now)
            if room_id is not None:
                self.cache.put_room(app_id, room_id, room, now)

    def _failure_mode(self, req: CheckRequest, now: Millis, last: AppStatus | None) -> Decision:
        decision = decide_without_store(req.check, last, None, now, self.cfg)
        key = (req.check.value, "open" if decision.allowed else "closed")
        self.failure_mode_answers[key] = self.failure_mode_answers.get(key, 0) + 1
        return decision

    def _fallback(self, req: CheckRequest, now: Millis) -> Decision:
        entry: Entry | None = self.cache.get(req.app_id)
        if entry is None:
            return self._failure_mode(req, now, None)
        seen_at = self.cache.last_confirmed(entry)
        if now - seen_at > self.cfg.stale_bound_ms:
            return self._failure_mode(req, now, entry.status)
        room = None
        if req.room_id and entry.rooms is not None:
            room = entry.rooms.get(req.room_id)
        if entry.status is None:
            # Known to be unknown: still R12, but say the answer is not fresh.
            return decide(req.check, None, now, self.cfg, degraded=True)
        try:
            return decide_without_store(
                req.check, entry.status, seen_at, now, self.cfg, bounded_room(room, self.cfg)
            )
        except Exception as exc:
            return self._internal_error(req, exc, now)

    def remember_room(self, app_id: str, room_id: str) -> None:
        """A report went through this sidecar: the room is read again on use."""
        self.cache.forget_room(app_id, room_id)

    def _note_error(self, exc: BaseException, now: Millis) -> None:
        self.store_errors += 1
        self.breaker.failure(now)
        self._warn.warning(
            "store",
            "status store unavailable (%s); answering per R13 (errors so far: %d)",
            describe_error(exc),
            self.store_errors,
        )
