"""The announcement stream keeps about the last retention of announcements
(issue 22 finding 8, ADR 0031), counted on Redis's clock: what is older goes
a stream node at a time as new ones are added, nothing newer ever does."""

from __future__ import annotations

from typing import Any

from lcic_guard.domain.policy import DAY
from lcic_guard.store.keys import GUARD_STREAM
from lcic_guard.store.status import Store

KEEP = 400 * DAY


async def redis_now(store: Store) -> int:
    sec, usec = await store.redis.time()
    return int(sec) * 1000 + int(usec) // 1000


async def old_and_recent(store: Store) -> tuple[list[str], list[str]]:
    """250 announcements 500 days old and 5 ten days old, by id."""
    now = await redis_now(store)
    old = [f"{now - 500 * DAY}-{i}" for i in range(250)]
    recent = [f"{now - 10 * DAY}-{i}" for i in range(5)]
    for eid in old + recent:
        await store.redis.xadd(GUARD_STREAM, {"event": "{}"}, id=eid)
    return old, recent


async def ids(store: Store) -> list[str]:
    rows: Any = await store.redis.xrange(GUARD_STREAM)
    return [eid.decode() for eid, _ in rows]


async def test_announcements_older_than_the_retention_go_newer_ones_stay(store: Store) -> None:
    old, recent = await old_and_recent(store)
    added = await store.announce({"type": "status_changed"}, keep_ms=KEEP)
    left = await ids(store)
    assert left[-6:] == [*recent, added]
    # Whole nodes (100 entries) go: at most one partly old node stays.
    assert len([i for i in left if i in old]) < 100
    assert set(left) <= set(old) | set(recent) | {added}


async def test_with_no_retention_every_announcement_stays(store: Store) -> None:
    old, recent = await old_and_recent(store)
    added = await store.announce({"type": "status_changed"})
    assert await ids(store) == [*old, *recent, added]
