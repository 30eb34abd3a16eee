"""R6's bound over the wire: a reported class is never protected past its
start + the maximum class length, whatever scheduled end was reported and
however long the overrun allowance is configured (a real sidecar and a real
Redis; the bound itself is lcic_guard.domain.rooms.protected_until)."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.policy import HOUR, PolicyConfig
from lcic_guard.reconciler import Reconciler

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

APP, ACCT = "app-1", "acct-1"


@pytest.fixture
def policy() -> PolicyConfig:
    # An overrun allowance longer than the maximum class length: a scheduled
    # end plus the overrun would outlast the cap for every class.
    return PolicyConfig(overrun_ms=13 * HOUR, max_class_ms=12 * HOUR)


def ts(ms: int) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(ms)
    return out


async def enter(sidecar: SidecarUnderTest, room_id: str) -> pb.Decision:
    resp: pb.CanEnterClassroomResponse = await sidecar.stub.CanEnterClassroom(
        pb.CanEnterClassroomRequest(app_id=APP, room_id=room_id), timeout=5
    )
    return resp.decision


@pytest.mark.parametrize("scheduled_end", [None, T0 - HOUR - 1, T0 + 30 * HOUR])
async def test_protection_stops_at_start_plus_the_maximum_class_length(
    reconciler: Reconciler,
    sidecar: SidecarUnderTest,
    events: Events,
    clock: FakeClock,
    scheduled_end: int | None,
) -> None:
    clock.now = T0 - 2 * HOUR
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    req = pb.ReportClassroomStartedRequest(app_id=APP, room_id="room-1", started_at=ts(clock.now))
    if scheduled_end is not None:
        req.scheduled_end_time.CopyFrom(ts(scheduled_end))
    await sidecar.stub.ReportClassroomStarted(req, timeout=5)
    # Suspended from T0 - 1 h, after the class started.
    await reconciler.ingest(deliveries([events("overdue_alert", T0 - 25 * HOUR, account_id=ACCT)]))

    cap = T0 - 2 * HOUR + 12 * HOUR
    clock.now = cap - 1
    d = await enter(sidecar, "room-1")
    assert d.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert d.protected_until.ToMilliseconds() == cap
    clock.now = cap
    d = await enter(sidecar, "room-1")
    assert not d.allowed
    assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
