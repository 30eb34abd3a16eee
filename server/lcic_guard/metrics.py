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
``lcic_guard_check_paths_total{path}``
    Check calls (a CheckBatch counts once) by where they were answered:
    ``thread`` (the serving thread, from memory) or ``loop`` (the event
    loop: a Redis read or a failure mode). With auth and tracing on, a cache
    hit is still ``thread``.
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
    Open watch streams, refusals past ``--max-watch-streams``, streams cut
    for falling behind, statuses skipped because they could not be rendered.
``lcic_guard_watch_messages_rendered_total``, ``lcic_guard_watch_messages_sent_total``
    Watch messages rendered (once per change, whatever the streams) and
    handed to streams.
``lcic_guard_watch_transitions_pushed_total``, ``lcic_guard_watch_transitions_not_fresh_total``
    Time-driven transitions pushed from the status held, and those not
    pushed at their instant because it was not fresh.

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
    Deadlines (state flips, releases, retries) processed by this replica.
``lcic_guard_reconciler_deadline_shards``
    Deadline shards this replica works now (its share: 16 divided by the
    replicas alive, rounded up).
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

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)


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
    detail: Callable[[], str] | None = None
    """A line ``/readyz`` adds to its answer (the reconciler: whether
    releases are paused)."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: one log line each would drown the rest."""


def _app(registry: CollectorRegistry, probes: Probes) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            # prometheus_client's WSGI app is untyped: it returns the body.
            return cast("Iterable[bytes]", metrics_app(environ, start_response))
        try:
            ok = probes.alive() if path == "/healthz" else probes.ready()
        except Exception:  # a probe that cannot tell says no
            log.exception("probe %s failed", path)
            ok = False
        body = b"ok\n" if ok else (b"not alive\n" if path == "/healthz" else b"not ready\n")
        if path == "/readyz" and probes.detail is not None:
            try:
                body += probes.detail().encode() + b"\n"
            except Exception:
                log.exception("probe detail failed")
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
