"""The deadline shards in Redis: where a member lives, lua/register_replica.lua
(the replicas alive, on Redis's clock), lua/forget_moved_deadlines.lua (a
member an earlier version left in the leader's set moved to its shard, never
lost), the shards' leases (lua/lease.lua on a shard's keys) and the two
lanes of a batch (the most recently due first, then the longest due)."""

from __future__ import annotations

import asyncio
import zlib

from lcic_guard.domain.policy import DAY
from lcic_guard.store.coordination import Coordination
from lcic_guard.store.keys import (
    DEADLINE_SHARDS,
    DEADLINES,
    FENCE,
    LEADER,
    REPLICAS,
    app_deadline,
    deadline_key,
    deadline_shard,
    notice_deadline,
    recheck_key,
    release_deadline,
    shard_deadlines,
    shard_fence,
    shard_lease,
    shard_rechecks,
    warning_deadline,
)
from lcic_guard.store.status import Store
from redis.crc import key_slot

from tests.support.clock import T0

# -- where a member lives ------------------------------------------------------------


def test_a_release_lives_in_the_leaders_set_every_other_kind_in_its_shard() -> None:
    assert deadline_key(release_deadline("acct-1")) == DEADLINES
    for member in (app_deadline("app-1"), notice_deadline("acct-1"), warning_deadline("acct-1")):
        assert deadline_key(member) == shard_deadlines(deadline_shard(member))
        assert deadline_key(member) != DEADLINES


def test_the_shard_is_a_stable_hash_of_the_member() -> None:
    # The same in every process and every version (a member must be found
    # where it was put, by whichever replica): CRC-32 of the member.
    assert deadline_shard("app:app-1") == zlib.crc32(b"app:app-1") % DEADLINE_SHARDS == 13
    assert deadline_key("warn:acct-1") == "lcic:guard:deadlines:{d02}"
    assert deadline_key("notice:acct-1") == "lcic:guard:deadlines:{d10}"
    shards = {deadline_shard(app_deadline(f"app-{n}")) for n in range(200)}
    assert shards == set(range(DEADLINE_SHARDS)), "members spread over every shard"


def test_a_shard_its_lease_and_its_counter_share_a_slot() -> None:
    for shard in range(DEADLINE_SHARDS):
        slot = key_slot(shard_deadlines(shard).encode())
        assert key_slot(shard_lease(shard).encode()) == slot
        assert key_slot(shard_fence(shard).encode()) == slot
    slots = {key_slot(shard_deadlines(s).encode()) for s in range(DEADLINE_SHARDS)}
    assert len(slots) == DEADLINE_SHARDS, "spread over a cluster's nodes"


async def test_schedule_and_unschedule_use_the_members_set(store: Store) -> None:
    coord = Coordination(store)
    await coord.schedule("app:app-1", T0)
    await coord.schedule("release:acct-1", T0 + 5)
    assert await store.redis.zscore(deadline_key("app:app-1"), "app:app-1") == T0
    assert await store.redis.zscore(DEADLINES, "app:app-1") is None
    assert await store.redis.zscore(DEADLINES, "release:acct-1") == T0 + 5
    await coord.schedule("app:app-1", T0 + 9, only_earlier=True)
    assert await store.redis.zscore(deadline_key("app:app-1"), "app:app-1") == T0
    await coord.reschedule({"app:app-1": T0 + 9, "warn:acct-1": T0 + 1}, ["release:acct-1"])
    assert await coord.scheduled() == [("warn:acct-1", T0 + 1), ("app:app-1", T0 + 9)]
    await coord.unschedule("app:app-1")
    assert await coord.scheduled("app:") == []


# -- lua/register_replica.lua ---------------------------------------------------------


async def test_replicas_alive_are_counted_and_the_lapsed_forgotten(store: Store) -> None:
    coord = Coordination(store)
    assert await coord.register_replica("r1", 10_000) == 1
    assert await coord.register_replica("r2", 100) == 2
    assert await coord.register_replica("r1", 10_000) == 2, "noting again counts once"
    await asyncio.sleep(0.2)
    assert await coord.register_replica("r1", 10_000) == 1, "r2's time ran out"
    assert await store.redis.zrange(REPLICAS, 0, -1) == [b"r1"]
    # Its time is Redis's clock, not the caller's.
    redis_now = await store.server_time()
    until = await store.redis.zscore(REPLICAS, "r1")
    assert until is not None and redis_now + 9_000 < until <= redis_now + 10_000
    await coord.forget_replica("r1")
    assert await store.redis.exists(REPLICAS) == 0


# -- lua/lease.lua and lua/resign.lua on a shard -------------------------------------------


async def test_a_shards_lease_is_its_own(store: Store) -> None:
    coord = Coordination(store)
    assert await coord.hold_shard(3, "r1", 10_000) == 1
    assert await coord.hold_shard(3, "r2", 10_000) == 0, "held by r1"
    assert await coord.hold_shard(4, "r2", 10_000) == 1, "each shard has its own counter"
    assert await coord.hold_lease("r2", 10_000) == 1, "and the leader lease its own"
    assert await coord.hold_shard(3, "r1", 10_000) == 1, "renewed, same token"
    await coord.resign_shard(3, "r2")
    assert await store.redis.get(shard_lease(3)) == b"r1|1", "only its holder gives it up"
    await coord.resign_shard(3, "r1")
    assert await coord.hold_shard(3, "r2", 10_000) == 2, "the next holder's token is higher"
    assert await store.redis.get(shard_fence(3)) == b"2"
    assert await store.redis.get(FENCE) == b"1" and await store.redis.get(LEADER) == b"r2|1"


# -- lua/forget_moved_deadlines.lua -----------------------------------------------------


async def test_members_of_an_earlier_version_move_to_their_shards(store: Store) -> None:
    coord = Coordination(store)
    old = {"app:a": T0, "warn:acct-1": T0 + 1, "notice:acct-1": T0 + 2, "release:acct-1": T0 + 3}
    await store.redis.zadd(DEADLINES, old)
    # One already in its shard, later than the old set says: moved no later.
    await store.redis.zadd(deadline_key("app:a"), {"app:a": T0 + 60_000})
    cursor, page = await coord.legacy_deadlines(0, 1000)
    assert cursor == 0
    assert sorted(page) == [("app:a", T0), ("notice:acct-1", T0 + 2), ("warn:acct-1", T0 + 1)]
    assert await coord.move_to_shards(page) == 3
    assert await store.redis.zrange(DEADLINES, 0, -1, withscores=True) == [
        (b"release:acct-1", float(T0 + 3))
    ]
    for member, at in old.items():
        assert await store.redis.zscore(deadline_key(member), member) == at, member


async def test_a_member_rescheduled_in_the_old_set_while_it_moved_stays_there(
    store: Store,
) -> None:
    """An earlier version still running may write the old set at any moment:
    a member whose time changed after it was read is kept, and moved again."""
    coord = Coordination(store)
    await store.redis.zadd(DEADLINES, {"app:a": T0, "app:b": T0})
    _, page = await coord.legacy_deadlines(0, 1000)
    await store.redis.zadd(DEADLINES, {"app:b": T0 + 5})  # rescheduled meanwhile
    assert await coord.move_to_shards(page) == 1
    assert await store.redis.zscore(DEADLINES, "app:b") == T0 + 5
    assert await store.redis.zscore(deadline_key("app:b"), "app:b") == T0
    _, page = await coord.legacy_deadlines(0, 1000)
    assert page == [("app:b", T0 + 5)]
    assert await coord.move_to_shards(page) == 1
    assert await store.redis.zscore(deadline_key("app:b"), "app:b") == T0, "never later"
    assert await store.redis.exists(DEADLINES) == 0


# -- the two lanes of a batch -------------------------------------------------------------


async def test_a_batch_takes_the_most_recently_due_then_the_longest_due_and_rechecks(
    store: Store,
) -> None:
    coord = Coordination(store)
    key = shard_deadlines(0)
    await store.redis.zadd(key, {f"app:{n:03d}": T0 + n for n in range(100)})
    await store.redis.zadd(key, {"app:later": T0 + 1000})
    await store.redis.zadd(shard_rechecks(0), {"app:r1": T0 + 50, "app:r0": T0, "app:r9": T0 + 999})
    got = await coord.due(
        key, T0 + 99, fresh=3, backlog=4, rechecks_key=shard_rechecks(0), rechecks=5
    )
    assert got == (
        ["app:099", "app:098", "app:097"],
        ["app:000", "app:001", "app:002", "app:003"],
        ["app:r0", "app:r1"],
    )
    assert await coord.due(key, T0 - 1, fresh=3, backlog=4) == ([], [], [])


async def test_an_applications_rechecks_are_apart_from_its_transitions(store: Store) -> None:
    """A state waiting to settle is looked at again from the shard's re-check
    set: a burst's second pass does not crowd the transitions just due."""
    coord = Coordination(store)
    await coord.reschedule({"app:a": T0 + DAY}, rechecks={"app:a": T0 + 10})
    assert await store.redis.zscore(deadline_key("app:a"), "app:a") == T0 + DAY
    assert await store.redis.zscore(recheck_key("app:a"), "app:a") == T0 + 10
    assert recheck_key("app:a") == shard_rechecks(deadline_shard("app:a"))
    assert key_slot(recheck_key("app:a").encode()) == key_slot(deadline_key("app:a").encode())
    await coord.recheck_earlier({"app:a": T0 + 20})
    assert await store.redis.zscore(recheck_key("app:a"), "app:a") == T0 + 10, "never later"
    assert await coord.scheduled("app:") == [("app:a", T0 + 10)]
    await coord.reschedule({}, ["app:a"], rechecks={"app:a": None})
    assert await coord.scheduled() == []
