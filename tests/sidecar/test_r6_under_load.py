"""R6 under load (issue 19, finding 5; SPEC R6, R13): a class in progress is
never denied because a batch is large or a healthy Redis is busy, and a
degraded enter check never denies a room whose report it has not read.

Real redis-server, the sidecar built as ``serve`` builds it, gRPC over a
socket; each test failed on the code before the fix."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, HOUR, AppStatus, Reason, Segment
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store

from tests.support.settings import sidecar_settings

R = pb.DecisionReason
CLIENTS = 4
ROUNDS = 5
PROTECTED_PER_BATCH = 3  # with 997 rooms never seen: 1,000 checks a batch


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def overdue_since(app_id: str, since: Millis, *, banned: bool = False) -> AppStatus:
    """Suspended since ``since`` (overdue, or banned)."""
    reasons = (Reason.ACCOUNT_BANNED,) if banned else (Reason.ACCOUNT_OVERDUE,)
    seg = Segment(since, reasons, grace_ends_at=since, suspended_at=since, release_at=since + DAY)
    return AppStatus(app_id, "acct-" + app_id, (Segment(since - 10 * DAY), seg), 1, since)


def ts(ms: Millis) -> Timestamp:
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def enter(app_id: str, room_id: str) -> pb.Check:
    return pb.Check(enter_classroom=pb.CanEnterClassroomRequest(app_id=app_id, room_id=room_id))


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def sidecar_on(
    redis: EmbeddedRedis,
) -> AsyncIterator[tuple[RunningSidecar, list[pb_grpc.EnforcementServiceStub]]]:
    """The sidecar with the product's default timeouts, and one channel
    (one connection) per client."""
    store = Store(connect(redis.url))
    sidecar = await build_sidecar(sidecar_settings(redis_url=redis.url), store)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") for _ in range(CLIENTS)]
    try:
        yield sidecar, [pb_grpc.EnforcementServiceStub(c) for c in channels]
    finally:
        for c in channels:
            await c.close()
        await sidecar.stop(grace=0.1)
        await store.close()


async def test_protected_rooms_in_large_concurrent_batches_are_allowed_and_never_degraded(
    redis: EmbeddedRedis,
) -> None:
    now = wall_clock()
    # Suspended an hour ago: a class reported started two hours ago is
    # protected (R6); any other room of these apps is denied.
    apps = [f"app-{i}" for i in range(20)]
    seeded = Store(connect(redis.url))
    for app in apps:
        await seeded.write_status(overdue_since(app, now - HOUR))
    await seeded.close()
    async with sidecar_on(redis) as (sidecar, stubs):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        checker = sidecar.checker
        protected: list[tuple[str, str]] = []
        decisions: list[pb.Decision] = []
        took: list[float] = []  # per round: four batches of 1,000 at once
        for rnd in range(ROUNDS):
            # New protected rooms each round, reported through the sidecar
            # (never read by it yet), each checked inside a batch of rooms
            # the sidecar has never seen, four such batches at once.
            batches = []
            for c in range(CLIENTS):
                mine = [
                    (apps[(rnd * CLIENTS + c + k) % len(apps)], f"class-{rnd}-{c}-{k}")
                    for k in range(PROTECTED_PER_BATCH)
                ]
                for app, room in mine:
                    await stubs[0].ReportClassroomStarted(
                        pb.ReportClassroomStartedRequest(
                            app_id=app, room_id=room, started_at=ts(now - 2 * HOUR)
                        ),
                        timeout=5,
                    )
                unseen = [
                    enter(apps[n % len(apps)], uuid.uuid4().hex)
                    for n in range(1000 - PROTECTED_PER_BATCH)
                ]
                # The protected rooms spread through the batch.
                checks = list(unseen)
                for k, (app, room) in enumerate(mine):
                    checks.insert(k * 300, enter(app, room))
                batches.append((mine, checks))
                protected += mine
            sent = time.monotonic()
            replies = await asyncio.gather(
                *(
                    stubs[c].CheckBatch(pb.CheckBatchRequest(checks=checks), timeout=30)
                    for c, (_, checks) in enumerate(batches)
                )
            )
            took.append(time.monotonic() - sent)
            for (mine, checks), reply in zip(batches, replies, strict=True):
                assert len(reply.decisions) == len(checks)
                by_room = {
                    check.enter_classroom.room_id: d
                    for check, d in zip(checks, reply.decisions, strict=True)
                }
                for _, room in mine:
                    d = by_room[room]
                    assert d.allowed and d.reason == R.DECISION_REASON_IN_PROGRESS_PROTECTED, (
                        room,
                        R.Name(d.reason),
                        d.degraded,
                    )
                decisions += reply.decisions
        print(
            f"\nR6 under load: {len(protected)} protected rooms in {ROUNDS} rounds of "
            f"{CLIENTS} concurrent batches of 1,000 unseen rooms; a round took "
            f"{min(took) * 1000:.0f}-{max(took) * 1000:.0f} ms; Redis reads {checker.store_reads}"
        )
        assert len(protected) == ROUNDS * CLIENTS * PROTECTED_PER_BATCH
        # Redis was healthy throughout: no answer is degraded, none comes
        # from a failure mode, and every unseen room is denied as overdue.
        assert not [d for d in decisions if d.degraded]
        assert checker.failure_mode_answers == {}
        denied = [d for d in decisions if not d.allowed]
        assert len(denied) == len(decisions) - len(protected)
        assert {d.reason for d in denied} == {R.DECISION_REASON_ACCOUNT_OVERDUE}


async def test_with_redis_down_an_unread_room_gets_the_failure_mode_and_is_counted(
    redis: EmbeddedRedis,
) -> None:
    now = wall_clock()
    seeded = Store(connect(redis.url))
    await seeded.write_status(overdue_since("app-late", now - HOUR))  # a room may protect
    await seeded.write_status(overdue_since("app-old", now - 2 * DAY))  # none can, any more
    await seeded.write_status(overdue_since("app-ban", now - HOUR, banned=True))  # R6 n/a
    await seeded.close()
    async with sidecar_on(redis) as (sidecar, stubs):
        await eventually(lambda: _true(sidecar.feed.in_sync))
        checker = sidecar.checker
        stub = stubs[0]
        # A room read while Redis was up, with nothing reported.
        seen = await stub.CheckBatch(pb.CheckBatchRequest(checks=[enter("app-late", "seen")]))
        assert seen.decisions[0].reason == R.DECISION_REASON_ACCOUNT_OVERDUE
        assert checker.failure_mode_answers == {}
        redis.kill()
        await eventually(lambda: _true(not checker.cache.feed_healthy))
        checks = [
            enter("app-late", "unread"),  # may be a protected class: not denied
            enter("app-late", "seen"),  # read: no report, so denied from what was seen
            enter("app-old", "unread"),  # no class can be protected so late: denied
            enter("app-ban", "unread"),  # a ban is not protected: denied
        ]
        reply = await stub.CheckBatch(pb.CheckBatchRequest(checks=checks), timeout=5)
        late, seen_room, old, ban = reply.decisions
        assert all(d.degraded for d in reply.decisions)
        assert late.allowed and late.reason == R.DECISION_REASON_STATUS_UNAVAILABLE
        assert not seen_room.allowed and seen_room.reason == R.DECISION_REASON_ACCOUNT_OVERDUE
        assert not old.allowed and old.reason == R.DECISION_REASON_ACCOUNT_OVERDUE
        assert not ban.allowed and ban.reason == R.DECISION_REASON_ACCOUNT_BANNED
        # The single check answers the same way.
        single = await stub.CanEnterClassroom(
            pb.CanEnterClassroomRequest(app_id="app-late", room_id="other"), timeout=5
        )
        assert single.decision.allowed and single.decision.degraded
        assert single.decision.reason == R.DECISION_REASON_STATUS_UNAVAILABLE
        # Every failure-mode answer is counted (enter fails open by default).
        assert checker.failure_mode_answers == {("enter", "open"): 2}
        assert checker.breaker.trips >= 1  # Redis was found down


async def _true(value: bool) -> bool:
    return value
