"""``Decision.valid_until`` over the wire (real Redis, reconciler and gRPC
server): for each kind of deadline it is the instant the answer flips, both
when the sidecar reads Redis and when it answers from its fed cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, PolicyConfig
from lcic_guard.domain.time import wall_clock
from lcic_guard.reconciler.reconciler import Reconciler
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.status import Store
from lcic_guard_client import CachedGuardClient, Reason, SidecarUnavailable

from tests.sidecar.test_sidecar_rpc import ACCT, APP, enter, ms, report_started, three
from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest
from tests.support.settings import sidecar_settings

R = pb.DecisionReason


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def grace(events: Events) -> tuple[list[dict[str, Any]], int, int]:
    return (
        [*events.app(ACCT, APP), events("overdue_alert", T0 - HOUR, account_id=ACCT)],
        (T0 + 23 * HOUR),
        R.DECISION_REASON_ACCOUNT_OVERDUE,
    )


def expiry(events: Events) -> tuple[list[dict[str, Any]], int, int]:
    return (
        events.app(ACCT, APP, expires=T0 + 5 * HOUR),
        T0 + 5 * HOUR,
        (R.DECISION_REASON_PACKAGE_EXPIRED),
    )


def package_start(events: Events) -> tuple[list[dict[str, Any]], int, int]:
    later = events(
        "package_purchased",
        T0 - DAY,
        app_id=APP,
        package_id="pkg-next",
        starts_at=T0 + 2 * HOUR,
        expires_at=T0 + 30 * DAY,
        quota_minutes=600,
    )
    return [*events.app(ACCT, APP, expires=T0 - HOUR), later], T0 + 2 * HOUR, R.DECISION_REASON_OK


KINDS = {"grace end": grace, "package expiry": expiry, "package start": package_start}


async def flips_at(
    ask: Callable[[], Awaitable[list[pb.Decision]]], clock: FakeClock, at: int, then: int
) -> None:
    before = await ask()
    for d in before:
        assert ms(d.valid_until) == at
    clock.now = at - 1
    for d, again in zip(before, await ask(), strict=True):
        assert (again.allowed, again.reason) == (d.allowed, d.reason)
    clock.now = at
    for d in await ask():
        assert d.reason == then


@pytest.mark.parametrize("kind", list(KINDS))
async def test_valid_until_is_the_next_flip_reading_redis(
    kind: str, reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    evs, at, then = KINDS[kind](events)
    await reconciler.ingest(deliveries(evs))

    async def ask() -> list[pb.Decision]:
        return (await three(sidecar)).all()

    await flips_at(ask, clock, at, then)


@pytest_asyncio.fixture
async def cached_sidecar(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[tuple[RunningSidecar, pb_grpc.EnforcementServiceStub]]:
    settings = sidecar_settings(redis_timeout_ms=2000, cache_size=50, policy=policy)
    sidecar = await build_sidecar(settings, store, clock=clock)

    async def healthy() -> bool:
        return sidecar.checker.cache.feed_healthy

    await eventually(healthy)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    yield sidecar, pb_grpc.EnforcementServiceStub(channel)
    await channel.close()
    await sidecar.stop(grace=0.2)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_valid_until_is_the_next_flip_from_the_cache(
    kind: str,
    reconciler: Reconciler,
    cached_sidecar: tuple[RunningSidecar, pb_grpc.EnforcementServiceStub],
    events: Events,
    clock: FakeClock,
) -> None:
    sidecar, stub = cached_sidecar
    evs, at, then = KINDS[kind](events)
    await reconciler.ingest(deliveries(evs))
    req = pb.CanCreateClassroomRequest(app_id=APP)
    await stub.CanCreateClassroom(req, timeout=5)  # fills the cache

    async def ask() -> list[pb.Decision]:
        hits = sidecar.checker.cache.hits
        d = (await stub.CanCreateClassroom(req, timeout=5)).decision
        if clock.now == T0:  # later, the entry is past its age and read again
            assert sidecar.checker.cache.hits == hits + 1  # answered from the cache
        return [d]

    await flips_at(ask, clock, at, then)


async def test_valid_until_of_a_protected_class_is_its_protection_end(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP, expires=T0 + HOUR)))
    await report_started(sidecar, "room-p", T0 - 10 * MINUTE, end=T0 + 2 * HOUR)
    clock.now = T0 + 90 * MINUTE
    d = await enter(sidecar, "room-p")
    assert d.reason == R.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert ms(d.valid_until) == ms(d.protected_until) == T0 + 3 * HOUR
    clock.now = T0 + 3 * HOUR
    assert (await enter(sidecar, "room-p")).reason == R.DECISION_REASON_PACKAGE_EXPIRED


async def test_no_valid_until_when_nothing_lies_ahead(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    evs = [
        events("application_registered", T0 - DAY, account_id=ACCT, app_id=APP),
        events("compliance_ban", T0 - HOUR, account_id=ACCT),
    ]
    await reconciler.ingest(deliveries(evs))
    for d in (await three(sidecar)).all():
        assert d.reason == R.DECISION_REASON_ACCOUNT_BANNED
        assert not d.HasField("valid_until")


def await_known(guard: CachedGuardClient, *app_ids: str) -> None:
    """Wait until the watch has delivered the status of each app (the answers
    of an app are kept only from then on)."""
    deadline = time.monotonic() + 5
    while not all(a in guard._known for a in app_ids):
        assert time.monotonic() < deadline, f"the watch never sent {app_ids}"
        time.sleep(0.02)


async def test_cached_client_keeps_no_answer_of_an_app_no_watch_covers(
    reconciler: Reconciler,
    cached_sidecar: tuple[RunningSidecar, pb_grpc.EnforcementServiceStub],
    events: Events,
    clock: FakeClock,
) -> None:
    """SPEC R15: no watch would tell the client of a ban of app-x, so its
    answer is asked every time, never kept for the TTL."""
    sidecar, _ = cached_sidecar
    clock.now = wall_clock()
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-w", "app-w", at=clock.now - DAY, expires=clock.now + 30 * DAY),
                *events.app("acct-x", "app-x", at=clock.now - DAY, expires=clock.now + 30 * DAY),
            ]
        )
    )
    target = f"127.0.0.1:{sidecar.port}"
    loop = asyncio.get_running_loop()

    def run() -> None:
        with CachedGuardClient(target, ["app-w"], answer_ttl=60.0) as guard:
            await_known(guard, "app-w")
            assert guard.can_create_classroom("app-x").reason == Reason.OK
            ban = events("compliance_ban", clock.now - 1, account_id="acct-x")
            asyncio.run_coroutine_threadsafe(reconciler.ingest(deliveries([ban])), loop).result()
            deadline = time.monotonic() + 5
            while guard.can_create_classroom("app-x").reason != Reason.ACCOUNT_BANNED:
                assert time.monotonic() < deadline, "an uncovered app's answer was kept"
                time.sleep(0.02)
            assert guard.kept_answers == 0

    await asyncio.to_thread(run)


async def test_cached_client_keeps_an_answer_until_valid_until_and_drops_it_on_a_change(
    reconciler: Reconciler,
    cached_sidecar: tuple[RunningSidecar, pb_grpc.EnforcementServiceStub],
    events: Events,
    clock: FakeClock,
) -> None:
    sidecar, _ = cached_sidecar
    # The client reads its own (real) clock: the sidecar's is set to it.
    clock.now = wall_clock()
    expires = clock.now + 1500
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-w", "app-w", at=clock.now - DAY, expires=clock.now + 30 * DAY),
                *events.app("acct-u", "app-u", at=clock.now - DAY, expires=expires),
            ]
        )
    )
    target = f"127.0.0.1:{sidecar.port}"

    def run() -> None:
        # max_staleness=0: the watch is never fresh enough to answer from
        # the schedule, so every answer comes from the sidecar or is kept.
        with CachedGuardClient(
            target, ["app-w", "app-u"], max_staleness=0, answer_ttl=60.0
        ) as guard:
            await_known(guard, "app-w", "app-u")
            first = guard.can_create_classroom("app-u")
            assert first.valid_until is not None
            assert round(first.valid_until.timestamp() * 1000) == expires
            assert guard.can_create_classroom("app-u").allowed
            assert (guard.remote_answers, guard.kept_answers) == (1, 1)
            while wall_clock() < expires:
                time.sleep(0.05)
            clock.now = expires
            assert guard.can_create_classroom("app-u").reason == Reason.PACKAGE_EXPIRED
            assert (guard.remote_answers, guard.kept_answers) == (2, 1)

            assert guard.can_create_classroom("app-w").allowed
            assert guard.can_create_classroom("app-w").allowed
            assert (guard.remote_answers, guard.kept_answers) == (3, 2)
            seen = guard.remote_answers
            ban = events("compliance_ban", clock.now - 1, account_id="acct-w")
            asyncio.run_coroutine_threadsafe(reconciler.ingest(deliveries([ban])), loop).result()
            deadline = time.monotonic() + 5
            while True:
                d = guard.can_create_classroom("app-w")
                if d.reason == Reason.ACCOUNT_BANNED:
                    break
                assert time.monotonic() < deadline, "the kept answer was never dropped"
                time.sleep(0.02)
            assert guard.remote_answers > seen

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(run)


async def test_cached_client_drops_kept_answers_when_the_watch_breaks(
    reconciler: Reconciler,
    cached_sidecar: tuple[RunningSidecar, pb_grpc.EnforcementServiceStub],
    events: Events,
    clock: FakeClock,
) -> None:
    """A kept answer relies on the watch to hear of a new fact: once the
    watch is down, it must not be served (here the sidecar stops, so the
    check fails instead of answering allowed from memory)."""
    sidecar, _ = cached_sidecar
    clock.now = wall_clock()
    await reconciler.ingest(
        deliveries(events.app("acct-k", "app-k", at=clock.now - DAY, expires=clock.now + DAY))
    )
    target = f"127.0.0.1:{sidecar.port}"
    loop = asyncio.get_running_loop()

    def run() -> None:
        with CachedGuardClient(
            target, ["app-k"], max_staleness=0, answer_ttl=60.0, retries=0, timeout=0.5
        ) as guard:
            # The watch's first message (which drops what was kept before it)
            # has arrived, so only a break can drop the answer kept next.
            await_known(guard, "app-k")
            assert guard.can_create_classroom("app-k").allowed
            assert guard.can_create_classroom("app-k").allowed
            assert guard.kept_answers == 1
            asyncio.run_coroutine_threadsafe(sidecar.stop(grace=0.1), loop).result()
            deadline = time.monotonic() + 5
            while True:
                try:
                    guard.can_create_classroom("app-k")
                except SidecarUnavailable:
                    break  # asked the (stopped) sidecar: nothing kept was served
                assert time.monotonic() < deadline, "a kept answer outlived the watch"
                time.sleep(0.05)

    await asyncio.to_thread(run)
