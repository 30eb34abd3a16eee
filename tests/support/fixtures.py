"""The fixtures that start real servers: a redis-server on a free port, the
store on it, the reconciler and the gRPC sidecar on a real socket. Only the
conftest of a folder whose tests need Redis imports them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import AppStatus, PolicyConfig
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.observe import DecisionObserver
from lcic_guard.sidecar.server import RunningServer, start_server
from lcic_guard.sidecar.service import EnforcementServicer
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store

from tests.support.clock import FakeClock


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def store(redis_server: EmbeddedRedis) -> AsyncIterator[Store]:
    s = Store(connect(redis_server.url))
    await s.redis.flushall()
    yield s
    await s.close()


@pytest_asyncio.fixture
async def own_redis() -> AsyncIterator[EmbeddedRedis]:
    """A redis-server of the test's own, for tests that stop, freeze or
    restart it."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def rstore(own_redis: EmbeddedRedis) -> AsyncIterator[Store]:
    s = Store(connect(own_redis.url))
    yield s
    await s.close()


async def write_all(store: Store, statuses: list[AppStatus]) -> None:
    """Write many statuses, 200 at a time."""
    for i in range(0, len(statuses), 200):
        await asyncio.gather(*(store.write_status(s) for s in statuses[i : i + 200]))


@pytest_asyncio.fixture
async def reconciler(store: Store, policy: PolicyConfig, clock: FakeClock) -> Reconciler:
    return Reconciler(
        store, policy, ReconcilerConfig(release_margin_ms=0, announce_settle_ms=0), clock=clock
    )


@dataclass
class SidecarUnderTest:
    running: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.EnforcementServiceStub
    checker: Checker

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


def servicer(checker: Checker, store: Store, *, store_timeout: float = 1.0) -> EnforcementServicer:
    """The servicer over ``checker`` as the runner wires it, without watchers
    (build the checker with ``render=RENDER``, as the runner does)."""
    return EnforcementServicer(checker, store, store_timeout=store_timeout, observer=OBSERVER)


# The plain observer of servers tests build by hand, and its renderer for
# their checkers: answers serialized as the runner's are.
OBSERVER = DecisionObserver()
RENDER = OBSERVER.render


@pytest_asyncio.fixture
async def sidecar(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[SidecarUnderTest]:
    # Generous sub-deadline: these tests are about answers, not store faults.
    checker = Checker(store, policy, read_timeout=2.0, clock=clock, render=RENDER)
    running = await start_server(servicer(checker, store), "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield SidecarUnderTest(running, channel, pb_grpc.EnforcementServiceStub(channel), checker)
    await channel.close()
    await running.stop(grace=0.5)
