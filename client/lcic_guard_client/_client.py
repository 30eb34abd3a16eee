from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Final

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

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


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def create_classroom_check(
    app_id: str,
    room_id: str = "",
    start_time: datetime | None = None,
    end_time: datetime | None = None,
) -> pb.Check:
    """A CanCreateClassroom check, for :meth:`GuardClient.check_batch`."""
    return pb.Check(create_classroom=_create(app_id, room_id, start_time, end_time))


def enter_classroom_check(
    app_id: str,
    room_id: str,
    user_id: str = "",
    role: pb.ClassroomRole.ValueType = pb.CLASSROOM_ROLE_UNSPECIFIED,
) -> pb.Check:
    """A CanEnterClassroom check, for :meth:`GuardClient.check_batch`."""
    return pb.Check(
        enter_classroom=pb.CanEnterClassroomRequest(
            app_id=app_id, room_id=room_id, user_id=user_id, role=role
        )
    )


def access_recording_check(app_id: str, recording_id: str, room_id: str = "") -> pb.Check:
    """A CanAccessRecording check, for :meth:`GuardClient.check_batch`."""
    return pb.Check(
        access_recording=pb.CanAccessRecordingRequest(
            app_id=app_id, recording_id=recording_id, room_id=room_id
        )
    )


def _create(
    app_id: str, room_id: str, start: datetime | None, end: datetime | None
) -> pb.CanCreateClassroomRequest:
    return pb.CanCreateClassroomRequest(
        app_id=app_id, room_id=room_id, start_time=_ts(start), end_time=_ts(end)
    )


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
    seconds by default) and is retried on UNAVAILABLE only, up to
    ``retries`` times within that deadline; with ``retries`` > 0 a call also
    waits, within its deadline, for a sidecar that cannot be reached yet
    (DEADLINE_EXCEEDED if it never can; ``retries=0`` fails at once with
    UNAVAILABLE). Use it as a context manager, or call :meth:`close`.
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
        self.channel = (
            grpc.secure_channel(target, tls.credentials(), options=opts)
            if tls is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self.stub = pb_grpc.EnforcementServiceStub(self.channel)

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
        self.channel.close()

    def can_create_classroom(
        self,
        app_id: str,
        *,
        room_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> pb.Decision:
        """May a classroom be created for ``app_id``?"""
        req = _create(app_id, room_id, start_time, end_time)
        resp: pb.CanCreateClassroomResponse = self.stub.CanCreateClassroom(
            req, timeout=self._t(timeout), metadata=self._metadata
        )
        return resp.decision

    def can_enter_classroom(
        self,
        app_id: str,
        room_id: str,
        *,
        user_id: str = "",
        role: pb.ClassroomRole.ValueType = pb.CLASSROOM_ROLE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> pb.Decision:
        """May a user enter classroom ``room_id`` of ``app_id``?"""
        req = pb.CanEnterClassroomRequest(
            app_id=app_id, room_id=room_id, user_id=user_id, role=role
        )
        resp: pb.CanEnterClassroomResponse = self.stub.CanEnterClassroom(
            req, timeout=self._t(timeout), metadata=self._metadata
        )
        return resp.decision

    def can_access_recording(
        self, app_id: str, recording_id: str, *, room_id: str = "", timeout: float | None = None
    ) -> pb.Decision:
        """May recording ``recording_id`` of ``app_id`` be served?"""
        req = pb.CanAccessRecordingRequest(
            app_id=app_id, recording_id=recording_id, room_id=room_id
        )
        resp: pb.CanAccessRecordingResponse = self.stub.CanAccessRecording(
            req, timeout=self._t(timeout), metadata=self._metadata
        )
        return resp.decision

    def check_batch(
        self, checks: Sequence[pb.Check], *, timeout: float | None = None
    ) -> list[pb.Decision]:
        """Many checks in one call; one decision per check, in order."""
        resp: pb.CheckBatchResponse = self.stub.CheckBatch(
            pb.CheckBatchRequest(checks=list(checks)),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )
        return list(resp.decisions)

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
        self.stub.ReportClassroomStarted(
            pb.ReportClassroomStartedRequest(
                app_id=app_id,
                room_id=room_id,
                started_at=_ts(started_at),
                scheduled_end_time=_ts(scheduled_end_time),
            ),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )

    def report_classroom_ended(
        self, app_id: str, room_id: str, ended_at: datetime, *, timeout: float | None = None
    ) -> None:
        """Report that a classroom ended."""
        self.stub.ReportClassroomEnded(
            pb.ReportClassroomEndedRequest(app_id=app_id, room_id=room_id, ended_at=_ts(ended_at)),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )

    def get_application_status(
        self, app_id: str, *, timeout: float | None = None
    ) -> pb.ApplicationStatus:
        """The application's status record and the rules behind it."""
        resp: pb.GetApplicationStatusResponse = self.stub.GetApplicationStatus(
            pb.GetApplicationStatusRequest(app_id=app_id),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )
        return resp.status


class AsyncGuardClient(_Base):
    """The asyncio twin of :class:`GuardClient` (same methods, awaitable)."""

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
        self.channel = (
            grpc.aio.secure_channel(target, tls.credentials(), options=opts)
            if tls is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self.stub = pb_grpc.EnforcementServiceStub(self.channel)

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
        await self.channel.close()

    async def can_create_classroom(
        self,
        app_id: str,
        *,
        room_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> pb.Decision:
        req = _create(app_id, room_id, start_time, end_time)
        resp: pb.CanCreateClassroomResponse = await self.stub.CanCreateClassroom(
            req, timeout=self._t(timeout), metadata=self._metadata
        )
        return resp.decision

    async def can_enter_classroom(
        self,
        app_id: str,
        room_id: str,
        *,
        user_id: str = "",
        role: pb.ClassroomRole.ValueType = pb.CLASSROOM_ROLE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> pb.Decision:
        req = pb.CanEnterClassroomRequest(
            app_id=app_id, room_id=room_id, user_id=user_id, role=role
        )
        resp: pb.CanEnterClassroomResponse = await self.stub.CanEnterClassroom(
            req, timeout=self._t(timeout), metadata=self._metadata
        )
        return resp.decision

    async def can_access_recording(
        self, app_id: str, recording_id: str, *, room_id: str = "", timeout: float | None = None
    ) -> pb.Decision:
        req = pb.CanAccessRecordingRequest(
            app_id=app_id, recording_id=recording_id, room_id=room_id
        )
        resp: pb.CanAccessRecordingResponse = await self.stub.CanAccessRecording(
            req, timeout=self._t(timeout), metadata=self._metadata
        )
        return resp.decision

    async def check_batch(
        self, checks: Sequence[pb.Check], *, timeout: float | None = None
    ) -> list[pb.Decision]:
        resp: pb.CheckBatchResponse = await self.stub.CheckBatch(
            pb.CheckBatchRequest(checks=list(checks)),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )
        return list(resp.decisions)

    async def report_classroom_started(
        self,
        app_id: str,
        room_id: str,
        started_at: datetime,
        *,
        scheduled_end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> None:
        await self.stub.ReportClassroomStarted(
            pb.ReportClassroomStartedRequest(
                app_id=app_id,
                room_id=room_id,
                started_at=_ts(started_at),
                scheduled_end_time=_ts(scheduled_end_time),
            ),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )

    async def report_classroom_ended(
        self, app_id: str, room_id: str, ended_at: datetime, *, timeout: float | None = None
    ) -> None:
        await self.stub.ReportClassroomEnded(
            pb.ReportClassroomEndedRequest(app_id=app_id, room_id=room_id, ended_at=_ts(ended_at)),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )

    async def get_application_status(
        self, app_id: str, *, timeout: float | None = None
    ) -> pb.ApplicationStatus:
        resp: pb.GetApplicationStatusResponse = await self.stub.GetApplicationStatus(
            pb.GetApplicationStatusRequest(app_id=app_id),
            timeout=self._t(timeout),
            metadata=self._metadata,
        )
        return resp.status
