"""The gRPC face of the sidecar: EnforcementService, health and reflection.

Validation and conversion live in :mod:`lcic_guard.api`, decisions in
:mod:`lcic_guard.checker`; this module only maps them onto grpc.aio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

from lcic_guard import api
from lcic_guard.api import BadRequest
from lcic_guard.checker import Checker
from lcic_guard.facts import Millis
from lcic_guard.policy import Room, protected_until
from lcic_guard.store import Store

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EnforcementService"].full_name


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("abort returned")  # pragma: no cover


async def _invalid(context: grpc.aio.ServicerContext, exc: BadRequest) -> NoReturn:
    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class EnforcementServicer(pb_grpc.EnforcementServiceServicer):
    """EnforcementService over a :class:`Checker` and the :class:`Store`."""

    def __init__(self, checker: Checker, store: Store, *, write_timeout: float = 1.0) -> None:
        self.checker = checker
        self.store = store
        self.write_timeout = write_timeout

    @property
    def clock(self) -> Callable[[], Millis]:
        return self.checker.clock

    async def CanCreateClassroom(
        self, request: pb.CanCreateClassroomRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanCreateClassroomResponse:
        try:
            req = api.create_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        decision = await self.checker.check(req)
        return pb.CanCreateClassroomResponse(decision=api.decision_to_pb(decision))

    async def CanEnterClassroom(
        self, request: pb.CanEnterClassroomRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanEnterClassroomResponse:
        try:
            req = api.enter_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        decision = await self.checker.check(req)
        return pb.CanEnterClassroomResponse(decision=api.decision_to_pb(decision))

    async def CanAccessRecording(
        self, request: pb.CanAccessRecordingRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanAccessRecordingResponse:
        try:
            req = api.recording_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        decision = await self.checker.check(req)
        return pb.CanAccessRecordingResponse(decision=api.decision_to_pb(decision))

    async def CheckBatch(
        self, request: pb.CheckBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckBatchResponse:
        try:
            reqs = api.batch_requests(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        decisions = await self.checker.check_many(reqs)
        return pb.CheckBatchResponse(decisions=[api.decision_to_pb(d) for d in decisions])

    async def _report(
        self,
        context: grpc.aio.ServicerContext,
        app_id: str,
        room_id: str,
        room: Room,
        **times: Millis | None,
    ) -> None:
        until = protected_until(room, self.checker.cfg)
        try:
            known = await asyncio.wait_for(
                self.store.report_room(app_id, room_id, now=self.clock(), until=until, **times),
                self.write_timeout,
            )
        except Exception as exc:
            log.warning("could not record classroom report for %s/%s: %s", app_id, room_id, exc)
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, "status store unavailable; retry the report"
            )
        if not known:
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"app_id: unknown application {app_id}"
            )
        self.checker.remember_room(app_id, room_id, room)

    async def ReportClassroomStarted(
        self, request: pb.ReportClassroomStartedRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportClassroomStartedResponse:
        try:
            app_id = api.require_id(request.app_id, "app_id")
            room_id = api.require_id(request.room_id, "room_id")
            started = api.required_millis(request, "started_at", "started_at")
            end = api.optional_millis(request, "scheduled_end_time", "scheduled_end_time")
            if end is not None and end < started:
                raise BadRequest("scheduled_end_time: must not be before started_at")
        except BadRequest as exc:
            await _invalid(context, exc)
        room = Room(started_at=started, scheduled_end=end)
        await self._report(context, app_id, room_id, room, started_at=started, scheduled_end=end)
        return pb.ReportClassroomStartedResponse()

    async def ReportClassroomEnded(
        self, request: pb.ReportClassroomEndedRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportClassroomEndedResponse:
        try:
            app_id = api.require_id(request.app_id, "app_id")
            room_id = api.require_id(request.room_id, "room_id")
            ended = api.required_millis(request, "ended_at", "ended_at")
        except BadRequest as exc:
            await _invalid(context, exc)
        # Only the end is known here; the stored start (if any) is kept.
        room = Room(started_at=ended, ended_at=ended)
        await self._report(context, app_id, room_id, room, ended_at=ended)
        return pb.ReportClassroomEndedResponse()

    async def GetApplicationStatus(
        self, request: pb.GetApplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetApplicationStatusResponse:
        try:
            app_id = api.require_id(request.app_id, "app_id")
        except BadRequest as exc:
            await _invalid(context, exc)
        try:
            status, _ = await asyncio.wait_for(self.store.read_status(app_id), self.write_timeout)
        except Exception:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        if status is None:
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"app_id: unknown application {app_id}"
            )
        return pb.GetApplicationStatusResponse(status=api.status_to_pb(status, self.clock()))

    async def WatchApplicationStatus(
        self, request: pb.WatchApplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchApplicationStatusResponse]:
        try:
            api.watch_ids(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "WatchApplicationStatus: not yet")
        yield pb.WatchApplicationStatusResponse()  # pragma: no cover


@dataclass
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    root = _read(tls.client_ca) if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))],
        root_certificates=root,
        require_client_auth=root is not None,
    )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        # Probes see NOT_SERVING first, then in-flight calls get `grace`.
        await self.set_serving(False)
        await self.server.stop(grace)


async def start_server(
    servicer: EnforcementServicer,
    listen: str,
    *,
    tls: TlsFiles | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> RunningServer:
    """Start EnforcementService, health and reflection on ``listen``."""
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), *(options or [])],
    )
    pb_grpc.add_EnforcementServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, server_credentials(tls))
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    running = RunningServer(server, port, health_servicer)
    await running.set_serving(True)
    return running
