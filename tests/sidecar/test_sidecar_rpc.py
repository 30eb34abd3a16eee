"""Every RPC of EnforcementService end to end on real parts: billing events ->
reconciler -> Redis -> the grpc.aio server on a real socket -> a real stub.
Also health, reflection and deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, PolicyConfig
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.sources import FileSource
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.server import SERVICE_NAME, start_server
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store

from tests.support.clock import T0, FakeClock, recorded_clock
from tests.support.events import Events, deliveries
from tests.support.fixtures import RENDER, SidecarUnderTest, servicer

R = pb.DecisionReason
APP = "app-1"
ACCT = "acct-1"
SUSPENDED_REASONS = (
    pb.DECISION_REASON_ACCOUNT_OVERDUE,
    pb.DECISION_REASON_PACKAGE_EXPIRED,
    pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED,
)


def ts(ms: int) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(ms)
    return out


def ms(t: Timestamp) -> int:
    return int(t.ToMilliseconds())


@dataclass
class Three:
    """The answers of the three check RPCs for one application."""

    create: pb.Decision
    enter: pb.Decision
    recording: pb.Decision

    def all(self) -> list[pb.Decision]:
        return [self.create, self.enter, self.recording]


async def three(sidecar: SidecarUnderTest, app_id: str = APP, room_id: str = "room-x") -> Three:
    stub = sidecar.stub
    create = await stub.CanCreateClassroom(
        pb.CanCreateClassroomRequest(app_id=app_id, room_id=room_id), timeout=5
    )
    enter = await stub.CanEnterClassroom(
        pb.CanEnterClassroomRequest(
            app_id=app_id, room_id=room_id, user_id="u-1", role=pb.CLASSROOM_ROLE_STUDENT
        ),
        timeout=5,
    )
    recording = await stub.CanAccessRecording(
        pb.CanAccessRecordingRequest(app_id=app_id, recording_id="rec-1", room_id=room_id),
        timeout=5,
    )
    return Three(create.decision, enter.decision, recording.decision)


async def enter(sidecar: SidecarUnderTest, room_id: str, app_id: str = APP) -> pb.Decision:
    resp: pb.CanEnterClassroomResponse = await sidecar.stub.CanEnterClassroom(
        pb.CanEnterClassroomRequest(app_id=app_id, room_id=room_id), timeout=5
    )
    return resp.decision


async def report_started(
    sidecar: SidecarUnderTest, room_id: str, started: int, end: int | None = None, app_id: str = APP
) -> None:
    req = pb.ReportClassroomStartedRequest(app_id=app_id, room_id=room_id, started_at=ts(started))
    if end is not None:
        req.scheduled_end_time.CopyFrom(ts(end))
    await sidecar.stub.ReportClassroomStarted(req, timeout=5)


async def report_ended(
    sidecar: SidecarUnderTest, room_id: str, ended: int, app_id: str = APP
) -> None:
    await sidecar.stub.ReportClassroomEnded(
        pb.ReportClassroomEndedRequest(app_id=app_id, room_id=room_id, ended_at=ts(ended)),
        timeout=5,
    )


async def status(sidecar: SidecarUnderTest, app_id: str = APP) -> pb.ApplicationStatus:
    resp: pb.GetApplicationStatusResponse = await sidecar.stub.GetApplicationStatus(
        pb.GetApplicationStatusRequest(app_id=app_id), timeout=5
    )
    return resp.status


def suspension_parts(
    events: Events, reason: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Events that suspend APP from T0 - 1 h for ``reason``: the app as set up
    (in good standing until then) and the facts that bring the suspension."""
    if reason == pb.DECISION_REASON_ACCOUNT_OVERDUE:
        return events.app(ACCT, APP), [events("overdue_alert", T0 - 25 * HOUR, account_id=ACCT)]
    if reason == pb.DECISION_REASON_PACKAGE_EXPIRED:
        return events.app(ACCT, APP, expires=T0 - HOUR), []  # a deadline: no fact needed
    assert reason == pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED
    usage = events(
        "package_usage", T0 - HOUR, app_id=APP, package_id=f"pkg-{APP}", used_minutes=600
    )
    return events.app(ACCT, APP, quota=600), [usage]


def suspension_events(events: Events, reason: int) -> list[dict[str, Any]]:
    setup, later = suspension_parts(events, reason)
    return setup + later


# -- the three checks, by state ----------------------------------------------------


async def test_active_application_is_allowed_everything(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    answers = await three(sidecar)
    for d in answers.all():
        assert d.allowed
        assert d.reason == pb.DECISION_REASON_OK
        assert list(d.reasons) == []
        assert d.state == pb.APPLICATION_STATE_ACTIVE
        assert d.status_version > 0
        assert not d.degraded
        assert "good standing" in d.message
        for name in ("grace_ends_at", "suspended_at", "release_at", "protected_until"):
            assert not d.HasField(name), name


async def test_grace_is_allowed_with_a_warning(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    evs = [*events.app(ACCT, APP), events("overdue_alert", T0 - HOUR, account_id=ACCT)]
    await reconciler.ingest(deliveries(evs))
    for d in (await three(sidecar)).all():
        assert d.allowed
        assert d.reason == pb.DECISION_REASON_OVERDUE_GRACE
        assert list(d.reasons) == [pb.DECISION_REASON_OVERDUE_GRACE]
        assert d.state == pb.APPLICATION_STATE_GRACE
        assert ms(d.grace_ends_at) == T0 + 23 * HOUR
        assert not d.HasField("suspended_at")
        assert "Top up before" in d.message


@pytest.mark.parametrize(
    ("reason", "advice"),
    [
        (pb.DECISION_REASON_ACCOUNT_OVERDUE, "Top up"),
        (pb.DECISION_REASON_PACKAGE_EXPIRED, "Buy a monthly package"),
        (pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED, "pay-as-you-go"),
    ],
)
async def test_suspended_application_is_denied_for_each_reason(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, reason: int, advice: str
) -> None:
    await reconciler.ingest(deliveries(suspension_events(events, reason)))
    for d in (await three(sidecar)).all():
        assert not d.allowed
        assert d.reason == reason
        assert list(d.reasons) == [reason]
        assert d.state == pb.APPLICATION_STATE_SUSPENDED
        assert ms(d.suspended_at) == T0 - HOUR
        assert advice in d.message
        assert not d.HasField("protected_until")
        if reason == pb.DECISION_REASON_ACCOUNT_OVERDUE:
            assert ms(d.grace_ends_at) == T0 - HOUR
            assert ms(d.release_at) == T0 - HOUR + 60 * DAY
        else:
            assert not d.HasField("release_at")


async def test_several_reasons_show_the_first_by_precedence(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    evs = [
        *events.app(ACCT, APP, quota=10, expires=T0 - 2 * HOUR),
        events(
            "package_usage", T0 - 3 * HOUR, app_id=APP, package_id=f"pkg-{APP}", used_minutes=10
        ),
        events("overdue_alert", T0 - 25 * HOUR, account_id=ACCT),
    ]
    await reconciler.ingest(deliveries(evs))
    for d in (await three(sidecar)).all():
        assert not d.allowed
        assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
        assert list(d.reasons) == [
            pb.DECISION_REASON_ACCOUNT_OVERDUE,
            pb.DECISION_REASON_PACKAGE_EXPIRED,
        ]
        # The unbroken suspension began with the quota, before the others.
        assert ms(d.suspended_at) == T0 - 3 * HOUR
        assert "Top up" in d.message
        assert "Buy a monthly package" in d.message


async def test_quota_suspension_lifts_when_pay_as_you_go_is_enabled(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    reason = pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED
    await reconciler.ingest(deliveries(suspension_events(events, reason)))
    before = await three(sidecar)
    assert not before.create.allowed
    await reconciler.ingest(
        deliveries([events("payg_changed", T0 - MINUTE, app_id=APP, enabled=True)])
    )
    after = await three(sidecar)
    for d in after.all():
        assert d.allowed
        assert d.reason == pb.DECISION_REASON_OK
        assert d.status_version > before.create.status_version


async def test_banned_application_is_denied_everything_even_a_started_class(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    await report_started(sidecar, "room-1", T0 - 2 * HOUR, T0 + HOUR)
    ban = events("compliance_ban", T0 - HOUR, account_id=ACCT, note="terms violation")
    await reconciler.ingest(deliveries([ban]))
    answers = await three(sidecar, room_id="room-1")
    for d in answers.all():
        assert not d.allowed
        assert d.reason == pb.DECISION_REASON_ACCOUNT_BANNED
        assert d.state == pb.APPLICATION_STATE_BANNED
        assert "cannot be restored" in d.message
    # Nothing restores a ban.
    await reconciler.ingest(deliveries([events("arrears_settled", T0, account_id=ACCT)]))
    clock.advance(DAY)
    assert (await enter(sidecar, "room-1")).reason == pb.DECISION_REASON_ACCOUNT_BANNED


async def test_unknown_application_is_denied(sidecar: SidecarUnderTest) -> None:
    for d in (await three(sidecar, app_id="never-registered")).all():
        assert not d.allowed
        assert d.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
        assert list(d.reasons) == [pb.DECISION_REASON_UNKNOWN_APPLICATION]
        assert d.status_version == 0
        assert d.state == pb.APPLICATION_STATE_UNSPECIFIED
        assert "not known" in d.message


async def test_unknown_application_becomes_known_once_registered(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    first = await three(sidecar)
    assert first.create.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    assert all(d.allowed for d in (await three(sidecar)).all())


async def test_deadline_flip_happens_at_decision_time(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    # R8: the package expires at T0 + 1 h; no process runs at that moment.
    await reconciler.ingest(deliveries(events.app(ACCT, APP, expires=T0 + HOUR)))
    assert (await three(sidecar)).create.allowed
    clock.now = T0 + HOUR - 1
    assert (await three(sidecar)).create.allowed
    clock.now = T0 + HOUR
    d = (await three(sidecar)).create
    assert not d.allowed
    assert d.reason == pb.DECISION_REASON_PACKAGE_EXPIRED
    assert ms(d.suspended_at) == T0 + HOUR


# -- R10: release ------------------------------------------------------------------


def overdue_for_100_days(events: Events) -> list[dict[str, Any]]:
    # Grace ends T0 - 99 d; release_at = T0 - 39 d.
    return [
        *events.app(ACCT, APP, at=T0 - 200 * DAY),
        *events.app(ACCT, "app-2", at=T0 - 200 * DAY),
        events("overdue_alert", T0 - 100 * DAY, account_id=ACCT),
    ]


async def test_release_needs_a_watermark_without_one_it_stays_overdue(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    # Read live: recorded when it happened.
    await reconciler.ingest(deliveries(overdue_for_100_days(events)), recorded_at=T0 - 100 * DAY)
    plan = await reconciler.try_release(ACCT, clock())
    assert not plan.eligible
    assert "confirmed read" in plan.why
    assert reconciler.releases_done == []
    for d in (await three(sidecar)).all():
        assert not d.allowed
        assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
        assert d.state == pb.APPLICATION_STATE_SUSPENDED
        assert ms(d.release_at) == T0 - 39 * DAY


async def test_released_application_is_denied_for_good(
    store: Store,
    policy: PolicyConfig,
    sidecar: SidecarUnderTest,
    events: Events,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    feed = tmp_path / "events.jsonl"
    feed.write_text("".join(json.dumps(e) + "\n" for e in overdue_for_100_days(events)))
    source = FileSource(feed, clock_ms=store.server_time)
    rec = Reconciler(
        store,
        policy,
        ReconcilerConfig(release_margin_ms=0),
        [source],
        clock=clock,
        recorded_clock=recorded_clock(T0 - 100 * DAY),  # loaded back then
    )
    stats = await rec.drain(source)
    assert stats.applied == 5
    await rec.notices_of_history()  # read live: noticed when the suspension became known
    plan = await rec.try_release(ACCT, clock())
    assert plan.eligible, plan.why
    assert rec.releases_done == [ACCT]

    for app_id in (APP, "app-2"):
        for d in (await three(sidecar, app_id=app_id, room_id="room-1")).all():
            assert not d.allowed
            assert d.reason == pb.DECISION_REASON_RESOURCES_RELEASED
            assert d.state == pb.APPLICATION_STATE_RELEASED
            assert "cannot be recovered" in d.message
    st = await status(sidecar)
    assert st.state == pb.APPLICATION_STATE_RELEASED
    assert any(rule.startswith("R10 release") for rule in st.rules)

    # Irreversible: a settlement afterwards restores nothing.
    await rec.ingest(deliveries([events("arrears_settled", T0 + MINUTE, account_id=ACCT)]))
    clock.advance(HOUR)
    d = (await three(sidecar)).create
    assert d.reason == pb.DECISION_REASON_RESOURCES_RELEASED
    assert not d.allowed


# -- CheckBatch ----------------------------------------------------------------------


async def test_check_batch_answers_in_order_like_the_single_rpcs(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    evs = [
        *events.app(ACCT, "good"),
        *events.app("acct-2", "expired", expires=T0 - HOUR),
        *events.app("acct-3", "grace"),
        events("overdue_alert", T0 - HOUR, account_id="acct-3"),
    ]
    await reconciler.ingest(deliveries(evs))
    await report_started(sidecar, "room-1", T0 - 2 * HOUR, app_id="expired")

    singles: list[tuple[pb.Check, Any]] = []
    for app_id in ("good", "expired", "nobody", "grace", "good"):
        create = pb.CanCreateClassroomRequest(app_id=app_id, room_id="room-9")
        enter_req = pb.CanEnterClassroomRequest(app_id=app_id, room_id="room-1")
        rec = pb.CanAccessRecordingRequest(app_id=app_id, recording_id="rec-1")
        singles += [
            (pb.Check(enter_classroom=enter_req), sidecar.stub.CanEnterClassroom(enter_req)),
            (pb.Check(access_recording=rec), sidecar.stub.CanAccessRecording(rec)),
            (pb.Check(create_classroom=create), sidecar.stub.CanCreateClassroom(create)),
        ]
    expected = [(await call).decision for _, call in singles]
    resp = await sidecar.stub.CheckBatch(
        pb.CheckBatchRequest(checks=[c for c, _ in singles]), timeout=5
    )
    assert len(resp.decisions) == len(singles)
    assert list(resp.decisions) == expected
    got = [(d.allowed, d.reason) for d in resp.decisions[:12]]
    assert got == [
        (True, R.DECISION_REASON_OK),
        (True, R.DECISION_REASON_OK),
        (True, R.DECISION_REASON_OK),
        # room-1 of "expired" started before its suspension (R6).
        (True, R.DECISION_REASON_IN_PROGRESS_PROTECTED),
        (False, R.DECISION_REASON_PACKAGE_EXPIRED),
        (False, R.DECISION_REASON_PACKAGE_EXPIRED),
        (False, R.DECISION_REASON_UNKNOWN_APPLICATION),
        (False, R.DECISION_REASON_UNKNOWN_APPLICATION),
        (False, R.DECISION_REASON_UNKNOWN_APPLICATION),
        (True, R.DECISION_REASON_OVERDUE_GRACE),
        (True, R.DECISION_REASON_OVERDUE_GRACE),
        (True, R.DECISION_REASON_OVERDUE_GRACE),
    ]


async def test_check_batch_of_one_thousand_repeats(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    checks = [
        pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id=APP))
        if i % 2 == 0
        else pb.Check(access_recording=pb.CanAccessRecordingRequest(app_id="x", recording_id="r"))
        for i in range(1000)
    ]
    resp = await sidecar.stub.CheckBatch(pb.CheckBatchRequest(checks=checks), timeout=10)
    assert [d.allowed for d in resp.decisions] == [i % 2 == 0 for i in range(1000)]


# -- R6: reports and classes in progress ----------------------------------------------


@pytest.mark.parametrize("reason", SUSPENDED_REASONS)
async def test_class_started_before_suspension_keeps_working(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock, reason: int
) -> None:
    setup, later = suspension_parts(events, reason)
    clock.now = T0 - 2 * HOUR
    await reconciler.ingest(deliveries(setup))
    # Reported as they happen, while the app is still in good standing.
    assert (await enter(sidecar, "room-1")).allowed
    await report_started(sidecar, "room-1", T0 - 2 * HOUR, T0 + HOUR)
    await report_started(sidecar, "room-open", T0 - 2 * HOUR)
    clock.now = T0 - 30 * MINUTE
    await report_started(sidecar, "room-late", T0 - 30 * MINUTE, T0 + HOUR)
    # The billing facts that suspend the app from T0 - 1 h arrive late.
    if later:
        await reconciler.ingest(deliveries(later))
    clock.now = T0

    d = await enter(sidecar, "room-1")
    assert d.allowed
    assert d.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert list(d.reasons) == [reason]
    assert d.state == pb.APPLICATION_STATE_SUSPENDED
    assert ms(d.suspended_at) == T0 - HOUR
    assert ms(d.protected_until) == T0 + 2 * HOUR  # scheduled end + 60 min overrun
    assert "no new classroom can start" in d.message

    open_ended = await enter(sidecar, "room-open")
    assert open_ended.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert ms(open_ended.protected_until) == T0 - 2 * HOUR + 12 * HOUR

    for room in ("room-late", "room-never-reported"):
        d = await enter(sidecar, room)
        assert not d.allowed, room
        assert d.reason == reason
        assert not d.HasField("protected_until")

    # The protection covers entering that class only.
    answers = await three(sidecar, room_id="room-1")
    assert not answers.create.allowed
    assert not answers.recording.allowed

    # Reported ended (when it ends: a report of the future is not believed).
    clock.now = T0 + 10 * MINUTE
    await report_ended(sidecar, "room-1", T0 + 10 * MINUTE)
    d = await enter(sidecar, "room-1")
    assert not d.allowed
    assert d.reason == reason
    # The other one runs out at started_at + 12 h.
    clock.now = T0 + 10 * HOUR - 1
    assert (await enter(sidecar, "room-open")).allowed
    clock.now = T0 + 10 * HOUR
    assert not (await enter(sidecar, "room-open")).allowed


async def test_protection_ends_at_scheduled_end_plus_overrun(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    await reconciler.ingest(
        deliveries(suspension_events(events, R.DECISION_REASON_ACCOUNT_OVERDUE))
    )
    await report_started(sidecar, "room-1", T0 - 2 * HOUR, T0)
    clock.now = T0 + HOUR - 1
    assert (await enter(sidecar, "room-1")).allowed
    clock.now = T0 + HOUR
    d = await enter(sidecar, "room-1")
    assert not d.allowed
    assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE


async def test_class_started_exactly_at_suspension_is_not_protected(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    # The alert was read when it was sent: the suspension took effect on time.
    await reconciler.ingest(
        deliveries(suspension_events(events, R.DECISION_REASON_ACCOUNT_OVERDUE)),
        recorded_at=T0 - 25 * HOUR,
    )
    await report_started(sidecar, "room-1", T0 - HOUR, T0 + HOUR)
    assert not (await enter(sidecar, "room-1")).allowed


async def test_end_reported_before_start_leaves_the_class_unprotected(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(
        deliveries(suspension_events(events, R.DECISION_REASON_ACCOUNT_OVERDUE))
    )
    await report_ended(sidecar, "room-1", T0 - 30 * MINUTE)
    await report_started(sidecar, "room-1", T0 - 2 * HOUR, T0 + HOUR)  # arrives late
    d = await enter(sidecar, "room-1")
    assert not d.allowed


@pytest.mark.parametrize("rpc", ["started", "ended"])
async def test_report_for_unknown_application_is_not_found(
    sidecar: SidecarUnderTest, rpc: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if rpc == "started":
            await report_started(sidecar, "room-1", T0, app_id="nobody")
        else:
            await report_ended(sidecar, "room-1", T0, app_id="nobody")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (info.value.details() or "").startswith("app_id:")


async def test_reports_are_idempotent_and_return_empty(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    req = pb.ReportClassroomStartedRequest(
        app_id=APP, room_id="room-1", started_at=ts(T0), scheduled_end_time=ts(T0 + HOUR)
    )
    for _ in range(3):
        resp = await sidecar.stub.ReportClassroomStarted(req, timeout=5)
        assert resp == pb.ReportClassroomStartedResponse()
    ended = await sidecar.stub.ReportClassroomEnded(
        pb.ReportClassroomEndedRequest(app_id=APP, room_id="room-1", ended_at=ts(T0 + MINUTE)),
        timeout=5,
    )
    assert ended == pb.ReportClassroomEndedResponse()


# -- GetApplicationStatus ------------------------------------------------------------


async def test_status_of_an_app_in_grace_shows_what_lies_ahead(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    clock.now = T0 - 5 * MINUTE
    evs = [*events.app(ACCT, APP), events("overdue_alert", T0 - HOUR, account_id=ACCT)]
    await reconciler.ingest(deliveries(evs))
    clock.now = T0
    st = await status(sidecar)
    assert st.app_id == APP
    assert st.account_id == ACCT
    assert st.state == pb.APPLICATION_STATE_GRACE
    assert list(st.reasons) == [pb.DECISION_REASON_OVERDUE_GRACE]
    assert ms(st.grace_ends_at) == T0 + 23 * HOUR
    assert not st.HasField("suspended_at")
    assert st.version > 0
    assert ms(st.updated_at) == T0 - 5 * MINUTE
    assert not st.degraded
    assert any(rule.startswith("R1 grace") for rule in st.rules)

    upcoming = [(ms(t.at), t.state, list(t.reasons)) for t in st.upcoming]
    assert upcoming == sorted(upcoming, key=lambda u: u[0])
    assert upcoming[0] == (
        T0 + 23 * HOUR,
        pb.APPLICATION_STATE_SUSPENDED,
        [pb.DECISION_REASON_ACCOUNT_OVERDUE],
    )
    # The package expires at T0 + 20 d: that is ahead too.
    assert (T0 + 20 * DAY) in [u[0] for u in upcoming]
    last = upcoming[-1]
    assert last[2] == [pb.DECISION_REASON_ACCOUNT_OVERDUE, pb.DECISION_REASON_PACKAGE_EXPIRED]

    # Past the deadline the same record reads as suspended, with no process run.
    clock.now = T0 + 23 * HOUR
    st = await status(sidecar)
    assert st.state == pb.APPLICATION_STATE_SUSPENDED
    assert list(st.reasons) == [pb.DECISION_REASON_ACCOUNT_OVERDUE]
    assert ms(st.suspended_at) == T0 + 23 * HOUR
    assert ms(st.release_at) == T0 + 23 * HOUR + 60 * DAY
    assert any(rule.startswith("R2 overdue suspension") for rule in st.rules)
    assert any(rule.startswith("suspended since") for rule in st.rules)
    assert ms(st.upcoming[0].at) == T0 + 20 * DAY


async def test_status_of_an_active_app(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    st = await status(sidecar)
    assert st.state == pb.APPLICATION_STATE_ACTIVE
    assert list(st.reasons) == []
    assert list(st.rules) == ["no rule restricts the application"]
    assert [(ms(t.at), t.state) for t in st.upcoming] == [
        (T0 + 20 * DAY, pb.APPLICATION_STATE_SUSPENDED)
    ]


async def test_status_version_grows_with_each_fact(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    v1 = (await status(sidecar)).version
    await reconciler.ingest(deliveries([events("overdue_alert", T0 - HOUR, account_id=ACCT)]))
    v2 = (await status(sidecar)).version
    assert v2 > v1
    assert (await three(sidecar)).create.status_version == v2


async def test_status_of_unknown_app_is_not_found(sidecar: SidecarUnderTest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await status(sidecar, "nobody")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (info.value.details() or "").startswith("app_id:")
    assert "nobody" in (info.value.details() or "")


# -- health and reflection -----------------------------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
async def test_health_is_serving(sidecar: SidecarUnderTest, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(sidecar.channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_of_an_unknown_service_is_not_found(sidecar: SidecarUnderTest) -> None:
    stub = health_pb2_grpc.HealthStub(sidecar.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_reports_not_serving_when_told(sidecar: SidecarUnderTest) -> None:
    stub = health_pb2_grpc.HealthStub(sidecar.channel)
    await sidecar.running.set_serving(False)
    for service in ("", SERVICE_NAME):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await sidecar.running.set_serving(True)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def _reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]), timeout=5)
    answers = [resp async for resp in call]
    assert len(answers) == 1
    return answers[0]


async def test_reflection_lists_the_services(sidecar: SidecarUnderTest) -> None:
    resp = await _reflect(sidecar.channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in resp.list_services_response.service}
    assert SERVICE_NAME == "lcic.guard.v1.EnforcementService"
    assert SERVICE_NAME in names
    assert "grpc.health.v1.Health" in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_reflection_describes_the_service(sidecar: SidecarUnderTest) -> None:
    resp = await _reflect(
        sidecar.channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in resp.file_descriptor_response.file_descriptor_proto
    ]
    ours = next(f for f in files if f.package == "lcic.guard.v1")
    assert ours.name == "lcic/guard/v1/enforcement.proto"
    service = next(s for s in ours.service if s.name == "EnforcementService")
    names = {m.name for m in service.method}
    assert names == set(pb.DESCRIPTOR.services_by_name["EnforcementService"].methods_by_name)
    assert {
        "CanCreateClassroom",
        "CanEnterClassroom",
        "CanAccessRecording",
        "CheckBatch",
        "ReportClassroomStarted",
        "ReportClassroomEnded",
        "GetApplicationStatus",
        "WatchApplicationStatus",
    } <= names
    watch = next(m for m in service.method if m.name == "WatchApplicationStatus")
    assert watch.server_streaming and not watch.client_streaming


# -- deadlines and a store that never answers ------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) and never
    answers a byte: a Redis that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@dataclass
class SlowSidecar:
    stub: pb_grpc.EnforcementServiceStub
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def sidecar_on(
    port: int, policy: PolicyConfig, clock: FakeClock, *, read_timeout: float, store_timeout: float
) -> AsyncIterator[SlowSidecar]:
    store = Store(connect(f"redis://127.0.0.1:{port}/0", timeout=60.0))
    checker = Checker(store, policy, render=RENDER, read_timeout=read_timeout, clock=clock)
    service = servicer(checker, store, store_timeout=store_timeout)
    running = await start_server(service, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield SlowSidecar(pb_grpc.EnforcementServiceStub(channel), channel)
    finally:
        await channel.close()
        await running.stop(grace=0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 2)


async def test_client_deadline_is_honoured_when_the_store_hangs(
    black_hole: int, policy: PolicyConfig, clock: FakeClock
) -> None:
    async with sidecar_on(black_hole, policy, clock, read_timeout=60.0, store_timeout=60.0) as slow:
        calls: list[Any] = [
            slow.stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id=APP), timeout=0.3),
            slow.stub.CanEnterClassroom(
                pb.CanEnterClassroomRequest(app_id=APP, room_id="r"), timeout=0.3
            ),
            slow.stub.CheckBatch(
                pb.CheckBatchRequest(
                    checks=[pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id=APP))]
                ),
                timeout=0.3,
            ),
            slow.stub.GetApplicationStatus(pb.GetApplicationStatusRequest(app_id=APP), timeout=0.3),
            slow.stub.ReportClassroomStarted(
                pb.ReportClassroomStartedRequest(app_id=APP, room_id="r", started_at=ts(T0)),
                timeout=0.3,
            ),
        ]
        started = time.monotonic()
        results = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = time.monotonic() - started
        assert elapsed < 3.0
        for r in results:
            assert isinstance(r, grpc.aio.AioRpcError), r
            assert r.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server itself is not stuck: health answers at once.
        health = health_pb2_grpc.HealthStub(slow.channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_store_that_hangs_costs_a_check_only_its_sub_deadline(
    black_hole: int, policy: PolicyConfig, clock: FakeClock
) -> None:
    # R13: never seen, store silent -> the failure mode (open), degraded.
    async with sidecar_on(black_hole, policy, clock, read_timeout=0.05, store_timeout=0.2) as slow:
        started = time.monotonic()
        resp = await slow.stub.CanCreateClassroom(
            pb.CanCreateClassroomRequest(app_id=APP), timeout=5
        )
        assert time.monotonic() - started < 2.0
        assert resp.decision.allowed
        assert resp.decision.degraded
        assert resp.decision.reason == pb.DECISION_REASON_STATUS_UNAVAILABLE
        # Status reads and reports say the store is unavailable, in time.
        for call in (
            slow.stub.GetApplicationStatus(pb.GetApplicationStatusRequest(app_id=APP), timeout=5),
            slow.stub.ReportClassroomStarted(
                pb.ReportClassroomStartedRequest(app_id=APP, room_id="r", started_at=ts(T0)),
                timeout=5,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 4.0
