"""The sidecar's Prometheus metrics (the names are listed in
:mod:`lcic_guard.metrics`, which serves them).
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lcic_guard.domain.policy import Check, Reason
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.follower import DISCONTINUITIES, ChangeFeedReader
from lcic_guard.sidecar.watchers import Watchers
from lcic_guard.store.keys import FEED_SHARDS

log = logging.getLogger(__name__)


# From 10 µs: a cached answer takes a few µs of Python; a Redis read a few
# hundred µs; the store sub-deadline (5 ms by default) bounds the rest.
CHECK_BUCKETS: Final = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)
BATCH: Final = "batch"
# Where a check was answered: on its serving thread from memory, or on the
# event loop (a Redis read, or a failure mode).
THREAD: Final = "thread"
LOOP: Final = "loop"


class _CheckerCollector(Collector):
    """What the checker and its cache count, read at scrape time."""

    def __init__(
        self,
        checker: Checker,
        feed: ChangeFeedReader | None = None,
        watchers: Watchers | None = None,
    ) -> None:
        self.checker = checker
        self.feed = feed
        self.watchers = watchers

    def collect(self) -> Iterator[Metric]:
        yield from self._bounds()
        yield from self._checker()

    def _bounds(self) -> Iterator[Metric]:
        checker = self.checker
        cache = checker.cache
        modes = CounterMetricFamily(
            "lcic_guard_failure_mode_answers",
            "Checks answered by their failure mode (R13): Redis unavailable, or the item "
            "could not be decided.",
            labels=("check", "mode"),
        )
        for check in Check:
            for mode in ("open", "closed"):
                n = checker.failure_mode_answers.get((check.value, mode), 0)
                modes.add_metric((check.value, mode), n)
        yield modes
        yield CounterMetricFamily(
            "lcic_guard_internal_errors",
            "Check items that could not be decided (a stored record that does not decode); "
            "each answered by its failure mode.",
            checker.internal_errors,
        )
        yield GaugeMetricFamily(
            "lcic_guard_cache_complete",
            "1 while the cache holds the whole status table (absent ids answer "
            "UNKNOWN_APPLICATION with no Redis read).",
            1.0 if cache.whole else 0.0,
        )
        yield GaugeMetricFamily(
            "lcic_guard_cache_rooms", "Classroom reports held in the cache.", cache.room_count
        )
        yield CounterMetricFamily(
            "lcic_guard_cache_room_evictions",
            "Classroom reports dropped by the per-application bound.",
            cache.room_evictions,
        )
        yield GaugeMetricFamily(
            "lcic_guard_negative_cache_entries",
            "Ids remembered as absent from the status table.",
            cache.absent_count,
        )
        yield CounterMetricFamily(
            "lcic_guard_negative_cache_evictions",
            "Ids forgotten by the negative cache's bound.",
            cache.negative_evictions,
        )
        yield CounterMetricFamily(
            "lcic_guard_snapshot_entries_refused",
            "Snapshot entries not held because they are not records this version reads "
            "(the replica is then not whole: ids not held are read from Redis).",
            cache.refused_entries,
        )
        if self.feed is not None:
            resyncs = CounterMetricFamily(
                "lcic_guard_table_loads",
                "Loads of the whole status table, by cause (start, generation: Redis holds a "
                "new data set, restart: Redis restarted or failed over, rollback: a version "
                "or a feed shard's number went backwards), and of one feed shard (gap: its "
                "numbers jumped).",
                labels=("cause",),
            )
            for cause in ("start", "generation", "restart", "rollback", "gap"):
                resyncs.add_metric((cause,), self.feed.resync_causes.get(cause, 0))
            yield resyncs
            gone_back = CounterMetricFamily(
                "lcic_guard_store_discontinuities",
                "Store discontinuities seen (SPEC R10, R15: Redis may have lost acknowledged "
                "writes), by cause; each is sent to every open watch stream.",
                labels=("cause",),
            )
            for cause in DISCONTINUITIES:
                gone_back.add_metric((cause,), self.feed.discontinuities.get(cause, 0))
            yield gone_back
            yield GaugeMetricFamily(
                "lcic_guard_table_loaded",
                "1 once the whole status table was loaded and while the feed is followed "
                "(a reload of some feed shards leaves it at 1: the sidecar serves meanwhile).",
                1.0 if self.feed.in_sync else 0.0,
            )
            yield GaugeMetricFamily(
                "lcic_guard_feed_shards_vouched",
                "Feed shards loaded, followed and confirmed by a progress mark within "
                "--cache-max-age (16 when every answer can come from memory).",
                sum(cache.vouched(s, checker.clock()) for s in range(FEED_SHARDS)),
            )
        if self.watchers is not None:
            w = self.watchers
            yield GaugeMetricFamily("lcic_guard_watch_streams", "Open watch streams.", len(w))
            yield GaugeMetricFamily(
                "lcic_guard_watch_sender_threads",
                "Threads sending watch messages: 2, and one more for each send a client "
                "blocks by not reading.",
                w.sender_threads,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_streams_refused",
                "Watch streams refused by --max-watch-streams.",
                w.refused,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_slow_cuts",
                "Watch streams cut (RESOURCE_EXHAUSTED) because they fell behind: more "
                "applications' changes unsent than a stream may hold.",
                w.slow_cuts,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_render_errors",
                "Statuses that could not be sent to watchers (skipped).",
                w.render_errors,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_messages_rendered",
                "Watch messages rendered: once per change or transition, shared by every "
                "stream it goes to.",
                w.rendered,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_messages_sent",
                "Watch messages handed to streams to send (heartbeats not counted).",
                w.messages_sent,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_transitions_pushed",
                "Time-driven transitions (grace ending, package expiring, release due) pushed "
                "to watchers from the status held.",
                w.transitions_pushed,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_transitions_not_fresh",
                "Time-driven transitions not pushed at their instant because the status held "
                "was not fresh (pushed once it is fresh again).",
                w.transitions_not_fresh,
            )

    def _checker(self) -> Iterator[Metric]:
        checker = self.checker
        cache = checker.cache
        yield CounterMetricFamily(
            "lcic_guard_cache_hits", "Checks answered from the status cache.", cache.hits
        )
        yield CounterMetricFamily(
            "lcic_guard_cache_misses",
            "Checks not answered from the status cache (read from Redis or per R13).",
            cache.misses,
        )
        yield GaugeMetricFamily(
            "lcic_guard_cache_entries", "Applications in the status cache.", len(cache)
        )
        yield GaugeMetricFamily(
            "lcic_guard_change_feed_healthy",
            "1 while the change feed is followed without a gap.",
            1.0 if cache.feed_healthy else 0.0,
        )
        staleness = math.nan
        if cache.confirmed_at > 0:
            staleness = max(0, checker.clock() - cache.confirmed_at) / 1000
        yield GaugeMetricFamily(
            "lcic_guard_status_staleness_seconds",
            "Now minus the time the least recently confirmed feed shard was last proven "
            "current by a progress mark or change (NaN while a shard is not loaded).",
            staleness,
        )
        yield CounterMetricFamily(
            "lcic_guard_redis_errors",
            "Status reads from Redis that failed or timed out.",
            checker.store_errors,
        )
        yield GaugeMetricFamily(
            "lcic_guard_breaker_open",
            "1 while the Redis circuit breaker is open.",
            1.0 if checker.breaker.is_open else 0.0,
        )
        yield CounterMetricFamily(
            "lcic_guard_breaker_trips",
            "Times the Redis circuit breaker opened.",
            checker.breaker.trips,
        )


class _CheckCounts:
    """What each answer sent adds, as plain integers: a check is counted
    with a dict increment or two and no lock (prometheus_client's counters
    take a lock on every increment). The serving threads increment them
    under the GIL; a scrape reads them through :class:`_CountsCollector`."""

    def __init__(self) -> None:
        self.decided: dict[tuple[str, str, str], int] = {}
        self.shadowed: dict[tuple[str, str], int] = {}
        # check -> [count in each bucket (the last: above every bound), sum]
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.paths: dict[str, int] = {THREAD: 0, LOOP: 0}


class _CountsCollector(Collector):
    def __init__(self, counts: _CheckCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        decisions = CounterMetricFamily(
            "lcic_guard_decisions",
            "Decisions returned, by check, main reason and outcome.",
            labels=("check", "reason", "allowed"),
        )
        for labels, n in list(c.decided.items()):
            decisions.add_metric(labels, n)
        yield decisions
        duration = HistogramMetricFamily(
            "lcic_guard_check_duration_seconds",
            "Time to decide a check in the sidecar (check=batch: a whole CheckBatch).",
            labels=("check",),
        )
        for check, row in list(c.buckets.items()):
            cumulative, out = 0, []
            for bound, n in zip((*CHECK_BUCKETS, math.inf), row, strict=True):
                cumulative += n
                out.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            duration.add_metric((check,), out, c.sums.get(check, 0.0))
        yield duration
        shadow = CounterMetricFamily(
            "lcic_guard_shadow_denials",
            "Denials that shadow mode turned into allows, by check and reason.",
            labels=("check", "reason"),
        )
        for labels2, n in list(c.shadowed.items()):
            shadow.add_metric(labels2, n)
        yield shadow
        paths = CounterMetricFamily(
            "lcic_guard_check_paths",
            "Check calls (a CheckBatch counts once) by where they were answered: on the "
            "serving thread from memory (thread), or on the event loop (loop: a Redis read "
            "or a failure mode).",
            labels=("path",),
        )
        for path, n in list(c.paths.items()):
            paths.add_metric((path,), n)
        yield paths


class SidecarMetrics:
    """The sidecar's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.counts = _CheckCounts()
        self.registry.register(_CountsCollector(self.counts))

    def watch(
        self,
        checker: Checker,
        feed: ChangeFeedReader | None = None,
        watchers: Watchers | None = None,
    ) -> None:
        """Expose the checker's own counters (cache, store errors, breaker),
        the table loads and the watch streams."""
        self.registry.register(_CheckerCollector(checker, feed, watchers))

    def decided(self, labels: tuple[str, str, str]) -> None:
        decided = self.counts.decided
        decided[labels] = decided.get(labels, 0) + 1

    def timed(self, check: str, seconds: float, path: str = THREAD) -> None:
        c = self.counts
        c.paths[path] += 1
        row = c.buckets.get(check)
        if row is None:
            row = c.buckets.setdefault(check, [0] * (len(CHECK_BUCKETS) + 1))
        row[bisect_left(CHECK_BUCKETS, seconds)] += 1
        c.sums[check] = c.sums.get(check, 0.0) + seconds

    def shadowed(self, check: Check, reason: Reason) -> None:
        key = (check.value, reason.value)
        shadowed = self.counts.shadowed
        shadowed[key] = shadowed.get(key, 0) + 1
