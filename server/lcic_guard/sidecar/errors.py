"""How a call that fails ends: the one mapping from what went wrong to the
gRPC status the caller gets.

Every EnforcementService call — a check answered on the serving thread, a
call bridged to the event loop, a call a hook refuses — ends through
:func:`status_of` and :func:`end` (see :mod:`lcic_guard.sidecar.calls`): a
bad field (:class:`~lcic_guard.sidecar.wire.BadRequest`, or bytes that do
not parse) is INVALID_ARGUMENT naming the field; a refusal or a deliberate
abort keeps its own code; a cancelled call is CANCELLED; anything else is
INTERNAL, logged with the call's request id (never grpc's UNKNOWN naming a
Python class).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import NoReturn

import grpc

from lcic_guard import logs
from lcic_guard.sidecar.wire import BadRequest

log = logging.getLogger(__name__)


class Refused(Exception):
    """A call ended on purpose with ``code``: a hook's refusal (auth), or a
    handler on the event loop that aborted the call itself."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def malformed(exc: Exception) -> BadRequest:
    """Bytes that do not parse as the request."""
    return BadRequest(f"request: malformed message: {exc}")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a call that raised ``exc`` ends with."""
    if isinstance(exc, Refused):
        return exc.code, exc.details
    if isinstance(exc, BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, concurrent.futures.CancelledError | asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "call cancelled"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def end(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call on ``context`` as :func:`status_of` says, with a request
    id (the call's own when one is bound, else one made now) returned in the
    trailing metadata and on the log line of an unexpected error."""
    code, details = status_of(exc)
    token = logs.bind_call(context) if logs.request_id.get() is None else None
    try:
        if code is grpc.StatusCode.INTERNAL:
            log.error("unexpected error", exc_info=exc, extra={"event": "rpc_error"})
        context.abort(code, details)
    finally:
        if token is not None:
            logs.request_id.reset(token)
    raise AssertionError("abort returned")  # pragma: no cover
