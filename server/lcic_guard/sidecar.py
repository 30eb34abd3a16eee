"""The gRPC face of the sidecar: EnforcementService, health and reflection.

Validation and conversion live in :mod:`lcic_guard.api`, decisions in
:mod:`lcic_guard.checker`; this module only maps them onto grpc.aio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

from lcic_guard import api, logs, report
from lcic_guard.api import BadRequest
from lcic_guard.certs import CertificateFiles, reloading_server_credentials
from lcic_guard.checker import Checker, CheckRequest
from lcic_guard.facts import Millis
from lcic_guard.observe import PREVIEW_CHECKS, DecisionObserver
from lcic_guard.policy import AppStatus, Room, protected_until
from lcic_guard.store import Store

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EnforcementService"].full_name
# A health service name that is SERVING for as long as the server runs, for
# liveness probes: the server's own health ("") turns NOT_SERVING while the
# statuses are not fresh, which must take the sidecar out of rotation, not
# get it restarted.
LIVENESS_SERVICE = "liveness"


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("abort returned")  # pragma: no cover


async def _invalid(context: grpc.aio.ServicerContext, exc: BadRequest) -> NoReturn:
    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class EnforcementServicer(pb_grpc.EnforcementServiceServicer):
    """EnforcementService over a :class:`Checker` and the :class:`Store`."""

    def __init__(
        self,
        checker: Checker,
        store: Store,
        *,
        write_timeout: float = 1.0,
        watchers: Watchers | None = None,
        observer: DecisionObserver | None = None,
    ) -> None:
        self.checker = checker
        self.store = store
        self.write_timeout = write_timeout
        self.watchers = watchers
        # Metrics, debug logs and shadow mode, after each decision.
        self.observer = observer if observer is not None else DecisionObserver()

    @property
    def clock(self) -> Callable[[], Millis]:
        return self.checker.clock

    async def _decide(self, req: CheckRequest) -> pb.Decision:
        start = time.perf_counter()
        decision = await self.checker.check(req)
        return self.observer.finish(req, decision, time.perf_counter() - start)

    async def CanCreateClassroom(
        self, request: pb.CanCreateClassroomRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanCreateClassroomResponse:
        try:
            req = api.create_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        return pb.CanCreateClassroomResponse(decision=await self._decide(req))

    async def CanEnterClassroom(
        self, request: pb.CanEnterClassroomRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanEnterClassroomResponse:
        try:
            req = api.enter_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        return pb.CanEnterClassroomResponse(decision=await self._decide(req))

    async def CanAccessRecording(
        self, request: pb.CanAccessRecordingRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanAccessRecordingResponse:
        try:
            req = api.recording_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        return pb.CanAccessRecordingResponse(decision=await self._decide(req))

    async def CheckBatch(
        self, request: pb.CheckBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckBatchResponse:
        try:
            reqs = api.batch_requests(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        start = time.perf_counter()
        decisions = await self.checker.check_many(reqs)
        answers = self.observer.finish_batch(reqs, decisions, time.perf_counter() - start)
        return pb.CheckBatchResponse(decisions=answers)

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
        try:
            await asyncio.wait_for(self.store.publish_room(app_id, room_id), self.write_timeout)
        except Exception as exc:
            # Recorded; other sidecars re-read the room when their cache
            # entry ages out (--cache-max-age).
            log.warning("could not announce classroom report %s/%s: %s", app_id, room_id, exc)

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
        try:  # the billing facts behind the reasons (one more read; not a hot RPC)
            _, facts = await asyncio.wait_for(
                self.store.load_account(status.account_id), self.write_timeout
            )
        except Exception:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        return pb.GetApplicationStatusResponse(
            status=report.explained_status(status, facts, self.clock())
        )

    async def PreviewApplication(
        self, request: pb.PreviewApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreviewApplicationResponse:
        try:
            app_id = api.require_id(request.app_id, "app_id")
            at = api.required_millis(request, "at", "at")
            room_id = api.optional_id(request.room_id, "room_id")
        except BadRequest as exc:
            await _invalid(context, exc)
        try:
            status, room = await asyncio.wait_for(
                self.store.read_status(app_id, room_id), self.write_timeout
            )
        except Exception:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        if status is None:
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"app_id: unknown application {app_id}"
            )
        resp = report.preview(status, room, max(at, self.clock()), self.checker.cfg)
        for name, check in PREVIEW_CHECKS:
            self.observer.shadow_pb(check, getattr(resp, name))
        return resp

    async def WatchApplicationStatus(
        self, request: pb.WatchApplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchApplicationStatusResponse]:
        try:
            ids = api.watch_ids(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        if self.watchers is None:
            await _abort(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                "this sidecar does not follow the change feed",
            )
        queue = self.watchers.subscribe(ids)
        try:
            if ids:
                try:
                    rows = await asyncio.wait_for(
                        self.store.read_statuses([(a, None) for a in ids]), self.write_timeout
                    )
                except Exception:
                    await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
                now = self.clock()
                for status, _ in rows:
                    if status is not None:
                        yield self._watched(status, now)
            while True:
                try:
                    status = await asyncio.wait_for(queue.get(), self.watchers.heartbeat_s)
                except TimeoutError:
                    if self.checker.cache.feed_healthy:
                        yield pb.WatchApplicationStatusResponse()
                    continue
                if status is None and self.watchers.closing:
                    await _abort(
                        context, grpc.StatusCode.UNAVAILABLE, "server shutting down; watch again"
                    )
                if status is None:  # the watcher fell too far behind
                    await _abort(
                        context, grpc.StatusCode.RESOURCE_EXHAUSTED, "watcher too slow; watch again"
                    )
                yield self._watched(status, self.clock())
        finally:
            self.watchers.unsubscribe(queue)

    def _watched(self, status: AppStatus, now: Millis) -> pb.WatchApplicationStatusResponse:
        resp = api.watch_response(status, now, self.checker.cfg)
        self.observer.shadow_schedule(resp)
        return resp


class Watchers:
    """Fans the change feed out to WatchApplicationStatus streams."""

    def __init__(self, *, queue_size: int = 10_000, heartbeat_s: float = 1.0) -> None:
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self._subs: dict[asyncio.Queue[AppStatus | None], frozenset[str] | None] = {}
        self.closing = False

    def subscribe(self, app_ids: list[str]) -> asyncio.Queue[AppStatus | None]:
        queue: asyncio.Queue[AppStatus | None] = asyncio.Queue(self.queue_size + 1)
        self._subs[queue] = frozenset(app_ids) if app_ids else None
        if self.closing:
            queue.put_nowait(None)
        return queue

    def close(self) -> None:
        """Shutting down: end every stream (UNAVAILABLE, watch again)."""
        self.closing = True
        for queue in list(self._subs):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def unsubscribe(self, queue: asyncio.Queue[AppStatus | None]) -> None:
        self._subs.pop(queue, None)

    def __len__(self) -> int:
        return len(self._subs)

    def publish(self, app_id: str, status: AppStatus | None) -> None:
        if status is None:
            return
        for queue, ids in list(self._subs.items()):
            if ids is not None and app_id not in ids:
                continue
            if queue.qsize() >= self.queue_size:
                # Never block the feed on one slow watcher: end its stream.
                queue.put_nowait(None)
                self._subs.pop(queue, None)
            else:
                queue.put_nowait(status)


@dataclass
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    certificates: CertificateFiles | None = None  # with TLS: reloaded when they change
    serving: bool = False  # what the health service says (read by the HTTP /readyz)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.serving = serving

    async def stop(self, grace: float = 5.0, drain: float = 0.0) -> None:
        # Probes see NOT_SERVING first (for `drain` seconds, still answering,
        # so that load balancers stop sending), then in-flight calls get `grace`.
        await self.set_serving(False)
        if drain > 0:
            await asyncio.sleep(drain)
        await self.server.stop(grace)


def add_service(servicer: EnforcementServicer, server: grpc.aio.Server) -> None:
    """Register EnforcementService like the generated ``add_..._to_server``,
    except that bytes which do not parse as the request message are answered
    INVALID_ARGUMENT (grpc.aio alone answers UNKNOWN, naming a Python class)."""

    def parsing(
        impl: Callable[..., Any], parse: Callable[[bytes], Any], streaming: bool
    ) -> Callable[..., Any]:
        async def request(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return parse(raw)
            except Exception as exc:
                await _abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, f"request: malformed message: {exc}"
                )

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            token = logs.bind_call(context)  # request id: logs and trailing metadata
            try:
                try:  # parsed inline: one coroutine less on every check
                    message = parse(raw)
                except Exception:
                    message = await request(raw, context)
                return await impl(message, context)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error", extra={"event": "rpc_error"})
                raise
            finally:
                with contextlib.suppress(ValueError):
                    logs.request_id.reset(token)

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            logs.bind_call(context)
            async for item in impl(await request(raw, context), context):
                yield item

        return stream if streaming else unary

    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["EnforcementService"].methods:
        parse = getattr(pb, method.input_type.name).FromString
        serialize = getattr(pb, method.output_type.name).SerializeToString
        impl = parsing(getattr(servicer, method.name), parse, method.server_streaming)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(impl, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def start_server(
    servicer: EnforcementServicer,
    listen: str,
    *,
    tls: TlsFiles | None = None,
    options: list[tuple[str, Any]] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    reuse_port: bool = False,
) -> RunningServer:
    """Start EnforcementService, health and reflection on ``listen``.

    With ``tls``, each new connection uses the certificate files as they are
    then (changed files are loaded again: see :mod:`lcic_guard.certs`).
    ``interceptors`` (e.g. :mod:`lcic_guard.auth`) see every call.
    ``reuse_port`` only for the processes of one ``--workers N``: gRPC turns
    SO_REUSEPORT on by default, and with it a second sidecar on a taken port
    would silently share it and half the checks would reach the wrong one.
    """
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1 if reuse_port else 0), *(options or [])],
        interceptors=list(interceptors or ()),
    )
    add_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    certificates = None
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        certificates = CertificateFiles(tls.cert, tls.key, tls.client_ca)
        port = server.add_secure_port(listen, reloading_server_credentials(certificates))
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    running = RunningServer(server, port, health_servicer, certificates)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await running.set_serving(True)
    return running
