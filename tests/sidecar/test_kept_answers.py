"""SPEC R15 in CachedGuardClient: an answer is kept only while a live watch
covers its app and the store has been continuous. A store discontinuity (the
sidecar's StoreDiscontinuity message, or a status version going back) drops
every schedule and kept answer.

The discontinuity message is sent by a small real gRPC server written here
(the network and the client are real; the server plays a sidecar that has
just found that Redis went back in time). The FLUSHALL and reload runs with
real Redis, the real sidecar and the real reconciler."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import free_port
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig
from lcic_guard.domain.time import wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.status import Store
from lcic_guard_client import (
    CachedGuardClient,
    Decision,
    GuardClient,
    Reason,
    SidecarUnavailable,
    create_classroom_check,
)

from tests.support.clock import FakeClock
from tests.support.events import Events, deliveries
from tests.support.settings import sidecar_settings


def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# -- a sidecar that reports a discontinuity ----------------------------------------------


def _decision(allowed: bool, reason: pb.DecisionReason.ValueType) -> pb.Decision:
    return pb.Decision(allowed=allowed, reason=reason, reasons=[reason])


OK = _decision(True, pb.DECISION_REASON_OK)
BANNED = _decision(False, pb.DECISION_REASON_ACCOUNT_BANNED)


def _status(version: int) -> pb.WatchApplicationStatusResponse:
    # Everything allowed from the epoch on, except entering a room (which the
    # client then asks, and may keep).
    entry = pb.ScheduledDecisions(create_classroom=OK, enter_classroom=BANNED, access_recording=OK)
    entry.starts_at.FromMilliseconds(0)
    return pb.WatchApplicationStatusResponse(
        status=pb.ApplicationStatus(
            app_id="app-1", account_id="acct-1", state=pb.APPLICATION_STATE_ACTIVE, version=version
        ),
        schedule=[entry],
    )


@dataclass
class Script:
    """What the server sends after the first status, when ``go`` is set, and
    what its checks answer (the store as it is now)."""

    then: pb.WatchApplicationStatusResponse
    go: asyncio.Event = field(default_factory=asyncio.Event)
    create: pb.Decision = field(default_factory=lambda: OK)
    enter: pb.Decision = field(default_factory=lambda: OK)


class ScriptedSidecar(pb_grpc.EnforcementServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def CanCreateClassroom(self, request: Any, context: Any) -> Any:
        return pb.CanCreateClassroomResponse(decision=self.script.create)

    async def CanEnterClassroom(self, request: Any, context: Any) -> Any:
        return pb.CanEnterClassroomResponse(decision=self.script.enter)

    async def WatchApplicationStatus(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield _status(5)
        sent = False
        while True:
            if self.script.go.is_set() and not sent:
                sent = True
                yield self.script.then
            else:
                yield pb.WatchApplicationStatusResponse()  # heartbeat
            await asyncio.sleep(0.05)


def _discontinuity() -> pb.WatchApplicationStatusResponse:
    msg = pb.WatchApplicationStatusResponse(
        discontinuity=pb.StoreDiscontinuity(cause="run_id_changed")
    )
    msg.discontinuity.detected_at.FromMilliseconds(wall_clock())
    return msg


@pytest.mark.parametrize(
    "then",
    [pytest.param(_discontinuity, id="discontinuity"), pytest.param(lambda: _status(3), id="v3")],
)
async def test_a_store_discontinuity_drops_every_kept_answer(
    then: Callable[[], pb.WatchApplicationStatusResponse],
) -> None:
    script = Script(then())
    server = grpc.aio.server()
    # Only the calls the client makes here are served (the rest: UNIMPLEMENTED).
    servicer = ScriptedSidecar(script)  # type: ignore[abstract]
    pb_grpc.add_EnforcementServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()

    def run() -> None:
        with CachedGuardClient(f"127.0.0.1:{port}", ["app-1"], answer_ttl=60.0) as guard:
            assert guard.wait_fresh()
            # From the schedule, and kept (an allowed entry the sidecar gave).
            assert guard.can_create_classroom("app-1").allowed
            assert guard.local_answers == 1
            assert guard.can_enter_classroom("app-1", "room-1").allowed
            assert guard.can_enter_classroom("app-1", "room-1").allowed
            assert (guard.remote_answers, guard.kept_answers) == (1, 1)

            # The store went back in time: the account is banned in it now.
            script.create = script.enter = BANNED
            loop.call_soon_threadsafe(script.go.set)
            until(lambda: guard.discontinuities == 1, "the discontinuity was not seen")
            assert guard.can_create_classroom("app-1").reason == Reason.ACCOUNT_BANNED
            assert guard.can_enter_classroom("app-1", "room-1").reason == Reason.ACCOUNT_BANNED
            assert (guard.local_answers, guard.kept_answers) == (1, 1)
            assert guard.remote_answers == 3

    try:
        await asyncio.to_thread(run)
    finally:
        await server.stop(grace=0)


def test_cached_check_batch_takes_a_timeout() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens: the call waits for it
    outcome: list[SidecarUnavailable] = []

    def call() -> None:
        with CachedGuardClient(target, [], timeout=60.0) as guard:
            try:
                guard.check_batch([create_classroom_check("app-1")], timeout=0.2)
            except SidecarUnavailable as exc:
                outcome.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(20)  # far below the client's 60 s default: the call's own won
    assert not worker.is_alive(), "check_batch ignored its timeout"
    assert len(outcome) == 1 and outcome[0].code == "DEADLINE_EXCEEDED"


# -- FLUSHALL and a reload, end to end ----------------------------------------------------


@pytest_asyncio.fixture
async def live_sidecar(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[RunningSidecar]:
    settings = sidecar_settings(redis_timeout_ms=2000, policy=policy)
    sidecar = await build_sidecar(settings, store, clock=clock)
    deadline = time.monotonic() + 5
    while not sidecar.checker.cache.feed_healthy:
        assert time.monotonic() < deadline, "the sidecar's feed never became healthy"
        await asyncio.sleep(0.01)
    yield sidecar
    await sidecar.stop(grace=0.2)


@pytest.mark.parametrize(
    "rounds",
    [
        pytest.param(4, id="versions-went-back"),
        # One status write before and one after: the reload writes the same
        # version numbers, so only the sidecar (which sees the new data set)
        # can tell.
        pytest.param(1, id="same-versions"),
    ],
)
async def test_no_allowed_answer_survives_a_flushall_and_a_reload_with_a_ban(
    live_sidecar: RunningSidecar,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    reconciler: Reconciler,
    events: Events,
    rounds: int,
) -> None:
    """Issue 19 finding 6: the account is banned in the reloaded store and
    app-2 is not in it at all; the client must answer as the sidecar does,
    not allowed from what it kept."""
    clock.now = wall_clock()
    far = clock.now + 365 * DAY
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-1", "app-1", at=clock.now - 30 * DAY, expires=far),
                *events.app("acct-2", "app-2", at=clock.now - 30 * DAY, expires=far),
            ]
        )
    )
    # Overdue episodes long settled, one batch each: a status write each, so
    # the versions held climb above the reload's.
    for n in range(1, rounds):
        start = clock.now - (20 - 3 * n) * DAY
        for acct in ("acct-1", "acct-2"):
            await reconciler.ingest(
                deliveries(
                    [
                        events("overdue_alert", start, account_id=acct),
                        events("arrears_settled", start + HOUR, account_id=acct),
                    ]
                )
            )
    target = f"127.0.0.1:{live_sidecar.port}"
    loop = asyncio.get_running_loop()

    async def wipe_and_reload() -> None:
        await store.redis.flushall()
        fresh = Reconciler(
            store,
            policy,
            ReconcilerConfig(release_margin_ms=0, announce_settle_ms=0),
            clock=clock,
        )
        await fresh.ingest(
            deliveries(
                [
                    *events.app("acct-1", "app-1", at=clock.now - 30 * DAY, expires=far),
                    events("compliance_ban", clock.now - 1, account_id="acct-1"),
                ]
            )
        )

    def run() -> None:
        with (
            CachedGuardClient(target, ["app-1", "app-2"], answer_ttl=60.0) as guard,
            GuardClient(target, timeout=2.0) as direct,
        ):
            assert guard.wait_fresh()
            for app in ("app-1", "app-2"):
                assert guard.can_create_classroom(app).allowed
                assert guard.can_access_recording(app, "rec-1").allowed
            assert guard.local_answers == 4

            asyncio.run_coroutine_threadsafe(wipe_and_reload(), loop).result()
            until(
                lambda: direct.can_create_classroom("app-1").reason == Reason.ACCOUNT_BANNED,
                "the sidecar itself never answered the ban",
            )
            truth = direct.can_create_classroom("app-2")
            assert not truth.allowed

            def agrees(app: str, want: Decision) -> bool:
                got = guard.can_create_classroom(app)
                return (got.allowed, got.reason) == (want.allowed, want.reason)

            until(lambda: agrees("app-1", direct.can_create_classroom("app-1")), "app-1 kept")
            until(lambda: agrees("app-2", direct.can_create_classroom("app-2")), "app-2 kept")

    await asyncio.to_thread(run)
