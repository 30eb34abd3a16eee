"""The streams lcic-guard writes: the change feed every sidecar follows, in
feed shards (a new status travels with its notice and its shard sequence
number, so applying it needs no read and a gap shows), with each shard's
packed snapshot; the announcements on ``lcic:guard:events``; and the dead
letters.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from lcic_guard.domain.policy import AppStatus
from lcic_guard.store.codec import decode_segments, text
from lcic_guard.store.connect import RedisClient
from lcic_guard.store.keys import (
    DEAD_LETTER_STREAM,
    DEADLETTER_MAXLEN,
    FEED_MAXLEN,
    FEED_SHARDS,
    GUARD_STREAM,
    MAX_EVENT_BYTES,
    SNAPSHOT_CHUNKS,
    feed_key,
    feed_seq_key,
    snapshot_key,
)
from lcic_guard.store.scripts import script


def stream_id_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as something that compares in the stream's order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class FeedEntry:
    """One entry of a feed shard: a new status, a room report, or a progress
    mark (neither), with the shard's sequence number after it."""

    shard: int
    entry_id: str
    seq: int
    app_id: str
    status: AppStatus | None
    room_id: str | None

    @property
    def is_mark(self) -> bool:
        return not self.app_id


def _entry(shard: int, entry_id: Any, fields: dict[Any, Any]) -> FeedEntry:
    f = {text(k): v for k, v in fields.items()}
    app_id = text(f.get("a")) or ""
    data = f.get("d")
    status = None
    if app_id and data is not None:
        status = AppStatus(
            app_id,
            text(f.get("acct")) or "",
            decode_segments(data),
            int(f.get("v") or 0),
            int(f.get("u") or 0),
        )
    return FeedEntry(
        shard, text(entry_id) or "", int(f.get("s") or 0), app_id, status, text(f.get("r"))
    )


class Feeds:
    """The change feed's shards and snapshots, announcements and dead
    letters (part of the Store)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._feed_mark = redis.register_script(script("feed_append") + script("feed_mark"))
        self._feed_head = redis.register_script(script("feed_head"))

    @property
    def clustered(self) -> bool:
        """A Redis Cluster: one read may name the streams of one slot only."""
        return isinstance(self.redis, RedisCluster)

    async def mark_progress(self) -> None:
        """A progress mark on every feed shard (the reconciler, every second)."""
        await asyncio.gather(
            *(
                self._feed_mark(keys=[feed_key(s), feed_seq_key(s)], args=[FEED_MAXLEN])
                for s in range(FEED_SHARDS)
            )
        )

    async def feed_head(self, shard: int) -> tuple[int, str]:
        """``(sequence, last entry id)`` of a shard at one instant: a reader
        positioned there applies numbers after that sequence."""
        seq, last = await self._feed_head(keys=[feed_key(shard), feed_seq_key(shard)])
        return int(seq), text(last) or "0-0"

    async def read_feeds(
        self, positions: dict[int, str], block_ms: int, count: int = 1000
    ) -> list[FeedEntry]:
        """Entries after each shard's position, waiting up to ``block_ms``
        for the first (shards of one slot only on a cluster)."""
        rows: Any = await self.redis.xread(
            {feed_key(s): after for s, after in positions.items()}, count=count, block=block_ms
        )
        if not rows:
            return []
        shard_of = {feed_key(s): s for s in positions}
        out = []
        for stream, entries in rows:
            shard = shard_of[text(stream) or ""]
            out += [_entry(shard, entry_id, fields) for entry_id, fields in entries]
        return out

    async def load_snapshot(self, shard: int) -> list[list[bytes]]:
        """The chunks of a shard's packed snapshot as read: each entry the app
        id, a NUL, then its packed record (fetched_at 0). ``HVALS``, so that
        an id crosses the wire once: one pipelined read, no decoding."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for chunk in range(SNAPSHOT_CHUNKS):
                pipe.hvals(snapshot_key(shard, chunk))
            chunks: list[list[bytes]] = await pipe.execute()
        return chunks

    async def announce(
        self, event: dict[str, Any], stream: str = GUARD_STREAM, *, keep_ms: int = 0
    ) -> str:
        """Add an announcement; with ``keep_ms``, entries more than that
        older than it go (a whole node of the stream at a time), counted on
        Redis's clock, which gave the new entry its id."""
        entry_id = (
            text(await self.redis.xadd(stream, {"event": json.dumps(event, sort_keys=True)})) or ""
        )
        if keep_ms > 0 and entry_id:
            added = stream_id_order(entry_id)[0]
            await self.redis.xtrim(stream, minid=f"{added - keep_ms}-0", approximate=True)
        return entry_id

    async def dead_letter(
        self, raw: str, reason: str, source: str, maxlen: int = DEADLETTER_MAXLEN
    ) -> None:
        """Keep a rejected event with its reason; the stream keeps about the
        last ``maxlen`` (0: all)."""
        await self.redis.xadd(
            DEAD_LETTER_STREAM,
            {"event": raw[:MAX_EVENT_BYTES], "reason": reason, "source": source},
            maxlen=maxlen or None,
            approximate=True,
        )

    async def dead_letter_length(self) -> int:
        return int(await self.redis.xlen(DEAD_LETTER_STREAM))
