"""Prometheus metrics of the sidecar and the reconciler.

Each process has its own :class:`~prometheus_client.CollectorRegistry` (no
global state, so tests and several servers in one process do not mix) and
serves it over HTTP on its own port with ``--metrics-listen HOST:PORT``
(off by default; see docs/configuration.md). With ``--workers N`` the main
process serves on ``PORT`` (the reconciler's metrics, in the embedded
default) and worker ``i`` (from 0) on ``PORT + 1 + i``.

The check hot path costs one counter increment and one histogram
observation, on label children bound once (labels are the check kind, the
reason and the outcome: never an application id). Everything the checker
and its cache already count (hits, misses, entries, store errors, breaker)
is read at scrape time by a collector, so it costs the hot path nothing.

Sidecar metrics:

``lcic_guard_decisions_total{check,reason,allowed}``
    Decisions returned, by check kind (create, enter, recording), main
    reason and outcome. Shadowed denials count as ``allowed="true"``.
``lcic_guard_check_duration_seconds{check}``
    Time to decide, in the servicer (cache or Redis), per check kind;
    ``check="batch"`` times a whole CheckBatch.
``lcic_guard_shadow_denials_total{check,reason}``
    Denials that shadow mode turned into allows.
``lcic_guard_cache_hits_total``, ``lcic_guard_cache_misses_total``
    Checks answered from the cache, and those that were not.
``lcic_guard_cache_entries``
    Applications in the status cache.
``lcic_guard_change_feed_healthy``
    1 while the change feed is followed without a gap.
``lcic_guard_status_staleness_seconds``
    Now minus the time the cache was last confirmed current by the feed.
``lcic_guard_redis_errors_total``
    Status reads that failed or timed out (answered per R13).
``lcic_guard_breaker_open``, ``lcic_guard_breaker_trips_total``
    The Redis circuit breaker's state (1 = open) and how often it opened.
``lcic_guard_failure_mode_answers_total{check,mode}``
    Checks answered by their failure mode (R13), by check and mode (open,
    closed): Redis really unavailable, or an item that could not be decided.
``lcic_guard_internal_errors_total``
    Check items that could not be decided (answered by the failure mode).
``lcic_guard_cache_complete``, ``lcic_guard_table_loaded``, ``lcic_guard_table_loads_total{cause}``
    Whether the cache is a whole replica of the status table; whether it is
    loaded and followed; loads by cause (start, generation, rollback, gap).
``lcic_guard_cache_rooms``, ``lcic_guard_cache_room_evictions_total``
    Classroom reports held, and those dropped by the per-application bound.
``lcic_guard_negative_cache_entries``, ``lcic_guard_negative_cache_evictions_total``
    Ids remembered as absent from the table, and those forgotten.
``lcic_guard_watch_streams``, ``lcic_guard_watch_streams_refused_total``,
``lcic_guard_watch_slow_cuts_total``, ``lcic_guard_watch_render_errors_total``
    Open watch streams, refusals past ``--max-watch-streams``, slow consumers
    cut, statuses skipped because they could not be rendered.

Reconciler metrics:

``lcic_guard_reconciler_events_received_total``
    Billing events read from the sources.
``lcic_guard_reconciler_events_total{outcome}``
    What became of them: applied, duplicate, dead_lettered, parked.
``lcic_guard_reconciler_stream_pending``, ``lcic_guard_reconciler_stream_lag``
    The billing stream's consumer group: entries delivered but not yet
    acknowledged, and entries not yet delivered.
``lcic_guard_reconciler_watermark_age_seconds``
    Now minus the time up to which every billing event is applied (release
    waits for it, R10).
``lcic_guard_reconciler_status_changes_total``
    State changes announced on the reconciler's event stream.
``lcic_guard_reconciler_deadlines_processed_total``
    Deadlines (state flips, releases, retries) processed by the leader.
``lcic_guard_reconciler_releases_total``
    Accounts whose resources were released (R10).
``lcic_guard_reconciler_leader_changes_total``, ``lcic_guard_reconciler_is_leader``
    Times this replica gained or lost the lead, and whether it leads now.
``lcic_guard_reconciler_generation_changes_total``
    Times Redis was found holding a new data set; releases wait meanwhile.
``lcic_guard_reconciler_errors_total{loop}``
    Failed rounds of the ingest or deadline loop (each retried).
``lcic_guard_reconciler_dead_letters_total{reason}``
    Dead-lettered billing events: too_large, invalid, reserved_id, conflict,
    registration.
``lcic_guard_reconciler_deadletter_length``
    Entries in the dead-letter stream (trimmed to about --deadletter-maxlen).

The same listener answers the probes of orchestrators and load balancers:

``/healthz``
    200 while the process is alive (its gRPC server, for the sidecar, is up).
``/readyz``
    200 when the process should get traffic, else 503: for the sidecar the
    same answer as its gRPC health (``SERVING``), for the reconciler once its
    loops run, for the main process of ``--workers N`` while every worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from lcic_guard.domain.policy import Check, Decision, Reason
from lcic_guard.domain.time import Millis
from lcic_guard.store.status import DEAD_LETTER_STREAM

if TYPE_CHECKING:
    from lcic_guard.reconciler.reconciler import IngestStats, Reconciler
    from lcic_guard.sidecar.cache import ChangeFeedReader
    from lcic_guard.sidecar.checker import Checker
    from lcic_guard.sidecar.server import Watchers

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


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too); raise ValueError if malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid metrics address {listen!r}: use HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port_text)


def worker_listen(listen: str, n: int) -> str:
    """The metrics address of worker ``n`` (from 0) of ``--workers``: PORT + 1 + n
    (the main process keeps PORT). Port 0 stays 0 (any free port)."""
    if not listen:
        return listen
    host, port = parse_listen(listen)
    return listen if port == 0 else f"{host}:{port + 1 + n}"


def _never() -> bool:
    return False


def _always() -> bool:
    return True


@dataclass
class Probes:
    """What ``/healthz`` and ``/readyz`` answer; the process points them at
    its parts as they start (read from the HTTP thread: plain attribute reads)."""

    alive: Callable[[], bool] = _always
    ready: Callable[[], bool] = _never  # until the process says how it is ready


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: one log line each would drown the rest."""


def _app(registry: CollectorRegistry, probes: Probes) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        try:
            ok = probes.alive() if path == "/healthz" else probes.ready()
        except Exception:  # a probe that cannot tell says no
            log.exception("probe %s failed", path)
            ok = False
        body = b"ok\n" if ok else (b"not alive\n" if path == "/healthz" else b"not ready\n")
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]

    return app


@dataclass
class MetricsServer:
    """The HTTP server of one registry (a daemon thread): ``/metrics`` and the
    probes ``/healthz`` and ``/readyz``."""

    server: WSGIServer
    thread: threading.Thread
    probes: Probes = field(default_factory=Probes)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2.0)


def serve_metrics(
    registry: CollectorRegistry, listen: str, probes: Probes | None = None
) -> MetricsServer:
    """Serve ``registry`` at ``http://HOST:PORT/metrics`` (port 0: any free one),
    with ``/healthz`` and ``/readyz`` answered from ``probes``."""
    host, port = parse_listen(listen)
    probes = probes if probes is not None else Probes()

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, _app(registry, probes), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="lcic-guard-metrics", daemon=True)
    thread.start()
    running = MetricsServer(server, thread, probes)
    log.info("metrics on http://%s:%d/metrics", host, running.port)
    return running


# ---------------------------------------------------------------------------
# Sidecar


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
            1.0 if cache.replica_answers_absent() else 0.0,
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
        if self.feed is not None:
            resyncs = CounterMetricFamily(
                "lcic_guard_table_loads",
                "Loads of the whole status table, by cause (start, generation: Redis holds a "
                "new data set, rollback: a version went backwards, gap: the change feed was "
                "trimmed past this reader).",
                labels=("cause",),
            )
            for cause in ("start", "generation", "rollback", "gap"):
                resyncs.add_metric((cause,), self.feed.resync_causes.get(cause, 0))
            yield resyncs
            yield GaugeMetricFamily(
                "lcic_guard_table_loaded",
                "1 while the whole status table is loaded and followed.",
                1.0 if self.feed.in_sync else 0.0,
            )
        if self.watchers is not None:
            w = self.watchers
            yield GaugeMetricFamily("lcic_guard_watch_streams", "Open watch streams.", len(w))
            yield CounterMetricFamily(
                "lcic_guard_watch_streams_refused",
                "Watch streams refused by --max-watch-streams.",
                w.refused,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_slow_cuts",
                "Watch streams cut because their client did not keep up.",
                w.slow_cuts,
            )
            yield CounterMetricFamily(
                "lcic_guard_watch_render_errors",
                "Statuses that could not be sent to watchers (skipped).",
                w.render_errors,
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
            "Now minus the time the cache was last confirmed current by the change feed.",
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


class SidecarMetrics:
    """The sidecar's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            "lcic_guard_decisions",
            "Decisions returned, by check, main reason and outcome.",
            ("check", "reason", "allowed"),
            registry=self.registry,
        )
        self.check_seconds = Histogram(
            "lcic_guard_check_duration_seconds",
            "Time to decide a check in the sidecar (check=batch: a whole CheckBatch).",
            ("check",),
            buckets=CHECK_BUCKETS,
            registry=self.registry,
        )
        self.shadow_denials = Counter(
            "lcic_guard_shadow_denials",
            "Denials that shadow mode turned into allows, by check and reason.",
            ("check", "reason"),
            registry=self.registry,
        )
        self._decided: dict[tuple[Check, Reason, bool], Any] = {}
        self._timed: dict[str, Any] = {}
        self._shadowed: dict[tuple[Check, Reason], Any] = {}

    def watch(
        self,
        checker: Checker,
        feed: ChangeFeedReader | None = None,
        watchers: Watchers | None = None,
    ) -> None:
        """Expose the checker's own counters (cache, store errors, breaker),
        the table loads and the watch streams."""
        self.registry.register(_CheckerCollector(checker, feed, watchers))

    def decided(self, check: Check, decision: Decision, allowed: bool) -> None:
        key = (check, decision.reason, allowed)
        child = self._decided.get(key)
        if child is None:
            child = self._decided[key] = self.decisions.labels(
                check.value, decision.reason.value, "true" if allowed else "false"
            )
        child.inc()

    def timed(self, check: str, seconds: float) -> None:
        child = self._timed.get(check)
        if child is None:
            child = self._timed[check] = self.check_seconds.labels(check)
        child.observe(seconds)

    def shadowed(self, check: Check, reason: Reason) -> None:
        key = (check, reason)
        child = self._shadowed.get(key)
        if child is None:
            child = self._shadowed[key] = self.shadow_denials.labels(check.value, reason.value)
        child.inc()


# ---------------------------------------------------------------------------
# Reconciler


class ReconcilerMetrics:
    """The reconciler's metrics, in a registry of their own.

    The reconciler calls the ``on_*`` methods (it takes this object as its
    optional ``metrics``); :meth:`poll` reads the consumer group's pending
    and lag, which only Redis knows.
    """

    OUTCOMES: Final = ("applied", "duplicate", "dead_lettered", "parked")
    DEAD_LETTER_REASONS: Final = ("too_large", "invalid", "reserved_id", "conflict", "registration")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "lcic_guard_reconciler_events_received",
            "Billing events read from the sources.",
            registry=r,
        )
        self.events = Counter(
            "lcic_guard_reconciler_events",
            "Billing events by what became of them.",
            ("outcome",),
            registry=r,
        )
        for outcome in self.OUTCOMES:
            self.events.labels(outcome)
        self.pending = Gauge(
            "lcic_guard_reconciler_stream_pending",
            "Billing stream entries delivered to the consumer group, not yet acknowledged.",
            registry=r,
        )
        self.lag = Gauge(
            "lcic_guard_reconciler_stream_lag",
            "Billing stream entries not yet delivered to the consumer group.",
            registry=r,
        )
        self.watermark_age = Gauge(
            "lcic_guard_reconciler_watermark_age_seconds",
            "Now minus the time up to which every billing event is applied.",
            registry=r,
        )
        self.watermark_age.set(math.nan)
        self.status_changes = Counter(
            "lcic_guard_reconciler_status_changes",
            "Application state changes announced on the reconciler's event stream.",
            registry=r,
        )
        self.deadlines = Counter(
            "lcic_guard_reconciler_deadlines_processed",
            "Deadlines processed by the leader.",
            registry=r,
        )
        self.releases = Counter(
            "lcic_guard_reconciler_releases",
            "Accounts whose resources were released (R10).",
            registry=r,
        )
        self.leader_changes = Counter(
            "lcic_guard_reconciler_leader_changes",
            "Times this replica gained or lost the lead.",
            registry=r,
        )
        self.is_leader = Gauge(
            "lcic_guard_reconciler_is_leader", "1 while this replica leads.", registry=r
        )
        self.errors = Counter(
            "lcic_guard_reconciler_errors",
            "Failed rounds of a reconciler loop (each is retried).",
            ("loop",),
            registry=r,
        )
        for loop in ("ingest", "deadlines"):
            self.errors.labels(loop)
        self.dead_letters = Counter(
            "lcic_guard_reconciler_dead_letters",
            "Billing events dead-lettered, by why: too_large (not parsed), invalid, "
            "reserved_id, conflict (event id reused with other content), registration "
            "(an application registered earlier to another account).",
            ("reason",),
            registry=r,
        )
        for reason in self.DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        self.deadletter_length = Gauge(
            "lcic_guard_reconciler_deadletter_length",
            "Entries in the dead-letter stream (trimmed to about --deadletter-maxlen).",
            registry=r,
        )
        self.generation_changes = Counter(
            "lcic_guard_reconciler_generation_changes",
            "Times Redis was found holding a new data set (releases wait for a full read).",
            registry=r,
        )

    def on_ingest(self, stats: IngestStats) -> None:
        self.received.inc(stats.received)
        for outcome, n in (
            ("applied", stats.applied),
            ("duplicate", stats.duplicates),
            ("dead_lettered", stats.dead_lettered),
            ("parked", stats.parked),
        ):
            if n:
                self.events.labels(outcome).inc(n)
        for reason, n in stats.dead_letter_kinds.items():
            self.dead_letters.labels(reason).inc(n)

    def on_status_change(self) -> None:
        self.status_changes.inc()

    def on_deadlines(self, done: int) -> None:
        if done:
            self.deadlines.inc(done)

    def on_release(self) -> None:
        self.releases.inc()

    def on_leadership(self, leading: bool) -> None:
        self.leader_changes.inc()
        self.is_leader.set(1 if leading else 0)

    def on_generation_change(self) -> None:
        self.generation_changes.inc()

    def on_error(self, loop: str) -> None:
        self.errors.labels(loop).inc()

    async def poll(self, reconciler: Reconciler, now: Callable[[], Millis]) -> None:
        """Read the billing stream's consumer group and the watermark."""
        from lcic_guard.reconciler.sources import StreamSource  # no import cycle at load time

        for source in reconciler.sources:
            if isinstance(source, StreamSource):
                await source.ensure_group()
                groups = await source.redis.xinfo_groups(source.stream)
                for g in groups:
                    name = g.get("name")
                    if (name.decode() if isinstance(name, bytes) else name) != source.group:
                        continue
                    self.pending.set(int(g.get("pending") or 0))
                    lag = g.get("lag")
                    self.lag.set(math.nan if lag is None else int(lag))
        self.deadletter_length.set(await reconciler.store.redis.xlen(DEAD_LETTER_STREAM))
        mark = await reconciler.watermark()
        self.watermark_age.set(math.nan if mark is None else max(0, now() - mark) / 1000)

    async def poll_forever(
        self,
        reconciler: Reconciler,
        stop: asyncio.Event,
        now: Callable[[], Millis],
        interval: float = 5.0,
    ) -> None:
        """:meth:`poll` every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.poll(reconciler, now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("metrics poll failed (%s: %s)", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
