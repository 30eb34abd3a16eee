"""A hostile or careless caller and a Redis that loses its data: the sidecar
built as ``serve`` builds it (real redis-server, real gRPC over a socket).

Each test reproduces one finding of the hostile-input review: it failed on
the code before the fix."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.config import Settings
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, HOUR, AppStatus, PolicyConfig, Reason, Segment
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.release import RESYNCING
from lcic_guard.reconciler.sources import FileSource
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import status_key
from lcic_guard.store.status import Store

from tests.support.fixtures import write_all
from tests.support.settings import sidecar_settings

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


def settings_for(redis: EmbeddedRedis, **kw: Any) -> Settings:
    return sidecar_settings(redis_url=redis.url, **kw)


@contextlib.asynccontextmanager
async def started(
    redis: EmbeddedRedis, **kw: Any
) -> AsyncIterator[tuple[RunningSidecar, grpc.aio.Channel, pb_grpc.EnforcementServiceStub]]:
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
    policy = PolicyConfig(stale_bound_ms=1500)
    async with started(own_redis, store_down_ms=100, policy=policy) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        checker = sidecar.checker
        assert checker.failure_mode_answers == {}
        own_redis.kill()
        await eventually(lambda: _true(not checker.cache.feed_healthy))
        # Within the stale bound: what was last seen, degraded; no failure mode.
        resp = await stub.CheckBatch(recordings(["never-seen", "app-up"]), timeout=5)
        unknown, up = resp.decisions
        assert unknown.reason == R.DECISION_REASON_UNKNOWN_APPLICATION and unknown.degraded
        assert up.allowed and up.degraded
        assert checker.failure_mode_answers == {}
        # Past it: the failure mode, counted by check and mode.
        await asyncio.sleep(1.6)
        resp = await stub.CheckBatch(recordings(["never-seen", "app-up"]), timeout=5)
        assert {d.reason for d in resp.decisions} == {R.DECISION_REASON_STATUS_UNAVAILABLE}
        assert checker.failure_mode_answers == {("recording", "open"): 2}


async def test_a_new_app_on_the_feed_is_inserted_into_the_replica(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    async with started(own_redis) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        status = suspended("app-new", version=3)
        await rstore.write_status(status)
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

        async def answered_right() -> bool:
            r = await stub.CheckBatch(recordings(["app-b"]), timeout=5)
            return r.decisions[0].status_version == 4 and not r.decisions[0].allowed

        await eventually(answered_right, timeout=2.0)
        assert sidecar.feed.resync_causes.get("rollback") == 1


# -- finding 6: bounded ---------------------------------------------------------


async def test_raw_tcp_connections_without_the_http2_preface_are_closed(
    own_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lcic_guard.sidecar import server as sidecar_mod

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
        # Rooms whose read missed its budget on a loaded machine are not held
        # (the answer was still a denial); at least one batch's were.
        assert cache.room_evictions >= 1000 - cache.rooms_per_app


# -- finding 2: believe no caller too far ------------------------------------------


def started_req(app: str, room: str, at: Millis, end: Millis | None = None) -> Any:
    req = pb.ReportClassroomStartedRequest(app_id=app, room_id=room)
    req.started_at.FromMilliseconds(at)
    if end is not None:
        req.scheduled_end_time.FromMilliseconds(end)
    return req


def ended_req(app: str, room: str, at: Millis) -> Any:
    req = pb.ReportClassroomEndedRequest(app_id=app, room_id=room)
    req.ended_at.FromMilliseconds(at)
    return req


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


YEAR_5000 = 95_617_584_000_000


async def test_forged_reports_are_refused_naming_the_field(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    now = wall_clock()
    # Suspended one second after the "start" a forger would claim.
    await write_all(rstore, [suspended("app-f", now=now)])
    async with started(own_redis) as (_sidecar, _channel, stub):
        bad = [
            (started_req("app-f", "r1", now - 2 * DAY - 1000, YEAR_5000), "started_at"),
            (started_req("app-f", "r1", now + 10 * 60_000), "started_at"),
            (started_req("app-f", "r1", now - 1000, now - 2000), "scheduled_end_time"),
        ]
        for req, field in bad:
            code, details = await code_of(stub.ReportClassroomStarted(req, timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field)
        code, details = await code_of(
            stub.ReportClassroomEnded(ended_req("app-f", "r1", 0), timeout=5)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("ended_at")
        code, details = await code_of(
            stub.ReportClassroomEnded(ended_req("app-f", "r1", now + DAY), timeout=5)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("ended_at")


async def test_protection_never_outlasts_start_plus_the_maximum_class_length(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    now = wall_clock()
    # Suspended 2 days ago, then re-suspended now: a class started 1 h ago
    # under an OK status, with a scheduled end in year 5000.
    seg_ok = Segment(now - 10 * DAY)
    seg_s = Segment(now - 1000, (Reason.PACKAGE_EXPIRED,), suspended_at=now - 1000, release_at=None)
    await rstore.write_status(AppStatus("app-p", "acct-p", (seg_ok, seg_s), 1, now))
    async with started(own_redis) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        await stub.ReportClassroomStarted(
            started_req("app-p", "live", now - HOUR, YEAR_5000), timeout=5
        )
        resp = await stub.CanEnterClassroom(
            pb.CanEnterClassroomRequest(app_id="app-p", room_id="live"), timeout=5
        )
        d = resp.decision
        assert d.allowed and d.reason == R.DECISION_REASON_IN_PROGRESS_PROTECTED
        max_class = sidecar.checker.cfg.max_class_ms
        assert d.protected_until.ToMilliseconds() <= now - HOUR + max_class


async def test_serve_refuses_a_network_address_without_auth(own_redis: EmbeddedRedis) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lcic_guard.cli",
        "serve",
        "--redis-url",
        own_redis.url,
        "--listen",
        "0.0.0.0:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "--auth-token-file" in lines[0] and "--insecure" in lines[0]


async def test_scopes_grant_what_the_token_file_lists(
    own_redis: EmbeddedRedis, rstore: Store, tmp_path: Path
) -> None:
    now = wall_clock()
    await write_all(rstore, [active("app-a")])
    tokens = tmp_path / "tokens"
    tokens.write_text("# token scopes\nreader-token read\nreporter-token report\nold-style-token\n")
    async with started(own_redis, auth_token_file=str(tokens)) as (_sidecar, _channel, stub):

        def auth(token: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {token}")]

        rep = started_req("app-a", "r", now - 1000)
        status = pb.GetApplicationStatusRequest(app_id="app-a")
        codes = {
            "anonymous report": await code_of(stub.ReportClassroomStarted(rep, timeout=5)),
            "reader report": await code_of(
                stub.ReportClassroomStarted(rep, timeout=5, metadata=auth("reader-token"))
            ),
            "reader status": await code_of(
                stub.GetApplicationStatus(status, timeout=5, metadata=auth("reader-token"))
            ),
            "reporter report": await code_of(
                stub.ReportClassroomStarted(rep, timeout=5, metadata=auth("reporter-token"))
            ),
            "reporter status": await code_of(
                stub.GetApplicationStatus(status, timeout=5, metadata=auth("reporter-token"))
            ),
            "old report": await code_of(
                stub.ReportClassroomStarted(rep, timeout=5, metadata=auth("old-style-token"))
            ),
            "old status": await code_of(
                stub.GetApplicationStatus(status, timeout=5, metadata=auth("old-style-token"))
            ),
        }
        C = grpc.StatusCode
        assert {k: v[0] for k, v in codes.items()} == {
            "anonymous report": C.UNAUTHENTICATED,
            "reader report": C.PERMISSION_DENIED,
            "reader status": C.OK,
            "reporter report": C.OK,
            "reporter status": C.PERMISSION_DENIED,
            "old report": C.OK,
            "old status": C.OK,
        }
        assert "needs scope 'report'" in codes["reader report"][1]


# -- finding 5: one bad stored value fails nothing else ------------------------------


async def test_one_poisoned_room_does_not_fail_its_batch(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    now = wall_clock()
    apps = [f"app-q{i}" for i in range(999)]
    await write_all(rstore, [suspended(a, now=now) for a in [*apps, "app-poison"]])
    # As Lua's cjson stores a report of 9999-12-31 (a float), and a room whose
    # record is garbage.
    key = status_key("app-poison")
    await rstore.redis.hset(key, "room:far", json.dumps({"s": now - 3 * DAY, "e": 2.53402e14}))
    await rstore.redis.hset(key, "room:bad", json.dumps({"s": "yesterday"}))
    # A generous sub-deadline: this is about answers, not a slow Redis.
    async with started(own_redis, redis_timeout_ms=5000) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        checks = [
            pb.Check(enter_classroom=pb.CanEnterClassroomRequest(app_id=a, room_id="room-1"))
            for a in apps
        ]
        checks.append(
            pb.Check(
                enter_classroom=pb.CanEnterClassroomRequest(app_id="app-poison", room_id="bad")
            )
        )
        checks.append(
            pb.Check(
                enter_classroom=pb.CanEnterClassroomRequest(app_id="app-poison", room_id="far")
            )
        )
        resp = await stub.CheckBatch(pb.CheckBatchRequest(checks=checks[-1000:]), timeout=10)
        reasons = [d.reason for d in resp.decisions]
        assert reasons[-2] == R.DECISION_REASON_STATUS_UNAVAILABLE
        assert reasons[-1] == R.DECISION_REASON_ACCOUNT_OVERDUE  # started after the suspension
        assert set(reasons[:-2]) == {R.DECISION_REASON_ACCOUNT_OVERDUE}
        assert sidecar.checker.internal_errors == 1
        assert sum(sidecar.checker.failure_mode_answers.values()) == 1


async def test_a_status_dated_9999_is_served_and_watched(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    late = 253_402_297_200_000  # 9999-12-31T23:00Z: its grace ends in year 10000
    seg = Segment(late, (Reason.OVERDUE_GRACE,), grace_ends_at=late + DAY, suspended_at=None)
    status = AppStatus("app-9999", "acct-9", (Segment(0), seg), 1, wall_clock())
    async with started(own_redis) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        watch = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(), timeout=10)
        await eventually(lambda: _true(len(sidecar.watchers or ()) == 1))
        await rstore.write_status(status)
        await rstore.write_status(active("app-after", 1))
        got: list[str] = []
        async for msg in watch:
            if msg.HasField("status"):
                got.append(msg.status.app_id)
            if "app-after" in got:
                break
        watch.cancel()
        # Its schedule cannot be written out (a grace end in year 10000): that
        # one message is skipped and counted; the stream goes on.
        assert got == ["app-after"]
        assert sidecar.watchers is not None and sidecar.watchers.render_errors == 1
        resp = await stub.GetApplicationStatus(
            pb.GetApplicationStatusRequest(app_id="app-9999"), timeout=5
        )
        assert resp.status.app_id == "app-9999"


# -- finding 4: watch streams cannot hurt checks ------------------------------------


async def test_watch_streams_past_the_limit_are_refused(own_redis: EmbeddedRedis) -> None:
    async with started(own_redis, max_watch_streams=5) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        calls = [
            stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(), timeout=10)
            for _ in range(5)
        ]
        await eventually(lambda: _true(len(sidecar.watchers or ()) == 5))
        extra = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await extra.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-watch-streams" in (err.value.details() or "")
        # Checks are answered meanwhile, and a freed slot can be used again.
        resp = await stub.CheckBatch(recordings(["x"]), timeout=5)
        assert resp.decisions[0].reason == R.DECISION_REASON_UNKNOWN_APPLICATION
        calls[0].cancel()
        await eventually(lambda: _true(len(sidecar.watchers or ()) == 4))
        again = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(), timeout=10)
        await eventually(lambda: _true(len(sidecar.watchers or ()) == 5))
        for c in [*calls, again]:
            c.cancel()


@pytest.mark.parametrize("ids", [["app-t"], []], ids=["by-id", "watch-all"])
async def test_watch_sends_a_time_driven_transition_at_its_instant(
    own_redis: EmbeddedRedis, rstore: Store, ids: list[str]
) -> None:
    def with_deadline(flip: Millis) -> AppStatus:
        """In grace until ``flip``, then suspended: no new record at the flip."""
        now = wall_clock()
        grace = Segment(now - HOUR, (Reason.OVERDUE_GRACE,), grace_ends_at=flip)
        susp = Segment(
            flip,
            (Reason.ACCOUNT_OVERDUE,),
            grace_ends_at=flip,
            suspended_at=flip,
            release_at=flip + 60 * DAY,
        )
        return AppStatus("app-t", "acct-t", (Segment(now - DAY), grace, susp), 1, now)

    if not ids:
        # Held since the start and never changed while watched.
        await rstore.write_status(with_deadline(wall_clock() + 3000))
    async with started(own_redis) as (sidecar, _channel, stub):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        if ids:
            await rstore.write_status(with_deadline(wall_clock() + 1000))
        status, _ = await rstore.read_status("app-t")
        assert status is not None
        flip = status.segments[-1].starts_at
        watch = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(app_ids=ids))
        states = []
        async for msg in watch:
            if msg.HasField("status"):
                states.append((msg.status.state, wall_clock()))
                if msg.status.state == pb.APPLICATION_STATE_SUSPENDED:
                    break
        watch.cancel()
        # Watching by id starts with the current status; watch-all sends
        # changes only, and this app's only change is the deadline.
        first = [pb.APPLICATION_STATE_GRACE] if ids else []
        assert [s for s, _ in states] == [*first, pb.APPLICATION_STATE_SUSPENDED]
        late_by = states[-1][1] - flip
        assert late_by >= 0
        print(f"time-driven transition sent {late_by} ms after its instant")
        assert sidecar.watchers is not None and sidecar.watchers.transitions_pushed == 1


# -- finding 7: errors that say what happened -------------------------------------


async def test_a_wrong_redis_password_is_reported_as_such_and_not_repeated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with EmbeddedRedis() as redis:
        admin = Store(connect(redis.url))
        await admin.redis.config_set("requirepass", "right-password")
        await admin.close()
        url = f"redis://:wrong-password@127.0.0.1:{redis.port}/0"
        settings = sidecar_settings(redis_url=url)
        store = Store(connect(url))
        rec_store = Store(connect(url))
        reconciler = Reconciler(rec_store, PolicyConfig(), ReconcilerConfig(tick_ms=50))
        stop = asyncio.Event()
        running = asyncio.create_task(reconciler.run(stop))
        sidecar = await build_sidecar(settings, store)
        try:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
            stub = pb_grpc.EnforcementServiceStub(channel)
            for _ in range(20):
                await stub.CheckBatch(recordings(["app-1"]), timeout=5)
            await asyncio.sleep(1.5)  # ~30 reconciler ticks
            await channel.close()
        finally:
            stop.set()
            await running
            await sidecar.stop(grace=0.1)
            await store.close()
            await rec_store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Redis refused the credentials" in w for w in warnings)
    ticks = [w for w in warnings if w.startswith("deadline work failed")]
    assert 1 <= len(ticks) <= 2, ticks
    assert "refused the credentials" in ticks[0]


async def test_reconciler_refuses_releases_after_flushall_until_the_feed_is_read_again(
    own_redis: EmbeddedRedis, rstore: Store, tmp_path: Path
) -> None:
    now = wall_clock()
    events = [
        {
            "event_id": "e1",
            "type": "application_registered",
            "occurred_at": format_time(now - 100 * DAY),
            "account_id": "acct-r",
            "app_id": "app-r",
        },
        {
            "event_id": "e2",
            "type": "overdue_alert",
            "occurred_at": format_time(now - 70 * DAY),
            "account_id": "acct-r",
        },
    ]
    snapshot = tmp_path / "snapshot.jsonl"
    snapshot.write_text("".join(json.dumps(e) + "\n" for e in events))
    source = FileSource(snapshot, clock_ms=rstore.server_time)
    rec = Reconciler(rstore, PolicyConfig(), ReconcilerConfig(release_margin_ms=0), [source])
    assert not await rec.check_generation()  # a new store: its generation is created
    await rec.drain(source)
    await rstore.redis.flushall()
    assert await rec.check_generation()
    assert rec.resyncing
    rec.token = await rec.coord.hold_lease(rec.name, 5000)
    plan = await rec.try_release("acct-r", wall_clock())
    assert not plan.eligible and plan.why == RESYNCING
    assert rec.releases_done == []
    # The snapshot is loaded again and read to its end: releases may go on.
    source2 = FileSource(snapshot, clock_ms=rstore.server_time)
    rec.sources[:] = [source2]  # the list the releaser reads too
    await rec.drain(source2)
    assert not rec.resyncing
    plan = await rec.try_release("acct-r", wall_clock())
    assert plan.why != RESYNCING
