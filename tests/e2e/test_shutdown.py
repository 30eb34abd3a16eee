"""Graceful shutdown (issue 5, item 6): SIGTERM to ``lcic-guard serve``
turns health NOT_SERVING first, lets in-flight calls finish, then exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.policy import DAY, PolicyConfig
from lcic_guard.domain.time import wall_clock
from lcic_guard.reconciler import Reconciler
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store
from redis.asyncio import Redis

from tests.support.events import Events, deliveries

DRAIN_S = 0.3
SLOW_REDIS_S = 0.8  # DEBUG SLEEP: holds a report for longer than the drain


@dataclass
class Serve:
    proc: asyncio.subprocess.Process
    port: int
    redis: EmbeddedRedis


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Serve]:
    redis = EmbeddedRedis(extra_args=["--enable-debug-command", "yes"])
    await asyncio.to_thread(redis.start)
    store = Store(connect(redis.url))
    now = wall_clock()
    events = Events()
    await Reconciler(store, PolicyConfig(), clock=wall_clock).ingest(
        deliveries(events.app("acct", "app-1", at=now - DAY, expires=now + 30 * DAY))
    )
    await store.close()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lcic_guard.cli",
        "serve",
        "--redis-url",
        redis.url,
        "--listen",
        f"127.0.0.1:{port}",
        "--shutdown-delay",
        f"{int(DRAIN_S * 1000)}ms",
        "--shutdown-grace",
        "5s",
        "--max-heartbeat-age",
        "0",
        "--log-format",
        "text",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Serve(proc, port, redis)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.to_thread(redis.stop)


@dataclass
class Probe:
    """Health, asked every 20 ms on its own connection, as a kubelet would."""

    seen: list[tuple[float, str]] = field(default_factory=list)
    check_during_drain: str | None = None

    async def run(self, port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            enforcement = pb_grpc.EnforcementServiceStub(channel)
            while True:
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                self.seen.append((time.monotonic(), status))
                if status == "NOT_SERVING" and self.check_during_drain is None:
                    # Still answering while the load balancer takes us out.
                    req = pb.CanCreateClassroomRequest(app_id="app-1")
                    try:
                        d = (await enforcement.CanCreateClassroom(req, timeout=1)).decision
                        self.check_during_drain = "allowed" if d.allowed else "denied"
                    except grpc.aio.AioRpcError as exc:
                        self.check_during_drain = exc.code().name
                if status not in ("SERVING", "NOT_SERVING"):
                    return
                await asyncio.sleep(0.02)

    def first(self, status: str) -> float:
        return next(t for t, s in self.seen if s == status)


async def test_sigterm_drains_finishes_in_flight_calls_and_exits_zero(serve: Serve) -> None:
    target = f"127.0.0.1:{serve.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        stub = pb_grpc.EnforcementServiceStub(channel)
        for _ in range(100):  # warm the cache (a first read may miss 5 ms on a busy machine)
            warm = await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"))
            if not warm.decision.degraded:
                break
            await asyncio.sleep(0.02)
        assert warm.decision.allowed and not warm.decision.degraded
        # A watch stream, open across the shutdown.
        watch = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(app_ids=["app-1"]))
        assert (await watch.read()).status.app_id == "app-1"
        probe = Probe()
        probing = asyncio.create_task(probe.run(serve.port))
        await asyncio.sleep(0.1)
        assert probe.seen and probe.seen[-1][1] == "SERVING"

        # A report held in flight by a Redis that is slow to answer.
        admin = Redis.from_url(serve.redis.url)
        slow = admin.execute_command("DEBUG", "SLEEP", SLOW_REDIS_S)  # type: ignore[no-untyped-call]
        sleeping = asyncio.create_task(slow)
        await asyncio.sleep(0.05)
        req = pb.ReportClassroomStartedRequest(app_id="app-1", room_id="room-1")
        req.started_at.FromMilliseconds(wall_clock())
        reporting = asyncio.ensure_future(stub.ReportClassroomStarted(req, timeout=10))
        await asyncio.sleep(0.05)

        serve.proc.send_signal(signal.SIGTERM)
        term = time.monotonic()
        await reporting  # OK: no error
        reported = time.monotonic()
        try:
            while True:
                await watch.read()
        except grpc.aio.AioRpcError as exc:
            watch_code, watch_details = exc.code(), exc.details() or ""
        watch_ended = time.monotonic()
        await asyncio.wait_for(probing, 10)
        _, stderr = await asyncio.wait_for(serve.proc.communicate(), 15)
        exited = time.monotonic()
        await sleeping
        await admin.aclose()

    statuses = [s for _, s in probe.seen]
    not_serving, closed = probe.first("NOT_SERVING"), probe.first(statuses[-1])
    print(
        f"\nshutdown: NOT_SERVING {1000 * (not_serving - term):.0f} ms after SIGTERM, port "
        f"closed after {1000 * (closed - term):.0f} ms, in-flight report done after "
        f"{1000 * (reported - term):.0f} ms, exit after {1000 * (exited - term):.0f} ms"
    )
    # Health: SERVING, then NOT_SERVING (never SERVING again), then no answer.
    first_ns = statuses.index("NOT_SERVING")
    assert set(statuses[:first_ns]) == {"SERVING"}
    assert "SERVING" not in statuses[first_ns:]
    # (a probe caught by the closing port is cancelled; later ones find no server)
    assert statuses[-1] in ("UNAVAILABLE", "CANCELLED"), statuses[-5:]
    assert term <= not_serving < closed  # at once: within the drain, before the port closes
    assert closed >= not_serving + DRAIN_S * 0.8  # the drain: probes saw NOT_SERVING first
    assert probe.check_during_drain == "allowed"
    # The report was in flight when the port closed, and finished normally.
    assert reported > closed
    # The watch stream was ended at once (not left to the 5 s grace), saying why.
    assert watch_code == grpc.StatusCode.UNAVAILABLE and "shutting down" in watch_details
    assert watch_ended < term + DRAIN_S + 2.0
    assert serve.proc.returncode == 0, stderr.decode()
    assert exited < term + 4.0
    assert b"stopping: health NOT_SERVING" in stderr
