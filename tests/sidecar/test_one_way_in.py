"""One way into a check: whatever auth and tracing are on, a check the cache
answers is answered on its serving thread (counted by
``lcic_guard_check_paths_total{path}``), the hooks run once per call whichever
path the call then takes, and every path ends a failed call with the same
status mapping."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import PolicyConfig
from lcic_guard.reconciler import Reconciler
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.errors import Refused, status_of
from lcic_guard.sidecar.metrics import SidecarMetrics
from lcic_guard.sidecar.observe import DecisionObserver
from lcic_guard.sidecar.server import start_server
from lcic_guard.sidecar.service import EnforcementServicer
from lcic_guard.sidecar.wire import BadRequest
from lcic_guard.store.status import Store
from prometheus_client import CollectorRegistry

from tests.support.clock import FakeClock
from tests.support.events import Events, deliveries
from tests.support.settings import sidecar_settings

TOKEN = "tok-one-way-in-7c41"
Code = grpc.StatusCode


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def paths(registry: CollectorRegistry) -> dict[str, float | None]:
    return {
        p: registry.get_sample_value("lcic_guard_check_paths_total", {"path": p})
        for p in ("thread", "loop")
    }


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


@pytest_asyncio.fixture
async def seeded(reconciler: Reconciler, events: Events) -> Reconciler:
    await reconciler.ingest(
        deliveries(events.app("acct-1", "app-1") + events.app("acct-2", "app-2"))
    )
    return reconciler


@pytest_asyncio.fixture
async def start_sidecar(
    store: Store, clock: FakeClock, policy: PolicyConfig
) -> AsyncIterator[Callable[..., Awaitable[tuple[RunningSidecar, CollectorRegistry]]]]:
    started: list[RunningSidecar] = []

    async def start(**kw: Any) -> tuple[RunningSidecar, CollectorRegistry]:
        registry = CollectorRegistry()
        settings = sidecar_settings(redis_timeout_ms=2000, policy=policy, **kw)
        sidecar = await build_sidecar(settings, store, clock=clock, registry=registry)
        started.append(sidecar)
        for _ in range(500):  # the whole table loaded: every check a cache hit
            if registry.get_sample_value("lcic_guard_table_loaded") == 1.0:
                break
            await asyncio.sleep(0.01)
        return sidecar, registry

    yield start
    for sidecar in started:
        await sidecar.stop(grace=0.2)


async def test_with_auth_checks_a_cache_hit_is_answered_on_the_serving_thread(
    start_sidecar: Callable[..., Awaitable[tuple[RunningSidecar, CollectorRegistry]]],
    seeded: Reconciler,
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"svc:check:{TOKEN}\nreader:read:tok-read-only-99\n")
    sidecar, registry = await start_sidecar(auth_token_file=str(tokens), auth_checks=True)
    create = pb.CanCreateClassroomRequest(app_id="app-1")
    batch = pb.CheckBatchRequest(checks=[pb.Check(create_classroom=create)] * 3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        for _ in range(5):
            d = (await stub.CanCreateClassroom(create, metadata=bearer(TOKEN), timeout=5)).decision
            assert d.allowed and not d.degraded
        answered = await stub.CheckBatch(batch, metadata=bearer(TOKEN), timeout=5)
        assert len(answered.decisions) == 3
        # Auth still refuses, before anything is answered or counted.
        assert await code_of(stub.CanCreateClassroom(create, timeout=5)) == Code.UNAUTHENTICATED
        assert (
            await code_of(stub.CanCreateClassroom(create, metadata=bearer("wrong"), timeout=5))
            == Code.UNAUTHENTICATED
        )
        assert (
            await code_of(stub.CheckBatch(batch, metadata=bearer("tok-read-only-99"), timeout=5))
            == Code.PERMISSION_DENIED
        )
    # Before: --auth-checks sent every check to the event loop.
    assert paths(registry) == {"thread": 6.0, "loop": 0.0}


@dataclass
class Hook:
    """Counts what the serving core tells a hook."""

    refuse: bool = False
    entered: list[str] = field(default_factory=list)
    left: list[tuple[str, grpc.StatusCode, bool]] = field(default_factory=list)

    def wants(self, method: str) -> bool:
        return True

    def enter(self, method: str, raw: bytes, context: Any) -> str:
        self.entered.append(method.rpartition("/")[2])
        if self.refuse:
            raise Refused(Code.FAILED_PRECONDITION, "not today")
        return method.rpartition("/")[2]

    def leave(self, state: str, response: bytes | None, code: grpc.StatusCode) -> None:
        self.left.append((state, code, response is not None))


async def test_a_check_the_loop_answers_runs_each_hook_once(
    store: Store, policy: PolicyConfig, clock: FakeClock, seeded: Reconciler
) -> None:
    """No change feed: the cache never answers, so every check is read from
    Redis on the loop, and the hooks still run once, on the serving thread."""
    hook = Hook()
    metrics = SidecarMetrics()
    observer = DecisionObserver(metrics)
    checker = Checker(store, policy, read_timeout=2.0, clock=clock, render=observer.render)
    servicer = EnforcementServicer(checker, store, observer=observer)
    running = await start_server(servicer, "127.0.0.1:0", hooks=[hook])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            d = (
                await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-2"))
            ).decision
            assert d.allowed and not d.degraded
            bad = stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="no such id!"))
            assert await code_of(bad) == Code.INVALID_ARGUMENT
            status = await stub.GetApplicationStatus(pb.GetApplicationStatusRequest(app_id="app-2"))
            assert status.status.app_id == "app-2"
            hook.refuse = True
            refused = stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-2"))
            assert await code_of(refused) == Code.FAILED_PRECONDITION
    finally:
        await running.stop(grace=0)
    assert hook.entered == [
        "CanCreateClassroom",
        "CanCreateClassroom",
        "GetApplicationStatus",
        "CanCreateClassroom",
    ]
    assert hook.left == [
        ("CanCreateClassroom", Code.OK, True),
        ("CanCreateClassroom", Code.INVALID_ARGUMENT, False),
        ("GetApplicationStatus", Code.OK, True),
    ]
    assert metrics.counts.paths == {"thread": 0, "loop": 1}


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (
            BadRequest("app_id: must not be empty"),
            Code.INVALID_ARGUMENT,
            "app_id: must not be empty",
        ),
        (Refused(Code.PERMISSION_DENIED, "needs scope"), Code.PERMISSION_DENIED, "needs scope"),
        (concurrent.futures.CancelledError(), Code.CANCELLED, "call cancelled"),
        (asyncio.CancelledError(), Code.CANCELLED, "call cancelled"),
        (KeyError("x"), Code.INTERNAL, "internal error (KeyError)"),
    ],
)
def test_one_mapping_from_errors_to_statuses(
    exc: BaseException, code: grpc.StatusCode, details: str
) -> None:
    assert status_of(exc) == (code, details)


class _WithoutPreview(EnforcementServicer):
    PreviewApplication = None  # type: ignore[assignment]  # an RPC this servicer does not serve


async def test_an_rpc_the_servicer_lacks_is_unimplemented(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> None:
    checker = Checker(store, policy, read_timeout=2.0, clock=clock)
    running = await start_server(_WithoutPreview(checker, store), "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            req = pb.PreviewApplicationRequest(app_id="app-1")
            assert await code_of(stub.PreviewApplication(req, timeout=5)) == Code.UNIMPLEMENTED
    finally:
        await running.stop(grace=0)
