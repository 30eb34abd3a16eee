"""Python client of the lcic-guard sidecar.

Depends on grpcio and protobuf only, and never needs either imported::

    from lcic_guard_client import GuardClient, Reason, SidecarUnavailable

    with GuardClient("127.0.0.1:50051") as guard:
        try:
            decision = guard.can_create_classroom("app-1")
        except SidecarUnavailable:
            ...  # the caller's failure mode
        if not decision.allowed:
            print(decision.reason, decision.message)  # ACCOUNT_OVERDUE Top up ...

Answers are frozen dataclasses (:class:`Decision`, :class:`ApplicationStatus`,
:class:`Preview`, :class:`Override`, :class:`StatusUpdate`) with ``datetime``
fields in UTC and enums with Python names (:class:`Reason`, :class:`State`,
:class:`Role`, :class:`OverrideKind`, :class:`DeadlineKind`). Every failure
of a call is a :class:`GuardError`. The generated gRPC code stays available
as ``lcic.guard.v1`` (each answer's ``to_proto()`` gives its message), but it
is not this package's API.
"""

from lcic_guard_client._cached import CachedGuardClient
from lcic_guard_client._client import (
    DEFAULT_TIMEOUT,
    AsyncGuardClient,
    AsyncWatch,
    GuardClient,
    TlsConfig,
    Watch,
)
from lcic_guard_client._errors import (
    GuardError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    SidecarUnavailable,
)
from lcic_guard_client._types import (
    AccessRecordingCheck,
    ApplicationStatus,
    Check,
    CreateClassroomCheck,
    Deadline,
    DeadlineKind,
    Decision,
    EnterClassroomCheck,
    Override,
    OverrideKind,
    Preview,
    Reason,
    ReasonFact,
    Role,
    ScheduledDecisions,
    State,
    StatusTransition,
    StatusUpdate,
    StoreDiscontinuity,
    SuspensionWarning,
    access_recording_check,
    create_classroom_check,
    enter_classroom_check,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AccessRecordingCheck",
    "ApplicationStatus",
    "AsyncGuardClient",
    "AsyncWatch",
    "CachedGuardClient",
    "Check",
    "CreateClassroomCheck",
    "Deadline",
    "DeadlineKind",
    "Decision",
    "EnterClassroomCheck",
    "GuardClient",
    "GuardError",
    "InvalidRequest",
    "NotFound",
    "Override",
    "OverrideKind",
    "PermissionDenied",
    "Preview",
    "Reason",
    "ReasonFact",
    "Role",
    "ScheduledDecisions",
    "SidecarUnavailable",
    "State",
    "StatusTransition",
    "StatusUpdate",
    "StoreDiscontinuity",
    "SuspensionWarning",
    "TlsConfig",
    "Watch",
    "access_recording_check",
    "create_classroom_check",
    "enter_classroom_check",
]
