"""The serving core: a threaded gRPC server in front of the event loop.

Why threaded: with the same messages, gRPC's threaded server answers 20-50%
more unary calls a second than grpc.aio on a 2-core machine, and costs less
CPU per call (docs/benchmarks.md). The checks are answered from memory, so
they need no event loop: a cache hit is answered on the serving thread
(validation, one memo lookup, bytes out). Everything that does I/O stays on
the event loop, where the cache's change feed, the Redis client and the
watchers live: a check the cache cannot answer, the reports, the status
reads, previews, watch streams and any RPC added later run there as the
coroutines of :class:`~lcic_guard.sidecar.service.EnforcementServicer`,
through their grpc.aio interceptors (auth, tracing) and with a context that
behaves like grpc.aio's: a unary call with ``run_coroutine_threadsafe``, a
stream as a task on the loop that hands its messages to the serving thread
through a queue.

Every request is validated as before (INVALID_ARGUMENT naming the field).
A request id is bound to a check only when the caller sends one, a log line
is made for it, or it must read Redis; bridged calls always bind one, as
before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, Final, NamedTuple, NoReturn

import grpc
import grpc._server
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard import logs
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.auth import AuthInterceptor
from lcic_guard.sidecar.checker import Answer, CheckRequest
from lcic_guard.sidecar.metrics import BATCH
from lcic_guard.sidecar.service import EnforcementServicer
from lcic_guard.sidecar.wire import BadRequest

log = logging.getLogger(__name__)

# Threads running unary calls at once. A cache hit holds its thread for
# tens of microseconds of Python, so a few keep 2 cores busy, and every
# thread more that is runnable adds GIL hand-offs: at concurrency 64, 16
# threads cost about 100 µs of CPU per check more than 2-4 did
# (docs/benchmarks.md). A call waiting on the event loop (a Redis read) does
# not count: another thread takes its place, up to CALL_THREADS_LIMIT.
CHECK_THREADS: Final = 4
CALL_THREADS_LIMIT: Final = 256
SPARE_IDLE_S: Final = 10.0  # how long a parked thread waits to be needed


class CallPool(concurrent.futures.Executor):
    """A thread pool that keeps at most ``active`` threads runnable: a thread
    inside :meth:`waiting` (blocked on the event loop) is replaced by a new
    one when work is queued, up to ``limit`` threads, and a thread finding
    itself surplus after its call ends. So a slow or frozen Redis holds
    threads, not the checks the cache answers."""

    def __init__(self, active: int, limit: int, name: str = "lcic-guard-rpc") -> None:
        self.active, self.limit, self.name = active, max(limit, active), name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._waiting = self._idle = 0
        self._started = 0
        self._closed = False
        # Threads that were surplus after a call, parked to be woken instead
        # of starting a new thread (under a stream of Redis reads, starting
        # and ending a thread per read cost more than the read).
        self._spares: list[threading.Event] = []

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((future, fn, args, kwargs))
            if self._idle == 0 and self._threads - self._waiting < self.active:
                self._spawn()
        return future

    def _spawn(self) -> None:  # with _lock held
        if self._threads >= self.limit:
            return
        self._threads += 1
        if self._spares:
            self._spares.pop().set()
            return
        self._started += 1
        threading.Thread(
            target=self._work, name=f"{self.name}_{self._started}", daemon=True
        ).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._queue.get()
            with self._lock:
                self._idle -= 1
            if item is None:
                with self._lock:
                    self._threads -= 1
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            spare = None
            with self._lock:
                if self._threads - self._waiting > self.active:
                    self._threads -= 1  # a waiting thread came back: one too many
                    spare = threading.Event()
                    self._spares.append(spare)
            if spare is not None and not self._park(spare):
                return

    def _park(self, spare: threading.Event) -> bool:
        """Wait to be woken by _spawn (True) or end after a while idle."""
        if spare.wait(SPARE_IDLE_S) and not self._closed:
            return True
        with self._lock:
            if spare in self._spares:
                self._spares.remove(spare)
                return False
        return not self._closed  # woken as the wait ended: counted again

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a wait on the event loop: this thread does not count."""
        with self._lock:
            self._waiting += 1
            if not self._queue.empty() and self._threads - self._waiting < self.active:
                self._spawn()
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._queue.put(None)
            for spare in self._spares:
                spare.set()
            self._spares.clear()


# grpc's threaded server runs a streaming call's whole life on a pool
# thread; it is recognised by the function grpc submits for it.
_STREAM_IN_POOL: Final = getattr(grpc._server, "_stream_response_in_pool", None)


class Pools(concurrent.futures.Executor):
    """The threaded server's executor: unary calls on a :class:`CallPool`,
    each stream (watches, health watches, reflection) on a thread of its own
    pool, so that open streams never take the threads checks need."""

    def __init__(self, calls: int, streams: int) -> None:
        self.calls = CallPool(calls, CALL_THREADS_LIMIT)
        self.streams = concurrent.futures.ThreadPoolExecutor(streams, "lcic-guard-stream")

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        streaming = _STREAM_IN_POOL is not None and (
            fn is _STREAM_IN_POOL or (bool(args) and args[0] is _STREAM_IN_POOL)
        )
        pool = self.streams if streaming else self.calls
        return pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.calls.shutdown(wait, cancel_futures=cancel_futures)
        self.streams.shutdown(wait, cancel_futures=cancel_futures)


_SINGLE: Final[dict[str, tuple[Callable[[bytes], Any], Callable[[Any], CheckRequest]]]] = {
    "CanCreateClassroom": (pb.CanCreateClassroomRequest.FromString, wire.create_request),
    "CanEnterClassroom": (pb.CanEnterClassroomRequest.FromString, wire.enter_request),
    "CanAccessRecording": (pb.CanAccessRecordingRequest.FromString, wire.recording_request),
}


class _Details(NamedTuple):
    """grpc.HandlerCallDetails, for the grpc.aio interceptors."""

    method: str
    invocation_metadata: Any


class _Aborted(Exception):
    pass


class BridgedContext:
    """What the grpc.aio handlers and interceptors use of their context, over
    a threaded call's context. ``abort`` records the status and raises, as
    grpc.aio's does; the serving thread then ends the call with it."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(metadata)

    def peer(self) -> str:
        return str(self._context.peer())

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def time_remaining(self) -> Any:
        return self._context.time_remaining()

    def is_active(self) -> bool:
        return bool(self._context.is_active())

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        if trailing_metadata:
            self._context.set_trailing_metadata(trailing_metadata)
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    def finish(self, exc: BaseException | None) -> None:
        """End the threaded call as the coroutine ended (``exc``: raised)."""
        if self._code is not None and self._code is not grpc.StatusCode.OK:
            self._context.abort(self._code, self._details or "")
        if exc is None:
            return
        if isinstance(exc, concurrent.futures.CancelledError | asyncio.CancelledError):
            self._context.abort(grpc.StatusCode.CANCELLED, "call cancelled")
        log.error("unexpected error", exc_info=exc, extra={"event": "rpc_error"})
        self._context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")


class Bridge:
    """Runs grpc.aio handlers, through their interceptors, on ``loop``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handlers: dict[str, grpc.RpcMethodHandler],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
    ) -> None:
        self.loop = loop
        self.pool: CallPool | None = None  # set by the server using it
        self.handlers = handlers
        self.interceptors = tuple(interceptors)
        prefix = f"/{pb.DESCRIPTOR.services_by_name['EnforcementService'].full_name}/"
        self.prefix = prefix

    def checks_unintercepted(self) -> bool:
        """True when no interceptor wants to see the checks (auth that
        leaves them open does not): they may skip the bridge."""
        for icpt in self.interceptors:
            if not isinstance(icpt, AuthInterceptor):
                return False
            if icpt.protects(self.prefix + "CanCreateClassroom"):
                return False
        return True

    async def _handler(self, name: str, metadata: Any) -> grpc.RpcMethodHandler | None:
        async def innermost(details: Any) -> grpc.RpcMethodHandler | None:
            return self.handlers.get(details.method[len(self.prefix) :])

        cont: Callable[[Any], Awaitable[Any]] = innermost
        for icpt in reversed(self.interceptors):
            cont = _link(icpt, cont)
        return await cont(_Details(self.prefix + name, metadata))

    def run(self, coro: Coroutine[Any, Any, Any], context: grpc.ServicerContext) -> Any:
        """Wait in this thread for ``coro`` on the loop; cancelled with the call."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        context.add_callback(future.cancel)
        if self.pool is None:
            return future.result()
        with self.pool.waiting():
            return future.result()

    def unary(self, name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        async def call(raw: bytes, bridged: BridgedContext) -> bytes:
            handler = await self._handler(name, bridged.invocation_metadata())
            if handler is None or handler.unary_unary is None:
                await bridged.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: not served")
                raise AssertionError("abort returned")  # pragma: no cover
            response = await handler.unary_unary(raw, bridged)
            serialize = handler.response_serializer
            return response if serialize is None else serialize(response)  # type: ignore[no-any-return]

        def served(raw: bytes, context: grpc.ServicerContext) -> bytes:
            bridged = BridgedContext(context)
            try:
                out = self.run(call(raw, bridged), context)
            except grpc.aio.AbortError:
                bridged.finish(None)
                raise
            except BaseException as exc:
                bridged.finish(exc)
                raise
            bridged.finish(None)
            return out  # type: ignore[no-any-return]

        return served

    def stream(self, name: str) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        """A server-streaming call: a task on the loop runs the grpc.aio
        handler and hands its messages to the serving thread through a queue
        (no round trip to the loop per message), at most :data:`STREAM_AHEAD`
        ahead of what the thread has sent, so a slow client still slows the
        handler down (and gets cut by it)."""

        def served(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            bridged = BridgedContext(context)
            handoff: queue.SimpleQueue[Any] = queue.SimpleQueue()
            taken = [0]
            resume: list[asyncio.Event] = []  # set when the thread has caught up

            async def pump() -> None:
                try:
                    handler = await self._handler(name, bridged.invocation_metadata())
                    if handler is None or handler.unary_stream is None:
                        await bridged.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: not served")
                        raise AssertionError("abort returned")  # pragma: no cover
                    serialize = handler.response_serializer
                    sent = 0
                    resume.append(asyncio.Event())
                    resume[0].set()  # cleared only while waiting
                    async for item in handler.unary_stream(raw, bridged):
                        handoff.put(item if serialize is None else serialize(item))
                        sent += 1
                        if sent - taken[0] >= STREAM_AHEAD:
                            resume[0].clear()
                            if sent - taken[0] >= STREAM_AHEAD:  # still, after clear
                                await resume[0].wait()
                    handoff.put(_END)
                except BaseException as exc:
                    handoff.put(_Failed(exc))
                    if not isinstance(exc, Exception):
                        raise

            future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
            context.add_callback(future.cancel)
            try:
                while True:
                    item = handoff.get()
                    if item is _END:
                        break
                    if isinstance(item, _Failed):
                        if isinstance(item.exc, grpc.aio.AbortError):
                            bridged.finish(None)
                        bridged.finish(item.exc)
                    yield item
                    taken[0] += 1
                    if resume and not resume[0].is_set():
                        with contextlib.suppress(RuntimeError):  # the loop closed
                            self.loop.call_soon_threadsafe(resume[0].set)
            finally:
                future.cancel()  # the handler's finally blocks (unsubscribing) run on the loop
            bridged.finish(None)

        return served


# How many messages of a stream may wait for its serving thread.
STREAM_AHEAD: Final = 32
_END: Final = object()


class _Failed(NamedTuple):
    exc: BaseException


def _link(
    icpt: grpc.aio.ServerInterceptor, cont: Callable[[Any], Awaitable[Any]]
) -> Callable[[Any], Awaitable[Any]]:
    async def next_(details: Any) -> Any:
        return await icpt.intercept_service(cont, details)

    return next_


class Checks:
    """The check RPCs answered on the serving thread from the cache (the
    rest of a check, or a batch's misses, is bridged to the loop)."""

    def __init__(self, servicer: EnforcementServicer, bridge: Bridge) -> None:
        self.checker = servicer.checker
        self.observer = servicer.observer
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

    def single(
        self,
        parse: Callable[[bytes], Any],
        validate: Callable[[Any], CheckRequest],
    ) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        checker, observer, bridge = self.checker, self.observer, self.bridge
        metrics = observer.metrics

        def served(raw: bytes, context: grpc.ServicerContext) -> bytes:
            start = time.perf_counter()
            req = _valid(raw, parse, validate, context)
            token = None
            try:
                answer = checker.answer(req)
                if answer is None:
                    # To Redis, on the loop: what it logs carries the request id.
                    token = logs.bind_call(context)
                    answer = bridge.run(
                        _bound(checker.answer_any(req), logs.request_id.get()), context
                    )
            except Exception as exc:
                if token is not None:
                    logs.request_id.reset(token)
                _internal(context, exc)
            if metrics is not None:
                metrics.timed(req.check.value, time.perf_counter() - start)
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
        reqs = _valid(raw, pb.CheckBatchRequest.FromString, wire.batch_requests, context)
        token = None
        try:
            now, answer = checker.clock(), checker.answer
            found = [answer(r, now) for r in reqs]
            if None in found:
                token = logs.bind_call(context)
                answers = self.bridge.run(
                    _bound(checker.complete_many(reqs, found), logs.request_id.get()), context
                )
            else:
                answers = found
        except Exception as exc:
            if token is not None:
                logs.request_id.reset(token)
            _internal(context, exc)
        if observer.metrics is not None:
            observer.metrics.timed(BATCH, time.perf_counter() - start)
        token = self._request_id(context, answers, token)
        try:
            observer.observe_many(reqs, answers)
        finally:
            if token is not None:
                logs.request_id.reset(token)
        return b"".join([a.payload for a in answers])


async def _bound(coro: Awaitable[Any], rid: str | None) -> Any:
    """``coro`` with the calling thread's request id (read when made)."""
    logs.request_id.set(rid)
    return await coro


def _valid(
    raw: bytes,
    parse: Callable[[bytes], Any],
    validate: Callable[[Any], Any],
    context: grpc.ServicerContext,
) -> Any:
    try:
        message = parse(raw)
    except Exception as exc:
        message, why = None, f"request: malformed message: {exc}"
    else:
        try:
            return validate(message)
        except BadRequest as exc:  # a bad field becomes INVALID_ARGUMENT, naming it
            why = str(exc)
    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, why)


def _internal(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, concurrent.futures.CancelledError):
        context.abort(grpc.StatusCode.CANCELLED, "call cancelled")
    _abort(context, grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})", exc)


def _abort(
    context: grpc.ServicerContext, code: grpc.StatusCode, why: str, exc: Exception | None = None
) -> NoReturn:
    """End a check with an error, its request id returned and logged."""
    token = logs.bind_call(context)
    try:
        if exc is not None:
            log.error("unexpected error", exc_info=exc, extra={"event": "rpc_error"})
        context.abort(code, why)
    finally:
        logs.request_id.reset(token)
    raise AssertionError("abort returned")  # pragma: no cover


def handlers(servicer: EnforcementServicer, bridge: Bridge) -> dict[str, grpc.RpcMethodHandler]:
    """EnforcementService's handlers on the threaded server: raw bytes in,
    bytes out."""
    out: dict[str, grpc.RpcMethodHandler] = {}
    checks = Checks(servicer, bridge) if bridge.checks_unintercepted() else None
    for method in pb.DESCRIPTOR.services_by_name["EnforcementService"].methods:
        name = method.name
        if method.server_streaming:
            out[name] = grpc.unary_stream_rpc_method_handler(bridge.stream(name))
        elif checks is not None and name in _SINGLE:
            out[name] = grpc.unary_unary_rpc_method_handler(checks.single(*_SINGLE[name]))
        elif checks is not None and name == "CheckBatch":
            out[name] = grpc.unary_unary_rpc_method_handler(checks.batch)
        else:
            out[name] = grpc.unary_unary_rpc_method_handler(bridge.unary(name))
    return out
