"""The streams lcic-guard writes: the change feed every sidecar follows (a
new status travels with its notice, so applying it needs no read), the
announcements on ``lcic:guard:events``, and the dead letters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from lcic_guard.domain.policy import AppStatus
from lcic_guard.store.codec import decode_segments, encode_segments, text
from lcic_guard.store.connect import RedisClient
from lcic_guard.store.keys import (
    CHANGES_MAXLEN,
    CHANGES_STREAM,
    DEAD_LETTER_STREAM,
    DEADLETTER_MAXLEN,
    GUARD_STREAM,
    MAX_EVENT_BYTES,
)


def stream_id_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as something that compares in the stream's order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed: a new status, or a room report."""

    entry_id: str
    app_id: str
    status: AppStatus | None
    room_id: str | None


class Feeds:
    """The change feed, announcements and dead letters (part of the Store)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def publish_change(self, status: AppStatus) -> None:
        """Tell every sidecar that an application's status changed (the new
        record travels with the notice, so no read is needed to apply it)."""
        await self.redis.xadd(
            CHANGES_STREAM,
            {
                "app": status.app_id,
                "v": status.version,
                "account": status.account_id,
                "data": encode_segments(status.segments),
                "updated_at": status.updated_at,
            },
            maxlen=CHANGES_MAXLEN,
            approximate=True,
        )

    async def publish_room(self, app_id: str, room_id: str) -> None:
        """Tell every sidecar that a classroom report changed a room."""
        await self.redis.xadd(
            CHANGES_STREAM,
            {"app": app_id, "room": room_id},
            maxlen=CHANGES_MAXLEN,
            approximate=True,
        )

    async def changes_tail(self) -> str:
        """The id of the newest change, where a new reader starts."""
        rows: Any = await self.redis.xrevrange(CHANGES_STREAM, count=1)
        return (text(rows[0][0]) or "0-0") if rows else "0-0"

    async def read_changes(self, after: str, block_ms: int, count: int = 1000) -> list[Change]:
        """Changes after ``after``, waiting up to ``block_ms`` for the first."""
        rows: Any = await self.redis.xread({CHANGES_STREAM: after}, count=count, block=block_ms)
        entries = rows[0][1] if rows else []
        out = []
        for entry_id, fields in entries:
            f = {text(k): v for k, v in fields.items()}
            app_id = text(f.get("app")) or ""
            room = text(f.get("room"))
            status = None
            if room is None and f.get("data") is not None:
                status = AppStatus(
                    app_id,
                    text(f.get("account")) or "",
                    decode_segments(f["data"]),
                    int(f.get("v") or 0),
                    int(f.get("updated_at") or 0),
                )
            out.append(Change(text(entry_id) or "", app_id, status, room))
        return out

    async def feed_gap(self, after: str) -> bool:
        """True if changes newer than ``after`` were trimmed from the feed
        (a reader resuming from ``after`` would miss them)."""
        try:
            info: Any = await self.redis.xinfo_stream(CHANGES_STREAM)
        except ResponseError:
            # No feed: nothing was missed, unless we had read from one, in
            # which case Redis lost it (restarted without its data).
            return stream_id_order(after) > (0, 0)
        # Trimming removes the oldest entries: if the entry we stopped at is
        # gone, newer ones may be gone too, so count that as a gap.
        deleted = text(info.get("max-deleted-entry-id")) or "0-0"
        first = info.get("first-entry")
        first_id = text(first[0]) if first else None
        trimmed = first_id is not None and stream_id_order(first_id) > stream_id_order(after)
        # A feed that ends before where we stopped was rolled back (Redis
        # restarted from an older snapshot): what we applied may be gone.
        last = text(info.get("last-generated-id")) or "0-0"
        rolled_back = stream_id_order(last) < stream_id_order(after)
        return trimmed or rolled_back or stream_id_order(deleted) > stream_id_order(after)

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
