"""The sidecar's cache and change feed (issue: checks at the speed of the
gRPC runtime): real Redis, real reconciler, real gRPC server and clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig
from lcic_guard.reconciler import Reconciler
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.keys import feed_key, feed_shard, snapshot_key_of
from lcic_guard.store.status import Store
from lcic_guard_client import CachedGuardClient, Decision, Reason

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.settings import sidecar_settings


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def cached_sidecar(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[RunningSidecar]:
    settings = sidecar_settings(redis_timeout_ms=2000, cache_size=50, policy=policy)
    sidecar = await build_sidecar(settings, store, clock=clock)
    await eventually(lambda: _healthy(sidecar))
    yield sidecar
    await sidecar.stop(grace=0.2)


async def _healthy(sidecar: RunningSidecar) -> bool:
    return sidecar.checker.cache.feed_healthy


async def command_calls(store: Store) -> dict[str, int]:
    stats = await store.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def stub_for(sidecar: RunningSidecar) -> tuple[grpc.aio.Channel, pb_grpc.EnforcementServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    return channel, pb_grpc.EnforcementServiceStub(channel)


async def test_steady_state_checks_make_no_redis_calls(
    cached_sidecar: RunningSidecar, reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(
        deliveries([*events.app("acct", "app-1"), *events.app("acct", "app-2")])
    )
    channel, stub = stub_for(cached_sidecar)
    async with channel:
        for app in ("app-1", "app-2", "app-unknown"):  # warm the cache
            await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id=app))
        await store.redis.config_resetstat()
        for _ in range(100):
            for app in ("app-1", "app-2"):
                d = (
                    await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id=app))
                ).decision
                assert d.allowed and not d.degraded
            d = (
                await stub.CanAccessRecording(
                    pb.CanAccessRecordingRequest(app_id="app-unknown", recording_id="r")
                )
            ).decision
            assert d.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
        batch = pb.CheckBatchRequest(
            checks=[pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id="app-1"))] * 100
        )
        assert len((await stub.CheckBatch(batch)).decisions) == 100
        calls = await command_calls(store)
    # Only the feed reader's blocking XREAD, its look for a store
    # discontinuity every 500 ms (generation, run id, feed's end) and this
    # INFO may have run: no check read a status (HMGET).
    background = {"xread", "set", "get", "info", "xrevrange"}
    assert set(calls) <= background | {"config|resetstat"}, calls
    assert cached_sidecar.checker.cache.hits >= 400


async def test_a_change_reaches_decisions_through_the_feed(
    cached_sidecar: RunningSidecar, reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct", "app-1")))
    channel, stub = stub_for(cached_sidecar)
    async with channel:
        d = (await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"))).decision
        assert d.reason == pb.DECISION_REASON_OK
        misses = cached_sidecar.checker.cache.misses
        await reconciler.ingest(
            deliveries([events("compliance_ban", T0 - HOUR, account_id="acct")])
        )

        async def banned() -> bool:
            req = pb.CanCreateClassroomRequest(app_id="app-1")
            d = (await stub.CanCreateClassroom(req)).decision
            return bool(d.reason == pb.DECISION_REASON_ACCOUNT_BANNED)

        await eventually(banned)
    # The new status came with the notice: the sidecar did not read Redis.
    assert cached_sidecar.checker.cache.misses == misses


async def test_the_cache_is_bounded(
    cached_sidecar: RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    for n in range(80):
        await reconciler.ingest(deliveries(events.app(f"acct-{n}", f"app-{n}")))
    channel, stub = stub_for(cached_sidecar)
    async with channel:
        for n in range(80):
            await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id=f"app-{n}"))
    assert len(cached_sidecar.checker.cache) == 50  # the configured size


async def test_feed_loss_is_resumed_and_a_trimmed_feed_is_repaired(
    cached_sidecar: RunningSidecar, reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct", "app-1")))
    channel, stub = stub_for(cached_sidecar)
    async with channel:
        await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"))
        feed = cached_sidecar.feed
        resyncs, gaps = feed.resyncs, feed.gaps
        # Drop the reader's connection and trim the app's feed shard past its
        # position while a change happens: the numbers jump when it is back.
        await feed.stop()
        assert not cached_sidecar.checker.cache.feed_healthy
        await reconciler.ingest(deliveries([events("compliance_ban", T0, account_id="acct")]))
        await store.redis.xtrim(feed_key(feed_shard("app-1")), maxlen=0)
        await store.mark_progress()
        # Meanwhile checks are answered from Redis, not from the stale entry.
        d = (await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"))).decision
        assert d.reason == pb.DECISION_REASON_ACCOUNT_BANNED and not d.degraded
        feed.start()

        async def repaired() -> bool:
            return feed.gaps == gaps + 1 and feed.applied[feed_shard("app-1")] is not None

        await eventually(repaired)
        # One shard loaded again, not the table.
        assert feed.resyncs == resyncs
        entry = cached_sidecar.checker.cache.get("app-1")
        assert entry is not None and entry.status is not None
        assert entry.status.at(T0).state.value == "BANNED"


async def test_watch_streams_current_status_changes_and_heartbeats(
    cached_sidecar: RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct", "app-1")))
    channel, stub = stub_for(cached_sidecar)
    async with channel:
        call = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(app_ids=["app-1"]))
        first = await call.read()
        assert first.status.app_id == "app-1"
        assert first.status.state == pb.APPLICATION_STATE_ACTIVE
        assert first.schedule[0].create_classroom.allowed
        await reconciler.ingest(deliveries([events("overdue_alert", T0, account_id="acct")]))
        seen_change = seen_heartbeat = False
        while not (seen_change and seen_heartbeat):
            resp = await asyncio.wait_for(call.read(), 5)
            if resp.HasField("status"):
                assert resp.status.state == pb.APPLICATION_STATE_GRACE
                # The schedule carries the R2 flip at A + 24 h (then the
                # package's expiry).
                assert [s.create_classroom.reason for s in resp.schedule[:2]] == [
                    pb.DECISION_REASON_OVERDUE_GRACE,
                    pb.DECISION_REASON_ACCOUNT_OVERDUE,
                ]
                seen_change = True
            else:
                seen_heartbeat = True
        call.cancel()


async def test_cached_client_answers_locally_and_asks_when_it_must(
    cached_sidecar: RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    # The client decides with its own (real) clock: packages far ahead.
    far = T0 + 3650 * DAY
    await reconciler.ingest(
        deliveries(
            [*events.app("acct", "app-1", expires=far), *events.app("acct-2", "app-2", expires=far)]
        )
    )
    target = f"127.0.0.1:{cached_sidecar.port}"

    def run() -> tuple[int, int, list[Decision]]:
        with CachedGuardClient(target, ["app-1", "app-2"], timeout=2.0) as guard:
            assert guard.wait_fresh()
            out = [guard.can_create_classroom("app-1") for _ in range(20)]
            out.append(guard.can_access_recording("app-1", "rec"))
            out.append(guard.can_create_classroom("app-unwatched"))
            return guard.local_answers, guard.remote_answers, out

    local, remote, decisions = await asyncio.to_thread(run)
    assert local == 21 and remote == 1
    assert all(d.allowed for d in decisions[:21])
    assert decisions[-1].reason == Reason.UNKNOWN_APPLICATION


async def test_progress_marks_keep_the_replica_fresh_with_no_reads(
    store: Store, policy: PolicyConfig, clock: FakeClock, reconciler: Reconciler, events: Events
) -> None:
    """Nothing is read again in the background: a held status stays fresh as
    long as progress marks confirm its shard within --cache-max-age. Without
    one, a check reads Redis (never an old answer as if current)."""
    await reconciler.ingest(
        deliveries([*events.app("acct", "app-1"), *events.app("acct", "app-2")])
    )
    settings = sidecar_settings(cache_max_age_ms=3000, policy=policy)
    sidecar = await build_sidecar(settings, store, clock=clock)
    cache = sidecar.checker.cache
    shard = feed_shard("app-1")
    try:
        await asyncio.wait_for(sidecar.feed.synced.wait(), 5)
        channel, stub = stub_for(sidecar)
        async with channel:

            async def check() -> Any:
                req = pb.CanCreateClassroomRequest(app_id="app-1")
                return (await stub.CanCreateClassroom(req)).decision

            for _ in range(3):
                clock.advance(2000)
                await store.mark_progress()
                confirmed_after = clock()

                async def confirmed(at: int = confirmed_after) -> bool:
                    return cache.shard_state(shard)[1] >= at

                await eventually(confirmed)
                d = await check()
                assert d.allowed and not d.degraded
            assert sidecar.checker.store_reads == 0
            # No mark for longer than the bound: the check reads Redis.
            clock.advance(3500)
            d = await check()
            assert d.allowed and not d.degraded
            assert sidecar.checker.store_reads == 1
    finally:
        await sidecar.stop(grace=0.2)


async def test_a_change_whose_feed_entry_was_lost_is_found_by_the_next_mark(
    store: Store, policy: PolicyConfig, clock: FakeClock, reconciler: Reconciler, events: Events
) -> None:
    """A write whose feed entry is gone (deleted, or trimmed before it was
    read) leaves a gap in the shard's numbers: the next progress mark shows
    it, and that shard alone is loaded again from its snapshot."""
    await reconciler.ingest(deliveries(events.app("acct", "app-1")))
    settings = sidecar_settings(policy=policy)
    sidecar = await build_sidecar(settings, store, clock=clock)
    try:
        await asyncio.wait_for(sidecar.feed.synced.wait(), 5)
        status, _ = await store.read_status("app-1")
        assert status is not None
        assert sidecar.checker.cache.held_version("app-1") == status.version
        await sidecar.feed.stop()
        written = await store.write_status(replace(status, version=status.version + 1))
        assert written.version > status.version
        stream = feed_key(feed_shard("app-1"))
        last: Any = await store.redis.xrevrange(stream, count=1)
        await store.redis.xdel(stream, last[0][0])
        sidecar.feed.start()
        await asyncio.sleep(0.3)
        # Nothing on the feed says so yet: the entry is simply not there.
        assert sidecar.checker.cache.held_version("app-1") == status.version
        await store.mark_progress()

        async def caught_up() -> bool:
            return sidecar.checker.cache.held_version("app-1") == written.version

        await eventually(caught_up, timeout=3.0)
        assert sidecar.feed.gaps == 1
    finally:
        await sidecar.stop(grace=0.2)


async def test_snapshot_entries_this_version_cannot_read_are_not_held(
    store: Store, policy: PolicyConfig, clock: FakeClock, reconciler: Reconciler, events: Events
) -> None:
    """A snapshot entry that is not what the reconciler writes (here one
    shifted by a byte, one with no id) is not held, and the replica is then
    not whole: a check of that app reads Redis, and says what Redis holds,
    instead of answering from a misread record or "unknown" from a table
    that lost it."""
    await reconciler.ingest(
        deliveries([*events.app("acct", "app-1"), *events.app("acct", "app-2")])
    )
    key = snapshot_key_of("app-2")
    good = await store.redis.hget(key, "app-2")
    assert isinstance(good, bytes)
    prefix = b"app-2\0"
    assert good.startswith(prefix)
    await store.redis.hset(key, "app-2", prefix + good[len(prefix) + 1 :])
    await store.redis.hset(snapshot_key_of("app-1"), "junk", b"\xff\xfe no id")
    settings = sidecar_settings(redis_timeout_ms=2000, policy=policy)
    sidecar = await build_sidecar(settings, store, clock=clock)
    try:
        await asyncio.wait_for(sidecar.feed.synced.wait(), 10)
        cache = sidecar.checker.cache
        assert cache.refused_entries == 2
        assert not cache.whole
        assert cache.lookup("app-1") is not None and cache.lookup("app-2") is None
        channel, stub = stub_for(sidecar)
        async with channel:
            for app in ("app-1", "app-2"):
                req = pb.CanCreateClassroomRequest(app_id=app)
                d = (await stub.CanCreateClassroom(req)).decision
                assert d.allowed and d.reason == pb.DECISION_REASON_OK, (app, d)
    finally:
        await sidecar.stop(grace=0.2)
