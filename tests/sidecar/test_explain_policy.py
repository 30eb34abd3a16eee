"""The explanation of a status reads the facts with the policy the status was
computed with (issue 19, finding 8): with ``--max-grace-extension 2d`` an
extension asking for 20 days is cited at the bound the status shows, over
GetApplicationStatus on the real server."""

from __future__ import annotations

import pytest
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig
from lcic_guard.domain.time import format_time
from lcic_guard.reconciler import Reconciler

from tests.support.clock import T0
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

BOUND = 2 * DAY
ALERT_AT = T0 - HOUR


@pytest.fixture
def policy() -> PolicyConfig:
    # Both the reconciler and the sidecar fixtures read this one policy.
    return PolicyConfig(max_grace_extension_ms=BOUND)


async def test_the_cited_extension_agrees_with_the_configured_bound(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events, policy: PolicyConfig
) -> None:
    asked = ALERT_AT + 20 * DAY
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct", "app-1", expires=T0 + 400 * DAY),
                events("overdue_alert", ALERT_AT, account_id="acct"),
                events(
                    "grace_extended",
                    T0,
                    account_id="acct",
                    until=format_time(asked),
                    actor="alice@support",
                    reason="ticket 9",
                ),
            ]
        )
    )
    resp = await sidecar.stub.GetApplicationStatus(
        pb.GetApplicationStatusRequest(app_id="app-1"), timeout=5
    )
    st = resp.status
    bound = ALERT_AT + policy.grace_ms + BOUND
    assert st.grace_ends_at.ToMilliseconds() == bound
    [extension] = [f for f in st.facts if f.event_type == "grace_extended"]
    assert f"until {format_time(bound)}" in extension.detail, extension.detail
    assert format_time(asked) not in extension.detail
    [grace_end] = [d for d in st.deadlines if d.kind == pb.DEADLINE_KIND_GRACE_END]
    assert grace_end.at.ToMilliseconds() == bound
