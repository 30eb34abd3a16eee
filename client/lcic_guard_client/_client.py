from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, cast

import grpc
import grpc.aio
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

from lcic_guard_client._errors import InvalidRequest, from_rpc
from lcic_guard_client._types import (
    AccessRecordingCheck,
    ApplicationStatus,
    Check,
    CreateClassroomCheck,
    Decision,
    EnterClassroomCheck,
    Override,
    OverrideKind,
    Preview,
    Role,
    StatusUpdate,
    create_request,
    enter_request,
    recording_request,
    timestamp,
)

DEFAULT_TIMEOUT: Final = 0.5
"""Seconds a call may take, retries included, unless the call says otherwise."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel: the CA to trust and, for mutual TLS, the client's
    own certificate and key. Each is PEM bytes or a path to a PEM file."""

    root_certificates: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _service_config(attempts: int) -> str:
    # Retries are gRPC's own, and only for UNAVAILABLE: a denial is an
    # answer, and INVALID_ARGUMENT will not get better by asking again.
    # waitForReady: while the sidecar cannot be reached (restarting), a call
    # waits for it within its deadline instead of failing at once; without
    # it every retry fails too, in the ~30 ms the retry backoff spans.
    policy = {
        "methodConfig": [
            {
                "name": [{"service": "lcic.guard.v1.EnforcementService"}],
                "waitForReady": True,
                "retryPolicy": {
                    "maxAttempts": max(2, attempts),
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return json.dumps(policy)


def _channel_options(
    retries: int, options: Sequence[tuple[str, str | int]] | None, tls: TlsConfig | None
) -> list[tuple[str, str | int]]:
    out: list[tuple[str, str | int]] = [("grpc.enable_retries", 1 if retries > 0 else 0)]
    if retries > 0:
        out.append(("grpc.service_config", _service_config(retries + 1)))
        # Reconnect soon enough for a waiting call to see a restarted sidecar
        # (gRPC's default first reconnect is after ~1 s, past the deadline).
        out += [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 500)]
    if tls is not None and tls.server_name:
        out.append(("grpc.ssl_target_name_override", tls.server_name))
    out += list(options or [])
    return out


# -- requests --------------------------------------------------------------------------


def _batch(checks: Sequence[Check]) -> pb.CheckBatchRequest:
    return pb.CheckBatchRequest(checks=[c.to_proto() for c in checks])


def _started(
    app_id: str, room_id: str, started_at: datetime, scheduled_end_time: datetime | None
) -> pb.ReportClassroomStartedRequest:
    return pb.ReportClassroomStartedRequest(
        app_id=app_id,
        room_id=room_id,
        started_at=timestamp(started_at, "started_at"),
        scheduled_end_time=(
            None
            if scheduled_end_time is None
            else timestamp(scheduled_end_time, "scheduled_end_time")
        ),
    )


def _ended(app_id: str, room_id: str, ended_at: datetime) -> pb.ReportClassroomEndedRequest:
    return pb.ReportClassroomEndedRequest(
        app_id=app_id, room_id=room_id, ended_at=timestamp(ended_at, "ended_at")
    )


def _preview(app_id: str, at: datetime, room_id: str) -> pb.PreviewApplicationRequest:
    return pb.PreviewApplicationRequest(app_id=app_id, at=timestamp(at, "at"), room_id=room_id)


def _override(
    account_id: str, kind: OverrideKind, reason: str, until: datetime | None
) -> pb.ApplyOverrideRequest:
    kind = OverrideKind(kind)
    if kind == OverrideKind.EXTEND_GRACE and until is None:
        raise InvalidRequest("until: required for EXTEND_GRACE", field="until")
    if kind != OverrideKind.EXTEND_GRACE and until is not None:
        raise InvalidRequest(f"until: only for EXTEND_GRACE, not {kind}", field="until")
    return pb.ApplyOverrideRequest(
        account_id=account_id,
        kind=cast("pb.OverrideKind.ValueType", int(kind)),
        reason=reason,
        until=None if until is None else timestamp(until, "until"),
    )


# -- watches ---------------------------------------------------------------------------


class Watch:
    """A WatchApplicationStatus stream: iterate it for :class:`StatusUpdate`
    messages; :meth:`cancel` (or leaving the ``with`` block) ends it, and the
    iteration then simply stops. A broken stream raises a
    :class:`~lcic_guard_client.GuardError`."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target
        self._cancelled = False

    def __iter__(self) -> Iterator[StatusUpdate]:
        return self

    def __next__(self) -> StatusUpdate:
        try:
            msg: pb.WatchApplicationStatusResponse = next(self._call)
        except grpc.RpcError as exc:
            if self._cancelled:
                raise StopIteration from None
            raise from_rpc(exc, self._target) from exc
        return StatusUpdate.from_proto(msg)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


class AsyncWatch:
    """The asyncio twin of :class:`Watch` (``async for``, ``async with``)."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target
        self._cancelled = False
        self._stream: AsyncIterator[pb.WatchApplicationStatusResponse] = call.__aiter__()

    def __aiter__(self) -> AsyncIterator[StatusUpdate]:
        return self

    async def __anext__(self) -> StatusUpdate:
        try:
            msg = await self._stream.__anext__()
        except grpc.RpcError as exc:
            if self._cancelled:
                raise StopAsyncIteration from None
            raise from_rpc(exc, self._target) from exc
        except asyncio.CancelledError:
            if self._cancelled:
                raise StopAsyncIteration from None
            raise
        return StatusUpdate.from_proto(msg)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


# -- clients ----------------------------------------------------------------------------


class _Base:
    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        retries: int,
        tls: TlsConfig | None,
        bearer_token: str | None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.tls = tls
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {bearer_token}"),) if bearer_token else ()
        )

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


class GuardClient(_Base):
    """A blocking client of the lcic-guard sidecar.

    ``target`` is ``host:port``. Every call has a deadline (``timeout``
    seconds by default, or the call's own ``timeout``) and is retried on
    UNAVAILABLE only, up to ``retries`` times within that deadline; with
    ``retries`` > 0 a call also waits, within its deadline, for a sidecar
    that cannot be reached yet. A call that fails raises a
    :class:`~lcic_guard_client.GuardError`: :class:`SidecarUnavailable`
    when the sidecar cannot be reached or does not answer in time,
    :class:`PermissionDenied`, :class:`InvalidRequest` (with the field) or
    :class:`NotFound`. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        tls: TlsConfig | None = None,
        bearer_token: str | None = None,
        options: Sequence[tuple[str, str | int]] | None = None,
    ) -> None:
        super().__init__(
            target, timeout=timeout, retries=retries, tls=tls, bearer_token=bearer_token
        )
        opts = _channel_options(retries, options, tls)
        self._channel = (
            grpc.secure_channel(target, tls.credentials(), options=opts)
            if tls is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.EnforcementServiceStub(self._channel)

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, rpc: Callable[..., Any], req: object, timeout: float | None) -> Any:
        try:
            return rpc(req, timeout=self._t(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc(exc, self.target) from exc

    def can_create_classroom(
        self,
        app_id: str,
        *,
        room_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> Decision:
        """May a classroom be created for ``app_id``?"""
        req = create_request(CreateClassroomCheck(app_id, room_id, start_time, end_time))
        resp = self._unary(self._stub.CanCreateClassroom, req, timeout)
        return Decision.from_proto(resp.decision)

    def can_enter_classroom(
        self,
        app_id: str,
        room_id: str,
        *,
        user_id: str = "",
        role: Role = Role.UNSPECIFIED,
        timeout: float | None = None,
    ) -> Decision:
        """May a user enter classroom ``room_id`` of ``app_id``?"""
        req = enter_request(EnterClassroomCheck(app_id, room_id, user_id, Role(role)))
        resp = self._unary(self._stub.CanEnterClassroom, req, timeout)
        return Decision.from_proto(resp.decision)

    def can_access_recording(
        self, app_id: str, recording_id: str, *, room_id: str = "", timeout: float | None = None
    ) -> Decision:
        """May recording ``recording_id`` of ``app_id`` be served?"""
        req = recording_request(AccessRecordingCheck(app_id, recording_id, room_id))
        resp = self._unary(self._stub.CanAccessRecording, req, timeout)
        return Decision.from_proto(resp.decision)

    def check_batch(
        self, checks: Sequence[Check], *, timeout: float | None = None
    ) -> list[Decision]:
        """Many checks in one call (at most 1,000); one decision per check, in order."""
        resp = self._unary(self._stub.CheckBatch, _batch(checks), timeout)
        return [Decision.from_proto(d) for d in resp.decisions]

    def report_classroom_started(
        self,
        app_id: str,
        room_id: str,
        started_at: datetime,
        *,
        scheduled_end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> None:
        """Report that a classroom started, so a suspension will not cut it off."""
        req = _started(app_id, room_id, started_at, scheduled_end_time)
        self._unary(self._stub.ReportClassroomStarted, req, timeout)

    def report_classroom_ended(
        self, app_id: str, room_id: str, ended_at: datetime, *, timeout: float | None = None
    ) -> None:
        """Report that a classroom ended."""
        self._unary(self._stub.ReportClassroomEnded, _ended(app_id, room_id, ended_at), timeout)

    def get_application_status(
        self, app_id: str, *, timeout: float | None = None
    ) -> ApplicationStatus:
        """The application's status record and the rules behind it
        (:class:`NotFound` if the sidecar does not know it)."""
        req = pb.GetApplicationStatusRequest(app_id=app_id)
        resp = self._unary(self._stub.GetApplicationStatus, req, timeout)
        return ApplicationStatus.from_proto(resp.status)

    def preview_application(
        self, app_id: str, at: datetime, *, room_id: str = "", timeout: float | None = None
    ) -> Preview:
        """What the application's checks will answer at ``at`` if no new
        billing event arrives (a time in the past is answered as of now)."""
        resp = self._unary(self._stub.PreviewApplication, _preview(app_id, at, room_id), timeout)
        return Preview.from_proto(resp)

    def apply_override(
        self,
        account_id: str,
        kind: OverrideKind,
        reason: str,
        *,
        until: datetime | None = None,
        timeout: float | None = None,
    ) -> Override:
        """Record a support override (needs scope ``admin``); ``until`` is
        for EXTEND_GRACE only. Returns the override as published; the
        reconciler applies it when it reads the billing feed."""
        req = _override(account_id, kind, reason, until)
        resp = self._unary(self._stub.ApplyOverride, req, timeout)
        return Override.from_proto(resp.override)

    def list_overrides(self, account_id: str, *, timeout: float | None = None) -> list[Override]:
        """Every override recorded for ``account_id``, oldest first."""
        req = pb.ListOverridesRequest(account_id=account_id)
        resp = self._unary(self._stub.ListOverrides, req, timeout)
        return [Override.from_proto(o) for o in resp.overrides]

    def watch(self, app_ids: Sequence[str] = (), *, timeout: float | None = None) -> Watch:
        """Stream the statuses of ``app_ids`` (empty: all): first each one
        known, then every change, with heartbeats while the sidecar's view
        is current. A watch is long-lived: it has no deadline unless
        ``timeout`` gives one."""
        call = self._stub.WatchApplicationStatus(
            pb.WatchApplicationStatusRequest(app_ids=list(app_ids)),
            timeout=timeout,
            metadata=self._metadata,
        )
        return Watch(call, self.target)


class AsyncGuardClient(_Base):
    """The asyncio twin of :class:`GuardClient` (same methods, awaitable;
    :meth:`watch` gives an :class:`AsyncWatch`)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        tls: TlsConfig | None = None,
        bearer_token: str | None = None,
        options: Sequence[tuple[str, str | int]] | None = None,
    ) -> None:
        super().__init__(
            target, timeout=timeout, retries=retries, tls=tls, bearer_token=bearer_token
        )
        opts = _channel_options(retries, options, tls)
        self._channel = (
            grpc.aio.secure_channel(target, tls.credentials(), options=opts)
            if tls is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.EnforcementServiceStub(self._channel)

    async def __aenter__(self) -> AsyncGuardClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, rpc: Callable[..., Any], req: object, timeout: float | None) -> Any:
        try:
            return await rpc(req, timeout=self._t(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc(exc, self.target) from exc

    async def can_create_classroom(
        self,
        app_id: str,
        *,
        room_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> Decision:
        req = create_request(CreateClassroomCheck(app_id, room_id, start_time, end_time))
        resp = await self._unary(self._stub.CanCreateClassroom, req, timeout)
        return Decision.from_proto(resp.decision)

    async def can_enter_classroom(
        self,
        app_id: str,
        room_id: str,
        *,
        user_id: str = "",
        role: Role = Role.UNSPECIFIED,
        timeout: float | None = None,
    ) -> Decision:
        req = enter_request(EnterClassroomCheck(app_id, room_id, user_id, Role(role)))
        resp = await self._unary(self._stub.CanEnterClassroom, req, timeout)
        return Decision.from_proto(resp.decision)

    async def can_access_recording(
        self, app_id: str, recording_id: str, *, room_id: str = "", timeout: float | None = None
    ) -> Decision:
        req = recording_request(AccessRecordingCheck(app_id, recording_id, room_id))
        resp = await self._unary(self._stub.CanAccessRecording, req, timeout)
        return Decision.from_proto(resp.decision)

    async def check_batch(
        self, checks: Sequence[Check], *, timeout: float | None = None
    ) -> list[Decision]:
        resp = await self._unary(self._stub.CheckBatch, _batch(checks), timeout)
        return [Decision.from_proto(d) for d in resp.decisions]

    async def report_classroom_started(
        self,
        app_id: str,
        room_id: str,
        started_at: datetime,
        *,
        scheduled_end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> None:
        req = _started(app_id, room_id, started_at, scheduled_end_time)
        await self._unary(self._stub.ReportClassroomStarted, req, timeout)

    async def report_classroom_ended(
        self, app_id: str, room_id: str, ended_at: datetime, *, timeout: float | None = None
    ) -> None:
        req = _ended(app_id, room_id, ended_at)
        await self._unary(self._stub.ReportClassroomEnded, req, timeout)

    async def get_application_status(
        self, app_id: str, *, timeout: float | None = None
    ) -> ApplicationStatus:
        req = pb.GetApplicationStatusRequest(app_id=app_id)
        resp = await self._unary(self._stub.GetApplicationStatus, req, timeout)
        return ApplicationStatus.from_proto(resp.status)

    async def preview_application(
        self, app_id: str, at: datetime, *, room_id: str = "", timeout: float | None = None
    ) -> Preview:
        req = _preview(app_id, at, room_id)
        return Preview.from_proto(await self._unary(self._stub.PreviewApplication, req, timeout))

    async def apply_override(
        self,
        account_id: str,
        kind: OverrideKind,
        reason: str,
        *,
        until: datetime | None = None,
        timeout: float | None = None,
    ) -> Override:
        req = _override(account_id, kind, reason, until)
        resp = await self._unary(self._stub.ApplyOverride, req, timeout)
        return Override.from_proto(resp.override)

    async def list_overrides(
        self, account_id: str, *, timeout: float | None = None
    ) -> list[Override]:
        req = pb.ListOverridesRequest(account_id=account_id)
        resp = await self._unary(self._stub.ListOverrides, req, timeout)
        return [Override.from_proto(o) for o in resp.overrides]

    def watch(self, app_ids: Sequence[str] = (), *, timeout: float | None = None) -> AsyncWatch:
        call = self._stub.WatchApplicationStatus(
            pb.WatchApplicationStatusRequest(app_ids=list(app_ids)),
            timeout=timeout,
            metadata=self._metadata,
        )
        return AsyncWatch(call, self.target)
