"""Answers checks: reads statuses, never waits on the store for long, and
falls back on what it last saw when the store is in trouble (R13).

Knows nothing of gRPC. The store is anything with the two read methods of
:class:`StatusReader`, so a unit test can hand it a small fake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from lcic_guard.facts import Millis
from lcic_guard.policy import (
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Room,
    decide,
    decide_without_store,
)

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


def wall_clock() -> Millis:
    return time.time_ns() // 1_000_000


class StatusReader(Protocol):
    async def read_status(
        self, app_id: str, room_id: str | None = None
    ) -> tuple[AppStatus | None, Room | None]: ...

    async def read_statuses(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None]]: ...


class LRU(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True, slots=True)
class CheckRequest:
    check: Check
    app_id: str
    room_id: str | None = None


@dataclass(slots=True)
class _Seen:
    status: AppStatus | None
    seen_at: Millis


class Checker:
    """Turns check requests into decisions.

    Each read of the store is bounded by ``read_timeout`` seconds; when it
    fails or times out the decision comes from the last status seen for the
    application (:func:`decide_without_store`).
    """

    def __init__(
        self,
        reader: StatusReader,
        cfg: PolicyConfig,
        *,
        read_timeout: float = 0.005,
        clock: Callable[[], Millis] = wall_clock,
        remember: int = 100_000,
    ) -> None:
        self.reader = reader
        self.cfg = cfg
        self.read_timeout = read_timeout
        self.clock = clock
        self._seen: LRU[str, _Seen] = LRU(remember)
        self._rooms: LRU[tuple[str, str], Room] = LRU(remember)
        self.store_errors = 0

    def remember_room(self, app_id: str, room_id: str, room: Room) -> None:
        self._rooms.put((app_id, room_id), room)

    async def check(self, req: CheckRequest) -> Decision:
        room_id = req.room_id if req.check is Check.ENTER_CLASSROOM else None
        try:
            status, room = await asyncio.wait_for(
                self.reader.read_status(req.app_id, room_id), self.read_timeout
            )
        except Exception as exc:  # any store fault: R13, never an RPC error
            self._note_error(exc)
            return self._fallback(req)
        return self._answer(req, status, room)

    async def check_many(self, reqs: Sequence[CheckRequest]) -> list[Decision]:
        keys = [(r.app_id, r.room_id if r.check is Check.ENTER_CLASSROOM else None) for r in reqs]
        try:
            rows = await asyncio.wait_for(self.reader.read_statuses(keys), self.read_timeout)
        except Exception as exc:
            self._note_error(exc)
            return [self._fallback(r) for r in reqs]
        return [self._answer(r, s, room) for r, (s, room) in zip(reqs, rows, strict=True)]

    def _answer(self, req: CheckRequest, status: AppStatus | None, room: Room | None) -> Decision:
        now = self.clock()
        self._seen.put(req.app_id, _Seen(status, now))
        if room is not None and req.room_id:
            self._rooms.put((req.app_id, req.room_id), room)
        return decide(req.check, status, now, self.cfg, room)

    def _fallback(self, req: CheckRequest) -> Decision:
        now = self.clock()
        seen = self._seen.get(req.app_id)
        room = self._rooms.get((req.app_id, req.room_id)) if req.room_id else None
        if (
            seen is not None
            and seen.status is None
            and now - seen.seen_at <= self.cfg.stale_bound_ms
        ):
            # Known to be unknown: still R12, but say the answer is not fresh.
            return decide(req.check, None, now, self.cfg, degraded=True)
        return decide_without_store(
            req.check,
            seen.status if seen else None,
            seen.seen_at if seen else None,
            now,
            self.cfg,
            room,
        )

    def _note_error(self, exc: BaseException) -> None:
        self.store_errors += 1
        if self.store_errors == 1 or self.store_errors % 1000 == 0:
            log.warning(
                "status store unavailable (%s: %s); answering per R13 (errors so far: %d)",
                type(exc).__name__,
                exc,
                self.store_errors,
            )
