"""The one way into an EnforcementService call, on the threaded server.

Every call — the checks on their fast path (:mod:`lcic_guard.sidecar.checks`),
the watch streams, served without a thread (:mod:`lcic_guard.sidecar.watch`),
the other unary calls and streams bridged to the event loop
(:mod:`lcic_guard.sidecar.bridge`) — goes through :class:`Entry`: the hooks
run around it on the serving thread (auth's scope check, the tracing span:
synchronous, so a cache hit stays on the serving thread whatever is
configured), and a call that fails ends as :mod:`lcic_guard.sidecar.errors`
says. A hook runs once per call, wherever the call is then answered.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Final, Protocol

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard import logs
from lcic_guard.sidecar.bridge import Bridge
from lcic_guard.sidecar.checks import BATCH_METHOD, SINGLE, Checks
from lcic_guard.sidecar.errors import Refused, end, status_of
from lcic_guard.sidecar.service import EnforcementServicer
from lcic_guard.sidecar.watch import METHOD as WATCH_METHOD
from lcic_guard.sidecar.watch import WatchStream
from lcic_guard.sidecar.watchers import Send

SERVICE: Final = pb.DESCRIPTOR.services_by_name["EnforcementService"]
PREFIX: Final = f"/{SERVICE.full_name}/"

Unary = Callable[[bytes, grpc.ServicerContext], bytes]
Streaming = Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]
# Opens a stream and returns; the stream's end calls the last argument once.
Opening = Callable[[bytes, grpc.ServicerContext, Send, Callable[[grpc.StatusCode], None]], None]
NonBlocking = Callable[[bytes, grpc.ServicerContext, Send], None]


class Hook(Protocol):
    """Runs on the serving thread around the calls it :meth:`wants`:
    :meth:`enter` before the call is answered (it may refuse it by raising
    :class:`~lcic_guard.sidecar.errors.Refused`; what it returns is given
    back to :meth:`leave`), :meth:`leave` once it is answered or failed,
    with the bytes sent (None for a failure or a stream) and the status."""

    def wants(self, method: str) -> bool: ...

    def enter(self, method: str, raw: bytes, context: grpc.ServicerContext) -> Any: ...

    def leave(self, state: Any, response: bytes | None, code: grpc.StatusCode) -> None: ...


class _Opened:
    """The hooks of one stream served without a thread (see :meth:`Entry.open_stream`)."""

    def __init__(self, hooks: tuple[Hook, ...], context: contextvars.Context) -> None:
        self.hooks = hooks
        self.context = context
        self.entered: list[tuple[Hook, Any]] = []
        self._lock = threading.Lock()
        self._opening = True
        self._ended: grpc.StatusCode | None = None  # done while opening
        self._left = False

    def open(
        self,
        method: str,
        raw: bytes,
        context: grpc.ServicerContext,
        send: Send,
        body: Opening,
    ) -> None:
        for hook in self.hooks:
            self.entered.append((hook, hook.enter(method, raw, context)))
        body(raw, context, send, self.done)

    def opened(self, failure: Exception | None) -> None:
        with self._lock:
            self._opening = False
            code = status_of(failure)[0] if failure is not None else self._ended
        if code is not None:
            self.context.run(self._leave, code)

    def done(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._opening:
                self._ended = code
                return
        self.context.run(self._leave, code)

    def _leave(self, code: grpc.StatusCode) -> None:
        if self._left:
            return
        self._left = True
        for hook, state in reversed(self.entered):
            hook.leave(state, None, code)


class Entry:
    """Wraps the body of each call with the hooks that want it."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self.hooks = tuple(hooks)

    def unary(self, method: str, body: Unary, *, bind: bool = False) -> Unary:
        """``body`` as a call of ``method``; with ``bind`` a request id is
        bound to every call (the bridged ones), else the body binds one when
        it needs it (the checks)."""
        hooks = tuple(h for h in self.hooks if h.wants(method))
        if not hooks and not bind:

            def bare(raw: bytes, context: grpc.ServicerContext) -> bytes:
                try:
                    return body(raw, context)
                except Exception as exc:
                    end(context, exc)

            return bare

        def served(raw: bytes, context: grpc.ServicerContext) -> bytes:
            if bind:
                logs.bind_call(context)  # request id: logs and trailing metadata
            entered: list[tuple[Hook, Any]] = []
            response: bytes | None = None
            code = grpc.StatusCode.OK
            failure: Exception | None = None
            try:
                for hook in hooks:
                    entered.append((hook, hook.enter(method, raw, context)))
                response = body(raw, context)
            except Exception as exc:
                failure = exc
                code = status_of(exc)[0]
            finally:
                for hook, state in reversed(entered):
                    hook.leave(state, response, code)
            if failure is not None:
                end(context, failure)
            assert response is not None
            return response

        return served

    def stream(self, method: str, body: Streaming) -> Streaming:
        """``body`` as a server-streaming call of ``method`` (a request id
        bound to it)."""
        hooks = tuple(h for h in self.hooks if h.wants(method))

        def served(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            logs.bind_call(context)
            entered: list[tuple[Hook, Any]] = []
            code = grpc.StatusCode.OK
            failure: Exception | None = None
            try:
                for hook in hooks:
                    entered.append((hook, hook.enter(method, raw, context)))
                yield from body(raw, context)
            except Exception as exc:
                failure = exc
                code = status_of(exc)[0]
            finally:
                for hook, state in reversed(entered):
                    hook.leave(state, None, code)
            if failure is not None:
                end(context, failure)

        return served

    def open_stream(self, method: str, body: Opening) -> NonBlocking:
        """``body`` as a server-streaming call of ``method`` that gRPC serves
        without a thread (a request id bound while it opens): ``body`` opens
        the stream and returns; whoever ends it later, on whatever thread,
        calls the ``done`` it is given, which runs the hooks' ``leave``.

        The hooks set context variables (the caller, the span) that must be
        reset in the context they were set in: they run in a context of the
        call's own, which ``done`` enters again (after the opening thread has
        left it, if the stream ends while it opens)."""
        hooks = tuple(h for h in self.hooks if h.wants(method))

        def served(raw: bytes, context: grpc.ServicerContext, send: Send) -> None:
            logs.bind_call(context)
            call = _Opened(hooks, contextvars.copy_context())
            failure: Exception | None = None
            try:
                call.context.run(call.open, method, raw, context, send, body)
            except Exception as exc:
                failure = exc
            call.opened(failure)
            if failure is not None:
                end(context, failure)

        served.experimental_non_blocking = True  # type: ignore[attr-defined]
        return served


def _unimplemented(name: str, streaming: bool) -> Callable[..., Any]:
    """An RPC of the service the servicer does not implement (yet)."""

    async def unary(request: Any, context: Any) -> Any:
        raise Refused(grpc.StatusCode.UNIMPLEMENTED, f"{name}: not served")

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        raise Refused(grpc.StatusCode.UNIMPLEMENTED, f"{name}: not served")
        yield  # pragma: no cover - an async generator

    return stream if streaming else unary


def handlers(
    servicer: EnforcementServicer, bridge: Bridge, entry: Entry
) -> dict[str, grpc.RpcMethodHandler]:
    """EnforcementService's handlers on the threaded server (raw bytes in,
    bytes out): the checks on their fast path, the watch streams on their
    own threads, every other RPC as the servicer's coroutine on the loop,
    each through ``entry``."""
    checks = Checks(servicer.checker, servicer.observer, bridge)
    out: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        name, full = method.name, PREFIX + method.name
        if name in SINGLE:
            out[name] = grpc.unary_unary_rpc_method_handler(entry.unary(full, checks.single(name)))
            continue
        if name == BATCH_METHOD:
            out[name] = grpc.unary_unary_rpc_method_handler(entry.unary(full, checks.batch))
            continue
        if name == WATCH_METHOD:
            watch = WatchStream(servicer, bridge)
            out[name] = grpc.unary_stream_rpc_method_handler(entry.open_stream(full, watch))
            continue
        parse = getattr(pb, method.input_type.name).FromString
        serialize = getattr(pb, method.output_type.name).SerializeToString
        impl = getattr(servicer, name, None) or _unimplemented(name, method.server_streaming)
        if method.server_streaming:
            body = bridge.stream(impl, parse, serialize)
            out[name] = grpc.unary_stream_rpc_method_handler(entry.stream(full, body))
        else:
            served = entry.unary(full, bridge.unary(impl, parse, serialize), bind=True)
            out[name] = grpc.unary_unary_rpc_method_handler(served)
    return out
