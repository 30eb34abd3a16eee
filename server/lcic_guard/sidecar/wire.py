"""The wire contract: validation of requests and conversion to and from the
policy's types. Everything here is pure; the servicer calls it.

A request that fails validation raises :class:`BadRequest`, whose message
starts with the field path (``checks[3].enter_classroom.room_id: ...``); the
servicer turns it into INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.domain.evidence import Deadline, ReasonFact, deadlines, reason_facts
from lcic_guard.domain.facts import ID_PATTERN, Fact, valid_id
from lcic_guard.domain.policy import (
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Reason,
    Room,
    Segment,
    State,
    decide,
    explain,
    status_message,
)
from lcic_guard.domain.time import MAX_TIME, MIN_TIME, Millis, format_time
from lcic_guard.domain.warnings import scheduled_suspensions
from lcic_guard.sidecar.checker import CheckRequest

MAX_BATCH: Final = 1000
MAX_WATCH_IDS: Final = 1000


_RANGE: Final = f"{format_time(MIN_TIME)[:10]} to {format_time(MAX_TIME)[:10]}"
# What a protobuf Timestamp can hold: a time computed from a stored one (an
# alert's grace end, a release date) is clamped to it rather than failing the
# answer.
_PB_MIN: Final = -62_135_596_800_000
_PB_MAX: Final = 253_402_300_799_999


class BadRequest(ValueError):
    """A request field is missing or malformed; the message names it."""


_REASON_TO_PB: Final = {r: getattr(pb, f"DECISION_REASON_{r.value}") for r in Reason}
_STATE_TO_PB: Final = {s: getattr(pb, f"APPLICATION_STATE_{s.value}") for s in State}
_ROLES: Final = frozenset(pb.ClassroomRole.values())


def require_id(value: str, field: str) -> str:
    if not value:
        raise BadRequest(f"{field}: required")
    if not valid_id(value):
        raise BadRequest(f"{field}: must be 1-64 characters from [A-Za-z0-9._:-]")
    return value


def optional_id(value: str, field: str) -> str | None:
    return require_id(value, field) if value else None


def to_millis(ts: Timestamp, field: str) -> Millis:
    if not 0 <= ts.nanos < 1_000_000_000:
        raise BadRequest(f"{field}: nanos out of range")
    ms = ts.seconds * 1000 + ts.nanos // 1_000_000
    if not MIN_TIME <= ms <= MAX_TIME:
        raise BadRequest(f"{field}: out of range ({_RANGE})")
    return ms


def optional_millis(msg: Message, name: str, field: str) -> Millis | None:
    if not msg.HasField(name):
        return None
    return to_millis(getattr(msg, name), field)


def required_millis(msg: Message, name: str, field: str) -> Millis:
    value = optional_millis(msg, name, field)
    if value is None:
        raise BadRequest(f"{field}: required")
    return value


def timestamp(ms: Millis | None) -> Timestamp | None:
    if ms is None:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(min(max(int(ms), _PB_MIN), _PB_MAX))
    return ts


# -- requests -----------------------------------------------------------------
#
# Every check is validated on the hot path, so these are written for speed:
# field paths are only built for an error (a batch item is validated again
# with its path when it fails). (A memo of ids found valid was tried: with
# 100,000 applications checked at random it was cleared too often to pay.)

_fullmatch: Final = ID_PATTERN.fullmatch


def _ok_id(value: str) -> bool:
    return bool(value) and _fullmatch(value) is not None


def _ok_times(req: pb.CanCreateClassroomRequest) -> bool:
    """True when start and end times, if given, hold nothing to object to."""
    has = req.HasField
    start = end = None
    if has("start_time"):
        ts = req.start_time
        nanos = ts.nanos
        start = ts.seconds * 1000 + nanos // 1_000_000
        if not (0 <= nanos < 1_000_000_000 and MIN_TIME <= start <= MAX_TIME):
            return False
    if has("end_time"):
        ts = req.end_time
        nanos = ts.nanos
        end = ts.seconds * 1000 + nanos // 1_000_000
        if not (0 <= nanos < 1_000_000_000 and MIN_TIME <= end <= MAX_TIME):
            return False
        return start is None or end >= start
    return True


def create_request(req: pb.CanCreateClassroomRequest, prefix: str = "") -> CheckRequest:
    app_id, room_id = req.app_id, req.room_id
    if _ok_id(app_id) and (not room_id or _fullmatch(room_id)) and _ok_times(req):
        return CheckRequest(Check.CREATE_CLASSROOM, app_id, room_id or None)
    # Something is wrong: say what, field by field.
    require_id(app_id, prefix + "app_id")
    optional_id(room_id, prefix + "room_id")
    start = optional_millis(req, "start_time", prefix + "start_time")
    end = optional_millis(req, "end_time", prefix + "end_time")
    if start is not None and end is not None and end < start:
        raise BadRequest(f"{prefix}end_time: must not be before start_time")
    raise AssertionError("a request both valid and not")  # pragma: no cover


def enter_request(req: pb.CanEnterClassroomRequest, prefix: str = "") -> CheckRequest:
    app_id, room_id, user_id = req.app_id, req.room_id, req.user_id
    if (
        _ok_id(app_id)
        and room_id
        and _fullmatch(room_id)
        and (not user_id or _fullmatch(user_id))
        and req.role in _ROLES
    ):
        return CheckRequest(Check.ENTER_CLASSROOM, app_id, room_id)
    require_id(app_id, prefix + "app_id")
    require_id(room_id, prefix + "room_id")
    optional_id(user_id, prefix + "user_id")
    raise BadRequest(f"{prefix}role: unknown value {req.role}")


def recording_request(req: pb.CanAccessRecordingRequest, prefix: str = "") -> CheckRequest:
    app_id, recording_id, room_id = req.app_id, req.recording_id, req.room_id
    if (
        _ok_id(app_id)
        and recording_id
        and _fullmatch(recording_id)
        and (not room_id or _fullmatch(room_id))
    ):
        return CheckRequest(Check.ACCESS_RECORDING, app_id, room_id or None)
    require_id(app_id, prefix + "app_id")
    require_id(recording_id, prefix + "recording_id")
    optional_id(room_id, prefix + "room_id")
    raise AssertionError("a request both valid and not")  # pragma: no cover


_BATCH_KINDS: Final[dict[str, Callable[..., CheckRequest]]] = {
    "create_classroom": create_request,
    "enter_classroom": enter_request,
    "access_recording": recording_request,
}


def batch_requests(req: pb.CheckBatchRequest) -> list[CheckRequest]:
    n = len(req.checks)
    if n == 0:
        raise BadRequest("checks: at least one check is required")
    if n > MAX_BATCH:
        raise BadRequest(f"checks: at most {MAX_BATCH} checks per batch, got {n}")
    out: list[CheckRequest] = []
    append, kinds, create = out.append, _BATCH_KINDS, Check.CREATE_CLASSROOM
    for i, check in enumerate(req.checks):
        kind = check.WhichOneof("kind")
        if kind == "create_classroom":  # the common item, inline
            item = check.create_classroom
            app_id, room_id = item.app_id, item.room_id
            if (
                app_id
                and _fullmatch(app_id)
                and (not room_id or _fullmatch(room_id))
                and _ok_times(item)
            ):
                append(CheckRequest(create, app_id, room_id or None))
                continue
        if kind is None or (validate := kinds.get(kind)) is None:
            raise BadRequest(f"checks[{i}]: exactly one kind of check must be set")
        try:
            append(validate(getattr(check, kind)))
        except BadRequest:
            validate(getattr(check, kind), f"checks[{i}].{kind}.")
            raise
    return out


def watch_ids(req: pb.WatchApplicationStatusRequest) -> list[str]:
    if len(req.app_ids) > MAX_WATCH_IDS:
        raise BadRequest(f"app_ids: at most {MAX_WATCH_IDS} ids, got {len(req.app_ids)}")
    return [require_id(a, f"app_ids[{i}]") for i, a in enumerate(req.app_ids)]


# -- answers ------------------------------------------------------------------


def _set_time(msg: object, name: str, ms: Millis | None) -> None:
    if ms is not None:
        getattr(msg, name).FromMilliseconds(min(max(int(ms), _PB_MIN), _PB_MAX))


def decision_to_pb(d: Decision) -> pb.Decision:
    out = pb.Decision(
        allowed=d.allowed,
        reason=_REASON_TO_PB[d.reason],
        reasons=[_REASON_TO_PB[r] for r in d.reasons],
        message=d.message,
        status_version=d.status_version,
        degraded=d.degraded,
        state=_STATE_TO_PB[d.state] if d.state is not None else pb.APPLICATION_STATE_UNSPECIFIED,
    )
    _set_time(out, "grace_ends_at", d.grace_ends_at)
    _set_time(out, "suspended_at", d.suspended_at)
    _set_time(out, "release_at", d.release_at)
    _set_time(out, "protected_until", d.protected_until)
    _set_time(out, "valid_until", d.valid_until)
    return out


def _transitions(segments: Iterable[Segment]) -> list[pb.StatusTransition]:
    out = []
    for seg in segments:
        t = pb.StatusTransition(
            state=_STATE_TO_PB[seg.state], reasons=[_REASON_TO_PB[r] for r in seg.reasons]
        )
        _set_time(t, "at", seg.starts_at)
        out.append(t)
    return out


def status_to_pb(status: AppStatus, now: Millis, *, degraded: bool = False) -> pb.ApplicationStatus:
    seg = status.at(now)
    out = pb.ApplicationStatus(
        app_id=status.app_id,
        account_id=status.account_id,
        state=_STATE_TO_PB[seg.state],
        reasons=[_REASON_TO_PB[r] for r in seg.reasons],
        version=status.version,
        upcoming=_transitions(status.upcoming(now)),
        rules=list(explain(seg)),
        degraded=degraded,
    )
    _set_time(out, "grace_ends_at", seg.grace_ends_at)
    _set_time(out, "suspended_at", seg.suspended_at)
    _set_time(out, "release_at", seg.release_at)
    _set_time(out, "updated_at", status.updated_at or None)
    return out


def schedule_to_pb(
    status: AppStatus, now: Millis, cfg: PolicyConfig
) -> list[pb.ScheduledDecisions]:
    """The decisions of every segment from the one in force at ``now`` on."""
    out = []
    current = status.at(now)
    for seg in status.segments:
        if seg.starts_at < current.starts_at:
            continue
        at = max(seg.starts_at, now) if seg is current else seg.starts_at
        entry = pb.ScheduledDecisions(
            create_classroom=decision_to_pb(decide(Check.CREATE_CLASSROOM, status, at, cfg)),
            enter_classroom=decision_to_pb(decide(Check.ENTER_CLASSROOM, status, at, cfg)),
            access_recording=decision_to_pb(decide(Check.ACCESS_RECORDING, status, at, cfg)),
        )
        _set_time(entry, "starts_at", seg.starts_at)
        out.append(entry)
    return out


def watch_response(
    status: AppStatus, now: Millis, cfg: PolicyConfig
) -> pb.WatchApplicationStatusResponse:
    return pb.WatchApplicationStatusResponse(
        status=status_to_pb(status, now), schedule=schedule_to_pb(status, now, cfg)
    )


# -- explained status and preview ------------------------------------------------


def facts_to_pb(facts: Iterable[ReasonFact]) -> list[pb.ReasonFact]:
    out = []
    for f in facts:
        msg = pb.ReasonFact(
            reason=_REASON_TO_PB[f.reason],
            event_id=f.event_id,
            event_type=f.event_type,
            detail=f.detail,
        )
        if f.event_id:
            msg.occurred_at.FromMilliseconds(f.occurred_at)
        out.append(msg)
    return out


def deadlines_to_pb(items: Iterable[Deadline]) -> list[pb.Deadline]:
    out = []
    for d in items:
        msg = pb.Deadline(
            kind=getattr(pb, f"DEADLINE_KIND_{d.kind.value}"),
            description=d.description,
            event_id=d.event_id,
        )
        msg.at.FromMilliseconds(d.at)
        out.append(msg)
    return out


def warnings_to_pb(status: AppStatus, now: Millis) -> list[pb.SuspensionWarning]:
    """The suspensions ahead of ``now`` (what suspension_scheduled warns of)."""
    out = []
    for w in scheduled_suspensions({status.app_id: status}, now):
        msg = pb.SuspensionWarning(reason=_REASON_TO_PB[w.reason], scope=w.scope)
        _set_time(msg, "at", w.at)
        out.append(msg)
    return out


def explained_status(
    status: AppStatus, facts: Sequence[Fact] | None, now: Millis, cfg: PolicyConfig
) -> pb.ApplicationStatus:
    """The status record with its facts, deadlines and advice (GetApplicationStatus),
    the facts read with the policy ``cfg`` the status was computed with."""
    out = status_to_pb(status, now)
    seg = status.at(now)
    if seg.suspended_at is not None:  # R6: when the suspension took effect for classes
        effective = seg.effective_at if seg.effective_at is not None else seg.suspended_at
        out.suspension_effective_at.FromMilliseconds(effective)
    out.message = status_message(seg, now)
    out.warnings.extend(warnings_to_pb(status, now))
    if facts is not None:
        out.facts.extend(facts_to_pb(reason_facts(status, facts, now, cfg)))
        out.deadlines.extend(deadlines_to_pb(deadlines(status, facts, now, cfg)))
    return out


def preview(
    status: AppStatus, room: Room | None, at: Millis, cfg: PolicyConfig
) -> pb.PreviewApplicationResponse:
    """What the three checks answer at ``at`` if no new billing fact arrives."""
    seg = status.at(at)
    out = pb.PreviewApplicationResponse(
        app_id=status.app_id,
        state=_STATE_TO_PB[seg.state],
        reasons=[_REASON_TO_PB[r] for r in seg.reasons],
        create_classroom=decision_to_pb(decide(Check.CREATE_CLASSROOM, status, at, cfg)),
        enter_classroom=decision_to_pb(decide(Check.ENTER_CLASSROOM, status, at, cfg, room)),
        access_recording=decision_to_pb(decide(Check.ACCESS_RECORDING, status, at, cfg)),
        rules=list(explain(seg)),
        warnings=warnings_to_pb(status, at),
    )
    out.at.FromMilliseconds(at)
    return out
