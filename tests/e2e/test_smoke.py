"""End to end on real parts: billing events -> reconciler -> Redis -> gRPC."""

from __future__ import annotations

from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.policy import HOUR
from lcic_guard.reconciler import Reconciler

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest


async def test_grace_then_suspension_over_grpc(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    evs = [*events.app("acct-1", "app-1"), events("overdue_alert", T0 - HOUR, account_id="acct-1")]
    await reconciler.ingest(deliveries(evs))

    resp = await sidecar.stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"))
    assert resp.decision.allowed
    assert resp.decision.reason == pb.DECISION_REASON_OVERDUE_GRACE
    assert resp.decision.grace_ends_at.ToMilliseconds() == T0 + 23 * HOUR

    clock.now = T0 + 23 * HOUR  # R2: flips at A + 24 h with no process running
    resp = await sidecar.stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"))
    assert not resp.decision.allowed
    assert resp.decision.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
    assert "Top up" in resp.decision.message
