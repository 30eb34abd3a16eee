"""A store that went back in time is told to every watch stream (SPEC R10,
R15): Redis restarted from an older snapshot, a FLUSHALL and reload, a
version or the change feed going backwards. Real redis-server, the sidecar
built as ``serve`` builds it, watch streams over a socket; each test failed
on the code before the change (no such message was ever sent)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, AppStatus, Reason, Segment
from lcic_guard.domain.time import wall_clock
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import feed_seq_key, feed_shard, status_key
from lcic_guard.store.status import Store
from prometheus_client import CollectorRegistry

from tests.support.settings import sidecar_settings


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def status(app_id: str, version: int, *, suspended: bool) -> AppStatus:
    now = wall_clock()
    segs = [Segment(now - 10 * DAY)]
    if suspended:
        segs.append(
            Segment(
                now - DAY,
                (Reason.ACCOUNT_OVERDUE,),
                grace_ends_at=now - DAY,
                suspended_at=now - DAY,
                release_at=now + 50 * DAY,
            )
        )
    return AppStatus(app_id, "acct-" + app_id, tuple(segs), version, now)


class Watch:
    """One WatchApplicationStatus stream of every application, read in the
    background: every message, in order."""

    def __init__(self, stub: pb_grpc.EnforcementServiceStub) -> None:
        self.call = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest())
        self.got: list[pb.WatchApplicationStatusResponse] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for msg in self.call:
                self.got.append(msg)

    def causes(self) -> list[str]:
        return [m.discontinuity.cause for m in self.got if m.HasField("discontinuity")]

    def versions_after(self, cause: str) -> list[int]:
        """Status versions sent after the first discontinuity of ``cause``."""
        at = next(i for i, m in enumerate(self.got) if m.discontinuity.cause == cause)
        return [m.status.version for m in self.got[at:] if m.HasField("status")]

    async def close(self) -> None:
        self.call.cancel()
        await self.task


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def watched(
    redis: EmbeddedRedis,
) -> AsyncIterator[tuple[RunningSidecar, pb_grpc.EnforcementServiceStub, Watch, Store]]:
    """The sidecar (metrics in a registry of its own), a stub, an open
    watch of everything, and a store to write with."""
    writer = Store(connect(redis.url))
    store = Store(connect(redis.url))
    sidecar = await build_sidecar(
        sidecar_settings(redis_url=redis.url), store, registry=CollectorRegistry()
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    stub = pb_grpc.EnforcementServiceStub(channel)
    await eventually(lambda: _true(sidecar.feed.in_sync))
    watch = Watch(stub)
    await eventually(lambda: _true(sidecar.watchers is not None and len(sidecar.watchers) == 1))
    try:
        yield sidecar, stub, watch, writer
    finally:
        await watch.close()
        await channel.close()
        await sidecar.stop(grace=0.1)
        await store.close()
        await writer.close()


async def write(store: Store, st: AppStatus) -> None:
    await store.write_status(st)


def counted(sidecar: RunningSidecar, cause: str) -> float | None:
    assert sidecar.metrics is not None
    return sidecar.metrics.registry.get_sample_value(
        "lcic_guard_store_discontinuities_total", {"cause": cause}
    )


async def version_of(stub: pb_grpc.EnforcementServiceStub, app_id: str) -> tuple[int, bool]:
    d = (
        await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id=app_id), timeout=5)
    ).decision
    return d.status_version, d.allowed


async def test_redis_restarted_from_an_older_snapshot_is_told_to_every_watch_stream(
    redis: EmbeddedRedis,
) -> None:
    seed = Store(connect(redis.url))
    await seed.write_status(status("app-a", 1, suspended=True))
    await seed.close()
    async with watched(redis) as (sidecar, stub, watch, writer):
        second = Watch(stub)  # every stream is told, not one
        await eventually(lambda: _true(len(sidecar.watchers or ()) == 2))
        await writer.redis.save()  # the snapshot: suspended, version 1
        # Paid after the snapshot: the sidecar and its watchers see version 2.
        await write(writer, status("app-a", 2, suspended=False))
        await eventually(lambda: _true(any(m.status.version == 2 for m in watch.got)))
        assert await version_of(stub, "app-a") == (2, True)
        before = time.time()
        redis.kill()
        await asyncio.to_thread(redis.start)  # same port and directory: the snapshot
        await eventually(lambda: _true("run_id_changed" in watch.causes()))
        await eventually(lambda: _true("run_id_changed" in second.causes()))
        await second.close()
        assert watch.causes() == ["run_id_changed"]
        told = next(m for m in watch.got if m.HasField("discontinuity")).discontinuity
        assert told.detected_at.ToMilliseconds() >= int(before * 1000)
        assert sidecar.feed.discontinuities == {"run_id_changed": 1}
        assert counted(sidecar, "run_id_changed") == 1.0
        # Served throughout (ADR 0035): checks read Redis while the shards
        # load again, then answer what Redis holds now from memory.
        assert sidecar.server.serving
        assert await version_of(stub, "app-a") == (1, False)
        await eventually(lambda: _true(sidecar.checker.cache.synced))
        assert sidecar.server.serving and sidecar.feed.in_sync
        assert await version_of(stub, "app-a") == (1, False)
        # Statuses after the discontinuity follow it on the stream.
        await write(writer, status("app-a", 3, suspended=False))
        await eventually(lambda: _true(3 in watch.versions_after("run_id_changed")))


async def test_flushall_and_reload_is_a_new_generation_told_to_watch_streams(
    redis: EmbeddedRedis,
) -> None:
    seed = Store(connect(redis.url))
    await seed.write_status(status("app-g", 42, suspended=False))
    await seed.close()
    async with watched(redis) as (sidecar, stub, watch, writer):
        first = sidecar.feed.generation
        await writer.redis.flushall()
        await write(writer, status("app-g", 1, suspended=True))  # the reload
        await eventually(lambda: _true("new_generation" in watch.causes()))
        assert watch.causes() == ["new_generation"]
        assert sidecar.feed.generation != first
        assert counted(sidecar, "new_generation") == 1.0
        assert counted(sidecar, "run_id_changed") == 0.0  # same server, not restarted
        await eventually(lambda: _true(sidecar.feed.in_sync))
        assert await version_of(stub, "app-g") == (1, False)


async def test_a_feed_sequence_going_back_is_told_to_watch_streams_and_served_through(
    redis: EmbeddedRedis,
) -> None:
    seed = Store(connect(redis.url))
    await seed.write_status(status("app-b", 9, suspended=False))
    await seed.close()
    async with watched(redis) as (sidecar, stub, watch, writer):
        serving = sidecar.server.serving
        # The same data set, restored older for one app (no restart).
        await writer.redis.delete(status_key("app-b"))
        await write(writer, status("app-b", 4, suspended=True))
        await eventually(lambda: _true("version_went_back" in watch.causes()))
        await eventually(lambda: _true(sidecar.checker.cache.synced))
        assert await version_of(stub, "app-b") == (4, False)
        # Restored older for one feed shard: its sequence went back.
        shard = feed_shard("app-b")
        await writer.redis.set(feed_seq_key(shard), 0)
        await write(writer, status("app-b", 5, suspended=True))
        await eventually(lambda: _true("stream_id_went_back" in watch.causes()))
        await eventually(lambda: _true(sidecar.checker.cache.synced))
        assert await version_of(stub, "app-b") == (5, False)
        assert watch.causes() == ["version_went_back", "stream_id_went_back"]
        assert sidecar.feed.discontinuities == {"version_went_back": 1, "stream_id_went_back": 1}
        # Served throughout: a reload keeps what is held and reads Redis for it.
        assert serving and sidecar.server.serving


async def _true(value: bool) -> bool:
    return value
