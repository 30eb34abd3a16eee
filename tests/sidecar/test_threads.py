"""The threaded serving core's own parts: the call pool, the cache read
from serving threads while the feed writes it, and the serialized answers."""

from __future__ import annotations

import threading
import time

import pytest
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.policy import AppStatus, Check, PolicyConfig, Reason, Segment, decide
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.cache import STALE, StatusCache
from lcic_guard.sidecar.threads import CallPool
from lcic_guard.sidecar.observe import DecisionObserver

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
    cache.feed_healthy, cache.synced_since, cache.complete = True, 0, complete
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
