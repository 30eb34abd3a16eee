"""The warnings ahead (what suspension_scheduled announces), shown by
GetApplicationStatus and PreviewApplication, and so by `lcic-guard status`,
`explain` and `preview` (issue 15)."""

from __future__ import annotations

from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard import render
from lcic_guard.domain.policy import DAY, HOUR
from lcic_guard.reconciler import Reconciler
from lcic_guard_client import ApplicationStatus, Preview

from tests.sidecar.test_sidecar_rpc import ACCT, APP, status
from tests.support.clock import T0
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest


async def preview(sidecar: SidecarUnderTest, at: int) -> pb.PreviewApplicationResponse:
    req = pb.PreviewApplicationRequest(app_id=APP)
    req.at.FromMilliseconds(at)
    resp: pb.PreviewApplicationResponse = await sidecar.stub.PreviewApplication(req, timeout=5)
    return resp


async def test_status_and_preview_show_the_warnings_ahead(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    expires = T0 + 10 * DAY
    grace_end = T0 - HOUR + 24 * HOUR
    await reconciler.ingest(
        deliveries(
            [
                *events.app(ACCT, APP, expires=expires),
                events("overdue_alert", T0 - HOUR, account_id=ACCT),
            ]
        )
    )
    st = await status(sidecar)
    assert [(w.at.ToMilliseconds(), w.reason, w.scope) for w in st.warnings] == [
        (grace_end, pb.DECISION_REASON_ACCOUNT_OVERDUE, "account")
    ]
    text = render.render_status(ApplicationStatus.from_proto(st), T0)
    assert "Warnings ahead" in text and "every application of the account" in text

    now = await preview(sidecar, T0)
    assert [w.at.ToMilliseconds() for w in now.warnings] == [grace_end]
    # Past the grace end the application is suspended already: nothing ahead
    # stops a service that has stopped.
    later = await preview(sidecar, grace_end + HOUR)
    assert list(later.warnings) == []
    assert "Warnings ahead" in render.render_preview(Preview.from_proto(now), T0)
