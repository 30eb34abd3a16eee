"""The client's Python types: enums with Python names, frozen dataclasses
for every answer, and their mapping to and from the wire messages.

The enums are ``IntEnum`` whose values are the wire values, so they compare
equal to the generated constants; their ``str()`` is the short name
(``"OK"``), the same the CLI prints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime
from typing import Any, Self, cast

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb


class _WireEnum(enum.IntEnum):
    """An enum of the API. A value a newer sidecar sends that this client
    does not know reads as ``UNSPECIFIED`` instead of failing the call."""

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        return cls(0) if isinstance(value, int) else None

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


class Reason(_WireEnum):
    """Why a decision was taken (``DecisionReason`` on the wire)."""

    UNSPECIFIED = pb.DECISION_REASON_UNSPECIFIED
    OK = pb.DECISION_REASON_OK
    OVERDUE_GRACE = pb.DECISION_REASON_OVERDUE_GRACE
    ACCOUNT_OVERDUE = pb.DECISION_REASON_ACCOUNT_OVERDUE
    PACKAGE_QUOTA_EXHAUSTED = pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED
    PACKAGE_EXPIRED = pb.DECISION_REASON_PACKAGE_EXPIRED
    RESOURCES_RELEASED = pb.DECISION_REASON_RESOURCES_RELEASED
    ACCOUNT_BANNED = pb.DECISION_REASON_ACCOUNT_BANNED
    IN_PROGRESS_PROTECTED = pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    UNKNOWN_APPLICATION = pb.DECISION_REASON_UNKNOWN_APPLICATION
    STATUS_UNAVAILABLE = pb.DECISION_REASON_STATUS_UNAVAILABLE


class State(_WireEnum):
    """The state of an application's status record."""

    UNSPECIFIED = pb.APPLICATION_STATE_UNSPECIFIED
    ACTIVE = pb.APPLICATION_STATE_ACTIVE
    GRACE = pb.APPLICATION_STATE_GRACE
    SUSPENDED = pb.APPLICATION_STATE_SUSPENDED
    RELEASED = pb.APPLICATION_STATE_RELEASED
    BANNED = pb.APPLICATION_STATE_BANNED


class Role(_WireEnum):
    """The role of a user entering a classroom (recorded for audit only)."""

    UNSPECIFIED = pb.CLASSROOM_ROLE_UNSPECIFIED
    STUDENT = pb.CLASSROOM_ROLE_STUDENT
    TEACHER = pb.CLASSROOM_ROLE_TEACHER
    ASSISTANT = pb.CLASSROOM_ROLE_ASSISTANT
    SUPERVISOR = pb.CLASSROOM_ROLE_SUPERVISOR


class OverrideKind(_WireEnum):
    """A support override of an account."""

    UNSPECIFIED = pb.OVERRIDE_KIND_UNSPECIFIED
    EXTEND_GRACE = pb.OVERRIDE_KIND_EXTEND_GRACE
    HOLD_RELEASE = pb.OVERRIDE_KIND_HOLD_RELEASE
    CLEAR_HOLD = pb.OVERRIDE_KIND_CLEAR_HOLD


class DeadlineKind(_WireEnum):
    """What happens at a :class:`Deadline`."""

    UNSPECIFIED = pb.DEADLINE_KIND_UNSPECIFIED
    GRACE_END = pb.DEADLINE_KIND_GRACE_END
    RELEASE = pb.DEADLINE_KIND_RELEASE
    PACKAGE_EXPIRY = pb.DEADLINE_KIND_PACKAGE_EXPIRY
    PACKAGE_START = pb.DEADLINE_KIND_PACKAGE_START


# -- conversions --------------------------------------------------------------------


def _time(msg: Any, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    ts: Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=UTC)


def timestamp(value: datetime, name: str) -> Timestamp:
    if value.tzinfo is None:
        from lcic_guard_client._errors import InvalidRequest

        raise InvalidRequest(f"{name}: must be timezone-aware (UTC)", field=name)
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _reasons(values: Any) -> tuple[Reason, ...]:
    return tuple(Reason(v) for v in values)


def _fill(msg: Any, obj: Any) -> None:
    # Every dataclass here names its fields as the message does, so one
    # generic walk writes any of them back.
    for f in fields(obj):  # obj: any of this module's dataclasses (Any: fields() is typed for one)
        value = getattr(obj, f.name)
        if value is None:
            continue
        if isinstance(value, datetime):
            getattr(msg, f.name).CopyFrom(timestamp(value, f.name))
        elif isinstance(value, tuple):
            target = getattr(msg, f.name)
            for item in value:
                if is_dataclass(item):
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif is_dataclass(value):
            _fill(getattr(msg, f.name), value)
        else:
            setattr(msg, f.name, value)


class _Wire:
    """Mixin: the wire message of the same name, for callers who want it."""

    _message: type[Message]

    def to_proto(self) -> Any:
        """This value as the generated ``lcic.guard.v1`` message."""
        msg = self._message()
        _fill(msg, self)
        return msg


# -- answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision(_Wire):
    """The answer to one check. Act on ``allowed``; ``message`` says what the
    customer can do. ``valid_until`` is the first instant at which the same
    check, on the same billing facts, answers otherwise (None: none known)."""

    allowed: bool
    reason: Reason
    reasons: tuple[Reason, ...] = ()
    message: str = ""
    grace_ends_at: datetime | None = None
    suspended_at: datetime | None = None
    release_at: datetime | None = None
    protected_until: datetime | None = None
    status_version: int = 0
    degraded: bool = False
    state: State = State.UNSPECIFIED
    shadow: bool = False
    valid_until: datetime | None = None

    _message = pb.Decision

    @classmethod
    def from_proto(cls, msg: pb.Decision) -> Decision:
        return cls(
            allowed=msg.allowed,
            reason=Reason(msg.reason),
            reasons=_reasons(msg.reasons),
            message=msg.message,
            grace_ends_at=_time(msg, "grace_ends_at"),
            suspended_at=_time(msg, "suspended_at"),
            release_at=_time(msg, "release_at"),
            protected_until=_time(msg, "protected_until"),
            status_version=msg.status_version,
            degraded=msg.degraded,
            state=State(msg.state),
            shadow=msg.shadow,
            valid_until=_time(msg, "valid_until"),
        )


@dataclass(frozen=True)
class StatusTransition(_Wire):
    """A change of state already known to lie ahead."""

    at: datetime | None
    state: State
    reasons: tuple[Reason, ...] = ()

    _message = pb.StatusTransition

    @classmethod
    def from_proto(cls, msg: pb.StatusTransition) -> StatusTransition:
        return cls(_time(msg, "at"), State(msg.state), _reasons(msg.reasons))


@dataclass(frozen=True)
class ReasonFact(_Wire):
    """A billing event behind one reason of a status."""

    reason: Reason
    event_id: str
    event_type: str
    occurred_at: datetime | None
    detail: str

    _message = pb.ReasonFact

    @classmethod
    def from_proto(cls, msg: pb.ReasonFact) -> ReasonFact:
        return cls(
            Reason(msg.reason), msg.event_id, msg.event_type, _time(msg, "occurred_at"), msg.detail
        )


@dataclass(frozen=True)
class Deadline(_Wire):
    """A known future moment that matters to an application."""

    kind: DeadlineKind
    at: datetime | None
    description: str
    event_id: str = ""

    _message = pb.Deadline

    @classmethod
    def from_proto(cls, msg: pb.Deadline) -> Deadline:
        return cls(DeadlineKind(msg.kind), _time(msg, "at"), msg.description, msg.event_id)


@dataclass(frozen=True)
class SuspensionWarning(_Wire):
    """A stop of service known to lie ahead; ``scope`` is "account" or "app"."""

    at: datetime | None
    reason: Reason
    scope: str

    _message = pb.SuspensionWarning

    @classmethod
    def from_proto(cls, msg: pb.SuspensionWarning) -> SuspensionWarning:
        return cls(_time(msg, "at"), Reason(msg.reason), msg.scope)


@dataclass(frozen=True)
class Override(_Wire):
    """A support override of an account, as recorded (the audit trail)."""

    event_id: str
    kind: OverrideKind
    account_id: str
    actor: str
    reason: str
    occurred_at: datetime | None = None
    recorded_at: datetime | None = None
    until: datetime | None = None
    effect: str = ""

    _message = pb.Override

    @classmethod
    def from_proto(cls, msg: pb.Override) -> Override:
        return cls(
            event_id=msg.event_id,
            kind=OverrideKind(msg.kind),
            account_id=msg.account_id,
            actor=msg.actor,
            reason=msg.reason,
            occurred_at=_time(msg, "occurred_at"),
            recorded_at=_time(msg, "recorded_at"),
            until=_time(msg, "until"),
            effect=msg.effect,
        )


@dataclass(frozen=True)
class ApplicationStatus(_Wire):
    """An application's status record and the rules behind it."""

    app_id: str
    account_id: str
    state: State
    reasons: tuple[Reason, ...] = ()
    grace_ends_at: datetime | None = None
    suspended_at: datetime | None = None
    release_at: datetime | None = None
    version: int = 0
    updated_at: datetime | None = None
    upcoming: tuple[StatusTransition, ...] = ()
    rules: tuple[str, ...] = ()
    degraded: bool = False
    facts: tuple[ReasonFact, ...] = ()
    deadlines: tuple[Deadline, ...] = ()
    message: str = ""
    suspension_effective_at: datetime | None = None
    overrides: tuple[Override, ...] = ()
    warnings: tuple[SuspensionWarning, ...] = ()

    _message = pb.ApplicationStatus

    @classmethod
    def from_proto(cls, msg: pb.ApplicationStatus) -> ApplicationStatus:
        return cls(
            app_id=msg.app_id,
            account_id=msg.account_id,
            state=State(msg.state),
            reasons=_reasons(msg.reasons),
            grace_ends_at=_time(msg, "grace_ends_at"),
            suspended_at=_time(msg, "suspended_at"),
            release_at=_time(msg, "release_at"),
            version=msg.version,
            updated_at=_time(msg, "updated_at"),
            upcoming=tuple(StatusTransition.from_proto(t) for t in msg.upcoming),
            rules=tuple(msg.rules),
            degraded=msg.degraded,
            facts=tuple(ReasonFact.from_proto(f) for f in msg.facts),
            deadlines=tuple(Deadline.from_proto(d) for d in msg.deadlines),
            message=msg.message,
            suspension_effective_at=_time(msg, "suspension_effective_at"),
            overrides=tuple(Override.from_proto(o) for o in msg.overrides),
            warnings=tuple(SuspensionWarning.from_proto(w) for w in msg.warnings),
        )


@dataclass(frozen=True)
class Preview(_Wire):
    """What an application's three checks will answer at ``at`` if no new
    billing event arrives meanwhile."""

    app_id: str
    at: datetime | None
    state: State
    reasons: tuple[Reason, ...]
    create_classroom: Decision
    enter_classroom: Decision
    access_recording: Decision
    rules: tuple[str, ...] = ()
    warnings: tuple[SuspensionWarning, ...] = ()

    _message = pb.PreviewApplicationResponse

    @classmethod
    def from_proto(cls, msg: pb.PreviewApplicationResponse) -> Preview:
        return cls(
            app_id=msg.app_id,
            at=_time(msg, "at"),
            state=State(msg.state),
            reasons=_reasons(msg.reasons),
            create_classroom=Decision.from_proto(msg.create_classroom),
            enter_classroom=Decision.from_proto(msg.enter_classroom),
            access_recording=Decision.from_proto(msg.access_recording),
            rules=tuple(msg.rules),
            warnings=tuple(SuspensionWarning.from_proto(w) for w in msg.warnings),
        )


@dataclass(frozen=True)
class ScheduledDecisions(_Wire):
    """The answers of the three checks from ``starts_at`` on."""

    starts_at: datetime | None
    create_classroom: Decision
    enter_classroom: Decision
    access_recording: Decision

    _message = pb.ScheduledDecisions

    @classmethod
    def from_proto(cls, msg: pb.ScheduledDecisions) -> ScheduledDecisions:
        return cls(
            starts_at=_time(msg, "starts_at"),
            create_classroom=Decision.from_proto(msg.create_classroom),
            enter_classroom=Decision.from_proto(msg.enter_classroom),
            access_recording=Decision.from_proto(msg.access_recording),
        )


@dataclass(frozen=True)
class StoreDiscontinuity(_Wire):
    """The sidecar found that the store may have lost acknowledged writes
    (``cause``: "run_id_changed", "version_went_back", "stream_id_went_back"
    or "new_generation"): every answer kept from before is void."""

    cause: str
    detected_at: datetime | None

    _message = pb.StoreDiscontinuity

    @classmethod
    def from_proto(cls, msg: pb.StoreDiscontinuity) -> StoreDiscontinuity:
        return cls(msg.cause, _time(msg, "detected_at"))


@dataclass(frozen=True)
class StatusUpdate(_Wire):
    """One message of a watch: a status as it is now with its decision
    schedule, a store discontinuity, or (neither) a heartbeat saying the
    sidecar's view is still current."""

    status: ApplicationStatus | None = None
    schedule: tuple[ScheduledDecisions, ...] = ()
    discontinuity: StoreDiscontinuity | None = None

    _message = pb.WatchApplicationStatusResponse

    @property
    def is_heartbeat(self) -> bool:
        return self.status is None and self.discontinuity is None

    @classmethod
    def from_proto(cls, msg: pb.WatchApplicationStatusResponse) -> StatusUpdate:
        return cls(
            status=ApplicationStatus.from_proto(msg.status) if msg.HasField("status") else None,
            schedule=tuple(ScheduledDecisions.from_proto(s) for s in msg.schedule),
            discontinuity=(
                StoreDiscontinuity.from_proto(msg.discontinuity)
                if msg.HasField("discontinuity")
                else None
            ),
        )


# -- checks of a batch ------------------------------------------------------------------


@dataclass(frozen=True)
class CreateClassroomCheck:
    """A CanCreateClassroom check, for ``check_batch``."""

    app_id: str
    room_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None

    def __post_init__(self) -> None:
        # Refused when built, not when a batch is sent: the caller's bug shows
        # where it was made.
        create_request(self)

    def to_proto(self) -> pb.Check:
        return pb.Check(create_classroom=create_request(self))


@dataclass(frozen=True)
class EnterClassroomCheck:
    """A CanEnterClassroom check, for ``check_batch``."""

    app_id: str
    room_id: str
    user_id: str = ""
    role: Role = Role.UNSPECIFIED

    def to_proto(self) -> pb.Check:
        return pb.Check(enter_classroom=enter_request(self))


@dataclass(frozen=True)
class AccessRecordingCheck:
    """A CanAccessRecording check, for ``check_batch``."""

    app_id: str
    recording_id: str
    room_id: str = ""

    def to_proto(self) -> pb.Check:
        return pb.Check(access_recording=recording_request(self))


Check = CreateClassroomCheck | EnterClassroomCheck | AccessRecordingCheck


def _opt_ts(value: datetime | None, name: str) -> Timestamp | None:
    return None if value is None else timestamp(value, name)


def create_request(c: CreateClassroomCheck) -> pb.CanCreateClassroomRequest:
    return pb.CanCreateClassroomRequest(
        app_id=c.app_id,
        room_id=c.room_id,
        start_time=_opt_ts(c.start_time, "start_time"),
        end_time=_opt_ts(c.end_time, "end_time"),
    )


def enter_request(c: EnterClassroomCheck) -> pb.CanEnterClassroomRequest:
    return pb.CanEnterClassroomRequest(
        app_id=c.app_id,
        room_id=c.room_id,
        user_id=c.user_id,
        role=cast("pb.ClassroomRole.ValueType", int(c.role)),
    )


def recording_request(c: AccessRecordingCheck) -> pb.CanAccessRecordingRequest:
    return pb.CanAccessRecordingRequest(
        app_id=c.app_id, recording_id=c.recording_id, room_id=c.room_id
    )


def create_classroom_check(
    app_id: str,
    room_id: str = "",
    start_time: datetime | None = None,
    end_time: datetime | None = None,
) -> CreateClassroomCheck:
    """A CanCreateClassroom check, for ``check_batch``."""
    return CreateClassroomCheck(app_id, room_id, start_time, end_time)


def enter_classroom_check(
    app_id: str, room_id: str, user_id: str = "", role: Role = Role.UNSPECIFIED
) -> EnterClassroomCheck:
    """A CanEnterClassroom check, for ``check_batch``."""
    return EnterClassroomCheck(app_id, room_id, user_id, Role(role))


def access_recording_check(
    app_id: str, recording_id: str, room_id: str = ""
) -> AccessRecordingCheck:
    """A CanAccessRecording check, for ``check_batch``."""
    return AccessRecordingCheck(app_id, recording_id, room_id)
