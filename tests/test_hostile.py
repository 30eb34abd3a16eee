"""A hostile or careless caller and a Redis that loses its data: the sidecar
built as ``serve`` builds it (real redis-server, real gRPC over a socket).

Each test reproduces one finding of the hostile-input review: it failed on
the code before the fix."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.checker import wall_clock
from lcic_guard.embedded import EmbeddedRedis
from lcic_guard.facts import Millis
from lcic_guard.policy import DAY, AppStatus, Reason, Segment
from lcic_guard.runner import Sidecar, build_sidecar
from lcic_guard.settings import Settings
from lcic_guard.store import Store, connect, status_key

R = pb.DecisionReason


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def suspended(app_id: str, version: int = 1, now: Millis | None = None) -> AppStatus:
    now = wall_clock() if now is None else now
    seg = Segment(
        now - 2 * DAY,
        (Reason.ACCOUNT_OVERDUE,),
        grace_ends_at=now - 2 * DAY,
        suspended_at=now - 2 * DAY,
        release_at=now + 50 * DAY,
    )
    return AppStatus(app_id, "acct-" + app_id, (Segment(now - 10 * DAY), seg), version, now)


def active(app_id: str, version: int = 1) -> AppStatus:
    return AppStatus(app_id, "acct-" + app_id, (Segment(wall_clock() - 10 * DAY),), version)


def recordings(app_ids: list[str]) -> pb.CheckBatchRequest:
    return pb.CheckBatchRequest(
        checks=[
            pb.Check(access_recording=pb.CanAccessRecordingRequest(app_id=a, recording_id="rec-1"))
            for a in app_ids
        ]
    )


async def write_all(store: Store, statuses: list[AppStatus]) -> None:
    for i in range(0, len(statuses), 200):
        await asyncio.gather(*(store.write_status(s) for s in statuses[i : i + 200]))


@pytest_asyncio.fixture
async def own_redis() -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def rstore(own_redis: EmbeddedRedis) -> AsyncIterator[Store]:
    s = Store(connect(own_redis.url))
    yield s
    await s.close()


def settings_for(redis: EmbeddedRedis, **kw: Any) -> Settings:
    s = Settings(redis_url=redis.url, listen="127.0.0.1:0")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@contextlib.asynccontextmanager
async def started(
    redis: EmbeddedRedis, **kw: Any
) -> AsyncIterator[tuple[Sidecar, grpc.aio.Channel, pb_grpc.EnforcementServiceStub]]:
    store = Store(connect(redis.url))
    sidecar = await build_sidecar(settings_for(redis, **kw), store)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    try:
        yield sidecar, channel, pb_grpc.EnforcementServiceStub(channel)
    finally:
        await channel.close()
        await sidecar.stop(grace=0.1)
        await store.close()


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(resp.status)


SERVING = health_pb2.HealthCheckResponse.SERVING


# -- finding 1: a cold cache never fails open ---------------------------------


async def test_cold_sidecar_denies_a_batch_of_1000_suspended_apps(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    apps = [f"app-s{i}" for i in range(1000)]
    await write_all(rstore, [suspended(a) for a in apps])
    # Checks arrive the moment the port is open, before the table is loaded.
    async with started(own_redis) as (sidecar, _channel, stub):
        cold = await stub.CheckBatch(recordings(apps), timeout=10)
        assert sum(d.allowed for d in cold.decisions) == 0
        assert {d.reason for d in cold.decisions} == {R.DECISION_REASON_ACCOUNT_OVERDUE}
        await eventually(lambda: _true(sidecar.feed.in_sync))
        warm = await stub.CheckBatch(recordings(apps), timeout=10)
        assert sum(d.allowed for d in warm.decisions) == 0
        assert sidecar.checker.failure_mode_answers == {}


async def _true(value: bool) -> bool:
    return value


def rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() // 1024


async def test_unknown_flood_of_50000_ids_is_denied_without_redis_reads(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    await write_all(rstore, [active(f"app-k{i}") for i in range(50)])
    async with started(own_redis) as (sidecar, channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        assert await health(channel) == SERVING
        reads = sidecar.checker.store_reads
        before = rss_kb()
        allowed = 0
        for n in range(50):
            ids = [f"nobody-{n}-{i}" for i in range(1000)]
            resp = await stub.CheckBatch(recordings(ids), timeout=10)
            allowed += sum(d.allowed for d in resp.decisions)
            assert {d.reason for d in resp.decisions} == {R.DECISION_REASON_UNKNOWN_APPLICATION}
        single = await stub.CanCreateClassroom(
            pb.CanCreateClassroomRequest(app_id="nobody-single"), timeout=5
        )
        assert not single.decision.allowed
        assert allowed == 0
        assert sidecar.checker.store_reads == reads  # no Redis read for any of them
        cache = sidecar.checker.cache
        assert len(cache) == 50 and cache.absent_count == 0
        assert rss_kb() - before < 30_000
        known = await stub.CheckBatch(recordings(["app-k1"]), timeout=5)
        assert known.decisions[0].allowed


async def test_failure_mode_only_when_redis_is_down_and_counted(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    await write_all(rstore, [active("app-up")])
    async with started(own_redis, store_down_ms=100) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        assert sidecar.checker.failure_mode_answers == {}
        own_redis.kill()
        # The replica no longer vouches for absent ids once the feed is lost.
        await eventually(lambda: _true(not sidecar.checker.cache.feed_healthy))
        resp = await stub.CheckBatch(recordings(["never-seen"]), timeout=5)
        d = resp.decisions[0]
        assert d.reason == R.DECISION_REASON_STATUS_UNAVAILABLE and d.degraded
        assert sum(sidecar.checker.failure_mode_answers.values()) == 1
        # A known app is still answered from what was last seen (R13), no failure mode.
        resp = await stub.CheckBatch(recordings(["app-up"]), timeout=5)
        assert resp.decisions[0].allowed and resp.decisions[0].degraded
        assert sum(sidecar.checker.failure_mode_answers.values()) == 1


async def test_a_new_app_on_the_feed_is_inserted_into_the_replica(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    async with started(own_redis) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        status = suspended("app-new", version=3)
        await rstore.write_status(status)
        await rstore.publish_change(status)
        await eventually(lambda: _true(sidecar.checker.cache.lookup("app-new") is not None))
        reads = sidecar.checker.store_reads
        resp = await stub.CheckBatch(recordings(["app-new"]), timeout=5)
        assert resp.decisions[0].reason == R.DECISION_REASON_ACCOUNT_OVERDUE
        assert sidecar.checker.store_reads == reads


# -- finding 3: Redis lost its data -------------------------------------------


async def test_flushall_and_snapshot_reload_detected_within_2s(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    await write_all(rstore, [active("app-g", version=42)])
    async with started(own_redis) as (sidecar, channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        first = sidecar.feed.generation
        resp = await stub.CheckBatch(recordings(["app-g"]), timeout=5)
        assert resp.decisions[0].allowed and resp.decisions[0].status_version == 42
        # Redis loses everything; the reload brings the app back suspended at
        # version 1 (the account's fact sequence starts again).
        await rstore.redis.flushall()
        reloaded = suspended("app-g", version=1)
        await rstore.write_status(reloaded)
        await rstore.publish_change(reloaded)
        t0 = time.monotonic()

        async def answered_right() -> bool:
            r = await stub.CheckBatch(recordings(["app-g"]), timeout=5)
            d = r.decisions[0]
            return not d.allowed and d.status_version == 1

        await eventually(answered_right, timeout=2.0)
        took = time.monotonic() - t0
        assert sidecar.feed.generation != first
        assert (
            sidecar.feed.resync_causes.get("generation", 0)
            + sidecar.feed.resync_causes.get("rollback", 0)
            >= 1
        )
        await eventually(lambda: _true(sidecar.feed.in_sync), timeout=2.0)
        assert await health(channel) == SERVING
        print(f"FLUSHALL + reload answered right after {took:.3f}s")


async def test_restored_older_data_is_noticed_by_the_version_going_back(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    await write_all(rstore, [active("app-b", version=9)])
    async with started(own_redis) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        # Same generation (restored from an older snapshot of the same data).
        await rstore.redis.delete(status_key("app-b"))
        older = suspended("app-b", version=4)
        await rstore.write_status(older)
        await rstore.publish_change(older)

        async def answered_right() -> bool:
            r = await stub.CheckBatch(recordings(["app-b"]), timeout=5)
            return r.decisions[0].status_version == 4 and not r.decisions[0].allowed

        await eventually(answered_right, timeout=2.0)
        assert sidecar.feed.resync_causes.get("rollback") == 1


# -- finding 6: bounded ---------------------------------------------------------


async def test_raw_tcp_connections_without_the_http2_preface_are_closed(
    own_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lcic_guard import sidecar as sidecar_mod

    # 10 s in production; short here so that the test is fast.
    monkeypatch.setattr(sidecar_mod, "HANDSHAKE_TIMEOUT_MS", 300)
    async with started(own_redis) as (sidecar, _channel, stub):
        socks = [socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(20)]

        def closed_by_server(s: socket.socket) -> bool:
            s.settimeout(5)
            try:
                while s.recv(1024):  # the server may send its SETTINGS first
                    pass
                return True
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
            finally:
                s.close()

        results = await asyncio.gather(*(asyncio.to_thread(closed_by_server, s) for s in socks))
        assert all(results)
        # A well-behaved client is still served.
        resp = await stub.CheckBatch(recordings(["anything"]), timeout=5)
        assert len(resp.decisions) == 1


async def test_room_ids_per_app_are_bounded(own_redis: EmbeddedRedis, rstore: Store) -> None:
    await write_all(rstore, [suspended("app-r")])
    async with started(own_redis) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        for n in range(5):
            req = pb.CheckBatchRequest(
                checks=[
                    pb.Check(
                        enter_classroom=pb.CanEnterClassroomRequest(
                            app_id="app-r", room_id=f"room-{n}-{i}"
                        )
                    )
                    for i in range(1000)
                ]
            )
            resp = await stub.CheckBatch(req, timeout=10)
            assert not any(d.allowed for d in resp.decisions)
        cache = sidecar.checker.cache
        rooms = cache.rooms_of("app-r") or {}
        assert len(rooms) <= cache.rooms_per_app
        assert cache.room_count == len(rooms)
        assert cache.room_evictions >= 5000 - cache.rooms_per_app
