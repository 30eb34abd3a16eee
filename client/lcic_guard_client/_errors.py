"""One family of exceptions for every failure of a call, so that a caller
never imports grpc to handle one. The gRPC error stays the ``__cause__``.

A denial is not an error: it is a :class:`~lcic_guard_client.Decision` with
``allowed`` false.
"""

from __future__ import annotations

import re

import grpc

# The sidecar names the offending field first: "checks[2].app_id: required".
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


class GuardError(Exception):
    """A call to the sidecar failed. ``code`` is the gRPC status name
    (e.g. ``"UNAVAILABLE"``), ``details`` the sidecar's words."""

    def __init__(self, message: str, *, code: str = "UNKNOWN", details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or message


class SidecarUnavailable(GuardError):
    """The sidecar could not be reached or did not answer within the
    deadline (not running, restarting, overloaded, network down). What a
    check should do then is the caller's failure mode."""


class PermissionDenied(GuardError):
    """The sidecar refused the caller: no or a wrong credential
    (UNAUTHENTICATED) or a missing scope (PERMISSION_DENIED)."""


class InvalidRequest(GuardError, ValueError):
    """The request is malformed; ``field`` names the offending field when
    the sidecar (or the client, before sending) said which."""

    def __init__(
        self, message: str, *, field: str = "", code: str = "INVALID_ARGUMENT", details: str = ""
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.field = field


class NotFound(GuardError):
    """The application or account is unknown to the sidecar (status,
    preview, overrides). Checks never raise it: they answer
    ``UNKNOWN_APPLICATION``."""


_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_DENIED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


def from_rpc(exc: grpc.RpcError, target: str) -> GuardError:
    """The :class:`GuardError` for a failed call; raise it ``from exc``."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = str((details_fn() if callable(details_fn) else None) or "")
    name = code.name
    if code in _UNAVAILABLE:
        return SidecarUnavailable(
            f"the sidecar at {target} is unavailable ({name}): {details}",
            code=name,
            details=details,
        )
    if code in _DENIED:
        return PermissionDenied(
            f"the sidecar at {target} refused the call ({name}): {details}",
            code=name,
            details=details,
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        m = _FIELD.match(details)
        return InvalidRequest(details, field=m.group(1) if m else "", details=details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, code=name, details=details)
    return GuardError(
        f"the sidecar at {target} answered {name}: {details}", code=name, details=details
    )
