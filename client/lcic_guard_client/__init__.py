"""Python client of the lcic-guard sidecar.

Depends on grpcio and protobuf only::

    from lcic_guard_client import GuardClient

    with GuardClient("127.0.0.1:50051") as guard:
        decision = guard.can_create_classroom("app-1")
        if not decision.allowed:
            print(decision.message)

Decisions are the ``lcic.guard.v1.Decision`` messages of the API (typed);
``Reason`` and ``State`` name their enum values.
"""

from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1.enforcement_pb2 import (
    ApplicationState,
    ApplicationStatus,
    Check,
    ClassroomRole,
    Decision,
    DecisionReason,
)

from lcic_guard_client._cached import CachedGuardClient
from lcic_guard_client._client import (
    DEFAULT_TIMEOUT,
    AsyncGuardClient,
    GuardClient,
    TlsConfig,
    access_recording_check,
    create_classroom_check,
    enter_classroom_check,
)

Reason = DecisionReason
State = ApplicationState

__all__ = [
    "DEFAULT_TIMEOUT",
    "ApplicationState",
    "ApplicationStatus",
    "AsyncGuardClient",
    "CachedGuardClient",
    "Check",
    "ClassroomRole",
    "Decision",
    "DecisionReason",
    "GuardClient",
    "Reason",
    "State",
    "TlsConfig",
    "access_recording_check",
    "create_classroom_check",
    "enter_classroom_check",
    "pb",
]
