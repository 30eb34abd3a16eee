"""Watch fan-out: a stream that does not read is cut and counted while the
others and the checks go on; every change and every time-driven transition
reaches the streams that read, rendered once whatever their number and never
on a serving thread; a transition is pushed from the status held, with Redis
frozen at its instant, and not while what is held is not fresh.

Real redis-server, the real sidecar (runner.build_sidecar) on a socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, HOUR, AppStatus, Reason, Segment
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.sidecar.calls import Entry
from lcic_guard.sidecar.watchers import CANCELLED, HEARTBEAT, MAX_PENDING, WatchCut, Watchers
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store
from prometheus_client import CollectorRegistry

from tests.support.fixtures import write_all
from tests.support.settings import sidecar_settings

SUSPENDED = pb.APPLICATION_STATE_SUSPENDED
GRACE = pb.APPLICATION_STATE_GRACE
ACTIVE = pb.APPLICATION_STATE_ACTIVE


async def eventually(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def active(app_id: str, version: int = 1) -> AppStatus:
    now = wall_clock()
    return AppStatus(app_id, "acct-" + app_id, (Segment(now - 10 * DAY),), version, now)


def flipping(app_id: str, flip: Millis) -> AppStatus:
    """In grace until ``flip``, then suspended: no new record at the flip."""
    now = wall_clock()
    grace = Segment(now - HOUR, (Reason.OVERDUE_GRACE,), grace_ends_at=flip)
    susp = Segment(
        flip,
        (Reason.ACCOUNT_OVERDUE,),
        grace_ends_at=flip,
        suspended_at=flip,
        release_at=flip + 60 * DAY,
    )
    return AppStatus(app_id, "acct-" + app_id, (Segment(now - DAY), grace, susp), 1, now)


@contextlib.asynccontextmanager
async def started(
    redis: EmbeddedRedis,
) -> AsyncIterator[tuple[RunningSidecar, pb_grpc.EnforcementServiceStub, CollectorRegistry]]:
    store = Store(connect(redis.url))
    registry = CollectorRegistry()
    sidecar = await build_sidecar(sidecar_settings(redis_url=redis.url), store, registry=registry)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    try:
        await eventually(lambda: sidecar.feed.in_sync)
        yield sidecar, pb_grpc.EnforcementServiceStub(channel), registry
    finally:
        await channel.close()
        await sidecar.stop(grace=0.1)
        await store.close()


@contextlib.contextmanager
def frozen(redis: EmbeddedRedis) -> Iterator[None]:
    """Redis stops answering (SIGSTOP: connections are accepted, nothing is read)."""
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


class Reader:
    """A stream read to its end in a task: each status message, by app."""

    def __init__(self, stub: pb_grpc.EnforcementServiceStub, ids: list[str] | None = None) -> None:
        self.call = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest(app_ids=ids or []))
        self.statuses: list[pb.ApplicationStatus] = []
        self.ended: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.call:
                if msg.HasField("status"):
                    self.statuses.append(msg.status)
        except grpc.aio.AioRpcError as exc:
            self.ended = exc

    def states_of(self, app_id: str) -> list[int]:
        return [s.state for s in self.statuses if s.app_id == app_id]

    def apps_in(self, state: int) -> set[str]:
        return {s.app_id for s in self.statuses if s.state == state}

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, name
    return value


# -- a stream that does not read -------------------------------------------------------


async def test_a_stream_that_does_not_read_is_cut_while_readers_and_checks_go_on(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    """The cut ends the call while its thread is blocked in a send the client
    does not read: with grpc's public cancel() the client would see
    CANCELLED, so this also fails if the private call object the watchers
    end it through (watchers.end_call) is gone from the grpcio pinned."""
    apps = [f"app-{n:05d}" for n in range(MAX_PENDING + 600)]
    async with started(own_redis) as (sidecar, stub, registry):
        watchers = sidecar.watchers
        assert watchers is not None
        reader = Reader(stub)
        # Its own connection, with the window it was opened with (64 KiB):
        # a client that reads nothing is blocked after a few hundred messages.
        lazy_channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{sidecar.port}",
            options=[("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)],
        )
        lazy = pb_grpc.EnforcementServiceStub(lazy_channel).WatchApplicationStatus(
            pb.WatchApplicationStatusRequest()
        )
        await eventually(lambda: len(watchers) == 2)
        await rstore.write_status(active("app-first"))
        await eventually(lambda: "app-first" in reader.apps_in(ACTIVE))

        answered: list[int] = []
        stop = asyncio.Event()

        async def check() -> None:
            while not stop.is_set():
                resp = await stub.CanCreateClassroom(
                    pb.CanCreateClassroomRequest(app_id="app-first"), timeout=5
                )
                answered.append(resp.decision.reason)

        checking = asyncio.create_task(check())
        await write_all(rstore, [active(a) for a in apps])
        await eventually(lambda: watchers.slow_cuts == 1)
        # The reader got every change and stays open; checks were answered
        # all along, from memory.
        await eventually(lambda: reader.apps_in(ACTIVE) >= set(apps))
        during = len(answered)
        await rstore.write_status(active("app-after"))
        await eventually(lambda: "app-after" in reader.apps_in(ACTIVE))
        stop.set()
        await checking
        assert during > 0 and set(answered) == {pb.DECISION_REASON_OK}
        assert reader.ended is None
        assert sample(registry, "lcic_guard_watch_slow_cuts_total") == 1
        assert len(watchers) == 1

        # What the client that did not read finds when it does: what was
        # sent to it, then why it ended.
        got = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in lazy:
                got += 1
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fell behind" in (err.value.details() or "")
        assert "watch again" in (err.value.details() or "")
        assert 0 < got < len(apps)
        await reader.close()
        await lazy_channel.close()


# -- every transition, rendered once, off the serving threads ----------------------------


async def test_every_transition_reaches_the_streams_that_read_rendered_once(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    # Loaded with the table when the sidecar starts: their owners are read
    # ahead of the instant, their statuses pushed from what is held.
    flip = wall_clock() + 4000
    apps = [f"app-{n:03d}" for n in range(300)]
    named = apps[:100]
    await write_all(rstore, [flipping(a, flip) for a in apps])
    async with started(own_redis) as (sidecar, stub, registry):
        watchers = sidecar.watchers
        assert watchers is not None
        threads: set[str] = set()
        render = watchers.render
        assert render is not None

        def recorded(status: AppStatus, now: Millis) -> bytes:
            threads.add(threading.current_thread().name)
            return render(status, now)

        watchers.render = recorded
        by_id = [Reader(stub, named), Reader(stub, named)]
        for r in by_id:
            await eventually(lambda r=r: r.apps_in(GRACE) == set(named))  # type: ignore[misc]
        # The first stream of every application opens after streams of some:
        # the transitions of all are looked for then.
        everything = Reader(stub)
        await eventually(lambda: len(watchers) == 3)
        assert wall_clock() < flip, "the machine was too slow to set up before the instant"
        rendered = watchers.rendered
        assert watchers.transitions_pushed == 0

        # A change of one app after its flip: it follows the transition.
        await eventually(lambda: everything.apps_in(SUSPENDED) == set(apps))
        await rstore.write_status(active(apps[0], version=2))
        await eventually(lambda: everything.states_of(apps[0])[-1:] == [ACTIVE])
        for r in by_id:
            await eventually(lambda r=r: r.apps_in(SUSPENDED) == set(named))  # type: ignore[misc]
            assert r.states_of(apps[0]) == [GRACE, SUSPENDED, ACTIVE]
        assert everything.states_of(apps[1]) == [SUSPENDED]

        # One message per transition and one for the change, whatever the
        # number of streams; none made on a serving thread or the event loop.
        assert watchers.transitions_pushed == len(apps)
        assert watchers.rendered - rendered == len(apps) + 1
        assert sample(registry, "lcic_guard_watch_messages_rendered_total") == watchers.rendered
        assert sample(registry, "lcic_guard_watch_transitions_pushed_total") == len(apps)
        assert threads == {"lcic-guard-watch"}
        # The account the cache does not keep was read ahead, not at the instant.
        pushed = [s for s in everything.statuses if s.state == SUSPENDED]
        assert {s.account_id for s in pushed} == {"acct-" + a for a in apps}
        assert all(s.version == 1 for s in pushed)
        for r in (everything, *by_id):
            assert r.ended is None
            await r.close()


# -- the instant: from the status held, not from Redis ----------------------------------


async def test_a_transition_is_pushed_with_redis_frozen_at_its_instant(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    async with started(own_redis) as (sidecar, stub, _registry):
        watchers = sidecar.watchers
        assert watchers is not None
        flip = wall_clock() + 2500
        await rstore.write_status(flipping("app-t", flip))
        reader = Reader(stub, ["app-t"])
        await eventually(lambda: reader.states_of("app-t") == [GRACE])
        await asyncio.sleep(max(0.0, (flip - wall_clock()) / 1000 - 0.2))
        with frozen(own_redis):
            # Redis answers nothing from just before the instant: the status
            # held is still fresh then (the feed notices a frozen Redis only
            # when its blocking read overruns), so it is pushed.
            await eventually(lambda: reader.states_of("app-t") == [GRACE, SUSPENDED], timeout=5)
            assert watchers.transitions_pushed == 1
            assert watchers.transitions_not_fresh == 0
            # And Redis really was out of reach: the feed finds it so.
            await eventually(lambda: not sidecar.checker.cache.feed_healthy, timeout=10)
        pushed = reader.statuses[-1]
        assert pushed.account_id == "acct-app-t"
        assert pushed.reasons == [pb.DECISION_REASON_ACCOUNT_OVERDUE]
        await reader.close()


async def test_a_transition_waits_while_the_status_held_is_not_fresh(
    own_redis: EmbeddedRedis, rstore: Store
) -> None:
    async with started(own_redis) as (sidecar, stub, _registry):
        watchers = sidecar.watchers
        cache = sidecar.checker.cache
        assert watchers is not None
        flip = wall_clock() + 4000
        await rstore.write_status(flipping("app-t", flip))
        reader = Reader(stub, ["app-t"])
        await eventually(lambda: reader.states_of("app-t") == [GRACE])
        with frozen(own_redis):
            await eventually(lambda: not cache.feed_healthy, timeout=10)
            assert wall_clock() < flip, (
                "the machine was too slow to freeze Redis before the instant"
            )
            await eventually(lambda: watchers.transitions_not_fresh == 1, timeout=10)
            # Nothing is pushed from a status that may be out of date, and
            # Redis is not asked: the transition waits.
            await asyncio.sleep(1.0)
            assert reader.states_of("app-t") == [GRACE]
            assert watchers.transitions_pushed == 0
        # Redis answers again: the feed vouches for what is held, and the
        # transition is pushed then, as the status is now.
        await eventually(lambda: reader.states_of("app-t") == [GRACE, SUSPENDED])
        assert watchers.transitions_pushed == 1
        assert reader.ended is None
        await reader.close()


# -- the outbox ----------------------------------------------------------------------------


def _render(status: AppStatus, now: Millis) -> bytes:
    return f"{status.app_id}@{status.version}".encode()


class Client:
    """What a stream's client takes, through the send the sender threads
    call: one message at a time, each send returning once taken; ``stop``
    makes the next send block (a client that reads nothing, its window
    full) until ``resume``."""

    def __init__(self) -> None:
        self.got: queue.Queue[bytes] = queue.Queue()
        self.ended: queue.Queue[WatchCut] = queue.Queue()
        self.statuses = 0  # sends of the call's status (its end)
        self._open = threading.Event()
        self._open.set()
        self.blocked = threading.Event()  # a send is blocked

    def send(self, payload: bytes | None) -> None:
        if payload is None:
            self.statuses += 1
            return
        if not self._open.is_set():
            self.blocked.set()
            self._open.wait()
        self.got.put(payload)

    def finish(self, cut: WatchCut) -> None:
        self.send(None)
        self.ended.put(cut)

    def stop(self) -> None:
        self.blocked.clear()
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def take(self, n: int) -> list[bytes]:
        """The next ``n`` messages that are not heartbeats."""
        out: list[bytes] = []
        while len(out) < n:
            msg = await asyncio.to_thread(self.got.get, True, 5.0)
            if msg != HEARTBEAT:
                out.append(msg)
        return out

    async def end(self) -> WatchCut:
        return await asyncio.to_thread(self.ended.get, True, 10.0)


async def test_a_stream_gets_the_newest_of_each_app_and_is_cut_when_it_stops_taking() -> None:
    watchers = Watchers(render=_render, lag_s=1.0)
    watchers.start()
    client = Client()
    try:
        watchers.subscribe([], send=client.send, finish=client.finish)
        # A change comes while the client takes nothing: its send blocks.
        client.stop()
        watchers.publish("app-0", active("app-0"))
        assert await asyncio.to_thread(client.blocked.wait, 5.0)
        # While that send is blocked, more changes come: only the newest of
        # each application waits (a watch-all stream gets them in the order
        # of those newest).
        for version in (1, 2, 3):
            watchers.publish("app-a", active("app-a", version))
        watchers.publish("app-b", active("app-b", 1))
        watchers.publish("app-a", active("app-a", 4))
        await asyncio.sleep(0.2)  # the watch thread has them all
        client.resume()
        assert await client.take(3) == [b"app-0@1", b"app-b@1", b"app-a@4"]
        # A burst of more changes than the bound, taken by a client that
        # reads: nothing is cut.
        burst = [f"app-{n}" for n in range(MAX_PENDING + 1)]
        for app in burst:
            watchers.publish(app, active(app, 2))
        assert await client.take(len(burst)) == [f"{app}@2".encode() for app in burst]
        assert watchers.slow_cuts == 0
        # A client that takes nothing more while more than the bound piles
        # up: cut once it has stayed that far behind for lag_s.
        client.stop()
        watchers.publish("app-last", active("app-last"))
        assert await asyncio.to_thread(client.blocked.wait, 5.0)
        for app in burst:
            watchers.publish(app, active(app, 3))
        await eventually(lambda: watchers.slow_cuts == 1)
        # The send blocked in gRPC is ended by gRPC (the call's core object;
        # here, the client goes on): the stream ends with why.
        client.resume()
        cut = await client.end()
        assert cut.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fell behind" in cut.message
        assert client.statuses == 1
        assert watchers.rendered == 1 + 5 + 2 * len(burst) + 1
        await eventually(lambda: len(watchers) == 0)
    finally:
        watchers.close()
        await asyncio.to_thread(watchers.join)


async def test_idle_streams_get_a_heartbeat_a_second_from_a_few_threads() -> None:
    watchers = Watchers(render=_render, heartbeat_s=0.2)
    watchers.start()
    clients = [Client() for _ in range(50)]
    try:
        before = threading.active_count()
        for client in clients:
            watchers.subscribe([], send=client.send, finish=client.finish)
        await asyncio.sleep(1.1)
        for client in clients:
            beats = client.got.qsize()
            assert 3 <= beats <= 7, beats  # one every 0.2 s, none early
        # Fifty idle streams, sent to by the pool's few warm threads.
        assert threading.active_count() - before <= 1
        assert watchers.sender_threads == 2
        # A stream with a message waiting sends that, not a heartbeat: a
        # client that stops taking gets nothing more until it reads again.
        clients[0].stop()
        watchers.publish("app-0", active("app-0"))
        assert await asyncio.to_thread(clients[0].blocked.wait, 5.0)
        while not clients[0].got.empty():
            clients[0].got.get()
        await asyncio.sleep(0.6)
        assert clients[0].got.empty()
        # The others go on, though a sender thread is blocked.
        for client in clients[1:]:
            while not client.got.empty():
                client.got.get()
        await asyncio.sleep(0.5)
        assert all(c.got.qsize() >= 1 for c in clients[1:])
        # The blocked send holds a thread: one more was started for the others.
        assert watchers.sender_threads == 3
        clients[0].resume()
        assert await clients[0].take(1) == [b"app-0@1"]
    finally:
        watchers.close()
        await asyncio.to_thread(watchers.join)
    # Shutting down ends every stream with why.
    for client in clients:
        cut = await client.end()
        assert cut.code == grpc.StatusCode.UNAVAILABLE


async def test_a_store_discontinuity_goes_first_and_drops_what_was_unsent() -> None:
    watchers = Watchers(render=_render, render_discontinuity=lambda cause, at: cause.encode())
    watchers.start()
    client = Client()
    try:
        watchers.subscribe([], send=client.send, finish=client.finish)
        client.stop()
        watchers.publish("app-0", active("app-0"))
        assert await asyncio.to_thread(client.blocked.wait, 5.0)
        watchers.publish("app-a", active("app-a"))
        watchers.discontinuity("run_id_changed", wall_clock())
        watchers.publish("app-b", active("app-b"))
        await asyncio.sleep(0.2)
        client.resume()
        assert await client.take(3) == [b"app-0@1", b"run_id_changed", b"app-b@1"]
        assert watchers.discontinuities_sent == 1
    finally:
        watchers.close()
        await asyncio.to_thread(watchers.join)


# -- a stream served without a thread --------------------------------------------------------

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who")


class Recorder:
    """A hook like auth's: sets a context variable on entering, resets it on
    leaving (which raises unless in the context it was set in)."""

    def __init__(self) -> None:
        self.left: queue.Queue[grpc.StatusCode] = queue.Queue()
        self.errors: list[BaseException] = []

    def wants(self, method: str) -> bool:
        return True

    def enter(self, method: str, raw: bytes, context: grpc.ServicerContext) -> Any:
        return WHO.set("caller")

    def leave(self, state: Any, response: bytes | None, code: grpc.StatusCode) -> None:
        try:
            WHO.reset(state)
        except BaseException as exc:
            self.errors.append(exc)
        self.left.put(code)


async def test_an_open_stream_holds_no_thread_and_its_hooks_leave_once_with_its_status() -> None:
    watchers = Watchers(render=_render, heartbeat_s=0.2)
    watchers.start()
    hook = Recorder()

    def body(
        raw: bytes,
        context: grpc.ServicerContext,
        send: Callable[[bytes | None], None],
        done: Callable[[grpc.StatusCode], None],
    ) -> None:
        def finish(cut: WatchCut) -> None:
            if cut is not CANCELLED:
                context.set_code(cut.code)
                context.set_details(cut.message)
                send(None)
            done(cut.code)

        sub = watchers.subscribe([], context, send, finish)
        if not context.add_callback(lambda: watchers.cancelled(sub)):
            watchers.cancelled(sub)

    method = Entry([hook]).open_stream("/t.T/Watch", body)
    handler = grpc.unary_stream_rpc_method_handler(method)
    # Two threads serve calls: a stream that held one would leave none for
    # the third stream.
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.T", {"Watch": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = channel.unary_stream("/t.T/Watch")
            calls = [watch(b"") for _ in range(8)]
            for call in calls:
                assert await asyncio.wait_for(call.read(), 5) == HEARTBEAT
            watchers.publish("app-0", active("app-0"))
            for call in calls:
                got = await asyncio.wait_for(call.read(), 5)
                while got == HEARTBEAT:
                    got = await asyncio.wait_for(call.read(), 5)
                assert got == b"app-0@1"
            for call in calls[:4]:
                call.cancel()  # the client goes: ended on gRPC's thread
            await eventually(lambda: len(watchers) == 4)
            watchers.close()  # the others: ended by a sender thread, with why
            for call in calls[4:]:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    while True:
                        await asyncio.wait_for(call.read(), 5)
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in (ended.value.details() or "")
        codes = [await asyncio.to_thread(hook.left.get, True, 5) for _ in range(8)]
        assert sorted(c.value[0] for c in codes) == [1] * 4 + [14] * 4  # CANCELLED, UNAVAILABLE
        assert hook.left.empty() and not hook.errors
    finally:
        watchers.close()
        server.stop(0)
        await asyncio.to_thread(watchers.join)


async def test_a_record_the_cache_cannot_read_is_skipped_once_not_spun_on() -> None:
    """A record whose head the load accepts but whose segments do not
    decode must not stop the transitions of the others, nor keep the watch
    thread busy on it: it is marked corrupt (its checks read Redis) and
    skipped."""
    from lcic_guard.sidecar.cache import StatusCache
    from lcic_guard.store.keys import feed_shard
    from lcic_guard.store.packed import HEAD, pack

    cache = StatusCache(100, 10_000)
    flip = wall_clock() + 60_000
    good = pack(flipping("app-good", flip), 0, feed_shard("app-good"))
    bad = HEAD.pack(1, 0, 1, 2, feed_shard("app-bad")) + b"\xff" * 30
    cache.put_loaded(feed_shard("app-good"), [[b"app-good\0" + good]])
    cache.put_loaded(feed_shard("app-bad"), [[b"app-bad\0" + bad]])
    assert cache.refused_entries == 0
    watchers = Watchers(render=_render)
    watchers.start(cache)
    try:
        watchers.subscribe([])
        await eventually(lambda: cache.is_corrupt("app-bad"))
        await eventually(lambda: "app-good" in {a for _, a in watchers._due})
        errors = watchers.render_errors
        await asyncio.sleep(0.5)
        assert watchers.render_errors == errors == 1
    finally:
        watchers.close()
        await asyncio.to_thread(watchers.join)
