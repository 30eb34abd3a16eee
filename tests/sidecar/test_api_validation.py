"""Bad requests over the real socket: every RPC answers INVALID_ARGUMENT with a
message that starts with the path of the offending field (SPEC §1, §5)."""

from __future__ import annotations

import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.policy import HOUR
from lcic_guard.reconciler import Reconciler
from lcic_guard.sidecar.wire import MAX_BATCH

from tests.support.clock import T0
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

SERVICE = "/lcic.guard.v1.EnforcementService/"
GOOD = "app-1"
ID_ALPHABET = string.ascii_letters + string.digits + "._:-"

# Each is invalid wherever an id is expected, required or optional.
BAD_IDS = [
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("caf\u00e9", id="unicode-letter"),
    pytest.param("\u0661\u0662", id="unicode-digits"),
    pytest.param("\uff41pp", id="fullwidth"),
    pytest.param("app 1", id="space"),
    pytest.param(" app", id="leading-space"),
    pytest.param("app\n", id="trailing-newline"),
    pytest.param("app\t1", id="tab"),
    pytest.param("app/1", id="slash"),
    pytest.param("{app}", id="brace"),
    pytest.param("app*", id="star"),
    pytest.param("app\x00", id="nul"),
    pytest.param("\u00a0", id="nbsp"),
]


def ts(ms: int) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(ms)
    return out


def raw_ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


# -- the RPCs, each as "send this message, get an awaitable answer" ---------------

Rpc = Callable[[SidecarUnderTest, Any], Awaitable[Any]]


async def _watch_first(sidecar: SidecarUnderTest, req: pb.WatchApplicationStatusRequest) -> Any:
    call = sidecar.stub.WatchApplicationStatus(req, timeout=5)
    async for item in call:
        return item
    return None


def _unary(name: str) -> Rpc:
    async def call(sidecar: SidecarUnderTest, req: Any) -> Any:
        return await getattr(sidecar.stub, name)(req, timeout=5)

    return call


@dataclass(frozen=True)
class IdField:
    """One id field of one RPC: how to build a request with that field set to
    a value (every other field valid), and the path the error must name."""

    name: str
    rpc: Rpc
    build: Callable[[str], Any]
    path: str
    required: bool


def _enter(**kw: Any) -> pb.CanEnterClassroomRequest:
    base: dict[str, Any] = {"app_id": GOOD, "room_id": "room-1", "user_id": "u-1"}
    return pb.CanEnterClassroomRequest(**{**base, **kw})


def _recording(**kw: Any) -> pb.CanAccessRecordingRequest:
    base: dict[str, Any] = {"app_id": GOOD, "recording_id": "rec-1", "room_id": "room-1"}
    return pb.CanAccessRecordingRequest(**{**base, **kw})


def _create(**kw: Any) -> pb.CanCreateClassroomRequest:
    base: dict[str, Any] = {"app_id": GOOD, "room_id": "room-1"}
    return pb.CanCreateClassroomRequest(**{**base, **kw})


def _batch_at(index: int, check: pb.Check) -> pb.CheckBatchRequest:
    filler = pb.Check(access_recording=_recording())
    checks = [filler] * index + [check] + [filler]
    return pb.CheckBatchRequest(checks=checks)


def _started(**kw: Any) -> pb.ReportClassroomStartedRequest:
    base: dict[str, Any] = {"app_id": GOOD, "room_id": "room-1", "started_at": ts(T0)}
    return pb.ReportClassroomStartedRequest(**{**base, **kw})


def _ended(**kw: Any) -> pb.ReportClassroomEndedRequest:
    base: dict[str, Any] = {"app_id": GOOD, "room_id": "room-1", "ended_at": ts(T0)}
    return pb.ReportClassroomEndedRequest(**{**base, **kw})


ID_FIELDS = [
    IdField(
        "create.app_id", _unary("CanCreateClassroom"), lambda v: _create(app_id=v), "app_id", True
    ),
    IdField(
        "create.room_id",
        _unary("CanCreateClassroom"),
        lambda v: _create(room_id=v),
        "room_id",
        False,
    ),
    IdField(
        "enter.app_id", _unary("CanEnterClassroom"), lambda v: _enter(app_id=v), "app_id", True
    ),
    IdField(
        "enter.room_id", _unary("CanEnterClassroom"), lambda v: _enter(room_id=v), "room_id", True
    ),
    IdField(
        "enter.user_id",
        _unary("CanEnterClassroom"),
        lambda v: _enter(user_id=v),
        "user_id",
        False,
    ),
    IdField(
        "recording.app_id",
        _unary("CanAccessRecording"),
        lambda v: _recording(app_id=v),
        "app_id",
        True,
    ),
    IdField(
        "recording.recording_id",
        _unary("CanAccessRecording"),
        lambda v: _recording(recording_id=v),
        "recording_id",
        True,
    ),
    IdField(
        "recording.room_id",
        _unary("CanAccessRecording"),
        lambda v: _recording(room_id=v),
        "room_id",
        False,
    ),
    IdField(
        "batch.create.app_id",
        _unary("CheckBatch"),
        lambda v: _batch_at(3, pb.Check(create_classroom=_create(app_id=v))),
        "checks[3].create_classroom.app_id",
        True,
    ),
    IdField(
        "batch.create.room_id",
        _unary("CheckBatch"),
        lambda v: _batch_at(0, pb.Check(create_classroom=_create(room_id=v))),
        "checks[0].create_classroom.room_id",
        False,
    ),
    IdField(
        "batch.enter.room_id",
        _unary("CheckBatch"),
        lambda v: _batch_at(3, pb.Check(enter_classroom=_enter(room_id=v))),
        "checks[3].enter_classroom.room_id",
        True,
    ),
    IdField(
        "batch.enter.user_id",
        _unary("CheckBatch"),
        lambda v: _batch_at(1, pb.Check(enter_classroom=_enter(user_id=v))),
        "checks[1].enter_classroom.user_id",
        False,
    ),
    IdField(
        "batch.recording.recording_id",
        _unary("CheckBatch"),
        lambda v: _batch_at(3, pb.Check(access_recording=_recording(recording_id=v))),
        "checks[3].access_recording.recording_id",
        True,
    ),
    IdField(
        "batch.recording.app_id",
        _unary("CheckBatch"),
        lambda v: _batch_at(2, pb.Check(access_recording=_recording(app_id=v))),
        "checks[2].access_recording.app_id",
        True,
    ),
    IdField(
        "started.app_id",
        _unary("ReportClassroomStarted"),
        lambda v: _started(app_id=v),
        "app_id",
        True,
    ),
    IdField(
        "started.room_id",
        _unary("ReportClassroomStarted"),
        lambda v: _started(room_id=v),
        "room_id",
        True,
    ),
    IdField(
        "ended.app_id", _unary("ReportClassroomEnded"), lambda v: _ended(app_id=v), "app_id", True
    ),
    IdField(
        "ended.room_id",
        _unary("ReportClassroomEnded"),
        lambda v: _ended(room_id=v),
        "room_id",
        True,
    ),
    IdField(
        "status.app_id",
        _unary("GetApplicationStatus"),
        lambda v: pb.GetApplicationStatusRequest(app_id=v),
        "app_id",
        True,
    ),
    IdField(
        "watch.app_ids[0]",
        _watch_first,
        lambda v: pb.WatchApplicationStatusRequest(app_ids=[v]),
        "app_ids[0]",
        True,
    ),
    IdField(
        "watch.app_ids[2]",
        _watch_first,
        lambda v: pb.WatchApplicationStatusRequest(app_ids=[GOOD, "app-2", v]),
        "app_ids[2]",
        True,
    ),
]
REQUIRED = [pytest.param(f, id=f.name) for f in ID_FIELDS if f.required]
ALL = [pytest.param(f, id=f.name) for f in ID_FIELDS]
# The RPCs that answer with a decision (or decisions) for a valid request.
DECIDING = [
    pytest.param(f, id=f.name)
    for f in ID_FIELDS
    if f.name.split(".")[0] in ("create", "enter", "recording", "batch")
]


async def expect_invalid(sidecar: SidecarUnderTest, rpc: Rpc, req: Any, path: str) -> str:
    """Send ``req``; it must fail with INVALID_ARGUMENT naming ``path``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc(sidecar, req)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    details = err.details() or ""
    assert details.startswith(f"{path}:"), f"{details!r} does not name {path!r}"
    return details


async def assert_still_serving(sidecar: SidecarUnderTest) -> None:
    resp = await sidecar.stub.CanCreateClassroom(
        pb.CanCreateClassroomRequest(app_id="nobody"), timeout=5
    )
    assert not resp.decision.allowed
    assert resp.decision.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION


def assert_rejected_as_malformed(err: grpc.aio.AioRpcError) -> None:
    # Not UNKNOWN (grpc.aio's default for a request that does not parse).
    assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), (
        err.code(),
        err.details(),
    )
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        assert (err.details() or "").startswith("request:")


def _decisions(resp: Any) -> list[pb.Decision]:
    if isinstance(resp, pb.CheckBatchResponse):
        return list(resp.decisions)
    return [resp.decision]


# -- ids ------------------------------------------------------------------------


@pytest.mark.parametrize("field", REQUIRED)
async def test_missing_required_id_is_invalid(sidecar: SidecarUnderTest, field: IdField) -> None:
    details = await expect_invalid(sidecar, field.rpc, field.build(""), field.path)
    assert "required" in details


@pytest.mark.parametrize("value", BAD_IDS)
@pytest.mark.parametrize("field", ALL)
async def test_malformed_id_is_invalid(
    sidecar: SidecarUnderTest, field: IdField, value: str
) -> None:
    details = await expect_invalid(sidecar, field.rpc, field.build(value), field.path)
    assert "1-64" in details


@pytest.mark.parametrize("field", DECIDING)
async def test_longest_and_odd_but_valid_ids_are_answered(
    sidecar: SidecarUnderTest, field: IdField
) -> None:
    for value in ("a" * 64, "A.b_c:d-9", "-", "..", "x"):
        resp = await field.rpc(sidecar, field.build(value))
        decisions = _decisions(resp)
        assert decisions
        assert all(d.reason != pb.DECISION_REASON_UNSPECIFIED for d in decisions)


@pytest.mark.parametrize("field", [pytest.param(f, id=f.name) for f in ID_FIELDS if not f.required])
async def test_optional_id_may_be_empty(sidecar: SidecarUnderTest, field: IdField) -> None:
    resp = await field.rpc(sidecar, field.build(""))
    assert all(d.reason != pb.DECISION_REASON_UNSPECIFIED for d in _decisions(resp))


async def test_watch_with_too_many_ids_names_app_ids(sidecar: SidecarUnderTest) -> None:
    req = pb.WatchApplicationStatusRequest(app_ids=[f"app-{i}" for i in range(1001)])
    details = await expect_invalid(sidecar, _watch_first, req, "app_ids")
    assert "1000" in details


# -- ids, fuzzed ----------------------------------------------------------------

valid_ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=64)
invalid_ids = st.one_of(
    st.text(alphabet=ID_ALPHABET, min_size=65, max_size=200),
    # At least one character outside the alphabet, anywhere.
    st.tuples(
        st.text(alphabet=ID_ALPHABET, max_size=30),
        st.characters(exclude_characters=ID_ALPHABET, codec="utf-8"),  # no surrogates
        st.text(max_size=30),
    ).map("".join),
)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture
async def known_app(reconciler: Reconciler, events: Events) -> str:
    await reconciler.ingest(deliveries(events.app("acct-1", GOOD)))
    return GOOD


@FUZZ
@given(value=st.one_of(st.just(GOOD), valid_ids))
async def test_fuzz_valid_app_id_gets_a_decision(
    sidecar: SidecarUnderTest, known_app: str, value: str
) -> None:
    resp = await sidecar.stub.CanCreateClassroom(
        pb.CanCreateClassroomRequest(app_id=value), timeout=5
    )
    if value == known_app:
        assert resp.decision.allowed
        assert resp.decision.reason == pb.DECISION_REASON_OK
    else:
        assert not resp.decision.allowed
        assert resp.decision.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION


@FUZZ
@given(value=valid_ids, which=st.sampled_from(["room_id", "user_id"]))
async def test_fuzz_valid_room_and_user_ids_are_allowed(
    sidecar: SidecarUnderTest, known_app: str, value: str, which: str
) -> None:
    req = pb.CanEnterClassroomRequest(app_id=known_app, room_id="room-1", user_id="u-1")
    setattr(req, which, value)
    resp = await sidecar.stub.CanEnterClassroom(req, timeout=5)
    assert resp.decision.allowed
    assert resp.decision.reason == pb.DECISION_REASON_OK


@FUZZ
@given(value=valid_ids)
async def test_fuzz_valid_recording_id_is_allowed(
    sidecar: SidecarUnderTest, known_app: str, value: str
) -> None:
    resp = await sidecar.stub.CanAccessRecording(
        pb.CanAccessRecordingRequest(app_id=known_app, recording_id=value), timeout=5
    )
    assert resp.decision.allowed
    assert resp.decision.reason == pb.DECISION_REASON_OK


@FUZZ
@given(value=invalid_ids, field=st.sampled_from(ID_FIELDS))
async def test_fuzz_invalid_ids_are_rejected_naming_the_field(
    sidecar: SidecarUnderTest, value: str, field: IdField
) -> None:
    await expect_invalid(sidecar, field.rpc, field.build(value), field.path)


# -- timestamps ------------------------------------------------------------------

BAD_TIMES = [
    pytest.param(raw_ts(T0 // 1000, -1), "nanos out of range", id="negative-nanos"),
    pytest.param(raw_ts(T0 // 1000, 1_000_000_000), "nanos out of range", id="nanos-1e9"),
    pytest.param(raw_ts(-1), "out of range", id="before-1970"),
    pytest.param(raw_ts(-62_135_596_800), "out of range", id="year-1"),
    pytest.param(raw_ts(253_402_300_800), "out of range", id="year-10000"),
    pytest.param(raw_ts(2**62), "out of range", id="huge"),
]

TIME_FIELDS = [
    pytest.param(
        _unary("CanCreateClassroom"),
        lambda t: _create(start_time=t),
        "start_time",
        id="create.start_time",
    ),
    pytest.param(
        _unary("CanCreateClassroom"),
        lambda t: _create(end_time=t),
        "end_time",
        id="create.end_time",
    ),
    pytest.param(
        _unary("CheckBatch"),
        lambda t: _batch_at(3, pb.Check(create_classroom=_create(end_time=t))),
        "checks[3].create_classroom.end_time",
        id="batch.create.end_time",
    ),
    pytest.param(
        _unary("ReportClassroomStarted"),
        lambda t: _started(started_at=t),
        "started_at",
        id="started.started_at",
    ),
    pytest.param(
        _unary("ReportClassroomStarted"),
        lambda t: _started(scheduled_end_time=t),
        "scheduled_end_time",
        id="started.scheduled_end_time",
    ),
    pytest.param(
        _unary("ReportClassroomEnded"),
        lambda t: _ended(ended_at=t),
        "ended_at",
        id="ended.ended_at",
    ),
]


@pytest.mark.parametrize(("bad", "words"), BAD_TIMES)
@pytest.mark.parametrize(("rpc", "build", "path"), TIME_FIELDS)
async def test_timestamp_out_of_range_is_invalid(
    sidecar: SidecarUnderTest,
    rpc: Rpc,
    build: Callable[[Timestamp], Any],
    path: str,
    bad: Timestamp,
    words: str,
) -> None:
    details = await expect_invalid(sidecar, rpc, build(bad), path)
    assert words in details


async def test_timestamp_bounds_are_accepted(sidecar: SidecarUnderTest) -> None:
    for start, end in (
        (raw_ts(0), raw_ts(0)),
        (raw_ts(0), raw_ts(253_370_764_799, 999_999_999)),  # 9998-12-31T23:59:59.999999999Z
    ):
        resp = await sidecar.stub.CanCreateClassroom(
            _create(start_time=start, end_time=end), timeout=5
        )
        assert resp.decision.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION


async def test_end_time_before_start_time_is_invalid(sidecar: SidecarUnderTest) -> None:
    req = _create(start_time=ts(T0), end_time=ts(T0 - 1))
    details = await expect_invalid(sidecar, _unary("CanCreateClassroom"), req, "end_time")
    assert "start_time" in details
    batch = _batch_at(3, pb.Check(create_classroom=req))
    await expect_invalid(
        sidecar, _unary("CheckBatch"), batch, "checks[3].create_classroom.end_time"
    )
    # Equal is fine: a zero-length class is odd but not malformed.
    resp = await sidecar.stub.CanCreateClassroom(_create(start_time=ts(T0), end_time=ts(T0)))
    assert resp.decision.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION


async def test_report_started_requires_started_at(sidecar: SidecarUnderTest) -> None:
    req = pb.ReportClassroomStartedRequest(app_id=GOOD, room_id="room-1")
    details = await expect_invalid(sidecar, _unary("ReportClassroomStarted"), req, "started_at")
    assert "required" in details
    # Only a scheduled end is not enough either.
    req.scheduled_end_time.CopyFrom(ts(T0))
    await expect_invalid(sidecar, _unary("ReportClassroomStarted"), req, "started_at")


async def test_report_started_scheduled_end_before_start_is_invalid(
    sidecar: SidecarUnderTest,
) -> None:
    req = _started(started_at=ts(T0), scheduled_end_time=ts(T0 - HOUR))
    details = await expect_invalid(
        sidecar, _unary("ReportClassroomStarted"), req, "scheduled_end_time"
    )
    assert "started_at" in details


async def test_report_ended_requires_ended_at(sidecar: SidecarUnderTest) -> None:
    req = pb.ReportClassroomEndedRequest(app_id=GOOD, room_id="room-1")
    details = await expect_invalid(sidecar, _unary("ReportClassroomEnded"), req, "ended_at")
    assert "required" in details


# -- enums -----------------------------------------------------------------------


@pytest.mark.parametrize("role", [5, 99, -1, 2**31 - 1])
async def test_unknown_role_is_invalid(sidecar: SidecarUnderTest, role: int) -> None:
    details = await expect_invalid(sidecar, _unary("CanEnterClassroom"), _enter(role=role), "role")
    assert str(role) in details
    batch = _batch_at(3, pb.Check(enter_classroom=_enter(role=role)))
    await expect_invalid(sidecar, _unary("CheckBatch"), batch, "checks[3].enter_classroom.role")


async def test_every_known_role_is_accepted(sidecar: SidecarUnderTest) -> None:
    for role in pb.ClassroomRole.values():
        resp = await sidecar.stub.CanEnterClassroom(_enter(role=role), timeout=5)
        assert resp.decision.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION


# -- batches ---------------------------------------------------------------------


async def test_empty_batch_is_invalid(sidecar: SidecarUnderTest) -> None:
    details = await expect_invalid(sidecar, _unary("CheckBatch"), pb.CheckBatchRequest(), "checks")
    assert "at least one" in details


@pytest.mark.parametrize("n", [MAX_BATCH + 1, 10_000])
async def test_oversized_batch_is_invalid(sidecar: SidecarUnderTest, n: int) -> None:
    check = pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id=GOOD))
    req = pb.CheckBatchRequest(checks=[check] * n)
    details = await expect_invalid(sidecar, _unary("CheckBatch"), req, "checks")
    assert str(MAX_BATCH) in details
    assert str(n) in details


async def test_batch_of_exactly_the_maximum_is_answered(sidecar: SidecarUnderTest) -> None:
    check = pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id=GOOD))
    resp = await sidecar.stub.CheckBatch(pb.CheckBatchRequest(checks=[check] * MAX_BATCH))
    assert len(resp.decisions) == MAX_BATCH


@pytest.mark.parametrize("index", [0, 3])
async def test_batch_check_without_kind_is_invalid(sidecar: SidecarUnderTest, index: int) -> None:
    details = await expect_invalid(
        sidecar, _unary("CheckBatch"), _batch_at(index, pb.Check()), f"checks[{index}]"
    )
    assert "exactly one kind" in details


async def test_first_bad_check_of_a_batch_is_named(sidecar: SidecarUnderTest) -> None:
    good = pb.Check(access_recording=_recording())
    bad = pb.Check(enter_classroom=_enter(room_id="bad room"))
    req = pb.CheckBatchRequest(checks=[good, good, good, bad, good, pb.Check()])
    details = await expect_invalid(
        sidecar, _unary("CheckBatch"), req, "checks[3].enter_classroom.room_id"
    )
    assert details.startswith("checks[3].")


# -- bytes that are not a request --------------------------------------------------

GARBAGE = [
    pytest.param(b"\x0a\xff", id="truncated-length"),
    pytest.param(b"\x0a\x02\xff\xfe", id="bad-utf8-string"),
    pytest.param(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", id="bad-varint-tag"),
    pytest.param(b"\x0f", id="end-group-without-start"),
    pytest.param(bytes(range(256)), id="all-bytes"),
]
# Every unary RPC of the service as the .proto defines it, now and later.
METHODS = [
    m.name
    for m in pb.DESCRIPTOR.services_by_name["EnforcementService"].methods
    if not m.server_streaming and not m.client_streaming
]


@pytest.mark.parametrize("payload", GARBAGE)
@pytest.mark.parametrize("method", METHODS)
async def test_garbage_bytes_get_an_error_and_the_server_keeps_serving(
    sidecar: SidecarUnderTest, method: str, payload: bytes
) -> None:
    call = sidecar.channel.unary_unary(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(payload, timeout=5)
    assert_rejected_as_malformed(info.value)
    await assert_still_serving(sidecar)


async def test_garbage_bytes_on_the_stream_rpc(sidecar: SidecarUnderTest) -> None:
    call = sidecar.channel.unary_stream(
        SERVICE + "WatchApplicationStatus", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call(b"\x0a\x02\xff\xfe", timeout=5):
            pass
    assert_rejected_as_malformed(info.value)
    await assert_still_serving(sidecar)


async def test_unknown_method_is_unimplemented(sidecar: SidecarUnderTest) -> None:
    call = sidecar.channel.unary_unary(
        SERVICE + "CanDeleteEverything", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await assert_still_serving(sidecar)


async def test_valid_bytes_on_a_raw_channel_are_answered(sidecar: SidecarUnderTest) -> None:
    # The raw path itself works: the errors above are about the bytes.
    call = sidecar.channel.unary_unary(
        SERVICE + "CanCreateClassroom", request_serializer=None, response_deserializer=None
    )
    raw = await call(pb.CanCreateClassroomRequest(app_id=GOOD).SerializeToString(), timeout=5)
    decision = pb.CanCreateClassroomResponse.FromString(raw).decision
    assert decision.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
