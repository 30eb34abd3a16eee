"""OpenTelemetry tracing (issue 13): spans exported over OTLP/gRPC to a real
receiver started here, from the real gRPC sidecar and the real reconciler."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard import tracing
from lcic_guard.config import Settings
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, PolicyConfig
from lcic_guard.domain.time import wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.sources import StreamSource
from lcic_guard.runner import RunningSidecar, build_reconciler, build_sidecar
from lcic_guard.store.keys import BILLING_STREAM, status_key
from lcic_guard.store.status import Store
from lcic_guard.tracing import Tracing
from prometheus_client import CollectorRegistry

from tests.support.clock import FakeClock, recorded_clock
from tests.support.events import Events, deliveries
from tests.support.otlp import Receiver
from tests.support.settings import sidecar_settings

ROOT = Path(__file__).resolve().parents[2]
LCIC_GUARD = str(Path(sys.executable).parent / "lcic-guard")
CREATE = "lcic.guard.v1.EnforcementService/CanCreateClassroom"
SPAN_KIND_SERVER = 2
SPAN_KIND_INTERNAL = 1
STATUS_ERROR = 2
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> pytest.MonkeyPatch:
    """The process environment as an operator would set it, and nothing else."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return monkeypatch


@pytest_asyncio.fixture
async def traced(otel_env: pytest.MonkeyPatch) -> AsyncIterator[Tracing]:
    t = tracing.setup()
    assert t is not None
    yield t
    await asyncio.to_thread(t.shutdown)


async def traced_sidecar(store: Store, clock: FakeClock, traced: Tracing) -> RunningSidecar:
    settings = sidecar_settings(redis_timeout_ms=2000)
    return await build_sidecar(settings, store, clock=clock, traced=traced)


def traceparent(sampled: bool = True) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-{'01' if sampled else '00'}"),)


def test_tracing_is_wanted_only_when_the_otel_variables_ask() -> None:
    endpoint = "http://127.0.0.1:4317"
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert tracing.setup(environ={}) is None


async def test_rpc_spans_are_children_of_the_callers_span_with_app_and_answer(
    store: Store,
    reconciler: Reconciler,
    events: Events,
    clock: FakeClock,
    traced: Tracing,
    receiver: Receiver,
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    sidecar = await traced_sidecar(store, clock, traced)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            resp = await stub.CanCreateClassroom(
                pb.CanCreateClassroomRequest(app_id="app-1", room_id="room-9"),
                metadata=traceparent(),
                timeout=5,
            )
            assert resp.decision.allowed
            unknown = await stub.CanCreateClassroom(
                pb.CanCreateClassroomRequest(app_id="app-nobody"), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(), timeout=5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await sidecar.stop(grace=0.2)
    assert traced.flush()
    spans = await asyncio.to_thread(receiver.wait_for, CREATE, 3)

    [child] = [s for s in spans if s.attributes.get("lcic.app_id") == "app-1"]
    assert child.kind == SPAN_KIND_SERVER
    assert child.trace_id == TRACE_ID and child.parent_span_id == PARENT_ID
    assert child.attributes["rpc.system"] == "grpc"
    assert child.attributes["rpc.service"] == "lcic.guard.v1.EnforcementService"
    assert child.attributes["rpc.method"] == "CanCreateClassroom"
    assert child.attributes["rpc.grpc.status_code"] == 0
    assert child.attributes["lcic.room_id"] == "room-9"
    assert child.attributes["lcic.allowed"] is True
    assert child.attributes["lcic.reason"] == "OK"
    assert child.resource["service.name"] == "lcic-guard"

    # Without trace context: a root span of a new trace.
    [root] = [s for s in spans if s.attributes.get("lcic.app_id") == "app-nobody"]
    assert root.parent_span_id == "" and root.trace_id != TRACE_ID
    expected = pb.DecisionReason.Name(unknown.decision.reason).removeprefix("DECISION_REASON_")
    assert root.attributes["lcic.reason"] == expected
    # A bad request is the caller's error: its code, not a server error.
    [invalid] = [s for s in spans if "lcic.app_id" not in s.attributes]
    assert invalid.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert invalid.status_code != STATUS_ERROR


async def test_batch_span_names_the_apps_and_health_is_not_traced(
    store: Store,
    reconciler: Reconciler,
    events: Events,
    clock: FakeClock,
    traced: Tracing,
    receiver: Receiver,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    await reconciler.ingest(
        deliveries(events.app("acct-1", "app-1") + events.app("acct-2", "app-2"))
    )
    sidecar = await traced_sidecar(store, clock, traced)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            checks = [
                pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id=a))
                for a in ("app-2", "app-1", "app-2")
            ]
            await pb_grpc.EnforcementServiceStub(channel).CheckBatch(
                pb.CheckBatchRequest(checks=checks), timeout=5
            )
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    finally:
        await sidecar.stop(grace=0.2)
    assert traced.flush()
    [batch] = await asyncio.to_thread(
        receiver.wait_for, "lcic.guard.v1.EnforcementService/CheckBatch"
    )
    assert batch.attributes["lcic.batch_size"] == 3
    assert batch.attributes["lcic.app_ids"] == ["app-1", "app-2"]
    assert [s.name for s in receiver.spans] == [batch.name]


async def test_sampler_comes_from_otel_traces_sampler_and_honours_the_parent(
    store: Store,
    reconciler: Reconciler,
    events: Events,
    clock: FakeClock,
    otel_env: pytest.MonkeyPatch,
    receiver: Receiver,
) -> None:
    """Ratio 0 samples nothing of its own, yet a sampled caller's trace is kept."""
    otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    traced = tracing.setup()
    assert traced is not None
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    sidecar = await traced_sidecar(store, clock, traced)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            for app, metadata in (
                ("app-1", ()),
                ("app-2", traceparent(sampled=False)),
                ("app-3", traceparent(sampled=True)),
            ):
                req = pb.CanCreateClassroomRequest(app_id=app)
                await stub.CanCreateClassroom(req, metadata=metadata, timeout=5)
    finally:
        await sidecar.stop(grace=0.2)
        assert traced.flush()
        await asyncio.to_thread(traced.shutdown)
    [kept] = await asyncio.to_thread(receiver.wait_for, CREATE)
    assert kept.attributes["lcic.app_id"] == "app-3" and kept.parent_span_id == PARENT_ID
    assert len(receiver.spans) == 1


async def test_at_one_percent_sampling_a_traced_cache_hit_stays_on_the_serving_thread(
    store: Store,
    reconciler: Reconciler,
    events: Events,
    clock: FakeClock,
    otel_env: pytest.MonkeyPatch,
    receiver: Receiver,
) -> None:
    """Production tracing (1 % of the calls sampled): the span is made on the
    serving thread, so a check the cache answers is still answered there
    (``lcic_guard_check_paths_total{path="thread"}``; before, tracing sent
    every check to the event loop), and the sampled spans still arrive."""
    otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    traced = tracing.setup()
    assert traced is not None
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    registry = CollectorRegistry()
    settings = sidecar_settings(redis_timeout_ms=2000)
    sidecar = await build_sidecar(settings, store, clock=clock, traced=traced, registry=registry)
    unsampled = 200
    try:
        for _ in range(500):  # the whole table loaded: every check a cache hit
            if registry.get_sample_value("lcic_guard_table_loaded") == 1.0:
                break
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            for n in range(unsampled):
                req = pb.CanCreateClassroomRequest(app_id="app-1", room_id=f"plain-{n}")
                assert (await stub.CanCreateClassroom(req, timeout=5)).decision.allowed
            for n in range(3):  # a sampled caller's trace is always kept
                req = pb.CanCreateClassroomRequest(app_id="app-1", room_id=f"sampled-{n}")
                await stub.CanCreateClassroom(req, metadata=traceparent(), timeout=5)
    finally:
        await sidecar.stop(grace=0.2)
        assert traced.flush()
        await asyncio.to_thread(traced.shutdown)
    spans = await asyncio.to_thread(receiver.wait_for, CREATE, 3)
    kept = sorted(
        (s for s in spans if s.parent_span_id == PARENT_ID),
        key=lambda s: s.attributes["lcic.room_id"],
    )
    assert [s.attributes["lcic.room_id"] for s in kept] == [f"sampled-{n}" for n in range(3)]
    for span in kept:
        assert span.trace_id == TRACE_ID and span.kind == SPAN_KIND_SERVER
        assert span.attributes["lcic.allowed"] is True
        assert span.attributes["rpc.grpc.status_code"] == 0
    # Of the calls without trace context about 1 % are sampled (2 expected;
    # more than 20 of 200 has a probability below 1e-12).
    assert len(spans) - len(kept) <= 20
    assert registry.get_sample_value("lcic_guard_check_paths_total", {"path": "thread"}) == (
        unsampled + 3
    )
    assert registry.get_sample_value("lcic_guard_check_paths_total", {"path": "loop"}) == 0


async def test_reconciler_traces_batches_recomputations_and_releases(
    store: Store, policy: PolicyConfig, events: Events, traced: Tracing, receiver: Receiver
) -> None:
    clock = FakeClock(wall_clock())
    alert_at = clock.now - 62 * DAY
    src = StreamSource(store.redis, group="g", consumer="c1")
    rec = Reconciler(
        store,
        policy,
        ReconcilerConfig(release_margin_ms=0, block_ms=10),
        [src],
        clock=clock,
        recorded_clock=recorded_clock(alert_at),  # a history read live, not backfilled
        hooks=traced.reconciler_hooks(),
    )
    history = [
        *events.app("acct-1", "app-1", at=alert_at - 10 * DAY, expires=alert_at + 400 * DAY),
        *events.app("acct-1", "app-2", at=alert_at - 10 * DAY, expires=alert_at + 400 * DAY),
        events("overdue_alert", alert_at, account_id="acct-1"),
        {"event_id": "bad-1", "type": "no_such_event"},
    ]
    for e in history:
        await store.redis.xadd(BILLING_STREAM, {"event": json.dumps(e)})
    stats = await rec.ingest_source(src)
    assert stats.received == len(history)
    rec.token = await rec.coord.hold_lease(rec.name, 60_000)
    await rec.notices_of_history()  # read live: noticed when the suspension became known
    plan = await rec.try_release("acct-1", clock.now)
    assert plan.eligible and rec.releases_done == ["acct-1"]
    assert traced.flush()

    [ingest] = await asyncio.to_thread(receiver.wait_for, "lcic_guard.ingest")
    assert ingest.kind == SPAN_KIND_INTERNAL and ingest.parent_span_id == ""
    assert ingest.attributes["lcic.events"] == len(history)
    assert ingest.attributes["lcic.account_ids"] == ["acct-1"]
    assert ingest.attributes["lcic.app_ids"] == ["app-1", "app-2"]
    assert ingest.attributes["lcic.dead_lettered"] == 1
    assert ingest.attributes["lcic.applied"] == stats.applied > 0

    [release] = await asyncio.to_thread(receiver.wait_for, "lcic_guard.release")
    assert release.attributes["lcic.account_id"] == "acct-1"
    assert release.attributes["lcic.app_ids"] == ["app-1", "app-2"]
    assert release.attributes["lcic.release.eligible"] is True
    assert release.attributes["lcic.released"] is True
    assert release.attributes["lcic.release.why"] == "due"

    # Each recomputation is a child of what caused it: the batch, the release.
    recomputes = await asyncio.to_thread(receiver.wait_for, "lcic_guard.recompute", 2)
    parents = {s.parent_span_id: s for s in recomputes}
    assert parents[ingest.span_id].trace_id == ingest.trace_id
    assert parents[release.span_id].trace_id == release.trace_id
    assert {s.attributes["lcic.account_id"] for s in recomputes} == {"acct-1"}


async def test_the_runner_wires_tracing_in_at_construction_and_patches_nothing(
    store: Store, events: Events, traced: Tracing, receiver: Receiver
) -> None:
    """The runner's wiring (issue 22): tracing is given to the reconciler
    when it is built; no method is replaced on the live object, the
    recording clock cannot be swapped, and the releaser holds nothing that
    calls back into the reconciler. The spans still arrive."""
    rec = build_reconciler(Settings(), store, None, clock=wall_clock, traced=traced)
    assert [n for n in vars(rec) if callable(getattr(Reconciler, n, None))] == []

    def calls_back(value: object) -> bool:
        cells = getattr(value, "__closure__", None) or ()
        return getattr(value, "__self__", None) is rec or any(c.cell_contents is rec for c in cells)

    assert [n for n, v in vars(rec.releaser).items() if calls_back(v)] == []
    with pytest.raises(AttributeError):
        setattr(rec, "recorded_clock", recorded_clock(0))  # noqa: B010 (mypy refuses it plainly)
    for e in events.app("acct-9", "app-9"):
        await store.redis.xadd(BILLING_STREAM, {"event": json.dumps(e)})
    assert (await rec.ingest_source(rec.sources[0])).applied > 0
    assert traced.flush()
    [ingest] = await asyncio.to_thread(receiver.wait_for, "lcic_guard.ingest")
    assert ingest.attributes["lcic.app_ids"] == ["app-9"]
    [recompute] = await asyncio.to_thread(receiver.wait_for, "lcic_guard.recompute")
    assert recompute.parent_span_id == ingest.span_id


def test_the_reconcile_command_traces_and_flushes_on_sigterm(
    redis_server: EmbeddedRedis, receiver: Receiver, tmp_path: Path
) -> None:
    """The runner's wiring: the OTEL_* environment alone turns it on; the
    spans still buffered are exported before the process exits."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # so only the shutdown exports them
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    }
    log = (tmp_path / "reconcile.log").open("w")
    proc = subprocess.Popen(
        [LCIC_GUARD, "reconcile", "--redis-url", redis_server.url, "--log-format", "text"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ev = Events()
        for e in ev.app("acct-7", "app-7"):
            client.xadd(BILLING_STREAM, {"event": json.dumps(e)})
        deadline = time.monotonic() + 60
        # Its status computed (the key alone exists from the registration's claim).
        while not client.hexists(status_key("app-7"), "data"):
            assert proc.poll() is None, (tmp_path / "reconcile.log").read_text()
            assert time.monotonic() < deadline, "the reconciler did not apply the events"
            time.sleep(0.05)
        assert receiver.spans == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "reconcile.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        client.close()
    [ingest] = receiver.wait_for("lcic_guard.ingest")
    assert ingest.attributes["lcic.app_ids"] == ["app-7"]
    assert ingest.resource["service.name"] == "lcic-guard-reconciler"
    assert ingest.resource["deployment.environment"] == "test"


@given(trace_id=st.integers(min_value=1, max_value=(1 << 128) - 1), rate=st.floats(0.0, 1.0))
def test_root_spans_are_drawn_exactly_as_the_ratio_sampler_decides(
    trace_id: int, rate: float
) -> None:
    """The serving core decides a root span before OpenTelemetry is called;
    the decision must be the sampler's own for that trace id, and the span it
    starts must get that very id, so that the sampler keeps it."""
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    roots = tracing.RootSampling.from_environ(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(rate)}
    )
    roots._bits = lambda _bits: trace_id  # the one id this example draws
    decided = TraceIdRatioBased(rate).should_sample(None, trace_id, "x").decision
    expected = decided is Decision.RECORD_AND_SAMPLE
    assert roots.draw() is expected
    if expected:
        assert roots.generate_trace_id() == trace_id
    assert roots.generate_trace_id() != trace_id  # handed over once, then random ids again


def test_root_sampling_applies_only_to_trace_id_ratio_samplers() -> None:
    for environ in (
        {},
        {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
    ):
        assert tracing.RootSampling.from_environ(environ).bound is None, environ
    ratio = {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    assert tracing.RootSampling.from_environ(ratio).bound == 1 << 63
