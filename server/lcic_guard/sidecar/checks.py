"""The checks' fast path: a check the cache answers is answered on the
serving thread — validation, one memo lookup, the memoized bytes sent as
they are — whatever hooks (auth, tracing) run around it (see
:mod:`lcic_guard.sidecar.calls`). A check the cache cannot answer (a Redis
read, or a failure mode), or a batch's misses, goes to the event loop
through the bridge. Each is counted by the path it took
(``lcic_guard_check_paths_total{path}``: ``thread`` or ``loop``).

A request id is bound to a check only when the caller sends one, a log line
is made for it, or it must read Redis. (gRPC runs each call in a context of
its own, so nothing bound here outlives the call.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard import logs
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.bridge import Bridge, parsed
from lcic_guard.sidecar.checker import Answer, Checker, CheckRequest
from lcic_guard.sidecar.metrics import BATCH, LOOP, THREAD
from lcic_guard.sidecar.observe import DecisionObserver

SINGLE: Final[dict[str, tuple[Callable[[bytes], Any], Callable[[Any], CheckRequest]]]] = {
    "CanCreateClassroom": (pb.CanCreateClassroomRequest.FromString, wire.create_request),
    "CanEnterClassroom": (pb.CanEnterClassroomRequest.FromString, wire.enter_request),
    "CanAccessRecording": (pb.CanAccessRecordingRequest.FromString, wire.recording_request),
}
BATCH_METHOD: Final = "CheckBatch"

Served = Callable[[bytes, grpc.ServicerContext], bytes]


class Checks:
    """The four check RPCs, as bodies for :class:`~lcic_guard.sidecar.calls.Entry`:
    they raise on a bad request (BadRequest) and never abort the call
    themselves."""

    def __init__(self, checker: Checker, observer: DecisionObserver, bridge: Bridge) -> None:
        self.checker = checker
        self.observer = observer
        self.bridge = bridge

    def _request_id(
        self, context: grpc.ServicerContext, answers: Sequence[Answer], token: Any
    ) -> Any:
        """Bind a request id when the caller sent one or a line is logged."""
        if token is not None:
            return token
        for key, _ in context.invocation_metadata():
            if key == logs.REQUEST_ID_KEY:
                return logs.bind_call(context)
        if self.observer.needs_request_id(answers):
            return logs.bind_call(context)
        return None

    def single(self, name: str) -> Served:
        parse, validate = SINGLE[name]
        checker, observer, bridge = self.checker, self.observer, self.bridge
        metrics = observer.metrics

        def served(raw: bytes, context: grpc.ServicerContext) -> bytes:
            start = time.perf_counter()
            req = validate(parsed(raw, parse))
            token = None
            path = THREAD
            answer = checker.answer(req)
            if answer is None:
                # To Redis, on the loop: what it logs carries the request id
                # (kept bound if it fails: the error returns it too).
                token = logs.bind_call(context)
                path = LOOP
                answer = bridge.run(checker.answer_any(req), context)
            if metrics is not None:
                metrics.timed(req.check.value, time.perf_counter() - start, path)
            token = self._request_id(context, (answer,), token)
            try:
                observer.observe(req, answer)
            finally:
                if token is not None:
                    logs.request_id.reset(token)
            return answer.payload

        return served

    def batch(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        checker, observer = self.checker, self.observer
        start = time.perf_counter()
        reqs = wire.batch_requests(parsed(raw, pb.CheckBatchRequest.FromString))
        token = None
        path = THREAD
        now, answer = checker.clock(), checker.answer
        found = [answer(r, now) for r in reqs]
        if None in found:
            token = logs.bind_call(context)
            path = LOOP
            answers = self.bridge.run(checker.complete_many(reqs, found), context)
        else:
            answers = cast(list[Answer], found)
        if observer.metrics is not None:
            observer.metrics.timed(BATCH, time.perf_counter() - start, path)
        token = self._request_id(context, answers, token)
        try:
            observer.observe_many(reqs, answers)
        finally:
            if token is not None:
                logs.request_id.reset(token)
        return b"".join([a.payload for a in answers])
