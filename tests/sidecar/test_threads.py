"""The threaded serving core's own parts: the call pool and the stream
routing (with the private gRPC function it relies on), the cache read from
serving threads while the feed writes it, and the serialized answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.policy import AppStatus, Check, PolicyConfig, Reason, Segment, decide
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.cache import STALE, StatusCache
from lcic_guard.sidecar.observe import DecisionObserver
from lcic_guard.sidecar.threads import CallPool
from lcic_guard.store.keys import FEED_SHARDS

T0 = 1_790_000_000_000


def test_a_call_waiting_on_the_loop_gives_its_place_to_another() -> None:
    pool = CallPool(active=2, limit=8)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow() -> str:
        with pool.waiting():  # as Bridge.run around a Redis read
            entered.release()
            release.wait(10)
        return "slow"

    try:
        slows = [pool.submit(slow) for _ in range(2)]
        for _ in slows:
            assert entered.acquire(timeout=5)
        # Both active threads wait on the loop: a check must still be answered.
        fast = pool.submit(lambda: "fast")
        assert fast.result(timeout=5) == "fast"
        assert not any(f.done() for f in slows)
    finally:
        release.set()
    assert [f.result(timeout=5) for f in slows] == ["slow", "slow"]
    pool.shutdown()


def test_threads_beyond_the_active_bound_end_once_their_wait_is_over() -> None:
    pool = CallPool(active=1, limit=8)
    release = threading.Event()
    entered = threading.Event()

    def slow() -> None:
        with pool.waiting():
            entered.set()
            release.wait(10)

    first = pool.submit(slow)
    assert entered.wait(5)
    assert pool.submit(lambda: 1).result(timeout=5) == 1  # a second thread served it
    release.set()
    first.result(timeout=5)
    deadline = time.monotonic() + 5
    while pool._threads > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool._threads == 1
    pool.shutdown()


def _status(version: int) -> AppStatus:
    return AppStatus("app-1", "acct-1", (Segment(T0 - 1000, ()),), version)


@pytest.mark.parametrize("complete", [True, False])
def test_a_held_record_is_never_missed_while_the_feed_replaces_it(complete: bool) -> None:
    """Serving threads read while the loop's thread stores new versions: a
    reader in between the LRU's remove and insert would find nothing, which a
    complete replica answers UNKNOWN_APPLICATION (and a partial one reads
    from Redis for nothing)."""
    cache = StatusCache(100, max_age_ms=10**12)
    cache.feed_healthy, cache.complete = True, complete
    for shard in range(FEED_SHARDS):
        cache.shard_loaded(shard, T0)
    apps = [f"app-{n}" for n in range(4)]
    for app in apps:
        cache.apply(app, _status(1), T0)
    stop = threading.Event()
    missed: list[str] = []

    def read() -> None:
        while not stop.is_set():
            for app in apps:
                held = cache.in_force(app, T0)
                if held is None or held is STALE:
                    missed.append(app)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for version in range(2, 20_000):
            cache.apply(apps[version % 4], _status(version), T0)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert missed == []


def test_a_batch_answer_is_its_items_answers_joined() -> None:
    cfg = PolicyConfig()
    observer = DecisionObserver(shadow=[Check.ACCESS_RECORDING])
    suspended = AppStatus(
        "app-1",
        "acct-1",
        (Segment(T0 - 1000, (Reason.ACCOUNT_OVERDUE,), T0 - 5000, T0 - 1000, T0 + 10**9),),
        7,
    )
    items = [
        (Check.CREATE_CLASSROOM, decide(Check.CREATE_CLASSROOM, suspended, T0, cfg)),
        (Check.ACCESS_RECORDING, decide(Check.ACCESS_RECORDING, suspended, T0, cfg)),
        (Check.CREATE_CLASSROOM, decide(Check.CREATE_CLASSROOM, None, T0, cfg)),
    ]
    answers = [observer.render(check, d) for check, d in items]
    got = pb.CheckBatchResponse.FromString(b"".join(a.payload for a in answers)).decisions
    assert len(got) == 3
    assert got[0] == wire.decision_to_pb(items[0][1])
    assert got[1].allowed and got[1].shadow and got[1].reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
    assert answers[1].labels == ("recording", "ACCOUNT_OVERDUE", "true") and answers[1].shadowed
    assert got[2].reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
    for check, d in items:  # each answer is also any single check's response
        single = pb.CanEnterClassroomResponse.FromString(observer.render(check, d).payload)
        assert single.decision.reason == wire.decision_to_pb(d).reason


# -- the private gRPC function the stream routing relies on ------------------------

WHAT_TO_DO = (
    "grpc changed grpc._server._stream_response_in_pool, by which "
    "lcic_guard.sidecar.threads.Pools tells a stream from a unary call: without it every watch "
    "stream would hold one of the few threads the checks need. Find how grpc/_server.py now "
    "submits a streaming call to the server's executor and recognise that in Pools.submit "
    "(and here), or keep grpcio at the version the lock pins."
)


def test_the_private_grpc_function_streams_are_recognised_by_is_still_there() -> None:
    import inspect

    import grpc._server
    from lcic_guard.sidecar import threads

    found: Any = getattr(grpc._server, "_stream_response_in_pool", None)
    assert callable(found), WHAT_TO_DO
    assert list(inspect.signature(found).parameters) == [
        "rpc_event",
        "state",
        "behavior",
        "argument_thunk",
        "request_deserializer",
        "response_serializer",
    ], WHAT_TO_DO
    assert threads.STREAM_IN_POOL is found, WHAT_TO_DO


def test_streams_run_on_their_own_pool_and_unary_calls_on_the_call_pool() -> None:
    """The routing as grpc really submits the calls: a server-streaming
    call must land on the stream pool, a unary call on the call pool."""
    import grpc
    from lcic_guard.sidecar.threads import Pools

    seen: dict[str, str] = {}

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen["unary"] = threading.current_thread().name
        return request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        seen["stream"] = threading.current_thread().name
        yield request

    pools = Pools(calls=2, streams=4)
    server = grpc.server(pools)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "probe.Probe",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary("/probe.Probe/Unary")(b"u", timeout=5) == b"u"
            assert list(channel.unary_stream("/probe.Probe/Stream")(b"s", timeout=5)) == [b"s"]
    finally:
        server.stop(0).wait(5)
        pools.shutdown(wait=False)
    assert seen["unary"].startswith("lcic-guard-rpc"), (seen, WHAT_TO_DO)
    assert seen["stream"].startswith("lcic-guard-stream"), (seen, WHAT_TO_DO)
