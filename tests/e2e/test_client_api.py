"""The client speaks Python (issue 21 finding 7): enums with Python names,
frozen dataclasses, one exception family that needs no grpc import, a
method with a timeout for every RPC, and only its API exported. Against the
real sidecar, real Redis and the real reconciler where a server is needed."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType, UnionType
from typing import Any, get_args

import grpc
import lcic_guard_client
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.demo import free_port
from lcic_guard.domain.policy import DAY, HOUR
from lcic_guard.reconciler import Reconciler
from lcic_guard.reconciler.sources import StreamSource
from lcic_guard.runner import RunningSidecar
from lcic_guard.sidecar.identities import token_identity
from lcic_guard.store.status import Store
from lcic_guard_client import (
    ApplicationStatus,
    AsyncGuardClient,
    Deadline,
    DeadlineKind,
    Decision,
    GuardClient,
    GuardError,
    InvalidRequest,
    NotFound,
    Override,
    OverrideKind,
    PermissionDenied,
    Preview,
    Reason,
    Role,
    SidecarUnavailable,
    State,
    StatusUpdate,
    create_classroom_check,
)

from tests.sidecar import test_security
from tests.sidecar.test_security import token_file
from tests.support.clock import T0
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

start_sidecar = test_security.start_sidecar  # the fixture: a sidecar built from settings
Start = Callable[..., Awaitable[RunningSidecar]]
ADMIN = "admin-token-0123456789"
READER = "reader-token-0123456789"


def at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


async def overdue(reconciler: Reconciler, events: Events) -> None:
    """app-1 overdue since T0 - 1 h (grace running); app-2 in good standing."""
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct", "app-1", expires=T0 + 400 * DAY),
                events("overdue_alert", T0 - HOUR, account_id="acct"),
                *events.app("acct-2", "app-2", expires=T0 + 400 * DAY),
            ]
        )
    )


# -- Python names ----------------------------------------------------------------------


ENUMS: list[tuple[type[enum.IntEnum], Any, str]] = [
    (Reason, pb.DecisionReason, "DECISION_REASON_"),
    (State, pb.ApplicationState, "APPLICATION_STATE_"),
    (Role, pb.ClassroomRole, "CLASSROOM_ROLE_"),
    (OverrideKind, pb.OverrideKind, "OVERRIDE_KIND_"),
    (DeadlineKind, pb.DeadlineKind, "DEADLINE_KIND_"),
]


@pytest.mark.parametrize(("python", "wire", "prefix"), ENUMS, ids=[e[0].__name__ for e in ENUMS])
def test_every_wire_enum_value_has_its_short_python_name(
    python: type[enum.IntEnum], wire: Any, prefix: str
) -> None:
    assert len(python) == len(wire.keys())
    for name, value in wire.items():
        member = python[name.removeprefix(prefix)]
        assert member == value and member.value == value
        assert str(member) == f"{member}" == member.name == name.removeprefix(prefix)
    # A value a newer sidecar may send does not fail the call.
    assert python(max(wire.values()) + 1) == python(0)


def test_reason_ok_prints_ok() -> None:
    assert str(Reason.OK) == "OK" and Reason.OK.name == "OK"
    assert f"{Reason.ACCOUNT_OVERDUE} / {State.SUSPENDED}" == "ACCOUNT_OVERDUE / SUSPENDED"


moments = st.none() | st.datetimes(
    min_value=dt.datetime(1971, 1, 1),
    max_value=dt.datetime(2200, 1, 1),
    timezones=st.just(dt.UTC),
)
reasons = st.sampled_from(list(Reason))
decisions = st.builds(
    Decision,
    allowed=st.booleans(),
    reason=reasons,
    reasons=st.lists(reasons, max_size=4).map(tuple),
    message=st.text(max_size=40),
    grace_ends_at=moments,
    suspended_at=moments,
    release_at=moments,
    protected_until=moments,
    status_version=st.integers(0, 2**64 - 1),
    degraded=st.booleans(),
    state=st.sampled_from(list(State)),
    shadow=st.booleans(),
    valid_until=moments,
)


@given(decisions)
def test_a_decision_is_the_wire_message_in_python_types(d: Decision) -> None:
    msg = d.to_proto()
    assert isinstance(msg, pb.Decision)
    assert Decision.from_proto(msg) == d
    assert msg.HasField("valid_until") == (d.valid_until is not None)
    assert pb.DecisionReason.Name(msg.reason) == f"DECISION_REASON_{d.reason}"


def test_answers_are_frozen_and_nest_python_types() -> None:
    msg = pb.ApplicationStatus(app_id="a", state=pb.APPLICATION_STATE_SUSPENDED, version=7)
    msg.deadlines.add(kind=pb.DEADLINE_KIND_RELEASE, description="x").at.FromMilliseconds(T0)
    status = ApplicationStatus.from_proto(msg)
    assert status.state == State.SUSPENDED and status.version == 7
    assert status.deadlines == (Deadline(DeadlineKind.RELEASE, at(T0), "x"),)
    assert status.to_proto() == msg
    with pytest.raises(AttributeError):
        status.version = 8  # type: ignore[misc]


def test_the_package_exports_its_api_only() -> None:
    public = {n for n in dir(lcic_guard_client) if not n.startswith("_")}
    assert public == set(lcic_guard_client.__all__)
    assert "pb" not in public
    for name in lcic_guard_client.__all__:
        obj = getattr(lcic_guard_client, name)
        assert not isinstance(obj, ModuleType), name
        # Nothing generated: every class is the client's own.
        for part in get_args(obj) if isinstance(obj, UnionType) else (obj,):
            module = getattr(part, "__module__", "lcic_guard_client")
            assert module.startswith("lcic_guard_client"), name
    # The generated code is still there for those who want the wire messages.
    assert Decision(allowed=True, reason=Reason.OK).to_proto() == pb.Decision(
        allowed=True, reason=pb.DECISION_REASON_OK
    )


# -- one exception family ---------------------------------------------------------------


def _down_target() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize(("retries", "code"), [(0, "UNAVAILABLE"), (2, "DEADLINE_EXCEEDED")])
def test_a_sidecar_that_is_down_raises_sidecar_unavailable(retries: int, code: str) -> None:
    with (
        GuardClient(_down_target(), timeout=0.2, retries=retries) as guard,
        pytest.raises(SidecarUnavailable) as info,
    ):
        guard.can_create_classroom("app-1")
    assert info.value.code == code
    assert isinstance(info.value, GuardError) and not isinstance(info.value, grpc.RpcError)
    assert isinstance(info.value.__cause__, grpc.RpcError)


async def test_an_async_client_raises_the_same_family() -> None:
    async with AsyncGuardClient(_down_target(), timeout=0.2, retries=0) as guard:
        with pytest.raises(SidecarUnavailable) as info:
            await guard.check_batch([create_classroom_check("app-1")], timeout=0.2)
    assert info.value.code == "UNAVAILABLE"
    assert isinstance(info.value.__cause__, grpc.RpcError)


async def test_bad_requests_name_the_field_and_unknown_apps_are_not_found(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events
) -> None:
    await overdue(reconciler, events)

    def run() -> None:
        with GuardClient(sidecar.target, timeout=2.0) as guard:
            with pytest.raises(InvalidRequest) as bad:
                guard.can_create_classroom("bad id")
            assert bad.value.field == "app_id" and bad.value.code == "INVALID_ARGUMENT"
            with pytest.raises(InvalidRequest) as bad:
                guard.check_batch([create_classroom_check("app-1"), create_classroom_check("x y")])
            assert bad.value.field.startswith("checks[1]")
            with pytest.raises(NotFound):
                guard.get_application_status("nobody")
            # Refused before sending: a naive time is the caller's bug.
            with pytest.raises(InvalidRequest) as bad:
                guard.report_classroom_started("app-1", "room-1", dt.datetime(2026, 1, 1))
            assert bad.value.field == "started_at" and isinstance(bad.value, ValueError)
            status = guard.get_application_status("app-1")
            assert isinstance(status, ApplicationStatus) and status.state == State.GRACE

    await asyncio.to_thread(run)
    async with AsyncGuardClient(sidecar.target, timeout=2.0) as guard:
        with pytest.raises(NotFound):
            await guard.get_application_status("nobody")
        with pytest.raises(InvalidRequest) as bad:
            await guard.can_enter_classroom("app-1", "room/1")
        assert bad.value.field == "room_id"


# -- preview, overrides, watch ------------------------------------------------------------


async def test_overrides_through_the_client(
    start_sidecar: Start, tmp_path: Path, reconciler: Reconciler, store: Store, events: Events
) -> None:
    await overdue(reconciler, events)
    tokens = token_file(tmp_path, f"{ADMIN} admin", f"{READER} read")
    sidecar = await start_sidecar(auth_token_file=str(tokens))
    target = f"127.0.0.1:{sidecar.port}"
    until = at(T0 + 3 * DAY)

    def apply() -> Override:
        with GuardClient(target, timeout=2.0, bearer_token=READER) as reader:
            with pytest.raises(PermissionDenied) as info:
                reader.apply_override("acct", OverrideKind.EXTEND_GRACE, "ticket 1", until=until)
            assert info.value.code == "PERMISSION_DENIED"
        with GuardClient(target, timeout=2.0) as anonymous:
            with pytest.raises(PermissionDenied) as info:
                anonymous.list_overrides("acct")
            assert info.value.code == "UNAUTHENTICATED"
        with GuardClient(target, timeout=2.0, bearer_token=ADMIN) as admin:
            with pytest.raises(InvalidRequest) as bad:
                admin.apply_override("acct", OverrideKind.EXTEND_GRACE, "ticket 1")
            assert bad.value.field == "until"
            return admin.apply_override("acct", OverrideKind.EXTEND_GRACE, "ticket 1", until=until)

    made = await asyncio.to_thread(apply)
    assert (made.kind, made.account_id, made.until) == (OverrideKind.EXTEND_GRACE, "acct", until)
    assert made.actor == token_identity(ADMIN) and made.recorded_at is None

    src = StreamSource(store.redis, group="g", consumer="c1")
    while (await reconciler.ingest_source(src)).received:
        pass
    async with AsyncGuardClient(target, timeout=2.0, bearer_token=READER) as guard:
        [listed] = await guard.list_overrides("acct")
        status = await guard.get_application_status("app-1")
    assert listed.event_id == made.event_id and listed.recorded_at is not None
    assert status.grace_ends_at == until


async def test_preview_and_watch_through_the_client(
    start_sidecar: Start, reconciler: Reconciler, events: Events
) -> None:
    await overdue(reconciler, events)
    sidecar = await start_sidecar()
    target = f"127.0.0.1:{sidecar.port}"

    def run() -> tuple[Preview, list[StatusUpdate]]:
        with GuardClient(target, timeout=2.0) as guard:
            preview = guard.preview_application("app-1", at(T0 + 2 * DAY), room_id="room-1")
            got: list[StatusUpdate] = []
            with guard.watch(["app-1"]) as stream:
                for update in stream:
                    got.append(update)
                    if update.is_heartbeat:
                        break
            return preview, got

    preview, got = await asyncio.to_thread(run)
    assert preview.app_id == "app-1" and preview.at == at(T0 + 2 * DAY)
    assert preview.state == State.SUSPENDED
    assert preview.create_classroom.reason == Reason.ACCOUNT_OVERDUE
    assert not preview.enter_classroom.allowed
    first = got[0]
    assert first.status is not None and first.status.app_id == "app-1"
    assert first.status.state == State.GRACE and first.schedule
    assert first.schedule[0].create_classroom.reason == Reason.OVERDUE_GRACE
    assert got[-1].is_heartbeat

    async with AsyncGuardClient(target, timeout=2.0) as guard:
        stream = guard.watch(["app-2"])
        update = await anext(aiter(stream))
        stream.cancel()
        assert [u async for u in stream] == []
    assert update.status is not None and update.status.state == State.ACTIVE
