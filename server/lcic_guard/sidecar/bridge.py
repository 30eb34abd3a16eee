"""The bridge from the serving threads to the event loop.

The change feed, the Redis client and the servicer's coroutines
(:class:`~lcic_guard.sidecar.service.EnforcementServicer`) live on the event
loop; gRPC's threaded server calls on its own threads. A
serving thread hands a coroutine to the loop with :meth:`Bridge.run` and
waits for it without counting as runnable (see
:class:`~lcic_guard.sidecar.threads.CallPool`); a stream is a task on the
loop feeding its serving thread through a queue (:meth:`Bridge.stream`).

A coroutine runs with the serving thread's context variables as they were
when it was handed over (the request id, the caller auth admitted, the
current span), so what it logs or records names the call. Handlers see a
:class:`BridgedContext`, which behaves like grpc.aio's context: their
``abort`` ends up as :class:`~lcic_guard.sidecar.errors.Refused`, and the
call ends as :mod:`lcic_guard.sidecar.errors` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Final, NamedTuple

import grpc

from lcic_guard.sidecar.errors import Refused, malformed
from lcic_guard.sidecar.threads import CallPool

# How many messages of a stream may wait for its serving thread.
STREAM_AHEAD: Final = 32
_END: Final = object()

Unary = Callable[[Any, Any], Coroutine[Any, Any, Any]]
Streaming = Callable[[Any, Any], AsyncIterator[Any]]


class _Failed(NamedTuple):
    exc: BaseException


class BridgedContext:
    """What the servicer's coroutines use of their context, over a threaded
    call's context. ``abort`` records the status and raises, as grpc.aio's
    does; :meth:`outcome` turns it into the exception the call ends with."""

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

    def outcome(self, exc: BaseException | None) -> BaseException | None:
        """What the call ends with, the coroutine having raised ``exc``
        (None: returned): its own abort or status first."""
        if self._code is not None and self._code is not grpc.StatusCode.OK:
            return Refused(self._code, self._details or "")
        if isinstance(exc, grpc.aio.AbortError):
            return Refused(grpc.StatusCode.UNKNOWN, "aborted")  # pragma: no cover
        return exc


async def _carried(coro: Coroutine[Any, Any, Any], ctx: contextvars.Context) -> Any:
    """``coro`` with the context variables of the thread that handed it over."""

    for var, value in ctx.items():
        var.set(value)
    return await coro


def parsed(raw: bytes, parse: Callable[[bytes], Any]) -> Any:
    """The request, or BadRequest (INVALID_ARGUMENT) for bytes that do not parse."""
    try:
        return parse(raw)
    except Exception as exc:
        raise malformed(exc) from None


class Bridge:
    """Runs coroutines for the serving threads on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: CallPool | None = None) -> None:
        self.loop = loop
        self.pool = pool  # the serving threads' pool: a waiting thread gives its place

    def run(
        self,
        coro: Coroutine[Any, Any, Any],
        context: grpc.ServicerContext,
        *,
        pooled: bool = True,
    ) -> Any:
        """Wait in this thread for ``coro`` on the loop; cancelled with the
        call. ``pooled=False`` on a thread not of the serving pool (a stream's)."""
        future = asyncio.run_coroutine_threadsafe(
            _carried(coro, contextvars.copy_context()), self.loop
        )
        context.add_callback(future.cancel)
        if self.pool is None or not pooled:
            return future.result()
        with self.pool.waiting():
            return future.result()

    def unary(
        self, impl: Unary, parse: Callable[[bytes], Any], serialize: Callable[[Any], bytes]
    ) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        """A unary call served by the coroutine ``impl(request, context)``:
        parsed here, answered with its message (or bytes already serialized)."""

        def served(raw: bytes, context: grpc.ServicerContext) -> bytes:
            request = parsed(raw, parse)
            bridged = BridgedContext(context)
            try:
                out = self.run(impl(request, bridged), context)
            except BaseException as exc:
                raise (bridged.outcome(exc) or exc) from None
            failed = bridged.outcome(None)
            if failed is not None:
                raise failed
            return out if isinstance(out, bytes) else serialize(out)

        return served

    def stream(
        self, impl: Streaming, parse: Callable[[bytes], Any], serialize: Callable[[Any], bytes]
    ) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        """A server-streaming call: a task on the loop runs ``impl`` and
        hands its messages to the serving thread through a queue (no round
        trip to the loop per message), at most :data:`STREAM_AHEAD` ahead of
        what the thread has sent, so a slow client still slows the handler
        down (and gets cut by it)."""

        def served(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            request = parsed(raw, parse)
            bridged = BridgedContext(context)
            handoff: queue.SimpleQueue[Any] = queue.SimpleQueue()
            taken = [0]
            resume: list[asyncio.Event] = []  # set when the thread has caught up

            async def pump() -> None:
                try:
                    sent = 0
                    resume.append(asyncio.Event())
                    resume[0].set()  # cleared only while waiting
                    async for item in impl(request, bridged):
                        handoff.put(item if isinstance(item, bytes) else serialize(item))
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

            future = asyncio.run_coroutine_threadsafe(
                _carried(pump(), contextvars.copy_context()), self.loop
            )
            context.add_callback(future.cancel)
            try:
                while True:
                    item = handoff.get()
                    if item is _END:
                        break
                    if isinstance(item, _Failed):
                        raise (bridged.outcome(item.exc) or item.exc) from None
                    yield item
                    taken[0] += 1
                    if resume and not resume[0].is_set():
                        with contextlib.suppress(RuntimeError):  # the loop closed
                            self.loop.call_soon_threadsafe(resume[0].set)
            finally:
                future.cancel()  # the handler's finally blocks (unsubscribing) run on the loop
            failed = bridged.outcome(None)
            if failed is not None:
                raise failed

        return served
