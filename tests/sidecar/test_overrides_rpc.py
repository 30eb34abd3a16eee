"""ApplyOverride and ListOverrides on the real server (issue 15): scope
`admin` and an authenticated actor, every field validated, the override
published on the billing feed and applied by the reconciler, and the audit
trail listed."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig
from lcic_guard.reconciler import Reconciler
from lcic_guard.reconciler.sources import StreamSource
from lcic_guard.runner import RunningSidecar
from lcic_guard.sidecar.identities import token_identity
from lcic_guard.store.keys import BILLING_STREAM
from lcic_guard.store.status import Store

from tests.sidecar import test_security
from tests.sidecar.test_security import bearer, token_file
from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries

ADMIN = "admin-token-0123456789"
READER = "reader-token-0123456789"
GRACE = PolicyConfig().grace_ms
MAX_EXTENSION = PolicyConfig().max_grace_extension_ms
ALERT_AT = T0 - HOUR


def ts(ms: int) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(ms)
    return out


def extend(
    until: int, account: str = "acct", reason: str = "ticket 4411"
) -> pb.ApplyOverrideRequest:
    return pb.ApplyOverrideRequest(
        kind=pb.OVERRIDE_KIND_EXTEND_GRACE, account_id=account, until=ts(until), reason=reason
    )


Start = Callable[..., Awaitable[RunningSidecar]]
start_sidecar = test_security.start_sidecar  # the fixture: a sidecar built from settings


async def admin_sidecar(
    start_sidecar: Start,
    tmp_path: Path,
) -> tuple[RunningSidecar, grpc.aio.Channel, pb_grpc.EnforcementServiceStub]:
    tokens = token_file(tmp_path, f"{ADMIN} admin", f"{READER} read")
    sidecar = await start_sidecar(auth_token_file=str(tokens))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    return sidecar, channel, pb_grpc.EnforcementServiceStub(channel)


async def overdue(reconciler: Reconciler, events: Events) -> None:
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct", "app-1", expires=T0 + 400 * DAY),
                events("overdue_alert", ALERT_AT, account_id="acct"),
            ]
        )
    )


async def published(store: Store) -> list[dict[str, Any]]:
    rows: Any = await store.redis.xrange(BILLING_STREAM)
    return [json.loads(fields[b"event"]) for _id, fields in rows]


async def code_and_details(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_only_an_authenticated_admin_may_apply_an_override(
    start_sidecar: Start,
    tmp_path: Path,
    reconciler: Reconciler,
    store: Store,
    events: Events,
) -> None:
    await overdue(reconciler, events)
    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    request = extend(T0 + DAY)
    try:
        code, details = await code_and_details(
            stub.ApplyOverride(request, metadata=bearer(READER), timeout=5)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
        code, _ = await code_and_details(stub.ApplyOverride(request, timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # The audit trail is readable with scope read.
        listed = await stub.ListOverrides(
            pb.ListOverridesRequest(account_id="acct"), metadata=bearer(READER), timeout=5
        )
        assert list(listed.overrides) == []
    finally:
        await channel.close()
    # Without authentication there is no actor to record: refused too.
    open_sidecar = await start_sidecar()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{open_sidecar.port}") as plain:
        code, details = await code_and_details(
            pb_grpc.EnforcementServiceStub(plain).ApplyOverride(request, timeout=5)
        )
    assert code == grpc.StatusCode.UNAUTHENTICATED and "who made it" in details
    assert await published(store) == []


def _bad(**changes: Any) -> pb.ApplyOverrideRequest:
    req = extend(T0 + DAY)
    for key, value in changes.items():
        if value is None:
            req.ClearField(key)  # type: ignore[arg-type]
        elif key == "until":
            req.until.CopyFrom(ts(value))
        else:
            setattr(req, key, value)
    return req


INVALID = {
    "no kind": (_bad(kind=pb.OVERRIDE_KIND_UNSPECIFIED), "kind:"),
    "unknown kind": (_bad(kind=42), "kind:"),
    "no account": (_bad(account_id=""), "account_id:"),
    "bad account": (_bad(account_id="acct 1"), "account_id:"),
    "no reason": (_bad(reason=""), "reason:"),
    "blank reason": (_bad(reason="   "), "reason:"),
    "long reason": (_bad(reason="r" * 2001), "reason:"),
    "two-line reason": (_bad(reason="a\nb"), "reason:"),
    # What audit would print raw: a new row, a terminal escape, reversed text.
    "line-separator reason": (_bad(reason="ok\u2028acct-2 CLEAR_HOLD"), "reason:"),
    "C1-control reason": (_bad(reason="ok\x9b2J"), "reason:"),
    "bidi reason": (_bad(reason="refund \u202e0001 USD"), "reason:"),
    "no until": (_bad(until=None), "until:"),
    "until in the past": (_bad(until=T0 - 1), "until:"),
    "until past the limit": (_bad(until=ALERT_AT + GRACE + MAX_EXTENSION + 1), "until:"),
    "until on a hold": (_bad(kind=pb.OVERRIDE_KIND_HOLD_RELEASE), "until:"),
    "clear without hold": (
        _bad(kind=pb.OVERRIDE_KIND_CLEAR_HOLD, until=None),
        "kind:",
    ),
    "extension, not overdue": (_bad(account_id="acct-ok"), "until:"),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_every_field_is_validated(
    case: str,
    start_sidecar: Start,
    tmp_path: Path,
    reconciler: Reconciler,
    store: Store,
    events: Events,
) -> None:
    await overdue(reconciler, events)
    await reconciler.ingest(deliveries(events.app("acct-ok", "app-ok")))
    request, field = INVALID[case]
    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    try:
        code, details = await code_and_details(
            stub.ApplyOverride(request, metadata=bearer(ADMIN), timeout=5)
        )
    finally:
        await channel.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, code, details)
    assert details.startswith(field), details
    assert await published(store) == []


async def test_unknown_account_is_not_found(
    start_sidecar: Start,
    tmp_path: Path,
) -> None:
    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    try:
        hold = pb.ApplyOverrideRequest(
            kind=pb.OVERRIDE_KIND_HOLD_RELEASE, account_id="nobody", reason="dispute"
        )
        code, _ = await code_and_details(stub.ApplyOverride(hold, metadata=bearer(ADMIN)))
    finally:
        await channel.close()
    assert code == grpc.StatusCode.NOT_FOUND


async def test_an_override_is_published_applied_and_audited(
    start_sidecar: Start,
    tmp_path: Path,
    reconciler: Reconciler,
    store: Store,
    events: Events,
    clock: FakeClock,
) -> None:
    await overdue(reconciler, events)
    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    src = StreamSource(store.redis, group="g", consumer="c1")

    async def drain() -> None:
        while (await reconciler.ingest_source(src)).received:
            pass

    until = T0 + 3 * DAY
    try:
        resp = await stub.ApplyOverride(extend(until), metadata=bearer(ADMIN), timeout=5)
        assert resp.override.actor == token_identity(ADMIN) != ADMIN
        [event] = await published(store)
        assert event["type"] == "grace_extended" and event["actor"] == token_identity(ADMIN)
        assert event["event_id"].startswith("override:")
        assert event["occurred_at"].startswith("2026-09-21T")  # the sidecar's clock: T0
        await drain()
        decision = (
            await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"), timeout=5)
        ).decision
        assert decision.reason == pb.DECISION_REASON_OVERDUE_GRACE
        assert decision.grace_ends_at.ToMilliseconds() == until

        # A moment later: overrides are dated when made, and the audit lists
        # two of one millisecond in no particular order.
        clock.now = T0 + 1
        hold = pb.ApplyOverrideRequest(
            kind=pb.OVERRIDE_KIND_HOLD_RELEASE, account_id="acct", reason="legal hold 7"
        )
        await stub.ApplyOverride(hold, metadata=bearer(ADMIN), timeout=5)
        await drain()
        clock.now = T0 + HOUR
        clear = pb.ApplyOverrideRequest(
            kind=pb.OVERRIDE_KIND_CLEAR_HOLD, account_id="acct", reason="hold lifted"
        )
        await stub.ApplyOverride(clear, metadata=bearer(ADMIN), timeout=5)
        await drain()

        listed = await stub.ListOverrides(
            pb.ListOverridesRequest(account_id="acct"), metadata=bearer(READER), timeout=5
        )
        kinds = [o.kind for o in listed.overrides]
        assert kinds == [
            pb.OVERRIDE_KIND_EXTEND_GRACE,
            pb.OVERRIDE_KIND_HOLD_RELEASE,
            pb.OVERRIDE_KIND_CLEAR_HOLD,
        ]
        assert [o.reason for o in listed.overrides] == [
            "ticket 4411",
            "legal hold 7",
            "hold lifted",
        ]
        for o in listed.overrides:
            assert o.actor == token_identity(ADMIN)
            assert o.HasField("occurred_at") and o.HasField("recorded_at")
        assert "extended until" in listed.overrides[0].effect
        status = await stub.GetApplicationStatus(
            pb.GetApplicationStatusRequest(app_id="app-1"), metadata=bearer(READER), timeout=5
        )
        assert [o.event_id for o in status.status.overrides] == [
            o.event_id for o in listed.overrides
        ]
    finally:
        await channel.close()


async def test_the_explanation_cites_the_extension(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    from lcic_guard.domain.evidence import reason_facts

    await overdue(reconciler, events)
    ext = events(
        "grace_extended",
        T0,
        account_id="acct",
        until="2026-09-25T00:00:00Z",
        actor="alice@support",
        reason="ticket 9",
    )
    await reconciler.ingest(deliveries([ext]))
    loaded = await store.load_account_facts("acct")
    status, _ = await store.read_status("app-1")
    assert status is not None
    cited = reason_facts(status, loaded.facts, T0, PolicyConfig())
    assert [(f.reason, f.event_type) for f in cited] == [
        (pb_reason("OVERDUE_GRACE"), "overdue_alert"),
        (pb_reason("OVERDUE_GRACE"), "grace_extended"),
    ]
    assert "alice@support" in cited[1].detail and "ticket 9" in cited[1].detail


def pb_reason(name: str) -> Any:
    from lcic_guard.domain.policy import Reason

    return Reason(name)
