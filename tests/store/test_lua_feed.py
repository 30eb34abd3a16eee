"""lua/feed_append.lua (the prefix every feed-writing script shares),
lua/feed_mark.lua, lua/feed_head.lua and lua/publish_status.lua, and the
feed side of lua/write_status.lua and lua/report_room.lua: one write, one
snapshot entry and one numbered feed entry in one step. Real Redis, through
the store's API."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic_guard.domain.policy import HOUR, AppStatus, Reason, Segment
from lcic_guard.store.keys import (
    FEED_SHARDS,
    feed_key,
    feed_seq_key,
    feed_shard,
    legacy_app_key,
    snapshot_key_of,
    status_key,
)
from lcic_guard.store.packed import HEAD, unpack
from lcic_guard.store.status import Store

from tests.support.clock import T0


def status(app: str, seq: int, *reasons: Reason, account: str = "acct-1") -> AppStatus:
    return AppStatus(app, account, (Segment(T0, tuple(reasons)),), seq, updated_at=T0)


async def entries(store: Store, shard: int) -> list[dict[str, str]]:
    rows: Any = await store.redis.xrange(feed_key(shard))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in rows]


async def test_a_write_numbers_its_feed_entry_and_packs_its_snapshot_entry(store: Store) -> None:
    shard = feed_shard("app-1")
    res = await store.write_status(status("app-1", 4, Reason.OVERDUE_GRACE))
    assert res.version == 4
    (entry,) = await entries(store, shard)
    assert entry["s"] == "1" and entry["a"] == "app-1" and entry["v"] == "4"
    assert entry["acct"] == "acct-1"
    assert int(await store.redis.get(feed_seq_key(shard)) or 0) == 1
    snap: Any = await store.redis.hget(snapshot_key_of("app-1"), "app-1")
    app, _, rec = snap.partition(b"\0")
    assert app == b"app-1"  # the id travels with the record: a reader takes HVALS
    packed, _ = unpack("app-1", rec)
    # The version in the snapshot is the store's own, patched in by the script.
    assert packed is not None and packed.version == 4
    assert packed.segments == (Segment(T0, (Reason.OVERDUE_GRACE,)),)
    assert HEAD.unpack_from(rec)[4] == shard


async def test_a_refused_or_repeated_write_adds_no_entry(store: Store) -> None:
    shard = feed_shard("app-1")
    await store.write_status(status("app-1", 7))
    assert not (await store.write_status(status("app-1", 6))).written
    assert (await store.write_status(status("app-1", 7))).version == 7  # the same seq
    assert not (await store.write_status(status("app-1", 9, account="acct-2"))).written
    assert [e["s"] for e in await entries(store, shard)] == ["1"]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(apps=st.lists(st.sampled_from([f"app-{n}" for n in range(40)]), min_size=1, max_size=60))
async def test_each_shard_numbers_its_changes_one_after_another(
    store: Store, apps: list[str]
) -> None:
    await store.redis.flushdb()
    seqs: dict[str, int] = {}
    for app in apps:
        seqs[app] = seqs.get(app, 0) + 1
        await store.write_status(status(app, seqs[app]))
    await store.mark_progress()
    for shard in range(FEED_SHARDS):
        got = [int(e["s"]) for e in await entries(store, shard)]
        changes = got[:-1]
        # 1, 2, 3, ... then the mark repeating the last number.
        assert changes == list(range(1, len(changes) + 1))
        assert got[-1] == len(changes)
        assert (await store.feed_head(shard))[0] == len(changes)


async def test_a_mark_repeats_the_shard_number_and_changes_nothing(store: Store) -> None:
    shard = feed_shard("app-1")
    await store.write_status(status("app-1", 1))
    await store.write_status(status("app-1", 2))
    await store.mark_progress()
    await store.mark_progress()
    got = await entries(store, shard)
    assert [(e["s"], e.get("m")) for e in got] == [("1", None), ("2", None), ("2", "1"), ("2", "1")]
    assert int(await store.redis.get(feed_seq_key(shard)) or 0) == 2
    # A shard that never changed is marked with 0.
    other = next(s for s in range(FEED_SHARDS) if s != shard)
    assert [e["s"] for e in await entries(store, other)] == ["0", "0"]


async def test_the_head_is_the_number_and_the_last_entry_read_together(store: Store) -> None:
    shard = feed_shard("app-1")
    assert await store.feed_head(shard) == (0, "0-0")
    await store.write_status(status("app-1", 1))
    await store.mark_progress()
    rows: Any = await store.redis.xrevrange(feed_key(shard), count=1)
    assert await store.feed_head(shard) == (1, rows[0][0].decode())


async def test_a_room_report_is_numbered_on_the_feed_too(store: Store) -> None:
    shard = feed_shard("app-1")
    await store.write_status(status("app-1", 1))
    assert await store.report_room("app-1", "room-9", now=T0, until=T0 + HOUR, started_at=T0)
    assert not await store.report_room("app-x", "room-9", now=T0, until=T0 + HOUR, started_at=T0)
    got = await entries(store, shard)
    assert [(e["s"], e.get("r")) for e in got] == [("1", None), ("2", "room-9")]
    for shard_ in range(FEED_SHARDS):
        assert all(e.get("a") != "app-x" for e in await entries(store, shard_))


async def test_publish_status_puts_a_carried_over_status_on_the_feed_once(store: Store) -> None:
    """The layout before feed shards: its keys are carried over, each status
    put into its shard's snapshot and feed (lua/publish_status.lua), and the
    old keys left to expire for processes of the previous version."""
    await store.write_status(status("app-1", 3, Reason.ACCOUNT_OVERDUE))
    held: Any = await store.redis.hgetall(status_key("app-1"))
    await store.redis.hset(legacy_app_key("app-2", "status"), mapping=held)
    await store.redis.hset(legacy_app_key("app-2", "parked"), mapping={"e1": "{}"})
    assert await store.migrate_legacy_layout() == 2
    got, _ = await store.read_status("app-2")
    assert got is not None and got.version == 3 and got.account_id == "acct-1"
    assert await store.redis.hget(legacy_app_key("app-2", "parked"), "e1") is not None
    assert 0 < await store.redis.ttl(legacy_app_key("app-2", "status")) <= 86_400
    shard = feed_shard("app-2")
    assert [e["a"] for e in await entries(store, shard) if e.get("a")].count("app-2") == 1
    entry: Any = await store.redis.hget(snapshot_key_of("app-2"), "app-2")
    assert unpack("app-2", entry.partition(b"\0")[2])[0] == AppStatus(
        "app-2", "", got.segments, 3
    )  # the cache keeps no account
    # Done once: a second pass finds the layout marked and carries nothing.
    assert await store.migrate_legacy_layout() == 0
    assert [e["a"] for e in await entries(store, shard) if e.get("a")].count("app-2") == 1


async def test_publish_status_skips_a_status_written_meanwhile(store: Store) -> None:
    await store.write_status(status("app-1", 3))
    older = status("app-1", 2)
    shard = feed_shard("app-1")
    before = await entries(store, shard)
    await store._publish_carried("app-1")  # the stored version: published
    assert len(await entries(store, shard)) == len(before) + 1
    # A packed record made from a version no longer stored is not published.
    from lcic_guard.store.packed import pack

    assert not await store._publish_status(
        keys=[status_key("app-1"), feed_key(shard), feed_seq_key(shard), snapshot_key_of("app-1")],
        args=[older.version, pack(older, 0, shard), "app-1", 100],
    )
    assert len(await entries(store, shard)) == len(before) + 1
