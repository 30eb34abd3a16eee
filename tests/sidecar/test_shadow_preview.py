"""Shadow mode and preview (issue 6, items 4 and 5), over the real gRPC
server on a socket, with the real reconciler and Redis."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard import cli, logs, runner
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, Check, PolicyConfig
from lcic_guard.domain.time import format_time
from lcic_guard.flags import parse_shadow, settings_from
from lcic_guard.reconciler import Reconciler
from lcic_guard.render import parse_at
from lcic_guard.store.status import Store
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest
from tests.support.settings import sidecar_settings

SHADOWED = frozenset({Check.CREATE_CLASSROOM, Check.ACCESS_RECORDING})


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def ts(ms: int) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(ms)
    return out


async def seed(reconciler: Reconciler, events: Events) -> list[dict[str, Any]]:
    """app-ok: good standing. app-susp: overdue since T0 - 1 d."""
    evs = [
        *events.app("acct-ok", "app-ok"),
        *events.app("acct-susp", "app-susp"),
        events("overdue_alert", T0 - 2 * DAY, account_id="acct-susp"),
    ]
    await reconciler.ingest(deliveries(evs))
    return evs


@pytest_asyncio.fixture
async def shadow_sidecar(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[runner.RunningSidecar]:
    settings = sidecar_settings(
        metrics_listen="127.0.0.1:0",
        redis_timeout_ms=2000,
        policy=policy,
        shadow=SHADOWED,
    )
    sidecar = await runner.build_sidecar(settings, store, clock=clock)

    async def healthy() -> bool:
        return sidecar.checker.cache.feed_healthy

    await eventually(healthy)
    yield sidecar
    await sidecar.stop(grace=0.2)


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def create(app: str) -> pb.CanCreateClassroomRequest:
    return pb.CanCreateClassroomRequest(app_id=app)


def enter(app: str, room: str = "room-1") -> pb.CanEnterClassroomRequest:
    return pb.CanEnterClassroomRequest(app_id=app, room_id=room)


def recording(app: str) -> pb.CanAccessRecordingRequest:
    return pb.CanAccessRecordingRequest(app_id=app, recording_id="rec-1")


# -- shadow mode ---------------------------------------------------------------------


async def test_shadowed_checks_allow_and_keep_the_would_be_denial(
    shadow_sidecar: runner.RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    await seed(reconciler, events)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    decisions_log = logging.getLogger("lcic_guard.decisions")
    decisions_log.addHandler(handler)
    decisions_log.setLevel(logging.INFO)  # the default --log-level
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{shadow_sidecar.port}")
    stub = pb_grpc.EnforcementServiceStub(channel)
    try:
        d = (
            await stub.CanCreateClassroom(
                create("app-susp"), metadata=(("x-request-id", "rid-shadow"),)
            )
        ).decision
        assert d.allowed and d.shadow
        assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
        assert list(d.reasons) == [pb.DECISION_REASON_ACCOUNT_OVERDUE]
        assert d.state == pb.APPLICATION_STATE_SUSPENDED and "Top up" in d.message

        d = (await stub.CanAccessRecording(recording("app-susp"))).decision
        assert d.allowed and d.shadow and d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE

        d = (await stub.CanEnterClassroom(enter("app-susp"))).decision  # not in shadow mode
        assert not d.allowed and not d.shadow

        d = (await stub.CanCreateClassroom(create("app-ok"))).decision
        assert d.allowed and not d.shadow and d.reason == pb.DECISION_REASON_OK

        d = (await stub.CanCreateClassroom(create("app-nobody"))).decision
        assert d.allowed and d.shadow and d.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION

        batch = pb.CheckBatchRequest(
            checks=[
                pb.Check(create_classroom=create("app-susp")),
                pb.Check(enter_classroom=enter("app-susp")),
                pb.Check(create_classroom=create("app-ok")),
            ]
        )
        got = (await stub.CheckBatch(batch)).decisions
        assert [(x.allowed, x.shadow) for x in got] == [(True, True), (False, False), (True, False)]
        assert metrics_port(shadow_sidecar)
        samples = await asyncio.to_thread(_scrape, metrics_port(shadow_sidecar))
    finally:
        decisions_log.removeHandler(handler)
        decisions_log.setLevel(logging.NOTSET)
        await channel.close()

    def shadow(check: str, reason: str) -> float:
        key = frozenset({"check": check, "reason": reason}.items())
        return samples.get(("lcic_guard_shadow_denials_total", key), 0.0)

    assert shadow("create", "ACCOUNT_OVERDUE") == 2  # the single check and the batch's
    assert shadow("recording", "ACCOUNT_OVERDUE") == 1
    assert shadow("create", "UNKNOWN_APPLICATION") == 1
    assert shadow("enter", "ACCOUNT_OVERDUE") == 0  # enforced, so not a shadow denial
    key = frozenset({"check": "create", "reason": "ACCOUNT_OVERDUE", "allowed": "true"}.items())
    assert samples[("lcic_guard_decisions_total", key)] == 2

    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    shadowed = [x for x in lines if x.get("event") == "shadow_denial"]
    assert len(shadowed) == 4  # create, recording, unknown app, and the batch's create
    first = shadowed[0]
    assert first["request_id"] == "rid-shadow" and first["app_id"] == "app-susp"
    assert first["check"] == "create" and first["reason"] == "ACCOUNT_OVERDUE"


def metrics_port(sidecar: runner.RunningSidecar) -> int:
    assert sidecar.metrics_server is not None
    return sidecar.metrics_server.port


async def test_watchers_get_the_shadowed_schedule(
    shadow_sidecar: runner.RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    await seed(reconciler, events)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{shadow_sidecar.port}")
    try:
        stub = pb_grpc.EnforcementServiceStub(channel)
        call = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(app_ids=["app-susp"]))
        first = await asyncio.wait_for(call.read(), 5)
        call.cancel()
    finally:
        await channel.close()
    entry = first.schedule[0]
    assert entry.create_classroom.allowed and entry.create_classroom.shadow
    assert entry.access_recording.allowed and entry.access_recording.shadow
    assert not entry.enter_classroom.allowed and not entry.enter_classroom.shadow


async def test_without_shadow_mode_the_same_checks_deny(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events
) -> None:
    await seed(reconciler, events)
    d = (await sidecar.stub.CanCreateClassroom(create("app-susp"))).decision
    assert not d.allowed and not d.shadow and d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE


def test_shadow_switch_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli.build_parser()
    assert settings_from(parser.parse_args(["serve"])).shadow == frozenset()
    args = parser.parse_args(["serve", "--shadow", "create, recording"])
    assert settings_from(args).shadow == SHADOWED
    monkeypatch.setenv("LCIC_GUARD_SHADOW", "all")
    assert settings_from(cli.build_parser().parse_args(["serve"])).shadow == frozenset(Check)
    assert parse_shadow("none") == frozenset() and parse_shadow("enter") == {Check.ENTER_CLASSROOM}
    with pytest.raises(ValueError, match="invalid shadow check 'delete'"):
        parse_shadow("create,delete")
    monkeypatch.setenv("LCIC_GUARD_SHADOW", "everything")
    with pytest.raises(SystemExit, match="LCIC_GUARD_SHADOW"):
        cli.build_parser()


# -- preview -------------------------------------------------------------------------


async def preview(
    sidecar: SidecarUnderTest, app: str, at: int, room: str = ""
) -> pb.PreviewApplicationResponse:
    req = pb.PreviewApplicationRequest(app_id=app, at=ts(at), room_id=room)
    resp: pb.PreviewApplicationResponse = await sidecar.stub.PreviewApplication(req)
    return resp


def answers(resp: pb.PreviewApplicationResponse) -> list[tuple[bool, int]]:
    return [
        (d.allowed, d.reason)
        for d in (resp.create_classroom, resp.enter_classroom, resp.access_recording)
    ]


async def grace_app(reconciler: Reconciler, events: Events) -> None:
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-g", "app-grace"),  # package expires at T0 + 20 d
                events("overdue_alert", T0 - HOUR, account_id="acct-g"),
            ]
        )
    )


async def test_preview_shows_grace_ending_expiry_and_release_falling_due(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events
) -> None:
    await grace_app(reconciler, events)
    grace = pb.DECISION_REASON_OVERDUE_GRACE
    overdue = pb.DECISION_REASON_ACCOUNT_OVERDUE
    before = await sidecar.stub.GetApplicationStatus(
        pb.GetApplicationStatusRequest(app_id="app-grace")
    )

    resp = await preview(sidecar, "app-grace", T0 + 22 * HOUR)
    assert resp.app_id == "app-grace" and resp.at.ToMilliseconds() == T0 + 22 * HOUR
    assert resp.state == pb.APPLICATION_STATE_GRACE and list(resp.reasons) == [grace]
    assert answers(resp) == [(True, grace)] * 3
    assert resp.create_classroom.grace_ends_at.ToMilliseconds() == T0 + 23 * HOUR

    release_at = T0 + 23 * HOUR + 60 * DAY
    resp = await preview(sidecar, "app-grace", T0 + 23 * HOUR)  # R2: the flip
    assert resp.state == pb.APPLICATION_STATE_SUSPENDED and list(resp.reasons) == [overdue]
    assert answers(resp) == [(False, overdue)] * 3
    assert resp.create_classroom.suspended_at.ToMilliseconds() == T0 + 23 * HOUR
    assert resp.create_classroom.release_at.ToMilliseconds() == release_at
    assert any(r.startswith("R2 overdue suspension") for r in resp.rules)

    resp = await preview(sidecar, "app-grace", T0 + 21 * DAY)  # and the package expired
    assert list(resp.reasons) == [overdue, pb.DECISION_REASON_PACKAGE_EXPIRED]

    # Past release_at: still ACCOUNT_OVERDUE, showing when the release falls
    # due; only the reconciler enters RELEASED, once it is certain (R10).
    resp = await preview(sidecar, "app-grace", release_at + DAY)
    assert resp.state == pb.APPLICATION_STATE_SUSPENDED
    assert resp.access_recording.release_at.ToMilliseconds() == release_at
    assert "released for good" in resp.access_recording.message

    # Nothing was changed by looking ahead.
    after = await sidecar.stub.GetApplicationStatus(
        pb.GetApplicationStatusRequest(app_id="app-grace")
    )
    assert after.status.version == before.status.version
    assert after.status.state == pb.APPLICATION_STATE_GRACE


async def test_a_past_time_is_answered_as_of_now(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events, clock: FakeClock
) -> None:
    await grace_app(reconciler, events)
    resp = await preview(sidecar, "app-grace", T0 - 10 * DAY)
    assert resp.at.ToMilliseconds() == clock.now == T0
    assert resp.state == pb.APPLICATION_STATE_GRACE


async def test_preview_of_a_protected_class(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events
) -> None:
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-q", "app-q", quota=100),
                events(
                    "package_usage",
                    T0 - 2 * HOUR,
                    app_id="app-q",
                    package_id="pkg-app-q",
                    used_minutes=100,
                ),
            ]
        )
    )
    await sidecar.stub.ReportClassroomStarted(
        pb.ReportClassroomStartedRequest(
            app_id="app-q",
            room_id="room-live",
            started_at=ts(T0 - 3 * HOUR),
            scheduled_end_time=ts(T0 + HOUR),
        )
    )
    quota = pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED
    resp = await preview(sidecar, "app-q", T0 + 90 * MINUTE, room="room-live")
    assert resp.enter_classroom.allowed
    assert resp.enter_classroom.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert resp.enter_classroom.protected_until.ToMilliseconds() == T0 + 2 * HOUR  # + overrun
    assert (resp.create_classroom.allowed, resp.create_classroom.reason) == (False, quota)
    resp = await preview(sidecar, "app-q", T0 + 2 * HOUR, room="room-live")
    assert (resp.enter_classroom.allowed, resp.enter_classroom.reason) == (False, quota)
    resp = await preview(sidecar, "app-q", T0 + 90 * MINUTE)  # no room named
    assert not resp.enter_classroom.allowed


async def test_preview_errors(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events
) -> None:
    await grace_app(reconciler, events)
    cases: list[tuple[pb.PreviewApplicationRequest, grpc.StatusCode, str]] = [
        (
            pb.PreviewApplicationRequest(app_id="app-x", at=ts(T0)),
            grpc.StatusCode.NOT_FOUND,
            "app_id: unknown",
        ),
        (
            pb.PreviewApplicationRequest(app_id="app-grace"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at: required",
        ),
        (
            pb.PreviewApplicationRequest(at=ts(T0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "app_id: required",
        ),
        (
            pb.PreviewApplicationRequest(app_id="app-grace", at=ts(T0), room_id="bad room"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "room_id: must be",
        ),
    ]
    for req, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await sidecar.stub.PreviewApplication(req)
        assert err.value.code() == code and err.value.details().startswith(message), req


async def test_preview_answers_follow_shadow_mode(
    shadow_sidecar: runner.RunningSidecar, reconciler: Reconciler, events: Events
) -> None:
    await seed(reconciler, events)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{shadow_sidecar.port}")
    try:
        stub = pb_grpc.EnforcementServiceStub(channel)
        resp = await stub.PreviewApplication(
            pb.PreviewApplicationRequest(app_id="app-susp", at=ts(T0 + HOUR))
        )
    finally:
        await channel.close()
    assert resp.create_classroom.allowed and resp.create_classroom.shadow
    assert not resp.enter_classroom.allowed and not resp.enter_classroom.shadow
    assert resp.state == pb.APPLICATION_STATE_SUSPENDED


async def test_preview_command(
    sidecar: SidecarUnderTest,
    reconciler: Reconciler,
    events: Events,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await grace_app(reconciler, events)
    at = format_time(T0 + 25 * HOUR)
    code = await asyncio.to_thread(
        cli.main, ["preview", "app-grace", "--at", at, "--target", sidecar.target]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"Preview of app-grace at {at}" in out
    assert "state: SUSPENDED (ACCOUNT_OVERDUE)" in out
    for check in ("create", "enter", "recording"):
        assert f"  {check:<10} DENIED     ACCOUNT_OVERDUE" in out
    assert "Top up the account" in out

    code = await asyncio.to_thread(
        cli.main, ["preview", "app-grace", "--at", at, "--json", "--target", sidecar.target]
    )
    raw = json.loads(capsys.readouterr().out)
    assert code == 0 and raw["state"] == "SUSPENDED"  # the CLI's one JSON dialect
    assert raw["create_classroom"]["reason"] == "ACCOUNT_OVERDUE"

    code = await asyncio.to_thread(
        cli.main, ["preview", "app-grace", "--at", "tomorrow", "--target", sidecar.target]
    )
    assert code == 2 and "RFC 3339" in capsys.readouterr().err


def test_preview_times() -> None:
    assert parse_at("+25h", T0) == T0 + 25 * HOUR
    assert parse_at("+61d", T0) == T0 + 61 * DAY
    assert parse_at(format_time(T0 + 1234), 0) == T0 + 1234
    with pytest.raises(argparse.ArgumentTypeError, match="no time zone"):
        parse_at("2026-10-01T12:00:00", T0)
    with pytest.raises(argparse.ArgumentTypeError, match="use a number and a unit"):
        parse_at("+soon", T0)
