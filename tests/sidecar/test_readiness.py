"""Readiness that means fresh (issue 5, item 7): health follows the
reconciler's heartbeat, observed through the gRPC health service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lcic_guard.config import Settings
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import PolicyConfig
from lcic_guard.domain.time import wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import HEARTBEAT
from lcic_guard.store.status import Store

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BOUND_MS = 600


async def health_of(port: int) -> int:
    """The health of the server and of EnforcementService, which agree
    (asked one after the other, so asked again if a flip fell in between)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):
            statuses = {
                (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)).status
                for name in ("", "lcic.guard.v1.EnforcementService")
            }
            if len(statuses) == 1:
                return int(statuses.pop())
    raise AssertionError(f"server and service health disagree: {statuses}")


async def becomes(port: int, status: int, timeout: float = 3.0) -> float:
    """Seconds until health reports ``status``."""
    start = time.monotonic()
    while await health_of(port) != status:
        assert time.monotonic() - start < timeout, f"health did not become {status}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest_asyncio.fixture
async def ready_sidecar(store: Store) -> AsyncIterator[RunningSidecar]:
    settings = Settings(listen="127.0.0.1:0", max_heartbeat_age_ms=BOUND_MS)
    sidecar = await build_sidecar(settings, store)
    yield sidecar
    await sidecar.stop(grace=0.2)


async def test_health_follows_the_age_of_the_heartbeat(
    ready_sidecar: RunningSidecar, store: Store
) -> None:
    port = ready_sidecar.port
    # No reconciler ever wrote one: not ready.
    assert await health_of(port) == NOT_SERVING
    written = time.monotonic()
    await store.redis.set(HEARTBEAT, wall_clock())
    await becomes(port, SERVING)
    # The heartbeat stops: once older than the bound, NOT_SERVING ...
    await becomes(port, NOT_SERVING)
    aged = time.monotonic() - written
    assert BOUND_MS / 1000 <= aged <= BOUND_MS / 1000 + 1.0, aged
    # ... and the checks are still answered meanwhile.
    assert ready_sidecar.readiness is not None and ready_sidecar.readiness.serving is False
    # A fresh heartbeat: SERVING again within one polling interval or so.
    await store.redis.set(HEARTBEAT, wall_clock())
    assert await becomes(port, SERVING) < 0.5


async def test_a_running_reconciler_keeps_it_ready_and_its_death_does_not(
    ready_sidecar: RunningSidecar, store: Store
) -> None:
    reconciler = Reconciler(store, PolicyConfig(), ReconcilerConfig(tick_ms=100), clock=wall_clock)
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop))
    try:
        await becomes(ready_sidecar.port, SERVING)
        await asyncio.sleep(3 * BOUND_MS / 1000)  # several bounds: it keeps beating
        assert await health_of(ready_sidecar.port) == SERVING
    finally:
        stop.set()
        await task
    await becomes(ready_sidecar.port, NOT_SERVING, timeout=BOUND_MS / 1000 + 1.0)


async def test_a_redis_outage_longer_than_the_bound_is_not_ready() -> None:
    redis = EmbeddedRedis()
    await asyncio.to_thread(redis.start)
    store = Store(connect(redis.url))
    settings = Settings(listen="127.0.0.1:0", max_heartbeat_age_ms=BOUND_MS)
    sidecar = await build_sidecar(settings, store)
    beating = asyncio.Event()

    async def heartbeat() -> None:  # a reconciler's, through its own client
        writer = Store(connect(redis.url))
        try:
            while not beating.is_set():
                await writer.redis.set(HEARTBEAT, wall_clock())
                await asyncio.sleep(0.05)
        finally:
            await writer.close()

    beat = asyncio.create_task(heartbeat())
    try:
        await becomes(sidecar.port, SERVING)
        beating.set()
        await beat
        await asyncio.to_thread(redis.kill)
        # The last heartbeat seen keeps ageing while Redis cannot be read.
        await becomes(sidecar.port, NOT_SERVING, timeout=BOUND_MS / 1000 + 1.0)
        assert sidecar.readiness is not None and sidecar.readiness.read_errors >= 1
    finally:
        await sidecar.stop(grace=0.2)
        await store.close()
        await asyncio.to_thread(redis.stop)


async def test_zero_disables_the_heartbeat_check(store: Store) -> None:
    sidecar = await build_sidecar(Settings(listen="127.0.0.1:0", max_heartbeat_age_ms=0), store)
    try:
        # Only the loaded status table is waited for: no heartbeat at all.
        await becomes(sidecar.port, SERVING)
    finally:
        await sidecar.stop(grace=0.2)


async def test_shutdown_is_not_undone_by_a_fresh_heartbeat(store: Store) -> None:
    settings = Settings(listen="127.0.0.1:0", max_heartbeat_age_ms=BOUND_MS)
    await store.redis.set(HEARTBEAT, wall_clock())
    sidecar = await build_sidecar(settings, store)
    await becomes(sidecar.port, SERVING)
    stopping = asyncio.create_task(sidecar.stop(grace=0.2, drain=0.6))
    await becomes(sidecar.port, NOT_SERVING, timeout=0.5)
    await store.redis.set(HEARTBEAT, wall_clock())
    await asyncio.sleep(0.3)  # several readiness intervals
    assert await health_of(sidecar.port) == NOT_SERVING
    await stopping
