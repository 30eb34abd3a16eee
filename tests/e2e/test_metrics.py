"""Prometheus metrics (issue 6, item 1), scraped over HTTP from the real
sidecar and reconciler after real checks and real billing events."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import free_port
from lcic_guard.domain.policy import DAY, PolicyConfig
from lcic_guard.domain.time import Millis
from lcic_guard.metrics import parse_listen, serve_metrics, worker_listen
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.reconciler.sources import FileSource, StreamSource
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.sidecar.metrics import CHECK_BUCKETS, SidecarMetrics
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import BILLING_STREAM
from lcic_guard.store.status import Store
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clock import T0, FakeClock, recorded_clock
from tests.support.events import Events, deliveries
from tests.support.settings import sidecar_settings

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _get(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.headers.get("Content-Type", ""), resp.read().decode()


async def scrape(port: int) -> Samples:
    """Every sample the endpoint serves, by name and labels, over real HTTP."""
    content_type, text = await asyncio.to_thread(_get, port)
    assert content_type.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metrics_port(sidecar: RunningSidecar) -> int:
    assert sidecar.metrics_server is not None
    return sidecar.metrics_server.port


async def start_sidecar(store: Store, policy: PolicyConfig, clock: FakeClock) -> RunningSidecar:
    settings = sidecar_settings(metrics_listen="127.0.0.1:0", redis_timeout_ms=2000, policy=policy)
    sidecar = await build_sidecar(settings, store, clock=clock)

    async def healthy() -> bool:
        return sidecar.checker.cache.feed_healthy

    await eventually(healthy)
    return sidecar


@pytest_asyncio.fixture
async def metered(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[RunningSidecar]:
    sidecar = await start_sidecar(store, policy, clock)
    yield sidecar
    await sidecar.stop(grace=0.2)


def stub_for(port: int) -> tuple[grpc.aio.Channel, pb_grpc.EnforcementServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.EnforcementServiceStub(channel)


def create(app: str) -> pb.CanCreateClassroomRequest:
    return pb.CanCreateClassroomRequest(app_id=app)


def recording(app: str) -> pb.CanAccessRecordingRequest:
    return pb.CanAccessRecordingRequest(app_id=app, recording_id="rec-1")


async def seed(reconciler: Reconciler, events: Events) -> None:
    """app-ok in good standing; app-susp suspended for overdue since T0 - 1 d."""
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-ok", "app-ok"),
                *events.app("acct-susp", "app-susp"),
                events("overdue_alert", T0 - 2 * DAY, account_id="acct-susp"),
            ]
        )
    )


async def test_checks_move_the_decision_latency_and_cache_metrics(
    metered: RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    await seed(reconciler, events)
    port = metrics_port(metered)
    before = await scrape(port)
    assert (
        value(before, "lcic_guard_decisions_total", check="create", reason="OK", allowed="true")
        == 0
    )
    channel, stub = stub_for(metered.port)
    async with channel:
        for _ in range(3):
            assert (await stub.CanCreateClassroom(create("app-ok"))).decision.allowed
        for _ in range(2):
            d = (await stub.CanAccessRecording(recording("app-susp"))).decision
            assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE and not d.allowed
        d = (await stub.CanCreateClassroom(create("app-nobody"))).decision
        assert d.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
        enter = pb.CanEnterClassroomRequest(app_id="app-susp", room_id="room-1")
        assert not (await stub.CanEnterClassroom(enter)).decision.allowed
        batch = pb.CheckBatchRequest(
            checks=[
                pb.Check(create_classroom=create("app-ok")),
                pb.Check(access_recording=recording("app-ok")),
            ]
        )
        assert all(d.allowed for d in (await stub.CheckBatch(batch)).decisions)
    after = await scrape(port)

    def decisions(check: str, reason: str, allowed: str) -> float:
        labels = {"check": check, "reason": reason, "allowed": allowed}
        return value(after, "lcic_guard_decisions_total", **labels)

    assert decisions("create", "OK", "true") == 4  # three single checks and one in the batch
    assert decisions("recording", "ACCOUNT_OVERDUE", "false") == 2
    assert decisions("recording", "OK", "true") == 1
    assert decisions("create", "UNKNOWN_APPLICATION", "false") == 1
    assert decisions("enter", "ACCOUNT_OVERDUE", "false") == 1
    # Latency: one observation per single check, one per batch, in sub-ms buckets.
    assert value(after, "lcic_guard_check_duration_seconds_count", check="create") == 4
    assert value(after, "lcic_guard_check_duration_seconds_count", check="recording") == 2
    assert value(after, "lcic_guard_check_duration_seconds_count", check="enter") == 1
    assert value(after, "lcic_guard_check_duration_seconds_count", check="batch") == 1
    bounds = {
        dict(labels)["le"]
        for name, labels in after
        if name == "lcic_guard_check_duration_seconds_bucket" and ("check", "create") in labels
    }
    assert {"0.0001", "0.00025", "0.0005", "0.001"} <= bounds  # sub-ms resolution
    assert value(after, "lcic_guard_check_duration_seconds_bucket", check="create", le="+Inf") == 4
    assert 0 < value(after, "lcic_guard_check_duration_seconds_sum", check="create") < 4 * 2.0
    # Cache: every check is a hit or a miss; the first room check of a
    # suspended app is a miss (rooms are read on demand).
    hits = value(after, "lcic_guard_cache_hits_total")
    misses = value(after, "lcic_guard_cache_misses_total")
    assert hits + misses == 9 and misses >= 1 and hits >= 4
    assert hits == metered.checker.cache.hits and misses == metered.checker.cache.misses
    # app-ok, app-susp; app-nobody is answered from the whole table, not cached.
    assert value(after, "lcic_guard_cache_entries") == 2
    assert value(after, "lcic_guard_cache_complete") == 1
    assert value(after, "lcic_guard_failure_mode_answers_total", check="create", mode="open") == 0
    assert value(after, "lcic_guard_change_feed_healthy") == 1
    assert value(after, "lcic_guard_redis_errors_total") == 0
    assert value(after, "lcic_guard_breaker_open") == 0
    # No label names an application (cardinality stays bounded).
    assert not any("app-ok" in str(labels) for _, labels in after)


async def test_staleness_is_the_age_of_the_last_confirmed_change(
    metered: RunningSidecar, clock: FakeClock
) -> None:
    port = metrics_port(metered)
    await metered.feed.stop()  # the feed stops confirming the cache
    confirmed = metered.checker.cache.confirmed_at
    assert confirmed > 0
    clock.now = confirmed + 30_000
    samples = await scrape(port)
    assert value(samples, "lcic_guard_status_staleness_seconds") == pytest.approx(30.0)
    assert value(samples, "lcic_guard_change_feed_healthy") == 0
    clock.advance(90_000)
    samples = await scrape(port)
    assert value(samples, "lcic_guard_status_staleness_seconds") == pytest.approx(120.0)


async def test_redis_errors_and_the_breaker_are_exposed(
    policy: PolicyConfig, clock: FakeClock
) -> None:
    # A store nobody listens on: every read fails at once (connection refused).
    dead = Store(connect(f"redis://127.0.0.1:{free_port()}", timeout=0.2))
    settings = sidecar_settings(metrics_listen="127.0.0.1:0", policy=policy)
    sidecar = await build_sidecar(settings, dead, clock=clock)
    try:
        channel, stub = stub_for(sidecar.port)
        async with channel:
            for _ in range(5):
                d = (await stub.CanCreateClassroom(create("app-1"))).decision
                assert d.reason == pb.DECISION_REASON_STATUS_UNAVAILABLE and d.allowed  # fail open
        samples = await scrape(metrics_port(sidecar))
    finally:
        await sidecar.stop(grace=0.2)
        await dead.close()
    threshold = sidecar.checker.breaker.threshold
    # The checks' failures, or the change feed finding the connection refused
    # first (then no check read Redis at all: 0 errors), opened the breaker
    # once; then it held (no more reads, no more errors).
    assert value(samples, "lcic_guard_redis_errors_total") <= threshold
    assert value(samples, "lcic_guard_breaker_open") == 1
    assert value(samples, "lcic_guard_breaker_trips_total") == 1
    labels = {"check": "create", "reason": "STATUS_UNAVAILABLE", "allowed": "true"}
    assert value(samples, "lcic_guard_decisions_total", **labels) == 5


async def _fake_redis_time(ms: Millis) -> Millis:
    return ms


async def test_reconciler_metrics_count_ingest_changes_deadlines_and_releases(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, tmp_path: Path
) -> None:
    metrics = ReconcilerMetrics()
    server = serve_metrics(metrics.registry, "127.0.0.1:0")
    try:
        # An account overdue for 70 days: its release is due now.
        evs = [
            *events.app("acct-1", "app-1", at=T0 - 80 * DAY, expires=T0 + 400 * DAY),
            events("overdue_alert", T0 - 70 * DAY, account_id="acct-1"),
        ]
        lines = [json.dumps(e) for e in evs]
        lines += [lines[0], '{"type": "overdue_alert"}']  # a duplicate and an invalid event
        path = tmp_path / "events.jsonl"
        path.write_text("\n".join(lines) + "\n")
        source = FileSource(path, clock_ms=lambda: _fake_redis_time(clock.now))
        rec = Reconciler(
            store,
            policy,
            ReconcilerConfig(release_margin_ms=0, announce_settle_ms=0),
            [source],
            clock=clock,
            recorded_clock=recorded_clock(T0 - 70 * DAY),  # read live, not backfilled
            metrics=metrics,
        )
        rec.token = await rec.coord.hold_lease(rec.name, 60_000)  # releases: leader only
        await rec.drain(source)
        await rec.notices_of_history()  # read live: noticed when the suspension became known
        assert await rec.run_deadlines() >= 1
        assert rec.releases_done == ["acct-1"]
        samples = await scrape(server.port)
    finally:
        await asyncio.to_thread(server.stop)

    assert value(samples, "lcic_guard_reconciler_events_received_total") == 5
    assert value(samples, "lcic_guard_reconciler_events_total", outcome="applied") == 3
    assert value(samples, "lcic_guard_reconciler_events_total", outcome="duplicate") == 1
    assert value(samples, "lcic_guard_reconciler_events_total", outcome="dead_lettered") == 1
    assert value(samples, "lcic_guard_reconciler_releases_total") == 1
    assert value(samples, "lcic_guard_reconciler_deadlines_processed_total") >= 1
    # SUSPENDED on ingest, then RELEASED: two announced changes.
    assert value(samples, "lcic_guard_reconciler_status_changes_total") == 2


def gauge(metrics: ReconcilerMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def test_reconciler_metrics_show_pending_lag_and_leadership(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    for e in events.app("acct-1", "app-1"):
        await store.redis.xadd(BILLING_STREAM, {"event": json.dumps(e)})
    await store.redis.xadd(
        BILLING_STREAM, {"event": json.dumps(events("overdue_alert", T0, account_id="acct-1"))}
    )
    source = StreamSource(store.redis, consumer="c1")
    metrics = ReconcilerMetrics()
    rec = Reconciler(
        store, policy, ReconcilerConfig(tick_ms=20), [source], clock=clock, metrics=metrics
    )
    got = await source.fetch(2, 10)  # delivered, not acknowledged
    assert len(got) == 2
    await metrics.poll(rec, clock)
    assert gauge(metrics, "lcic_guard_reconciler_stream_pending") == 2
    assert gauge(metrics, "lcic_guard_reconciler_stream_lag") == 1
    await rec.ingest(got)
    await source.ack(got)
    rest = await source.fetch(10, 10)
    await rec.ingest(rest)
    await source.ack(rest)
    await metrics.poll(rec, clock)
    assert gauge(metrics, "lcic_guard_reconciler_stream_pending") == 0
    assert gauge(metrics, "lcic_guard_reconciler_stream_lag") == 0
    assert gauge(metrics, "lcic_guard_reconciler_watermark_age_seconds") is not None

    server = serve_metrics(metrics.registry, "127.0.0.1:0")
    stop = asyncio.Event()
    task = asyncio.create_task(rec.run(stop))
    try:

        async def leading() -> bool:
            return rec.token > 0

        await eventually(leading)
        samples = await scrape(server.port)
    finally:
        stop.set()
        await task
        await asyncio.to_thread(server.stop)
    assert value(samples, "lcic_guard_reconciler_leader_changes_total") == 1
    assert value(samples, "lcic_guard_reconciler_is_leader") == 1
    assert value(samples, "lcic_guard_reconciler_stream_pending") == 0
    assert value(samples, "lcic_guard_reconciler_events_total", outcome="applied") == 3


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen(":9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)
    assert worker_listen("127.0.0.1:9464", 0) == "127.0.0.1:9465"
    assert worker_listen("127.0.0.1:9464", 2) == "127.0.0.1:9467"
    assert worker_listen("127.0.0.1:0", 2) == "127.0.0.1:0"
    assert worker_listen("", 1) == ""


def test_each_process_has_its_own_registry() -> None:
    a, b = SidecarMetrics(), SidecarMetrics()  # no clash on the global registry
    assert a.registry is not b.registry
    assert CHECK_BUCKETS[0] <= 0.00001 and CHECK_BUCKETS[6] == 0.001  # sub-ms resolution


async def test_the_dashboard_uses_only_metrics_that_exist(
    metered: RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    await seed(reconciler, events)
    channel, stub = stub_for(metered.port)
    async with channel:
        await stub.CanCreateClassroom(create("app-susp"))
    served = {name for name, _ in await scrape(metrics_port(metered))}
    rec_metrics = ReconcilerMetrics()
    rec_metrics.on_leadership(True)
    server = serve_metrics(rec_metrics.registry, "127.0.0.1:0")
    try:
        served |= {name for name, _ in await scrape(server.port)}
    finally:
        await asyncio.to_thread(server.stop)
    served.add("lcic_guard_shadow_denials_total")  # exists once a check is shadowed

    dashboard = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 12
    used = {m for e in exprs for m in re.findall(r"lcic_guard_[a-z_]+", e)}
    assert used - served == set(), used - served
    # It covers both processes and the list.
    for needed in (
        "lcic_guard_decisions_total",
        "lcic_guard_check_duration_seconds_bucket",
        "lcic_guard_cache_hits_total",
        "lcic_guard_status_staleness_seconds",
        "lcic_guard_breaker_open",
        "lcic_guard_redis_errors_total",
        "lcic_guard_reconciler_stream_lag",
        "lcic_guard_reconciler_events_total",
        "lcic_guard_reconciler_releases_total",
        "lcic_guard_reconciler_leader_changes_total",
    ):
        assert needed in used, needed
    titles = [p["title"] for p in panels]
    assert len(set(titles)) == len(titles)
