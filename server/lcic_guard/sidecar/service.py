"""The EnforcementService servicer: each RPC validates its request (see
:mod:`lcic_guard.sidecar.wire`), asks the checker or the store and converts
the answer. A bad field raises BadRequest, which
:func:`lcic_guard.sidecar.errors.status_of` turns into INVALID_ARGUMENT (as
it maps every error of every call).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.domain.evidence import override_log
from lcic_guard.domain.policy import AppStatus, PolicyConfig, Room
from lcic_guard.domain.rooms import end_report_problem, report_record, start_report_problem
from lcic_guard.domain.time import Millis
from lcic_guard.logs import describe_error
from lcic_guard.sidecar import auth, overrides, wire
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.observe import PREVIEW_CHECKS, DecisionObserver
from lcic_guard.sidecar.watchers import Watchers
from lcic_guard.sidecar.wire import BadRequest
from lcic_guard.store.status import Store

log = logging.getLogger(__name__)

# Bounds every store call the RPCs other than the checks make (reads for
# GetApplicationStatus and watches, writes for classroom reports).
STORE_TIMEOUT_S: Final = 1.0


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("abort returned")  # pragma: no cover


class EnforcementServicer:
    """EnforcementService's RPCs other than the checks, as coroutines on the
    event loop, over a :class:`Checker` and the :class:`Store` (the serving
    core calls them by the RPC's name)."""

    def __init__(
        self,
        checker: Checker,
        store: Store,
        *,
        store_timeout: float = STORE_TIMEOUT_S,
        watchers: Watchers | None = None,
        observer: DecisionObserver | None = None,
    ) -> None:
        self.checker = checker
        self.store = store
        self.store_timeout = store_timeout
        self.watchers = watchers
        # Metrics, debug logs and shadow mode, after each decision; the
        # checker's answers are rendered by it too (the runner wires both:
        # lcic_guard.runner.servicer_for).
        self.observer = observer if observer is not None else DecisionObserver()

    @property
    def clock(self) -> Callable[[], Millis]:
        return self.checker.clock

    # The checks (CanCreateClassroom, CanEnterClassroom, CanAccessRecording,
    # CheckBatch) are not coroutines of this servicer: they are served by the
    # serving core's fast path (lcic_guard.sidecar.checks), which reads Redis
    # through the checker on the loop when the cache cannot answer.

    async def _report(
        self,
        context: grpc.aio.ServicerContext,
        app_id: str,
        room_id: str,
        **times: Millis | None,
    ) -> None:
        until = report_record(self.checker.cfg, **times).until
        try:
            known = await asyncio.wait_for(
                self.store.report_room(app_id, room_id, now=self.clock(), until=until, **times),
                self.store_timeout,
            )
        except Exception as exc:
            log.warning("could not record classroom report for %s/%s: %s", app_id, room_id, exc)
            await abort(
                context, grpc.StatusCode.UNAVAILABLE, "status store unavailable; retry the report"
            )
        if not known:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"app_id: unknown application {app_id}")
        # Other sidecars learn of it from the feed entry the report made.
        self.checker.remember_room(app_id, room_id)

    async def ReportClassroomStarted(
        self, request: pb.ReportClassroomStartedRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportClassroomStartedResponse:
        app_id = wire.require_id(request.app_id, "app_id")
        room_id = wire.require_id(request.room_id, "room_id")
        started = wire.required_millis(request, "started_at", "started_at")
        end = wire.optional_millis(request, "scheduled_end_time", "scheduled_end_time")
        problem = start_report_problem(started, end, self.clock(), self.checker.cfg)
        if problem is not None:
            raise BadRequest(problem)
        await self._report(context, app_id, room_id, started_at=started, scheduled_end=end)
        return pb.ReportClassroomStartedResponse()

    async def ReportClassroomEnded(
        self, request: pb.ReportClassroomEndedRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportClassroomEndedResponse:
        app_id = wire.require_id(request.app_id, "app_id")
        room_id = wire.require_id(request.room_id, "room_id")
        ended = wire.required_millis(request, "ended_at", "ended_at")
        problem = end_report_problem(ended, self.clock(), self.checker.cfg)
        if problem is not None:
            raise BadRequest(problem)
        # Only the end is known here; the stored start (if any) is kept.
        await self._report(context, app_id, room_id, ended_at=ended)
        return pb.ReportClassroomEndedResponse()

    async def GetApplicationStatus(
        self, request: pb.GetApplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetApplicationStatusResponse:
        app_id = wire.require_id(request.app_id, "app_id")
        status, _ = await self._read_one(context, app_id, None)
        try:  # the billing facts behind the reasons (one more read; not a hot RPC)
            loaded = await asyncio.wait_for(
                self.store.load_account_facts(status.account_id), self.store_timeout
            )
        except Exception:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        try:
            explained = wire.explained_status(status, loaded.facts, self.clock(), self.checker.cfg)
            explained.overrides.extend(
                overrides.entries_to_pb(
                    override_log(loaded.facts, self.checker.cfg, loaded.recorded_at)
                )
            )
        except Exception as exc:
            # A stored fact the explanation cannot render must not hide the status.
            log.warning("cannot explain the status of %s (%s); sent without facts", app_id, exc)
            explained = wire.status_to_pb(status, self.clock())
        return pb.GetApplicationStatusResponse(status=explained)

    async def ApplyOverride(
        self, request: pb.ApplyOverrideRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyOverrideResponse:
        return await overrides.apply_override(
            self.store, self.checker.cfg, auth.CALLER.get(), request, self.clock, context
        )

    async def ListOverrides(
        self, request: pb.ListOverridesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOverridesResponse:
        return await overrides.list_overrides(self.store, self.checker.cfg, request, context)

    async def _read_one(
        self, context: grpc.aio.ServicerContext, app_id: str, room_id: str | None
    ) -> tuple[AppStatus, Room | None]:
        """One status for an RPC that needs it: NOT_FOUND, UNAVAILABLE or
        INTERNAL (a stored record that does not decode) otherwise."""
        try:
            rows = await asyncio.wait_for(
                self.store.read_rows([(app_id, room_id)]), self.store_timeout
            )
        except Exception as exc:
            self.checker.warn.warning(
                "rpc-read", "status store unavailable for a status read (%s)", describe_error(exc)
            )
            await abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        row = rows[0]
        if isinstance(row, Exception):
            self.checker.internal_errors += 1
            log.warning("stored status of %s does not decode: %s", app_id, row)
            await abort(
                context,
                grpc.StatusCode.INTERNAL,
                f"app_id: the stored status of {app_id} cannot be read; the operator is told",
            )
        status, room = row
        if status is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"app_id: unknown application {app_id}")
        return status, room

    async def PreviewApplication(
        self, request: pb.PreviewApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreviewApplicationResponse:
        app_id = wire.require_id(request.app_id, "app_id")
        at = wire.required_millis(request, "at", "at")
        room_id = wire.optional_id(request.room_id, "room_id")
        status, room = await self._read_one(context, app_id, room_id)
        try:
            resp = wire.preview(
                status,
                room,
                max(at, self.clock()),
                self.checker.cfg,
            )
        except Exception as exc:
            log.warning("cannot preview %s: %s", app_id, exc)
            await abort(
                context, grpc.StatusCode.INTERNAL, f"app_id: cannot preview {app_id}: {exc}"
            )
        for name, check in PREVIEW_CHECKS:
            self.observer.shadow_pb(check, getattr(resp, name))
        return resp

    # WatchApplicationStatus is not a coroutine of this servicer either: each
    # stream is served on its own thread (lcic_guard.sidecar.watch), fed by
    # the watchers' own thread.


def render_discontinuity(cause: str, detected_at: Millis) -> bytes:
    """The watch message that tells a client to drop every answer it kept."""
    return pb.WatchApplicationStatusResponse(
        discontinuity=pb.StoreDiscontinuity(cause=cause, detected_at=wire.timestamp(detected_at))
    ).SerializeToString()


@dataclass(frozen=True, slots=True)
class WatchRenderer:
    """The watchers' renderer: a watch message, shadow mode applied,
    serialized once for every stream that gets it."""

    cfg: PolicyConfig
    observer: DecisionObserver

    def __call__(self, status: AppStatus, now: Millis) -> bytes:
        resp = wire.watch_response(status, now, self.cfg)
        self.observer.shadow_schedule(resp)
        return resp.SerializeToString()


@dataclass(frozen=True, slots=True)
class StatusRefresh:
    """A read of whole status records for the watchers, bounded like every
    store call of the RPCs other than the checks: ahead of time-driven
    transitions, for the owner the cache does not keep."""

    store: Store
    timeout: float

    async def __call__(self, app_ids: list[str]) -> list[AppStatus]:
        rows = await asyncio.wait_for(
            self.store.read_rows([(a, None) for a in app_ids]), self.timeout
        )
        return [r[0] for r in rows if not isinstance(r, Exception) and r[0] is not None]
