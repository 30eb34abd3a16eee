"""WatchApplicationStatus fan-out, on a thread of its own.

Everything a watch costs except the sending happens on one thread, the
*watch thread*, never on a thread serving a check and never on the event
loop (which bridged checks wait on): rendering each change once into the
bytes every stream shares, putting it in the outbox of each stream that
watches the application, the time-driven transitions, and deciding which
stream may send next. The event loop only hands it changes (a queue put).

A stream holds no thread: gRPC serves WatchApplicationStatus as a
non-blocking stream, and a few *sender threads* (:class:`SenderPool`) send
what the watch thread grants, a few dozen messages of one stream at a time,
and the heartbeats. Grants are paced (:data:`SEND_RATE` messages a second,
all streams together, at most :data:`SENDERS` streams sending at once), so
that however many streams are open and however many changes arrive,
fan-out never takes more than a bounded share of the GIL and the gRPC
server's completion thread from the checks. Streams wait their turn,
coalescing meanwhile. A heartbeat goes to each stream that has sent
nothing for a second, those due within :data:`HEARTBEAT_TICK_S` together,
from the same warm threads: a thousand idle streams cost a thousand sends
a second, not a thousand threads woken.

What a stream has to send keeps one message per application (the newest: a
watch message carries the whole status and its schedule, so a newer one of
an application supersedes an older one unsent), feed changes ahead of
time-driven transitions. A stream of named applications has an outbox of
its own (at most one message per application it names); the watch-all
streams share two logs (changes, transitions), each read from its own
cursor, where a newer message of an application blanks its older one, so
that a change costs the same whatever their number and a burst of changes
costs no memory per stream.

A stream that stays more than :data:`MAX_PENDING` changes behind for
:data:`LAG_S` does not keep up (its client does not read, or reads too
slowly for the changes it asked for): it is cut with RESOURCE_EXHAUSTED
("fell behind ... watch again") and counted, so that its client stops
trusting what it kept (SPEC R15) rather than trust a stream minutes late.
So is any stream more than :data:`MAX_BEHIND` changes behind. A burst of
changes that a stream takes within LAG_S cuts nothing.

Time-driven transitions (a grace ending, a package expiring, a release
falling due) change no record, so nothing comes on the feed for them: the
transitions due within the horizon are kept in a heap and, at their
instant, the status the cache holds is pushed, rendered then, with no Redis
read; a held status that is not fresh then is not pushed at the instant but
as soon as it is fresh again (unless a change of the application came
meanwhile, which is pushed itself).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from lcic_guard.domain.policy import AppStatus
from lcic_guard.domain.time import Millis
from lcic_guard.logs import RateLimitedLog, describe_error
from lcic_guard.sidecar.cache import STALE, StatusCache

log = logging.getLogger(__name__)

# Watch messages sent a second, all streams together (heartbeats aside):
# gRPC's threaded server spends 80-100 µs of CPU on each (the stream's
# thread and its completion thread), so this is about a fifth of a core.
SEND_RATE: Final = 2_000.0
# Streams sending at once, and the sender threads kept warm: each send
# wakes a sender thread and gRPC's completion thread, which also takes in
# every check; few at once keep the checks' wait for the GIL short.
SENDERS: Final = 2
# A sender thread beyond SENDERS (started for a send its client blocks)
# leaves after this long with nothing to send.
SENDER_IDLE_S: Final = 10.0
# Heartbeats due within this are sent together: the watch thread wakes for
# them at most this often, whatever the number of streams.
HEARTBEAT_TICK_S: Final = 0.05
# Messages granted to a stream at a time.
GRANT: Final = 64
# A grant not done within this is a stream blocked by its client (flow
# control): it no longer counts as sending.
GRANT_STALL_S: Final = 0.1
# Changes a stream may stay behind for LAG_S: beyond, it is cut. A stream
# of named applications holds at most one message for each of the
# wire.MAX_WATCH_IDS (1,000) it may name, so only a watch-all stream can be
# cut for this.
MAX_PENDING: Final = 1_000
LAG_S: Final = 5.0
# Changes a watch-all stream may be behind, reading or not: the shared log
# keeps them for it (a burst of a whole feed shard reloaded fits).
MAX_BEHIND: Final = 200_000
# Time-driven transitions a watch-all stream may be behind (its client has
# them in the schedules it got already): beyond, it is cut.
MAX_TICKS_BEHIND: Final = 1_000_000
# How often streams are looked at for being cut, and the shared logs trimmed.
SWEEP_S: Final = 0.5
# The watch thread works at most this long before it lets other threads run
# (and as long again when there is more to do).
SLICE_S: Final = 0.002
# How often transitions not pushed at their instant (the held status was
# not fresh) are tried again.
RETRY_S: Final = 0.5
# Applications whose owner is read ahead of their transitions, per read.
OWNERS_CHUNK: Final = 500
# The message of a heartbeat: an empty WatchApplicationStatusResponse.
HEARTBEAT: Final = b""
HEARTBEATS: Final = [HEARTBEAT]
# The key of a store discontinuity's message (an app id is never empty).
EVERY_STREAM: Final = ""


class WatchCut(Exception):
    """A watch stream ends: ``code`` and ``message`` say why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def end_call(context: Any, code: grpc.StatusCode, message: str) -> None:
    """End a call from another thread than its own, while that one may be
    blocked in a send its client does not read: the client gets ``code``
    and ``message`` (after what it was sent), as with an abort.

    grpc's public ``cancel()`` can only say CANCELLED; the call's core
    object (private to grpc: checked by tests/sidecar/test_watch_fanout.py
    against the grpcio pinned) can say why."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is not None:
        try:
            call.cancel(code.value[0], message)
            return
        except Exception as exc:  # pragma: no cover - a grpcio the lock does not pin
            log.warning("cannot end a watch stream with its status (%s): cancelled", exc)
    context.cancel()


@dataclass(slots=True, eq=False)
class Msg:
    """One watch message, rendered once and shared by every stream it goes to."""

    app_id: str
    payload: bytes
    seq: int  # in the order rendered: a higher one is newer
    version: int  # of the status record (0: a store discontinuity)


class SharedLog:
    """Messages for every watch-all stream, each read from its own cursor
    (an absolute position). A newer message of an application blanks its
    older one, which a stream not past it then skips: coalescing for every
    stream at once, at no cost per stream."""

    def __init__(self) -> None:
        self.entries: list[Msg | None] = []
        self.base = 0  # position of entries[0]
        self._at: dict[str, int] = {}  # app id -> position of its newest message

    @property
    def head(self) -> int:
        return self.base + len(self.entries)

    def append(self, msg: Msg) -> None:
        self.blank(msg.app_id)
        self._at[msg.app_id] = self.head
        self.entries.append(msg)

    def blank(self, app_id: str) -> None:
        at = self._at.pop(app_id, None)
        if at is not None and at >= self.base:
            self.entries[at - self.base] = None

    def read(self, cursor: int, n: int, out: list[bytes]) -> int:
        """Append up to ``n`` payloads from ``cursor`` to ``out``; the new cursor."""
        entries, base, head = self.entries, self.base, self.head
        pos = max(cursor, base)
        while pos < head and n > 0:
            msg = entries[pos - base]
            pos += 1
            if msg is not None:
                out.append(msg.payload)
                n -= 1
        return pos

    def trim(self, low: int) -> None:
        """Forget what every reader is past (``low``), when that is worth it."""
        drop = low - self.base
        if drop > 0 and (2 * drop >= len(self.entries) or drop == len(self.entries)):
            del self.entries[:drop]
            self.base = low
            self._at = {a: i for a, i in self._at.items() if i >= low}


Send = Callable[[bytes | None], None]


class Subscription:
    """One WatchApplicationStatus stream: its outbox (the watch thread's
    alone) and what the watch thread shares with the sender threads (plain
    attribute reads and writes, atomic under the GIL, and a lock for who
    ends it).

    ``send`` is gRPC's send of the call (``None`` sends the status: the
    call's end), taken by one sender thread at a time; ``finish(cut)``
    ends the call once nothing sends on it any more (the status if the
    call is still open, then what its entry owes: hooks, unsubscribing)."""

    def __init__(
        self,
        ids: frozenset[str] | None,
        context: Any = None,
        send: Send | None = None,
        finish: Callable[[WatchCut], None] | None = None,
    ) -> None:
        self.ids = ids
        self.context = context
        self.send = send
        self.finish = finish
        # A stream of named applications: its outbox, by application
        # (changes are sent before transitions).
        self.changes: dict[str, Msg] = {}
        self.ticks: dict[str, Msg] = {}
        # A watch-all stream: its positions in the shared logs.
        self.change_cursor = 0
        self.tick_cursor = 0
        self.notice: Msg | None = None  # a store discontinuity, sent before anything else
        # Versions of the statuses it started with (read from Redis, which the
        # cache may not have caught up with): nothing older is sent after them,
        # as a client takes a version going back for a store discontinuity.
        self.floor: dict[str, int] = {}
        self.behind_since: float | None = None  # more than MAX_PENDING behind since
        self.queued = False  # has something to send (waiting for, or holding, a grant)
        # Shared with the sender threads.
        self.sending_since: float | None = None  # a sender thread is in a send since
        self.ended: WatchCut | None = None
        self._busy = False  # a sender thread holds a job of it
        self._finished = False
        self._lock = threading.Lock()

    def take(self) -> None:
        """The watch thread hands it a job: one sender at a time."""
        self._busy = True

    def release(self) -> bool:
        """A sender thread is done with it: True if that thread must finish it."""
        with self._lock:
            self._busy = False
            return self._owes_finish()

    def end(self, cut: WatchCut) -> bool:
        """The stream ends (any thread): True if the caller must finish it
        (nothing sends on it; otherwise the sender thread will)."""
        with self._lock:
            if self.ended is None:
                self.ended = cut
            return self._owes_finish()

    def _owes_finish(self) -> bool:
        if self.ended is None or self._busy or self._finished:
            return False
        self._finished = True
        return True


CANCELLED: Final = WatchCut(grpc.StatusCode.CANCELLED, "call cancelled")
SHUTDOWN: Final = WatchCut(grpc.StatusCode.UNAVAILABLE, "server shutting down; watch again")


def _wall_clock() -> Millis:
    return time.time_ns() // 1_000_000


def _owner(status: AppStatus) -> tuple[str, int, Millis]:
    return status.account_id, status.version, status.updated_at


class SenderPool:
    """The threads that send what the watch thread grants: :data:`SENDERS`
    kept warm (a thread that sends one message after another costs far
    less than a thread per stream woken for each), and one more for each
    send its client blocks, so that a client that reads nothing never holds
    up the others; one beyond those leaves after :data:`SENDER_IDLE_S`
    with nothing to do."""

    def __init__(self, base: int = SENDERS) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._base = base
        self.threads = 0
        self._stopping = False

    def start(self) -> None:
        for _ in range(self._base):
            self.grow()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._jobs.put((fn, args))

    def grow(self) -> None:
        """One more thread, for a send its client blocks."""
        with self._lock:
            if self._stopping:
                return
            self.threads += 1
            name = f"lcic-guard-watch-send-{self.threads}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def stop(self) -> None:
        """Each thread leaves once the jobs submitted before are done."""
        with self._lock:
            self._stopping = True
            n = self.threads
        for _ in range(n):
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=SENDER_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self.threads > self._base:
                        self.threads -= 1
                        return
                continue
            if job is None:
                with self._lock:
                    self.threads -= 1
                return
            fn, args = job
            fn(*args)


class Watchers:
    """Fans the change feed out to WatchApplicationStatus streams (see the
    module's documentation). The event loop and the streams' threads talk
    to the watch thread through its inbox; its state is its own."""

    def __init__(
        self,
        *,
        heartbeat_s: float = 1.0,
        max_streams: int = 1000,
        horizon_ms: int = 10 * 60_000,
        send_rate: float = SEND_RATE,
        max_pending: int = MAX_PENDING,
        lag_s: float = LAG_S,
        max_behind: int = MAX_BEHIND,
        max_ticks_behind: int = MAX_TICKS_BEHIND,
        render: Callable[[AppStatus, Millis], bytes] | None = None,
        render_discontinuity: Callable[[str, Millis], bytes] | None = None,
        clock: Callable[[], Millis] | None = None,
        read_owners: Callable[[list[str]], Coroutine[Any, Any, list[AppStatus]]] | None = None,
    ) -> None:
        """``render`` makes a watch message of a status, ``render_discontinuity``
        the message of a store discontinuity (without them nothing is sent);
        ``read_owners`` reads, ahead of their transitions, the full records
        of applications whose statuses were loaded with the table (the cache
        keeps no account); ``clock`` is the sidecar's (the wall clock by
        default)."""
        self.heartbeat_s = heartbeat_s
        self.max_streams = max_streams
        self.horizon_ms = horizon_ms
        self.send_rate = send_rate
        self.max_pending = max_pending
        self.lag_s = lag_s
        self.max_behind = max_behind
        self.max_ticks_behind = max_ticks_behind
        self.render = render
        self.render_discontinuity = render_discontinuity
        self.clock: Callable[[], Millis] = clock if clock is not None else _wall_clock
        self.read_owners = read_owners
        self.cache: StatusCache | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Streams open, as their threads see them.
        self._lock = threading.Lock()
        self._open: set[Subscription] = set()
        self.closing = False
        # -- the watch thread's own state ------------------------------------
        self._stopped = False
        self._subs: set[Subscription] = set()
        self._all: set[Subscription] = set()  # watch-all streams
        self._index: dict[str, set[Subscription]] = {}  # app id -> streams naming it
        self._seq = 0
        # What every watch-all stream is sent.
        self._changes = SharedLog()
        self._ticks = SharedLog()
        self._ticks_added = False
        self._sweep_at = 0.0
        # Pacing.
        self._pool = SenderPool()
        self._ready: collections.deque[Subscription] = collections.deque()
        self._sending: dict[Subscription, float] = {}  # a job given to a sender: since when
        self._active: dict[Subscription, float] = {}  # grants not blocked by their clients
        self._beating: dict[Subscription, float] = {}  # heartbeats within GRANT_STALL_S
        # Streams with nothing to send, by when they last sent (the oldest first).
        self._idle: collections.OrderedDict[Subscription, float] = collections.OrderedDict()
        self._heartbeat_at = 0.0  # heartbeats are not looked at before
        # Heartbeats sent, of streams with nothing to send since: taken in
        # whenever the thread wakes (no need to wake it for them).
        self._beaten: collections.deque[Subscription] = collections.deque()
        self._tokens = send_rate * 0.02
        self._refilled = time.monotonic()
        # Time-driven transitions: (instant, app id), as a heap and a set.
        self._due: list[tuple[Millis, str]] = []
        self._due_set: set[tuple[Millis, str]] = set()
        self._backlog: collections.deque[tuple[Millis, str]] = collections.deque()
        self._deferred: dict[str, Millis] = {}  # not fresh at its instant: app -> instant
        self._retry_at = 0.0
        self._owners: dict[str, tuple[str, int, Millis]] = {}  # app -> account, version, updated
        self._owners_todo: collections.deque[list[str]] = collections.deque()
        self._owners_reading = False
        self._fill: list[str] | None = None
        self._fill_pos = 0
        self._fill_at = 0.0
        self._warn = RateLimitedLog(log)
        # Counted (read by the metrics).
        self.refused = 0
        self.slow_cuts = 0
        self.render_errors = 0
        self.rendered = 0  # messages rendered: once per change, whatever the streams
        self.messages_sent = 0  # messages granted to streams
        self.discontinuities_sent = 0  # streams told of a store discontinuity
        self.transitions_pushed = 0
        self.transitions_not_fresh = 0  # not pushed at their instant: held status not fresh

    # -- life -------------------------------------------------------------------

    def start(
        self, cache: StatusCache | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        """Start the watch thread; ``cache`` holds the statuses time-driven
        transitions are pushed from, ``loop`` runs ``read_owners``."""
        self.cache = cache
        self._loop = loop
        self._pool.start()
        self._thread = threading.Thread(target=self._run, name="lcic-guard-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Shutting down: end every stream (UNAVAILABLE, watch again)."""
        with self._lock:
            self.closing = True
            subs = list(self._open)
        self._inbox.put(("close",))
        if self._thread is None:
            for sub in subs:
                if sub.end(SHUTDOWN):
                    self._finish(sub)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def __len__(self) -> int:
        return len(self._open)

    @property
    def sender_threads(self) -> int:
        """Threads sending watch messages: SENDERS, and one for each send
        a client blocks (a client that reads nothing holds one)."""
        return self._pool.threads

    @property
    def feed_healthy(self) -> bool:
        return self.cache is None or self.cache.feed_healthy

    # -- the calls' threads -------------------------------------------------------

    def subscribe(
        self,
        app_ids: Iterable[str],
        context: Any = None,
        send: Send | None = None,
        finish: Callable[[WatchCut], None] | None = None,
    ) -> Subscription:
        """A new stream (on the thread gRPC opened its call on): refused
        beyond ``max_streams``. What it is granted goes to ``send``, one
        message at a time on a sender thread, and ``finish`` is called once
        when it ends (see :class:`Subscription`)."""
        ids = frozenset(app_ids)
        with self._lock:
            if self.closing:
                raise WatchCut(grpc.StatusCode.UNAVAILABLE, "server shutting down; watch again")
            if len(self._open) >= self.max_streams:
                self.refused += 1
                raise WatchCut(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many watch streams open ({self.max_streams}, --max-watch-streams); "
                    "retry later or watch through another sidecar",
                )
            sub = Subscription(ids or None, context, send, finish)
            self._open.add(sub)
        self._inbox.put(("subscribe", sub))
        return sub

    def first(self, sub: Subscription, statuses: list[AppStatus], now: Millis) -> None:
        """The statuses a stream of named applications starts with (read
        from the store when it opened): rendered and sent before the changes
        that follow them."""
        self._inbox.put(("first", sub, statuses, now))

    def cancelled(self, sub: Subscription) -> None:
        """The client went (gRPC's callback): ends the stream."""
        if sub.end(CANCELLED):
            self._finish(sub)

    def abandon(self, sub: Subscription) -> None:
        """A stream that could not open: its call ends with what failed,
        not through ``finish``."""
        sub.send = sub.finish = None
        if sub.end(CANCELLED):
            self._finish(sub)

    def _finish(self, sub: Subscription) -> None:
        """End ``sub``'s call, once nothing sends on it (any thread)."""
        try:
            if sub.finish is not None and sub.ended is not None:
                sub.finish(sub.ended)
        except Exception as exc:
            self._warn.warning("finish", "watch fan-out: cannot end a stream: %r", exc)
        finally:
            with self._lock:
                self._open.discard(sub)
            self._inbox.put(("unsubscribe", sub))

    # -- the sender threads ---------------------------------------------------------

    def _send(self, sub: Subscription, batch: list[bytes]) -> None:
        try:
            send = sub.send
            if send is not None:
                for payload in batch:
                    if sub.ended is not None:
                        break
                    sub.sending_since = time.monotonic()
                    send(payload)  # returns once sent (gRPC's flow control permitting)
        except Exception as exc:
            self._warn.warning("send", "watch fan-out: a send failed: %r", exc)
        finally:
            sub.sending_since = None
            if sub.release():
                self._finish(sub)
            if batch is HEARTBEATS:
                self._beaten.append(sub)
                if sub.queued:  # a change came meanwhile: it waits for this
                    self._inbox.put(("wake",))
            else:
                self._inbox.put(("sent", sub))

    # -- the event loop ----------------------------------------------------------

    def publish(self, app_id: str, status: AppStatus | None, now: Millis | None = None) -> None:
        """A change from the feed (on the event loop: a queue put, no more)."""
        if status is None or self.closing:
            return
        self._inbox.put(("change", app_id, status, self.clock() if now is None else now))

    def discontinuity(self, cause: str, now: Millis) -> None:
        """Tell every open stream, before anything else, that the store may
        have lost acknowledged writes (SPEC R15): its client drops every
        answer it kept. What was not sent yet is dropped (it may be what the
        store lost); statuses published after this follow it."""
        if not self.closing:
            self._inbox.put(("discontinuity", cause, now))

    # -- the watch thread ----------------------------------------------------------

    def _run(self) -> None:
        handlers: dict[str, Callable[..., None]] = {
            "change": self._on_change,
            "discontinuity": self._on_discontinuity,
            "subscribe": self._on_subscribe,
            "first": self._on_first,
            "sent": self._on_sent,
            "wake": lambda: None,
            "unsubscribe": self._on_unsubscribe,
            "owners": self._on_owners,
            "close": self._on_close,
        }
        while not self._stopped:
            item = self._get(self._wait_s())
            deadline = time.perf_counter() + SLICE_S
            while self._beaten:
                self._on_sent(self._beaten.popleft())
            while item is not None:
                try:
                    handlers[item[0]](*item[1:])
                except Exception as exc:
                    self._warn.warning(item[0], "watch fan-out: %s failed: %r", item[0], exc)
                if time.perf_counter() >= deadline:
                    break
                item = self._get(0)
            try:
                self._timed_work(deadline)
                self._dispatch()
            except Exception as exc:
                self._warn.warning("timed", "watch fan-out failed: %r", exc)
            if time.perf_counter() >= deadline:
                # More to do: let the serving threads have the GIL meanwhile.
                time.sleep(SLICE_S)
        self._pool.stop()

    def _get(self, timeout: float) -> tuple[Any, ...] | None:
        try:
            if timeout <= 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _wait_s(self) -> float:
        """How long the thread may sleep unless something arrives."""
        if self._backlog or self._fill is not None or self._beaten:
            return 0.0
        wait = 1.0
        if self._due:
            wait = min(wait, (self._due[0][0] - self.clock()) / 1000)
        if self._deferred:
            wait = min(wait, RETRY_S)
        if self._ready:
            wait = min(wait, self._pacer_wait())
        if self._idle:
            first = next(iter(self._idle.values()))
            mono = time.monotonic()
            due = first + self.heartbeat_s - HEARTBEAT_TICK_S
            wait = min(wait, max(due, self._heartbeat_at) - mono)
        return max(wait, 0.0005) if wait > 0 else 0.0

    # -- changes -------------------------------------------------------------------

    def _render(self, status: AppStatus, now: Millis) -> Msg | None:
        if self.render is None:
            return None
        try:
            payload = self.render(status, now)
        except Exception as exc:
            # A status that cannot be rendered is skipped, never a broken stream.
            self.render_errors += 1
            if self.render_errors == 1 or self.render_errors % 1000 == 0:
                log.warning("cannot send the status of %s to watchers: %s", status.app_id, exc)
            return None
        self._seq += 1
        self.rendered += 1
        return Msg(status.app_id, payload, self._seq, status.version)

    def _watched(self, app_id: str) -> bool:
        return bool(self._all) or app_id in self._index

    def _on_change(self, app_id: str, status: AppStatus, now: Millis) -> None:
        self._schedule(status, now)
        self._deferred.pop(app_id, None)  # this change is pushed itself
        if not self._watched(app_id):
            return
        msg = self._render(self._with_owner(status), now)
        if msg is None:
            return
        self._ticks.blank(app_id)  # older than this change
        if self._all:
            self._changes.append(msg)
            for sub in self._all:
                self._ready_up(sub)
        for sub in self._index.get(app_id, ()):
            if msg.version >= sub.floor.get(app_id, 0):
                sub.ticks.pop(app_id, None)
                self._add_change(sub, msg)

    def _add_change(self, sub: Subscription, msg: Msg) -> None:
        sub.changes[msg.app_id] = msg  # an application's place is kept, its message replaced
        self._ready_up(sub)

    def _on_first(self, sub: Subscription, statuses: list[AppStatus], now: Millis) -> None:
        if sub not in self._subs:
            return
        for status in statuses:
            self._schedule(status, now)
            app = status.app_id
            sub.floor[app] = status.version
            held = sub.changes.get(app)
            if held is not None and held.version >= status.version:
                continue  # a change as new came meanwhile
            msg = self._render(status, now)
            if msg is not None:
                sub.ticks.pop(app, None)
                self._add_change(sub, msg)

    def _on_discontinuity(self, cause: str, now: Millis) -> None:
        if not self._subs or self.render_discontinuity is None:
            return
        self._seq += 1
        msg = Msg(EVERY_STREAM, self.render_discontinuity(cause, now), self._seq, 0)
        for sub in self._subs:
            sub.changes.clear()
            sub.ticks.clear()
            sub.change_cursor, sub.tick_cursor = self._changes.head, self._ticks.head
            sub.notice = msg
            self._ready_up(sub)
        self.discontinuities_sent += len(self._subs)

    # -- streams ----------------------------------------------------------------------

    def _on_subscribe(self, sub: Subscription) -> None:
        if sub.ended is not None:
            return
        if not self._subs or (sub.ids is None and not self._all):
            # The first stream, or the first of every application: look for
            # the transitions of what it watches now.
            self._fill, self._fill_at = None, 0.0
        self._subs.add(sub)
        self._idle[sub] = time.monotonic()
        if sub.ids is None:
            self._all.add(sub)
            sub.change_cursor, sub.tick_cursor = self._changes.head, self._ticks.head
        else:
            for app in sub.ids:
                self._index.setdefault(app, set()).add(sub)

    def _forget(self, sub: Subscription) -> None:
        if sub not in self._subs:
            return
        self._subs.discard(sub)
        self._all.discard(sub)
        for app in sub.ids or ():
            watching = self._index.get(app)
            if watching is not None:
                watching.discard(sub)
                if not watching:
                    del self._index[app]
        self._sending.pop(sub, None)
        self._active.pop(sub, None)
        self._beating.pop(sub, None)
        self._idle.pop(sub, None)
        sub.changes.clear()
        sub.ticks.clear()
        sub.notice = None

    def _on_unsubscribe(self, sub: Subscription) -> None:
        self._forget(sub)

    def _cut(self, sub: Subscription, why: str) -> None:
        """A stream fell behind: cut and counted."""
        self.slow_cuts += 1
        message = f"watch stream fell behind ({why}); watch again"
        self._end(sub, grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _end(self, sub: Subscription, code: grpc.StatusCode, message: str) -> None:
        """End a stream from here: finished by a sender thread if none is
        sending on it, ended by gRPC if one is (it may be blocked in a send
        its client does not read)."""
        if sub.ended is not None:
            return
        sending = sub in self._sending
        self._forget(sub)
        if sub.end(WatchCut(code, message)):
            self._pool.submit(self._finish, sub)
        elif sending and sub.context is not None:
            end_call(sub.context, code, message)

    def _on_close(self) -> None:
        for sub in list(self._subs):
            self._end(sub, SHUTDOWN.code, SHUTDOWN.message)
        with self._lock:
            stragglers = list(self._open)
        for sub in stragglers:
            if sub.end(SHUTDOWN):
                self._pool.submit(self._finish, sub)
        self._stopped = True

    # -- pacing --------------------------------------------------------------------------

    def _has_pending(self, sub: Subscription) -> bool:
        if sub.notice is not None or sub.changes or sub.ticks:
            return True
        return sub.ids is None and (
            sub.change_cursor < self._changes.head or sub.tick_cursor < self._ticks.head
        )

    def _ready_up(self, sub: Subscription) -> None:
        if not sub.queued:
            sub.queued = True
            self._ready.append(sub)
            self._idle.pop(sub, None)  # no heartbeat while messages wait

    def _on_sent(self, sub: Subscription) -> None:
        self._active.pop(sub, None)
        self._beating.pop(sub, None)
        if self._sending.pop(sub, None) is None or sub.ended is not None:
            return
        if self._has_pending(sub):
            self._ready.append(sub)
            sub.queued = True
        else:
            sub.queued = False
            self._idle.pop(sub, None)
            self._idle[sub] = time.monotonic()

    def _senders(self, now: float) -> int:
        """Streams granted and not done, but for those whose send has been
        blocked by their client for GRANT_STALL_S: those no longer count (a
        blocked send holds no GIL) but hold a sender thread, so one more is
        started."""
        for jobs in (self._active, self._beating):
            for sub in list(jobs):
                since = sub.sending_since
                if sub not in self._sending:
                    del jobs[sub]
                elif since is not None and now - since >= GRANT_STALL_S:
                    del jobs[sub]
                    self._pool.grow()
        return len(self._active)

    def _pacer_wait(self) -> float:
        if self._tokens < 1:
            return (1 - self._tokens) / self.send_rate
        if len(self._active) >= SENDERS:
            return GRANT_STALL_S / 2  # a send done wakes the thread; a blocked one is seen then
        return 0.0

    def _dispatch(self) -> None:
        now = time.monotonic()
        if self._beating or self._idle:
            self._senders(now)
            self._heartbeats(now)
        if not self._ready:
            return
        cap = self.send_rate * 0.02
        self._tokens = min(cap, self._tokens + (now - self._refilled) * self.send_rate)
        self._refilled = now
        senders = self._senders(now)
        while self._ready and senders < SENDERS and self._tokens >= 1:
            sub = self._ready.popleft()
            if sub.ended is not None or sub in self._sending:
                continue
            batch = self._take(sub, min(GRANT, int(self._tokens)))
            if not batch:
                sub.queued = False
                continue
            self._tokens -= len(batch)
            self.messages_sent += len(batch)
            self._sending[sub] = now
            self._active[sub] = now
            sub.take()
            self._pool.submit(self._send, sub, batch)
            senders += 1

    def _heartbeats(self, now: float) -> None:
        """A heartbeat to each stream that has sent nothing for
        ``heartbeat_s`` (within a tick) while the sidecar's view is current."""
        idle = self._idle
        if not idle or now < self._heartbeat_at:
            return
        self._heartbeat_at = now + HEARTBEAT_TICK_S
        healthy = self.feed_healthy
        due = now + HEARTBEAT_TICK_S - self.heartbeat_s
        while idle:
            sub, at = next(iter(idle.items()))
            if at > due:
                break
            del idle[sub]
            if sub.ended is not None or sub in self._sending:
                continue  # its job's end puts it back
            idle[sub] = now
            if healthy:
                self._sending[sub] = now
                self._beating[sub] = now
                sub.take()
                self._pool.submit(self._send, sub, HEARTBEATS)

    def _take(self, sub: Subscription, n: int) -> list[bytes]:
        """Up to ``n`` messages out of the outbox, in the order they go."""
        out: list[bytes] = []
        if sub.notice is not None:
            out.append(sub.notice.payload)
            sub.notice = None
        if sub.ids is None:
            sub.change_cursor = self._changes.read(sub.change_cursor, n - len(out), out)
            sub.tick_cursor = self._ticks.read(sub.tick_cursor, n - len(out), out)
            return out
        for box in (sub.changes, sub.ticks):
            while box and len(out) < n:
                out.append(box.pop(next(iter(box))).payload)
        return out

    # -- time-driven transitions -------------------------------------------------------

    def _schedule(self, status: AppStatus, now: Millis) -> None:
        """Remember the transitions of ``status`` due within the horizon."""
        horizon = now + self.horizon_ms
        for seg in status.segments:
            if now < seg.starts_at <= horizon:
                self._note_owner(status)
                self._add_due(seg.starts_at, status.app_id)

    def _add_due(self, at: Millis, app_id: str) -> None:
        item = (at, app_id)
        if item not in self._due_set:
            self._due_set.add(item)
            heapq.heappush(self._due, item)

    def _timed_work(self, deadline: float) -> None:
        now = self.clock()
        while self._due and self._due[0][0] <= now:
            item = heapq.heappop(self._due)
            self._due_set.discard(item)
            if self._subs:
                self._backlog.append(item)
        self._push_due(deadline)
        self._retry_deferred(deadline)
        self._fill_due(deadline)
        self._sweep()

    def _push_due(self, deadline: float) -> None:
        while self._backlog and time.perf_counter() < deadline:
            at, app = self._backlog.popleft()
            if self._watched(app):
                self._push_held(app, at, self.clock())
        self._ready_all()

    def _held(self, app_id: str, now: Millis) -> tuple[AppStatus | None, bool]:
        """The status the cache holds (None: none), with what was seen of its
        owner, and whether it is fresh at ``now`` (as a check would find it)."""
        cache = self.cache
        if cache is None:
            return None, True
        if cache.in_force(app_id, now) is STALE:
            entry = cache.get(app_id)
            return (entry.status if entry is not None else None), False
        entry = cache.get(app_id)
        if entry is None or entry.status is None:
            return None, True
        return self._with_owner(entry.status), True

    def _with_owner(self, status: AppStatus) -> AppStatus:
        """``status`` with the account id (and, for its version, the time
        written) last seen: neither is in the cache's packed records."""
        owner = self._owners.get(status.app_id)
        if status.account_id or owner is None:
            return status
        account, version, updated = owner
        return dataclasses.replace(
            status, account_id=account, updated_at=updated if version == status.version else 0
        )

    def _note_owner(self, status: AppStatus) -> None:
        if status.account_id:
            self._owners[status.app_id] = _owner(status)

    def _push_held(self, app_id: str, at: Millis, now: Millis) -> None:
        """The transition of ``app_id`` at ``at``, from the status held."""
        status, fresh = self._held(app_id, now)
        if not fresh:
            self.transitions_not_fresh += 1
            self._deferred[app_id] = at
            return
        if status is None or not any(seg.starts_at == at for seg in status.segments):
            return  # not held, or the timeline changed since: that change was pushed itself
        self._push(status, now)

    def _push(self, status: AppStatus, now: Millis) -> None:
        msg = self._render(status, now)
        if msg is not None:
            self.transitions_pushed += 1
            self._tick(msg)

    def _tick(self, msg: Msg) -> None:
        app = msg.app_id
        if self._all:
            self._ticks.append(msg)
            self._ticks_added = True
        for sub in self._index.get(app, ()):
            if msg.version < sub.floor.get(app, 0):
                continue  # the cache had not caught up with what it started with
            if app in sub.changes:
                sub.changes[app] = msg  # newer, and keeps its place ahead
            else:
                sub.ticks[app] = msg
            self._ready_up(sub)

    def _ready_all(self) -> None:
        if self._ticks_added:
            self._ticks_added = False
            for sub in self._all:
                self._ready_up(sub)

    def _retry_deferred(self, deadline: float) -> None:
        """Transitions that were not pushed at their instant: pushed once the
        status held is fresh again, as it is then."""
        mono = time.monotonic()
        if not self._deferred or mono < self._retry_at:
            return
        self._retry_at = mono + RETRY_S
        if not self.feed_healthy:
            return
        now = self.clock()
        for app, at in list(self._deferred.items()):
            if time.perf_counter() >= deadline:
                self._retry_at = 0.0
                break
            status, fresh = self._held(app, now)
            if not fresh and now - at <= self.horizon_ms:
                continue
            del self._deferred[app]
            if fresh and status is not None and self._watched(app):
                self._push(status, now)
        self._ready_all()

    def _fill_due(self, deadline: float) -> None:
        """Fill the heap from every status held, not only those that
        changed: every ``horizon/2`` while someone watches, and as soon as
        the first stream opens; a slice at a time."""
        cache = self.cache
        if cache is None:
            return
        if self._fill is None:
            if not self._subs or time.monotonic() < self._fill_at:
                return
            # Only watched applications matter: with no watch-all stream,
            # the named ones (a stream's own are scheduled when it opens).
            ids = cache.app_ids() if self._all else list(self._index)
            self._fill, self._fill_pos = ids, 0
            self._fill_at = time.monotonic() + self.horizon_ms / 2000
        ids, pos = self._fill, self._fill_pos
        now = self.clock()
        until = now + self.horizon_ms
        unknown: list[str] = []
        while pos < len(ids) and time.perf_counter() < deadline:
            for app in ids[pos : pos + 500]:
                try:
                    due = cache.transitions(app, now, until)
                except Exception:
                    # A record the cache cannot read: its checks read Redis;
                    # here it is skipped, never retried in a loop.
                    cache.mark_corrupt(app)
                    self.render_errors += 1
                    continue
                for at in due:
                    self._add_due(at, app)
                    if app not in self._owners:
                        unknown.append(app)
            pos += 500
        self._fill_pos = pos
        if pos >= len(ids):
            self._fill = None
            self._prune_owners()
        self._read_owners(unknown)

    # -- owners, read ahead ------------------------------------------------------------

    def _read_owners(self, apps: list[str]) -> None:
        """Read the full records of ``apps`` ahead of their transitions (one
        read at a time, on the event loop), for the account id the cache
        does not keep."""
        for i in range(0, len(apps), OWNERS_CHUNK):
            self._owners_todo.append(apps[i : i + OWNERS_CHUNK])
        if self._owners_reading or not self._owners_todo:
            return
        if self.read_owners is None or self._loop is None:
            self._owners_todo.clear()
            return
        chunk = self._owners_todo.popleft()
        self._owners_reading = True
        try:
            future = asyncio.run_coroutine_threadsafe(self.read_owners(chunk), self._loop)
        except RuntimeError:  # the loop is closed
            self._owners_reading = False
            return
        future.add_done_callback(lambda f: self._inbox.put(("owners", f)))

    def _on_owners(self, future: concurrent.futures.Future[list[AppStatus]]) -> None:
        self._owners_reading = False
        try:
            statuses = future.result()
        except Exception as exc:
            self._warn.warning(
                "owners",
                "cannot read the owners of applications with transitions ahead (%s); "
                "they are pushed without their account id",
                describe_error(exc),
            )
            self._owners_todo.clear()
            return
        for status in statuses:
            self._note_owner(status)
        self._read_owners([])

    def _prune_owners(self) -> None:
        if len(self._owners) > 2 * len(self._due_set) + 1000:
            due = {app for _, app in self._due_set}
            self._owners = {a: o for a, o in self._owners.items() if a in due}

    def _behind(self, sub: Subscription) -> tuple[int, int]:
        """(changes, transitions) ``sub`` has yet to send."""
        if sub.ids is None:
            return self._changes.head - sub.change_cursor, self._ticks.head - sub.tick_cursor
        return len(sub.changes), len(sub.ticks)

    def _sweep(self) -> None:
        """Cut the streams that fell behind; forget what every watch-all
        stream has read."""
        mono = time.monotonic()
        if mono < self._sweep_at:
            return
        self._sweep_at = mono + SWEEP_S
        for sub in list(self._subs):
            changes, ticks = self._behind(sub)
            if changes <= self.max_pending:
                sub.behind_since = None
            elif sub.behind_since is None:
                sub.behind_since = mono
            lagging = sub.behind_since is not None and mono - sub.behind_since >= self.lag_s
            if lagging or changes > self.max_behind:
                self._cut(sub, f"more than {self.max_pending} changes unsent")
            elif ticks > self.max_ticks_behind:
                self._cut(sub, f"more than {self.max_ticks_behind} transitions unsent")
        self._changes.trim(min((s.change_cursor for s in self._all), default=self._changes.head))
        self._ticks.trim(min((s.tick_cursor for s in self._all), default=self._ticks.head))
