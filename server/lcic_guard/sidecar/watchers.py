"""WatchApplicationStatus streams: one shared change log, rendered once per
change and sent to every stream that watches the application, paced
across all streams.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import grpc

from lcic_guard.domain.policy import AppStatus
from lcic_guard.domain.time import Millis
from lcic_guard.sidecar.cache import StatusCache
from lcic_guard.tasks import wait_event

log = logging.getLogger(__name__)

# Watch messages sent per second, all streams together, and how often the
# streams are woken per stream open (see Watchers).
SEND_RATE: Final = 5_000.0
FLUSH_PER_STREAM_S: Final = 0.0001
WAKE_GROUPS: Final = 8
# The change log's key of an entry for every stream (an app id is never empty).
EVERY_STREAM: Final = ""


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
            if app_id == EVERY_STREAM:
                # A store discontinuity: what was not sent yet may be what
                # the store lost, and nothing from before may follow it.
                self.pending.clear()
                self.pending[EVERY_STREAM] = payload
            elif ids is None or app_id in ids:
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
            if not await wait_event(self.watchers.wakes[self.group], timeout):
                return None


def _wall_clock() -> Millis:
    return time.time_ns() // 1_000_000


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
        render: Callable[[AppStatus, Millis], bytes] | None = None,
        render_discontinuity: Callable[[str, Millis], bytes] | None = None,
        clock: Callable[[], Millis] | None = None,
        refresh: Callable[[list[str]], Awaitable[list[AppStatus]]] | None = None,
    ) -> None:
        """``render`` makes a watch message of a status, ``render_discontinuity``
        the message of a store discontinuity (without them nothing is sent);
        ``refresh`` reads statuses again for a time-driven transition (without
        it none is pushed); ``clock`` is the sidecar's (the wall clock by
        default)."""
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
        self.render = render
        self.render_discontinuity = render_discontinuity
        self.discontinuities_sent = 0  # streams told of a store discontinuity
        self.clock: Callable[[], Millis] = clock if clock is not None else _wall_clock
        # Time-driven transitions: (instant, app id), and the same as a set.
        self._due: list[tuple[Millis, str]] = []
        self._due_set: set[tuple[Millis, str]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.refresh = refresh
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

    def payload_for(self, status: AppStatus, now: Millis) -> bytes | None:
        """What watchers are sent for ``status``; None without a renderer or
        when it cannot be rendered (counted and logged)."""
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
        payload = self.payload_for(status, now)
        if payload is None:
            return
        self.log.append((app_id, payload))
        self.seq += 1
        if urgent:
            self._wake_soon()
        elif self._wake_due is None:
            # Waking every stream costs in proportion to their number: the
            # more streams, the less often (each wake carries more changes).
            interval = max(self.flush_s, len(self._subs) * FLUSH_PER_STREAM_S)
            step = interval / WAKE_GROUPS
            self._wake_due = asyncio.get_running_loop().call_later(step, self._cycle, 0, step)

    def _wake_soon(self) -> None:
        if self._wake_due is not None:
            self._wake_due.cancel()
        self._wake_due = asyncio.get_running_loop().call_soon(self._wake_now)

    def discontinuity(self, cause: str, now: Millis) -> None:
        """Tell every open stream, at once, that the store may have lost
        acknowledged writes (SPEC R15): its client drops every answer it
        kept. Statuses published after this follow it on each stream."""
        if not self._subs or self.closing or self.render_discontinuity is None:
            return
        self.log.append((EVERY_STREAM, self.render_discontinuity(cause, now)))
        self.seq += 1
        self.discontinuities_sent += len(self._subs)
        self._wake_soon()

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
                # Not wait_for: Python 3.11's loses a cancellation that lands
                # as the event is set, and the sidecar's stop would hang.
                async with asyncio.timeout(wait):
                    await self._first_watcher.wait()

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
