"""The serving threads: a pool that keeps a bounded number of them runnable,
and the executor that gives each stream a thread of its own.

:class:`Pools` is the executor of gRPC's threaded server. It tells streams
from unary calls by the function gRPC submits for a stream, the private
``grpc._server._stream_response_in_pool``: tests/sidecar/test_threads.py
fails loudly if gRPC renames it or changes its signature. Without it every
stream would hold one of the few threads the checks need.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

import grpc._server

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
# thread; it is recognised by the function grpc submits for it (private to
# grpc: checked by tests/sidecar/test_threads.py against the grpcio pinned).
STREAM_IN_POOL: Final = getattr(grpc._server, "_stream_response_in_pool", None)


class Pools(concurrent.futures.Executor):
    """The threaded server's executor: unary calls on a :class:`CallPool`,
    each stream (a watch while it opens, health watches, reflection) on a
    thread of its own pool, so that streams never take the threads checks
    need."""

    def __init__(self, calls: int, streams: int) -> None:
        if STREAM_IN_POOL is None:  # pragma: no cover - a grpcio the lock does not pin
            log.error(
                "grpc._server._stream_response_in_pool is gone from this grpcio: watch "
                "streams will take the threads the checks need (see lcic_guard.sidecar.threads)"
            )
        self.calls = CallPool(calls, CALL_THREADS_LIMIT)
        self.streams = concurrent.futures.ThreadPoolExecutor(streams, "lcic-guard-stream")

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        streaming = STREAM_IN_POOL is not None and (
            fn is STREAM_IN_POOL or (bool(args) and args[0] is STREAM_IN_POOL)
        )
        pool = self.streams if streaming else self.calls
        return pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.calls.shutdown(wait, cancel_futures=cancel_futures)
        self.streams.shutdown(wait, cancel_futures=cancel_futures)
