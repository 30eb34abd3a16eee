"""Fixtures: a real redis-server on a free port, the real gRPC server on a
real socket, the real reconciler. Nothing stands in for the store or the
network."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import DAY, PolicyConfig
from lcic_guard.domain.time import Millis, format_time
from lcic_guard.embedded import EmbeddedRedis
from lcic_guard.reconciler.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.sources import Delivery
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.server import RunningServer, start_server
from lcic_guard.sidecar.service import EnforcementServicer
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store

T0: Millis = 1_790_000_000_000  # 2026-09-21T14:13:20Z, a fixed "now" for tests


def recorded_clock(at: Millis) -> Callable[[], Awaitable[Millis]]:
    """A recording clock stopped at ``at``: facts are stored as if the
    reconciler had read them then (a history read live, not backfilled)."""

    async def read() -> Millis:
        return at

    return read


@dataclass
class FakeClock:
    """A settable clock (ms), so tests can step over deadlines."""

    now: Millis = T0

    def __call__(self) -> Millis:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture
async def store(redis_server: EmbeddedRedis) -> AsyncIterator[Store]:
    s = Store(connect(redis_server.url))
    await s.redis.flushall()
    yield s
    await s.close()


@pytest.fixture
def policy() -> PolicyConfig:
    return PolicyConfig()


@pytest_asyncio.fixture
async def reconciler(store: Store, policy: PolicyConfig, clock: FakeClock) -> Reconciler:
    return Reconciler(
        store, policy, ReconcilerConfig(release_margin_ms=0, announce_settle_ms=0), clock=clock
    )


@dataclass
class Events:
    """Builds billing events with unique ids, in the billing system's form."""

    n: int = 0
    made: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, kind: str, at: Millis, **fields: Any) -> dict[str, Any]:
        self.n += 1
        for key in ("starts_at", "expires_at"):
            if isinstance(fields.get(key), int):
                fields[key] = format_time(fields[key])
        event = {"event_id": f"ev-{self.n}", "type": kind, "occurred_at": format_time(at), **fields}
        self.made.append(event)
        return event

    def app(
        self,
        account: str,
        app_id: str,
        at: Millis = T0 - 10 * DAY,
        expires: Millis = T0 + 20 * DAY,
        quota: int = 6000,
    ) -> list[dict[str, Any]]:
        """An app registered with a package in force around T0."""
        return [
            self("application_registered", at, account_id=account, app_id=app_id),
            self(
                "package_purchased",
                at,
                app_id=app_id,
                package_id=f"pkg-{app_id}",
                starts_at=at,
                expires_at=expires,
                quota_minutes=quota,
            ),
        ]


@pytest.fixture
def events() -> Events:
    return Events()


def deliveries(evs: list[dict[str, Any]] | list[str], source: str = "test") -> list[Delivery]:
    return [
        Delivery(e if isinstance(e, str) else json.dumps(e), f"t-{i}", source)
        for i, e in enumerate(evs)
    ]


@dataclass
class Sidecar:
    running: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.EnforcementServiceStub
    checker: Checker

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@pytest_asyncio.fixture
async def sidecar(store: Store, policy: PolicyConfig, clock: FakeClock) -> AsyncIterator[Sidecar]:
    # Generous sub-deadline: these tests are about answers, not store faults.
    checker = Checker(store, policy, read_timeout=2.0, clock=clock)
    running = await start_server(EnforcementServicer(checker, store), "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield Sidecar(running, channel, pb_grpc.EnforcementServiceStub(channel), checker)
    await channel.close()
    await running.stop(grace=0.5)
