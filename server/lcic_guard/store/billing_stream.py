"""The billing stream read through a consumer group: the Redis commands of
the reconciler's stream source (XGROUP, XAUTOCLAIM, XREADGROUP, XACK, XINFO,
XPENDING, TIME).

Entries come back as ``(entry_id, fields)`` pairs as redis-py returns them;
turning them into deliveries is the source's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from lcic_guard.domain.time import Millis
from lcic_guard.store.codec import text
from lcic_guard.store.connect import RedisClient, redis_time
from lcic_guard.store.keys import BILLING_STREAM


class GroupMissing(Exception):
    """The consumer group was deleted under us (NOGROUP): create it again."""


@dataclass(frozen=True, slots=True)
class GroupStats:
    """What the consumer group reports: entries delivered and not acknowledged,
    and entries not yet delivered (None: Redis cannot tell)."""

    pending: int
    lag: int | None


async def publish_events(redis: RedisClient, events: list[str]) -> None:
    """XADD each event (its JSON text) to the billing stream, in one round trip."""
    if not events:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(BILLING_STREAM, {"event": event})
        await pipe.execute()


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


@dataclass
class BillingStream:
    redis: RedisClient
    group: str
    consumer: str
    stream: str = BILLING_STREAM

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def reclaim_idle(self, idle_ms: int, start: str, count: int) -> tuple[str, Any]:
        """Take over entries pending longer than ``idle_ms`` to any consumer
        (XAUTOCLAIM), from ``start``: the next cursor and the entries."""
        try:
            taken = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, idle_ms, start_id=start, count=count
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise GroupMissing from exc
            raise
        return text(taken[0]) or "0-0", taken[1]

    async def read(self, start: str, count: int, block_ms: int | None) -> Any:
        """Our own pending entries (``start="0"``) or new ones (``">"``)."""
        resp: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count, block=block_ms
        )
        return resp[0][1] if resp else []

    async def ack(self, entry_ids: list[Any]) -> None:
        if entry_ids:
            await self.redis.xack(self.stream, self.group, *entry_ids)

    async def _group_info(self) -> dict[Any, Any] | None:
        groups = await self.redis.xinfo_groups(self.stream)
        return next((g for g in groups if text(g.get("name")) == self.group), None)

    async def stats(self) -> GroupStats | None:
        info = await self._group_info()
        if info is None:
            return None
        lag = info.get("lag")
        return GroupStats(int(info.get("pending") or 0), None if lag is None else int(lag))

    async def watermark(self) -> Millis | None:
        """Everything added to the stream before the returned time is applied.

        With nothing undelivered and nothing pending, that is Redis's clock
        now; otherwise just before the oldest unapplied entry.
        """
        now = await redis_time(self.redis)
        info = await self._group_info()
        if info is None:
            return None
        lag = info.get("lag")
        pending = await self.redis.xpending(self.stream, self.group)
        marks = [now]
        if pending and int(pending.get("pending", 0)) > 0:
            marks.append(_entry_ms(text(pending["min"]) or "0-0") - 1)
        if lag is None or int(lag) > 0:
            last = text(info.get("last-delivered-id")) or "0-0"
            marks.append(_entry_ms(last))
        return min(marks)
