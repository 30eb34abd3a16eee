"""Answers checks: from the cache when it is fresh, else from Redis, else,
only when Redis is down, from what was last seen or the failure mode (R13).

Knows nothing of gRPC. The store is anything with the two read methods of
:class:`StatusReader`, so a unit test can hand it a small fake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from lcic_guard.domain.policy import (
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Room,
    decide,
    decide_without_store,
    r4_r5_allowed,
    r6_may_protect,
)
from lcic_guard.domain.rooms import protection_ends_at
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.logs import RateLimitedLog, describe_error
from lcic_guard.sidecar.cache import (
    STALE,
    UNKNOWN_HELD,
    CircuitBreaker,
    Entry,
    StatusCache,
)
from lcic_guard.store.packed import segment_of, timeline_of

log = logging.getLogger(__name__)

# Memoized answers (see Checker.answer); cleared when full.
MEMO_SIZE = 8192


@dataclass(frozen=True, slots=True)
class Answer:
    """A decision with what is sent for it, made once per memo key.

    ``payload`` is the serialized response (set by the renderer the server
    installs: the decision as field 1, which is every check response's
    layout, so a CheckBatchResponse is its items' payloads joined);
    ``labels`` what the decision is counted under (check, reason, allowed);
    ``shadowed`` whether shadow mode turned a denial into an allow."""

    decision: Decision
    payload: bytes = b""
    labels: tuple[str, str, str] = ("", "", "")
    shadowed: bool = False


Render = Callable[[Check, Decision], Answer]


def plain_answer(check: Check, decision: Decision) -> Answer:
    """The renderer of a checker that no server uses (no payload)."""
    labels = (check.value, decision.reason.value, "true" if decision.allowed else "false")
    return Answer(decision, labels=labels)


class _NeedsRoom(Enum):
    """Memoized for an enter check of a suspended app: the room decides (an
    enum of one member, so that ``memo is _NEEDS_ROOM`` narrows the type)."""

    NEEDS_ROOM = "needs_room"


_NEEDS_ROOM: Final = _NeedsRoom.NEEDS_ROOM
_NO_ROOM: Final = object()


class StatusReader(Protocol):
    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]: ...


_T = TypeVar("_T")
Row = tuple[AppStatus | None, Room | None]
RowOrError = Row | Exception

# A batch's misses are read in pipelines of this many, one after the other:
# each is answered soon, so a large batch on a busy but healthy Redis (or a
# busy sidecar) shows that Redis answers, and waits for its reads instead of
# being taken for an outage (R13).
BATCH_CHUNK: Final = 250


class CheckRequest(NamedTuple):
    # A tuple: made for every check, and a frozen dataclass costs three
    # times as much to make.
    check: Check
    app_id: str
    room_id: str | None = None


class Checker:
    """Turns check requests into decisions.

    A check is answered from the cache when its entry is fresh, or, when the
    cache is a complete current replica and does not hold the app, as
    UNKNOWN_APPLICATION (no Redis call either way). Otherwise Redis is read
    and the check waits for it. Only when Redis is down (a refused or reset
    connection, the circuit breaker open, or no answer within
    ``store_down_timeout``) does the check answer without it (R13): from a
    status seen within the stale bound, degraded, else by its failure mode,
    which is counted. A busy Redis, a cold cache or a large batch never
    leads there.
    """

    def __init__(
        self,
        reader: StatusReader,
        cfg: PolicyConfig,
        *,
        store_down_timeout: float = 0.25,
        read_timeout: float = 0.0,
        clock: Callable[[], Millis] = wall_clock,
        cache: StatusCache | None = None,
        breaker: CircuitBreaker | None = None,
        render: Render = plain_answer,
    ) -> None:
        """``read_timeout`` is the older name of a lower bound of
        ``store_down_timeout`` (the larger of the two is used). ``render``
        makes the answers (the server's encoding: the observer's renderer)."""
        self.reader = reader
        self.cfg = cfg
        self.store_down_timeout = max(store_down_timeout, read_timeout)
        self.clock = clock
        self.cache = cache if cache is not None else StatusCache(100_000, max_age_ms=60_000)
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.store_errors = 0
        self.store_reads = 0  # reads attempted (none while the breaker is open)
        self.failure_mode_answers: dict[tuple[str, str], int] = {}
        self.internal_errors = 0
        self._reads: dict[tuple[str, str | None], asyncio.Future[RowOrError]] = {}
        self._answered_at = 0.0  # monotonic: when Redis last answered a read
        # The one memo of answers. Its key is everything an answer depends
        # on: the check, the status record's version, and the packed segment
        # in force with every one after it (crossing a deadline of the
        # timeline is a new key; valid_until is read from the ones ahead), and
        # for an enter check of a suspended app also the room as reported and
        # whether now is inside its protection (the only comparison of now a
        # room makes). Nothing else of now enters a decision; an answer field
        # that would (e.g. a validity bound clamped against now) must add what
        # it depends on to this key. Shadow mode is fixed per process, and the
        # renderer applies it, so it needs no place in the key.
        self._memo: dict[tuple[Any, ...], Answer | _NeedsRoom] = {}
        self.render = render
        # Throttled warnings about the store; the servicer's own status reads
        # warn here too, so that one outage is one throttled series.
        self.warn = RateLimitedLog(log)

    def answer(self, req: CheckRequest, now: Millis | None = None) -> Answer | None:
        """The answer from a fresh cache entry, or None (then
        :meth:`check_uncached`). Synchronous and safe from any thread: a cache
        hit costs no coroutine, and mostly one memo lookup."""
        if now is None:
            now = self.clock()
        try:
            return self._from_cache(req, now)
        except Exception as exc:
            return self.render(req.check, self._internal_error(req, exc, now))

    def _from_cache(self, req: CheckRequest, now: Millis) -> Answer | None:
        cache = self.cache
        held = cache.in_force(req.app_id, now)
        if held is None:
            if not (
                cache.replica_answers_absent(req.app_id, now) or cache.absent_fresh(req.app_id, now)
            ):
                return None
            held = UNKNOWN_HELD  # R12, from a whole and current replica or a fresh "absent"
        elif held is STALE:
            return None
        version, segment = held
        key = (req.check, version, segment)
        memo = self._memo.get(key)
        if memo is None:
            memo = self._remember(key, self._decide_held(req.check, version, segment, now))
        if memo is _NEEDS_ROOM:
            return self._with_room(req, key, version, segment, now)
        cache.hits += 1
        return memo

    def _remember(self, key: tuple[Any, ...], memo: Answer | _NeedsRoom) -> Answer | _NeedsRoom:
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = memo
        return memo

    def _decide_held(
        self, check: Check, version: int, segment: bytes, now: Millis
    ) -> Answer | _NeedsRoom:
        if not segment:
            return self.render(check, decide(check, None, now, self.cfg))
        if check is Check.ENTER_CLASSROOM and not r4_r5_allowed(segment_of(segment)):
            return _NEEDS_ROOM  # only a suspension makes the room matter (R6)
        status = AppStatus("", "", timeline_of(segment), version)
        return self.render(check, decide(check, status, now, self.cfg))

    def _with_room(
        self, req: CheckRequest, key: tuple[Any, ...], version: int, segment: bytes, now: Millis
    ) -> Answer | None:
        rooms = self.cache.rooms_of(req.app_id)
        got = rooms.get(req.room_id or "", _NO_ROOM) if rooms is not None else _NO_ROOM
        if got is _NO_ROOM:
            return None  # not known here yet: read it
        room = got if isinstance(got, Room) else None
        if room is None:
            room_key: tuple[Any, ...] = (*key, None)
        else:
            # The room's times (plain ints hash faster than the dataclass).
            inside = now < protection_ends_at(room, self.cfg)
            room_key = (*key, room.started_at, room.scheduled_end, room.ended_at, inside)
        memo = self._memo.get(room_key)
        if memo is None or memo is _NEEDS_ROOM:  # with its room, a key only holds answers
            status = AppStatus("", "", timeline_of(segment), version)
            answer = self.render(req.check, decide(req.check, status, now, self.cfg, room))
            self._remember(room_key, answer)
            memo = answer
        self.cache.hits += 1
        return memo

    def _room_key(self, req: CheckRequest) -> str | None:
        return req.room_id if req.check is Check.ENTER_CLASSROOM else None

    async def answer_any(self, req: CheckRequest) -> Answer:
        """The answer from the cache, else from Redis or R13 (not memoized)."""
        return self.answer(req) or self.render(req.check, await self.check_uncached(req))

    async def check_uncached(self, req: CheckRequest) -> Decision:
        """The decision when the cache had none: Redis, else R13."""
        now = self.clock()
        self.cache.misses += 1
        if not self.breaker.allows(now):
            return self._fallback(req, now)
        read = self._read_future((req.app_id, self._room_key(req)))
        try:
            row = await self._answer(read)
        except Exception as exc:  # any store fault: R13, never an RPC error
            self._note_error(exc, now)
            return self._fallback(req, self.clock())
        # The read's own callback (_keep) already filled the cache.
        return self._decide_row(req, row, self.clock())

    def _decide_row(self, req: CheckRequest, row: RowOrError, now: Millis) -> Decision:
        """One item's decision; an item that cannot be decided gets its failure
        mode, alone."""
        try:
            if isinstance(row, Exception):
                raise row
            status, room = row
            return decide(req.check, status, now, self.cfg, room)
        except Exception as exc:
            return self._internal_error(req, exc, now)

    def _internal_error(self, req: CheckRequest, exc: BaseException, now: Millis) -> Decision:
        self.internal_errors += 1
        self.warn.warning(
            f"internal:{req.app_id}",
            "cannot decide %s for %s (%s: %s); answered by the failure mode",
            req.check.value,
            req.app_id,
            type(exc).__name__,
            exc,
        )
        return self._failure_mode(req, now, None)

    async def complete_many(
        self, reqs: Sequence[CheckRequest], out: list[Answer | None]
    ) -> list[Answer]:
        """Fill the items the cache could not answer (None in ``out``)."""
        render = self.render
        missing = [i for i, d in enumerate(out) if d is None]
        if missing:
            self.cache.misses += len(missing)
            rows: list[RowOrError | None] = [None] * len(missing)
            if self.breaker.allows(self.clock()):
                rows = await self._read_batch(
                    [(reqs[i].app_id, self._room_key(reqs[i])) for i in missing]
                )
            now = self.clock()
            for i, row in zip(missing, rows, strict=True):
                if row is None:
                    out[i] = render(reqs[i].check, self._fallback(reqs[i], now))
                else:
                    out[i] = render(reqs[i].check, self._decide_row(reqs[i], row, now))
        return [a for a in out if a is not None]

    async def _read_batch(self, keys: list[tuple[str, str | None]]) -> list[RowOrError | None]:
        """The rows of ``keys`` (None: not read, for Redis is down).

        Read :data:`BATCH_CHUNK` at a time, one pipeline after the other, so
        that each answers soon and a batch of any size waits for its reads as
        long as Redis keeps answering (see :meth:`_answer`); the caller's
        deadline bounds the whole (gRPC then ends the call)."""
        started = self.clock()
        out: list[RowOrError | None] = []
        for n in range(0, len(keys), BATCH_CHUNK):
            chunk = keys[n : n + BATCH_CHUNK]
            self.store_reads += 1
            read = asyncio.ensure_future(self.reader.read_rows(chunk))
            read.add_done_callback(partial(self._batch_done, chunk))
            try:
                rows = await self._answer(read)
            except Exception as exc:  # Redis is down: the rest per R13
                self._note_error(exc, started)
                break
            out += rows
        return out + [None] * (len(keys) - len(out))

    async def _answer(self, read: asyncio.Future[_T]) -> _T:
        """What ``read`` returns, waited for as long as Redis keeps answering
        reads: a busy Redis, or a sidecar busy decoding other replies, is not
        a down Redis (R13). TimeoutError once Redis has answered no read at
        all for ``store_down_timeout``. ``read`` itself is never cancelled
        (see :meth:`_read_future`)."""
        since = time.monotonic()
        while not read.done():
            left = max(since, self._answered_at) + self.store_down_timeout - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Redis within --store-down-after")
            await asyncio.wait((read,), timeout=left)
        return read.result()

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
            self.warn.warning("read-failed", "status store read failed: %s", describe_error(exc))
            return
        result = read.result()
        self._keep(keys, result if isinstance(result, list) else [result])

    def _keep(self, keys: Sequence[tuple[str, str | None]], rows: Sequence[RowOrError]) -> None:
        # Redis answered, if late: it is reachable, so close the breaker (a
        # frozen or dead Redis never gets here, and keeps it open).
        self.breaker.success()
        self._answered_at = time.monotonic()
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
        seen_at = self.cache.last_confirmed(req.app_id, entry)
        if now - seen_at > self.cfg.stale_bound_ms:
            return self._failure_mode(req, now, entry.status)
        if entry.status is None:
            # Known to be unknown: still R12, but say the answer is not fresh.
            return decide(req.check, None, now, self.cfg, degraded=True)
        room: Room | None = None
        if req.check is Check.ENTER_CLASSROOM and req.room_id:
            rooms = entry.rooms or {}
            if req.room_id in rooms:
                room = rooms[req.room_id]
            elif r6_may_protect(entry.status, now, self.cfg):
                # Never deny a class whose report was not read (R6).
                return self._failure_mode(req, now, entry.status)
        try:
            return decide_without_store(req.check, entry.status, seen_at, now, self.cfg, room)
        except Exception as exc:
            return self._internal_error(req, exc, now)

    def remember_room(self, app_id: str, room_id: str) -> None:
        """A report went through this sidecar: the room is read again on use."""
        self.cache.forget_room(app_id, room_id)

    def _note_error(self, exc: BaseException, now: Millis) -> None:
        self.store_errors += 1
        self.breaker.failure(now)
        self.warn.warning(
            "store",
            "status store unavailable (%s); answering per R13 (errors so far: %d)",
            describe_error(exc),
            self.store_errors,
        )
