"""The cache's packed records and the memoized fast path agree with the
policy they stand in for."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import grpc
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import (
    HOUR,
    MINUTE,
    SUSPENSION_PRECEDENCE,
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Reason,
    Room,
    Segment,
    decide,
    protected_until,
)
from lcic_guard.domain.time import MAX_TIME
from lcic_guard.reconciler import Reconciler
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.sidecar.cache import StatusCache
from lcic_guard.sidecar.checker import Checker, CheckRequest
from lcic_guard.store.packed import pack, segment_span, unpack, unpack_segment
from lcic_guard.store.status import Store

from tests.sidecar.test_sidecar_rpc import ts
from tests.support.clock import FakeClock
from tests.support.events import Events, deliveries
from tests.support.settings import sidecar_settings

T0 = 1_790_000_000_000


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


CANONICAL = (*SUSPENSION_PRECEDENCE, Reason.OVERDUE_GRACE)
# Times a record can hold: the messages of a decision format them.
times = st.one_of(st.none(), st.integers(0, MAX_TIME))


@st.composite
def statuses(draw: st.DrawFn) -> AppStatus:
    starts = sorted(
        draw(st.sets(st.integers(T0 - 100 * HOUR, T0 + 100 * HOUR), min_size=1, max_size=5))
    )
    segments = []
    for start in starts:
        held = draw(st.sets(st.sampled_from(CANONICAL)))
        reasons = tuple(r for r in CANONICAL if r in held)
        suspended = draw(times)
        # R6's effective time exists with a suspension start, often equal to it.
        effective = (
            None
            if suspended is None
            else draw(st.one_of(st.just(suspended), st.integers(suspended, MAX_TIME)))
        )
        segments.append(Segment(start, reasons, draw(times), suspended, draw(times), effective))
    return AppStatus("app-1", "", tuple(segments), draw(st.integers(0, 2**40)))


@settings(max_examples=300, deadline=None)
@given(
    status=statuses(),
    fetched=st.integers(0, 2**45),
    now=st.integers(T0 - 200 * HOUR, T0 + 200 * HOUR),
)
def test_a_packed_record_is_the_status_it_packs(status: AppStatus, fetched: int, now: int) -> None:
    rec = pack(status, fetched, 3)
    back, fetched_at = unpack("app-1", rec)
    assert back == status and fetched_at == fetched
    start, _end = segment_span(rec, len(status.segments), now)
    assert unpack_segment(rec, start) == status.at(now)


def test_unknown_apps_pack_too() -> None:
    assert unpack("x", pack(None, 42, 0)) == (None, 42)


@pytest_asyncio.fixture
async def fed(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[RunningSidecar]:
    """A sidecar whose cache is fed by the change feed from a real Redis, and
    whose entries stay fresh across the hours these tests step over (the
    feed confirms them; only the age bound would expire them)."""
    settings = sidecar_settings(
        redis_timeout_ms=2000, cache_size=10_000, cache_max_age_ms=1000 * HOUR, policy=policy
    )
    clock.now = T0 - 200 * HOUR  # before every time the tests step to
    sidecar = await build_sidecar(settings, store, clock=clock)
    await eventually(lambda: sidecar.checker.cache.whole)
    yield sidecar
    await sidecar.stop(grace=0.2)


class Written:
    """Statuses written and published as the reconciler does, each under a
    new application id, held by the sidecar once the feed delivers them."""

    ids = itertools.count(1)  # hypothesis runs its examples on one store

    def __init__(self, store: Store, sidecar: RunningSidecar) -> None:
        self.store, self.sidecar = store, sidecar

    async def status(self, status: AppStatus) -> AppStatus:
        status = replace(status, app_id=f"app-{next(self.ids)}")
        res = await self.store.write_status(status)
        assert res.written
        status = replace(status, version=res.version)  # the store's own version
        cache = self.sidecar.checker.cache
        await eventually(lambda: cache.held_version(status.app_id) == status.version)
        return status

    async def room(self, app_id: str, room_id: str, room: Room) -> None:
        """A classroom report as the sidecar records one, and the first check
        of it, which reads the room from Redis into the cache."""
        until = protected_until(room, PolicyConfig())
        assert await self.store.report_room(
            app_id,
            room_id,
            now=self.sidecar.checker.clock(),
            until=until,
            started_at=room.started_at,
            scheduled_end=room.scheduled_end,
            ended_at=room.ended_at,
        )
        checker = self.sidecar.checker
        await checker.check_uncached(CheckRequest(Check.ENTER_CLASSROOM, app_id, room_id))
        rooms = checker.cache.rooms_of(app_id)
        assert rooms is not None and room_id in rooms


def cached(checker: Checker, req: CheckRequest) -> Decision | None:
    """What the serving threads answer from the cache (None: not held)."""
    answer = checker.answer(req)
    return answer.decision if answer is not None else None


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    status=statuses(),
    offsets=st.lists(st.integers(-150 * HOUR, 150 * HOUR), min_size=1, max_size=20),
)
async def test_memoized_fast_path_equals_the_policy(
    store: Store, fed: RunningSidecar, clock: FakeClock, status: AppStatus, offsets: list[int]
) -> None:
    cfg = PolicyConfig()
    # Fetched before every time asked at: the clock only moves forward.
    clock.now = T0 - 151 * HOUR
    status = await Written(store, fed).status(status)
    app, checker = status.app_id, fed.checker
    for off in offsets:  # crossing deadlines: each segment memoized apart
        clock.now = T0 + off
        for check in (Check.CREATE_CLASSROOM, Check.ACCESS_RECORDING):
            got = cached(checker, CheckRequest(check, app))
            assert got == decide(check, status, clock.now, cfg)
            # Not in the table: the whole replica answers it unknown.
            unknown = cached(checker, CheckRequest(check, "app-never"))
            assert unknown == decide(check, None, clock.now, cfg)
        enter = cached(checker, CheckRequest(Check.ENTER_CLASSROOM, app, "room-1"))
        expected = decide(Check.ENTER_CLASSROOM, status, clock.now, cfg)
        # A suspended app's classroom needs the room: no cached answer yet.
        assert enter == (expected if expected.allowed else None)


def test_the_least_recently_used_app_is_forgotten_first() -> None:
    cache = StatusCache(2, max_age_ms=1000)
    st_ = AppStatus("a", "", (Segment(T0),), 1)
    cache.put("a", st_, 1)
    cache.put("b", st_, 1)
    assert cache.lookup("a") is not None  # "a" is now the most recent
    cache.put("c", st_, 1)
    assert cache.app_ids() == ["a", "c"]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    status=statuses(),
    start=st.integers(-30 * HOUR, 30 * HOUR),
    length=st.one_of(st.none(), st.integers(1, 20 * HOUR)),
    ended=st.one_of(st.none(), st.integers(-30 * HOUR, 30 * HOUR)),
    offsets=st.lists(st.integers(-40 * HOUR, 40 * HOUR), min_size=1, max_size=20),
)
async def test_memoized_room_answers_follow_the_clock(
    store: Store,
    fed: RunningSidecar,
    clock: FakeClock,
    status: AppStatus,
    start: int,
    length: int | None,
    ended: int | None,
    offsets: list[int],
) -> None:
    """An enter check of a suspended app is memoized with its room: the same
    record and room must still give a new answer once now passes the end of
    the class's protection or its reported end."""
    cfg = PolicyConfig()
    # Fetched before every time asked at: the clock only moves forward.
    clock.now = T0 - 41 * HOUR
    written = Written(store, fed)
    status = await written.status(status)
    room = Room(
        T0 + start,
        None if length is None else T0 + start + length,
        None if ended is None else T0 + ended,
    )
    await written.room(status.app_id, "room-1", room)
    enter = CheckRequest(Check.ENTER_CLASSROOM, status.app_id, "room-1")
    for off in sorted(offsets) + sorted(offsets):  # again: now from the memo
        clock.now = T0 + off
        got = cached(fed.checker, enter)
        want = decide(Check.ENTER_CLASSROOM, status, clock.now, cfg, room)
        assert got == want


async def test_a_memoized_protected_room_is_denied_once_its_protection_ends(
    store: Store, reconciler: Reconciler, events: Events, policy: PolicyConfig, clock: FakeClock
) -> None:
    """The status and the room reach the cache the way they do in production
    (the reconciler's write and the report, delivered by the change feed);
    the second answer comes from the same held record and room."""
    settings = sidecar_settings(
        redis_timeout_ms=2000, cache_size=50, cache_max_age_ms=10 * HOUR, policy=policy
    )
    sidecar = await build_sidecar(settings, store, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    stub = pb_grpc.EnforcementServiceStub(channel)
    try:
        await eventually(lambda: sidecar.checker.cache.feed_healthy)
        # The package expires at T0 + 1 h, after the class started.
        await reconciler.ingest(deliveries(events.app("acct-1", "app-1", expires=T0 + HOUR)))
        report = pb.ReportClassroomStartedRequest(
            app_id="app-1", room_id="room-1", started_at=ts(T0 - 10 * MINUTE)
        )
        report.scheduled_end_time.CopyFrom(ts(T0 + HOUR))
        await stub.ReportClassroomStarted(report, timeout=5)
        enter = pb.CanEnterClassroomRequest(app_id="app-1", room_id="room-1")
        await eventually(lambda: sidecar.checker.cache.held_version("app-1") is not None)

        clock.now = T0 + 90 * MINUTE
        await stub.CanEnterClassroom(enter, timeout=5)  # may read the room from Redis
        hits = sidecar.checker.cache.hits
        first = (await stub.CanEnterClassroom(enter, timeout=5)).decision
        assert first.allowed and first.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
        assert sidecar.checker.cache.hits == hits + 1, "answered from the cache, memoized"
        # Past the scheduled end and the overrun: same record, same room.
        clock.now = T0 + 3 * HOUR
        later = (await stub.CanEnterClassroom(enter, timeout=5)).decision
        assert not later.allowed and later.reason == pb.DECISION_REASON_PACKAGE_EXPIRED
        assert sidecar.checker.cache.hits == hits + 2, "answered from the cache"
    finally:
        await channel.close()
        await sidecar.stop(grace=0.2)
