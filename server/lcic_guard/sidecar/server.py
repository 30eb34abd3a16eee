"""The gRPC face of the sidecar: EnforcementService, health and reflection.

Validation and conversion live in :mod:`lcic_guard.sidecar.wire`, decisions in
:mod:`lcic_guard.sidecar.checker`; this module only maps them onto grpc.aio.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

from lcic_guard import logs
from lcic_guard.domain.policy import AppStatus, Room, protected_until
from lcic_guard.domain.time import Millis
from lcic_guard.ratelimit import describe_error
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.cache import StatusCache
from lcic_guard.sidecar.certs import CertificateFiles, reloading_server_credentials
from lcic_guard.sidecar.checker import Checker, CheckRequest, bounded_room
from lcic_guard.sidecar.observe import PREVIEW_CHECKS, DecisionObserver
from lcic_guard.sidecar.wire import BadRequest
from lcic_guard.store.status import Store

log = logging.getLogger(__name__)

# How far in the future a classroom report's time may be (clock skew).
REPORT_SKEW_MS: Final = 5 * 60_000
# Watch messages sent per second, all streams together, and how often the
# streams are woken per stream open (see Watchers).
SEND_RATE: Final = 5_000.0
FLUSH_PER_STREAM_S: Final = 0.0001
WAKE_GROUPS: Final = 8
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
        if watchers is not None:
            watchers.render = self.render_watched
            watchers.clock = checker.clock
            watchers.refresh = self._refresh

    @property
    def clock(self) -> Callable[[], Millis]:
        return self.checker.clock

    async def _refresh(self, app_ids: list[str]) -> list[AppStatus]:
        rows = await asyncio.wait_for(
            self.store.read_rows([(a, None) for a in app_ids]), self.write_timeout
        )
        return [r[0] for r in rows if not isinstance(r, Exception) and r[0] is not None]

    async def _decide(self, req: CheckRequest) -> pb.Decision:
        start = time.perf_counter()
        decision = await self.checker.check(req)
        return self.observer.finish(req, decision, time.perf_counter() - start)

    async def CanCreateClassroom(
        self, request: pb.CanCreateClassroomRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanCreateClassroomResponse:
        try:
            req = wire.create_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        return pb.CanCreateClassroomResponse(decision=await self._decide(req))

    async def CanEnterClassroom(
        self, request: pb.CanEnterClassroomRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanEnterClassroomResponse:
        try:
            req = wire.enter_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        return pb.CanEnterClassroomResponse(decision=await self._decide(req))

    async def CanAccessRecording(
        self, request: pb.CanAccessRecordingRequest, context: grpc.aio.ServicerContext
    ) -> pb.CanAccessRecordingResponse:
        try:
            req = wire.recording_request(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        return pb.CanAccessRecordingResponse(decision=await self._decide(req))

    async def CheckBatch(
        self, request: pb.CheckBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckBatchResponse:
        try:
            reqs = wire.batch_requests(request)
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
        until = protected_until(bounded_room(room, self.checker.cfg) or room, self.checker.cfg)
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

    def _believable(self, at: Millis, field: str) -> None:
        """R6: a report is believed only about a class that could be running:
        not earlier than now - the maximum class length, not later than
        now + 5 min (clock skew)."""
        now = self.clock()
        earliest = now - self.checker.cfg.max_class_ms
        if at < earliest:
            raise BadRequest(
                f"{field}: earlier than now minus the maximum class length "
                f"({self.checker.cfg.max_class_ms // 60_000} min); not believed"
            )
        if at > now + REPORT_SKEW_MS:
            raise BadRequest(f"{field}: more than 5 minutes in the future; not believed")

    async def ReportClassroomStarted(
        self, request: pb.ReportClassroomStartedRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportClassroomStartedResponse:
        try:
            app_id = wire.require_id(request.app_id, "app_id")
            room_id = wire.require_id(request.room_id, "room_id")
            started = wire.required_millis(request, "started_at", "started_at")
            end = wire.optional_millis(request, "scheduled_end_time", "scheduled_end_time")
            self._believable(started, "started_at")
            if end is not None and end <= started:
                raise BadRequest("scheduled_end_time: must be after started_at")
        except BadRequest as exc:
            await _invalid(context, exc)
        room = Room(started_at=started, scheduled_end=end)
        await self._report(context, app_id, room_id, room, started_at=started, scheduled_end=end)
        return pb.ReportClassroomStartedResponse()

    async def ReportClassroomEnded(
        self, request: pb.ReportClassroomEndedRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportClassroomEndedResponse:
        try:
            app_id = wire.require_id(request.app_id, "app_id")
            room_id = wire.require_id(request.room_id, "room_id")
            ended = wire.required_millis(request, "ended_at", "ended_at")
            self._believable(ended, "ended_at")
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
            app_id = wire.require_id(request.app_id, "app_id")
        except BadRequest as exc:
            await _invalid(context, exc)
        status, _ = await self._read_one(context, app_id, None)
        try:  # the billing facts behind the reasons (one more read; not a hot RPC)
            _, facts = await asyncio.wait_for(
                self.store.load_account(status.account_id), self.write_timeout
            )
        except Exception:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        try:
            explained = wire.explained_status(status, facts, self.clock())
        except Exception as exc:
            # A stored fact the explanation cannot render must not hide the status.
            log.warning("cannot explain the status of %s (%s); sent without facts", app_id, exc)
            explained = wire.status_to_pb(status, self.clock())
        return pb.GetApplicationStatusResponse(status=explained)

    async def _read_one(
        self, context: grpc.aio.ServicerContext, app_id: str, room_id: str | None
    ) -> tuple[AppStatus, Room | None]:
        """One status for an RPC that needs it: NOT_FOUND, UNAVAILABLE or
        INTERNAL (a stored record that does not decode) otherwise."""
        try:
            rows = await asyncio.wait_for(
                self.store.read_rows([(app_id, room_id)]), self.write_timeout
            )
        except Exception as exc:
            self.checker._warn.warning(
                "rpc-read", "status store unavailable for a status read (%s)", describe_error(exc)
            )
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        row = rows[0]
        if isinstance(row, Exception):
            self.checker.internal_errors += 1
            log.warning("stored status of %s does not decode: %s", app_id, row)
            await _abort(
                context,
                grpc.StatusCode.INTERNAL,
                f"app_id: the stored status of {app_id} cannot be read; the operator is told",
            )
        status, room = row
        if status is None:
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"app_id: unknown application {app_id}"
            )
        return status, room

    async def PreviewApplication(
        self, request: pb.PreviewApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreviewApplicationResponse:
        try:
            app_id = wire.require_id(request.app_id, "app_id")
            at = wire.required_millis(request, "at", "at")
            room_id = wire.optional_id(request.room_id, "room_id")
        except BadRequest as exc:
            await _invalid(context, exc)
        status, room = await self._read_one(context, app_id, room_id)
        try:
            resp = wire.preview(
                status,
                bounded_room(room, self.checker.cfg),
                max(at, self.clock()),
                self.checker.cfg,
            )
        except Exception as exc:
            log.warning("cannot preview %s: %s", app_id, exc)
            await _abort(
                context, grpc.StatusCode.INTERNAL, f"app_id: cannot preview {app_id}: {exc}"
            )
        for name, check in PREVIEW_CHECKS:
            self.observer.shadow_pb(check, getattr(resp, name))
        return resp

    async def WatchApplicationStatus(  # type: ignore[override]
        self, request: pb.WatchApplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchApplicationStatusResponse | bytes]:
        try:
            ids = wire.watch_ids(request)
        except BadRequest as exc:
            await _invalid(context, exc)
        if self.watchers is None:
            await _abort(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                "this sidecar does not follow the change feed",
            )
        watchers = self.watchers
        try:
            sub = watchers.subscribe(ids)
        except WatchCut as cut:
            await _abort(context, cut.code, cut.message)
        try:
            if ids:
                try:
                    rows = await asyncio.wait_for(
                        self.store.read_rows([(a, None) for a in ids]), self.write_timeout
                    )
                except Exception:
                    await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
                now = self.clock()
                for row in rows:
                    if isinstance(row, Exception) or row[0] is None:
                        continue
                    watchers.schedule(row[0], now)
                    payload = watchers._render(row[0], now)
                    if payload is not None:
                        yield payload
            while True:
                try:
                    payloads = await sub.next(watchers.heartbeat_s)
                except WatchCut as cut:
                    await _abort(context, cut.code, cut.message)
                if payloads is None:
                    if self.checker.cache.feed_healthy:
                        yield pb.WatchApplicationStatusResponse()
                    continue
                for payload in payloads:
                    yield payload
        finally:
            watchers.unsubscribe(sub)

    def render_watched(self, status: AppStatus, now: Millis) -> bytes:
        """A watch message, serialized once for every stream that gets it."""
        resp = wire.watch_response(status, now, self.checker.cfg)
        self.observer.shadow_schedule(resp)
        return resp.SerializeToString()


class WatchCut(Exception):
    """A watch stream ends: ``code`` and ``message`` say why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Subscription:
    """One WatchApplicationStatus stream's view of the shared change log."""

    def __init__(self, watchers: Watchers, ids: frozenset[str] | None) -> None:
        self.watchers = watchers
        self.ids = ids
        self.cursor = watchers.seq
        self.group = watchers.next_group()
        # Latest payload per application not yet sent (coalesced: latest wins).
        self.pending: dict[str, bytes] = {}

    def _collect(self) -> None:
        w = self.watchers
        if w.closing:
            raise WatchCut(grpc.StatusCode.UNAVAILABLE, "server shutting down; watch again")
        if w.seq == self.cursor:
            return
        first = w.seq - len(w.log) + 1  # seq of the oldest entry kept
        if self.cursor + 1 < first:
            w.slow_cuts += 1
            raise WatchCut(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"watcher too slow: more than {w.log_size} changes behind; watch again",
            )
        ids = self.ids
        for i in range(self.cursor + 1 - first, len(w.log)):
            app_id, payload = w.log[i]
            if ids is None or app_id in ids:
                self.pending.pop(app_id, None)
                self.pending[app_id] = payload
        self.cursor = w.seq
        if len(self.pending) > w.max_pending:
            w.slow_cuts += 1
            raise WatchCut(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"watcher too slow: {len(self.pending)} applications' changes unsent; watch again",
            )

    async def next(self, timeout: float) -> list[bytes] | None:
        """The payloads to send now (each application's latest), or None when
        ``timeout`` passed with nothing sent (time for a heartbeat). A stream
        wakes only when the watchers flush; without send budget it waits for
        the next flush, coalescing meanwhile."""
        while True:
            self._collect()
            if self.pending and self.watchers.take(len(self.pending)):
                out = list(self.pending.values())
                self.pending.clear()
                return out
            try:
                await asyncio.wait_for(self.watchers.wakes[self.group].wait(), timeout)
            except TimeoutError:
                return None


class Watchers:
    """Fans the change feed out to WatchApplicationStatus streams.

    Each change is rendered once (bytes on the wire, shared by every stream)
    and appended to a bounded log; streams wake together at most every
    ``flush_s`` and take what concerns them, coalesced by application, so
    the work a change costs does not grow with the number of streams and a
    burst of changes does not wake every stream once per change. A stream
    whose client does not keep up is cut (RESOURCE_EXHAUSTED) once it falls
    more than ``log_size`` changes behind or holds ``max_pending`` unsent
    applications. Beyond ``max_streams`` open streams, new ones are refused.

    Every message sent to a watcher takes a token from one bucket refilled at
    ``send_rate`` a second, and streams are woken at most every 100 µs times
    their number (200 ms with 2,000 open): fan-out work is bounded whatever
    the number of streams, so it never runs ahead of the checks; streams wait
    their turn (coalescing meanwhile) and one that falls too far behind is
    cut. A time-driven transition wakes them at once.

    Time-driven transitions (a grace ending, a package expiring) change no
    record, so nothing comes on the feed: the transitions due within
    ``horizon_ms`` are kept in a heap and pushed at their instant.
    """

    def __init__(
        self,
        *,
        queue_size: int = 10_000,
        heartbeat_s: float = 1.0,
        max_streams: int = 1000,
        log_size: int = 50_000,
        flush_s: float = 0.02,
        horizon_ms: int = 10 * 60_000,
        send_rate: float = SEND_RATE,
    ) -> None:
        self.max_pending = queue_size
        self.send_rate = send_rate
        self._tokens = send_rate / 10
        self._refilled = time.monotonic()
        self.heartbeat_s = heartbeat_s
        self.max_streams = max_streams
        self.log_size = log_size
        self.flush_s = flush_s
        self.horizon_ms = horizon_ms
        self.log: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=log_size)
        self.seq = 0
        # Streams are woken a group at a time, so that no single wake holds
        # the event loop for long.
        self.wakes = [asyncio.Event() for _ in range(WAKE_GROUPS)]
        self._groups = 0
        self._cycle_seq = 0
        self._wake_due: asyncio.TimerHandle | asyncio.Handle | None = None
        self._subs: set[Subscription] = set()
        self.closing = False
        self.refused = 0
        self.slow_cuts = 0
        self.render_errors = 0
        self.render: Callable[[AppStatus, Millis], bytes] | None = None
        self.clock: Callable[[], Millis] = lambda: time.time_ns() // 1_000_000
        # Time-driven transitions: (instant, app id), and the same as a set.
        self._due: list[tuple[Millis, str]] = []
        self._due_set: set[tuple[Millis, str]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.refresh: Callable[[list[str]], Awaitable[list[AppStatus]]] | None = None
        self.transitions_pushed = 0
        self._first_watcher = asyncio.Event()

    def take(self, n: int) -> bool:
        """Take ``n`` send tokens if the bucket holds them (it may go into
        debt by one burst, so that a large backlog is not starved)."""
        now = time.monotonic()
        cap = self.send_rate / 10  # a tenth of a second of burst
        self._tokens = min(cap, self._tokens + (now - self._refilled) * self.send_rate)
        self._refilled = now
        if self._tokens >= min(n, cap):
            self._tokens -= n
            return True
        return False

    def subscribe(self, app_ids: list[str]) -> Subscription:
        if self.closing:
            raise WatchCut(grpc.StatusCode.UNAVAILABLE, "server shutting down; watch again")
        if len(self._subs) >= self.max_streams:
            self.refused += 1
            raise WatchCut(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many watch streams open ({self.max_streams}, --max-watch-streams); "
                "retry later or watch through another sidecar",
            )
        sub = Subscription(self, frozenset(app_ids) if app_ids else None)
        if not self._subs:
            self._first_watcher.set()
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """Shutting down: end every stream (UNAVAILABLE, watch again)."""
        self.closing = True
        self._wake_now()
        if self._timer is not None:
            self._timer.cancel()

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def __len__(self) -> int:
        return len(self._subs)

    def next_group(self) -> int:
        self._groups += 1
        return self._groups % WAKE_GROUPS

    def _wake_now(self) -> None:
        """Wake every group at once (shutdown, a time-driven transition)."""
        self._wake_due = None
        for g in range(WAKE_GROUPS):
            self._wake_group(g)

    def _wake_group(self, g: int) -> None:
        wake, self.wakes[g] = self.wakes[g], asyncio.Event()
        wake.set()

    def _cycle(self, g: int, step: float) -> None:
        """Wake group ``g``, then the next one ``step`` seconds later."""
        self._wake_group(g)
        if g + 1 < WAKE_GROUPS:
            self._wake_due = asyncio.get_running_loop().call_later(step, self._cycle, g + 1, step)
        else:
            self._wake_due = None

    def _render(self, status: AppStatus, now: Millis) -> bytes | None:
        if self.render is None:
            return None
        try:
            return self.render(status, now)
        except Exception as exc:
            # A status that cannot be rendered is skipped, never a broken stream.
            self.render_errors += 1
            if self.render_errors == 1 or self.render_errors % 1000 == 0:
                log.warning("cannot send the status of %s to watchers: %s", status.app_id, exc)
            return None

    def publish(
        self,
        app_id: str,
        status: AppStatus | None,
        now: Millis | None = None,
        *,
        urgent: bool = False,
    ) -> None:
        if status is None or self.closing:
            return
        now = self.clock() if now is None else now
        self.schedule(status, now)
        if not self._subs:
            return
        payload = self._render(status, now)
        if payload is None:
            return
        self.log.append((app_id, payload))
        self.seq += 1
        if urgent:
            if self._wake_due is not None:
                self._wake_due.cancel()
            self._wake_due = asyncio.get_running_loop().call_soon(self._wake_now)
        elif self._wake_due is None:
            # Waking every stream costs in proportion to their number: the
            # more streams, the less often (each wake carries more changes).
            interval = max(self.flush_s, len(self._subs) * FLUSH_PER_STREAM_S)
            step = interval / WAKE_GROUPS
            self._wake_due = asyncio.get_running_loop().call_later(step, self._cycle, 0, step)

    # -- time-driven transitions --------------------------------------------

    async def follow_transitions(self, cache: StatusCache) -> None:
        """Keep the heap filled from every status held, not only those that
        changed: every ``horizon/2`` while someone watches, and as soon as
        the first stream opens. Chunked, so that checks are not held up."""
        while True:
            if self._subs:
                now = self.clock()
                until = now + self.horizon_ms
                ids = cache.app_ids()
                for n, app_id in enumerate(ids):
                    for t in cache.transitions(app_id, now, until):
                        item = (t, app_id)
                        if item not in self._due_set:
                            self._due_set.add(item)
                            heapq.heappush(self._due, item)
                    if n % 2000 == 1999:
                        await asyncio.sleep(0)
                self._arm(self.clock())
                wait = self.horizon_ms / 2000
            else:
                wait = 3600.0
            self._first_watcher.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_watcher.wait(), wait)

    def schedule(self, status: AppStatus, now: Millis) -> None:
        """Remember the transitions of ``status`` due within the horizon."""
        horizon = now + self.horizon_ms
        added = False
        for seg in status.segments:
            if now < seg.starts_at <= horizon:
                item = (seg.starts_at, status.app_id)
                if item not in self._due_set:
                    self._due_set.add(item)
                    heapq.heappush(self._due, item)
                    added = True
        if added:
            self._arm(now)

    def _arm(self, now: Millis) -> None:
        if not self._due or self.closing:
            return
        with contextlib.suppress(RuntimeError):  # no running loop (unit use)
            loop = asyncio.get_running_loop()
            if self._timer is not None:
                self._timer.cancel()
            delay = max(0.0, (self._due[0][0] - now) / 1000)
            self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock()
        due: list[tuple[Millis, str]] = []
        while self._due and self._due[0][0] <= now:
            item = heapq.heappop(self._due)
            self._due_set.discard(item)
            due.append(item)
        if due:
            asyncio.get_running_loop().create_task(self._push(due))
        self._arm(now)

    async def _push(self, due: list[tuple[Millis, str]]) -> None:
        """At a transition's instant, send each affected app's status as of then."""
        if not self._subs or self.refresh is None:
            return
        app_ids = sorted({app for _, app in due if self._watched_by_any(app)})
        if not app_ids:
            return
        try:
            statuses = await self.refresh(app_ids)
        except Exception as exc:
            log.warning("cannot read statuses for time-driven watch updates: %s", exc)
            return
        at = {app: t for t, app in due}
        for status in statuses:
            t = at.get(status.app_id, 0)
            if any(seg.starts_at == t for seg in status.segments):
                self.transitions_pushed += 1
                self.publish(status.app_id, status, max(t, self.clock()), urgent=True)

    def _watched_by_any(self, app_id: str) -> bool:
        return any(s.ids is None or app_id in s.ids for s in self._subs)


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


# A connection that has not completed the TLS and HTTP/2 handshake (the
# client's preface and first SETTINGS) by then is closed: an idle socket must
# not hold a slot for ever.
HANDSHAKE_TIMEOUT_MS = 10_000


def connection_limits(handshake_timeout_ms: int = HANDSHAKE_TIMEOUT_MS) -> list[tuple[str, Any]]:
    """gRPC server options that bound what one peer can hold open."""
    return [
        ("grpc.server_handshake_timeout_ms", handshake_timeout_ms),
        # Streams one connection may have open at once (watches included).
        ("grpc.max_concurrent_streams", 256),
        # A connection with no call for 5 minutes is closed (GOAWAY: a client
        # reconnects on its next call).
        ("grpc.max_connection_idle_ms", 300_000),
        # Dead peers are found by keepalive pings, and clients may ping no
        # more often than every 10 s.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ]


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A serializer that sends already serialized messages as they are (a
    watch message is serialized once for all the streams that carry it)."""

    def out(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return out


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
            except Exception as exc:
                # Logged with the request id; the caller gets INTERNAL, never
                # grpc's UNKNOWN naming a Python class.
                log.exception("unexpected error", extra={"event": "rpc_error"})
                await _abort(
                    context, grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
                )
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
        serialize = _passing_bytes(getattr(pb, method.output_type.name).SerializeToString)
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
    serving: bool = True,
    handshake_timeout_ms: int | None = None,
) -> RunningServer:
    """Start EnforcementService, health and reflection on ``listen``.

    With ``tls``, each new connection uses the certificate files as they are
    then (changed files are loaded again: see :mod:`lcic_guard.sidecar.certs`).
    ``interceptors`` (e.g. :mod:`lcic_guard.sidecar.auth`) see every call.
    ``reuse_port`` only for the processes of one ``--workers N``: gRPC turns
    SO_REUSEPORT on by default, and with it a second sidecar on a taken port
    would silently share it and half the checks would reach the wrong one.
    With ``serving=False`` health says NOT_SERVING until the caller says
    otherwise.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *connection_limits(handshake_timeout_ms or HANDSHAKE_TIMEOUT_MS),
            *(options or []),
        ],
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
    await running.set_serving(serving)
    return running
