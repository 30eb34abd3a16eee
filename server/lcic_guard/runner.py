"""The runner: the one place that knows every concrete part and wires them.

``serve`` runs the sidecar; ``reconcile`` runs the reconciler; without a
Redis URL ``serve`` is the embedded default: a private redis-server, the
reconciler fed with sample (or given) billing events, and the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client import CollectorRegistry

from lcic_guard import logs, tracing
from lcic_guard.config import Settings
from lcic_guard.demo import (
    SAMPLE_APPS,
    SAMPLE_ROOMS,
    EmbeddedRedis,
    free_port,
    sample_jsonl,
    sample_recorded_at,
)
from lcic_guard.domain.policy import Room, protected_until
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.errors import CommandError, bind_error, check_readable
from lcic_guard.logs import redact_url
from lcic_guard.metrics import MetricsServer, serve_metrics, worker_listen
from lcic_guard.reconciler.hooks import NO_HOOKS
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.reconciler.reconciler import Reconciler
from lcic_guard.reconciler.sources import BillingSource, FileSource, StreamSource
from lcic_guard.sidecar import auth
from lcic_guard.sidecar.auth import AuthConfig
from lcic_guard.sidecar.cache import StatusCache
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.follower import ChangeFeedReader
from lcic_guard.sidecar.metrics import SidecarMetrics
from lcic_guard.sidecar.observe import DecisionObserver
from lcic_guard.sidecar.readiness import Readiness
from lcic_guard.sidecar.server import RunningServer, TlsFiles, start_server
from lcic_guard.sidecar.service import (
    STORE_TIMEOUT_S,
    EnforcementServicer,
    StatusRefresh,
    WatchRenderer,
    render_discontinuity,
)
from lcic_guard.sidecar.watchers import Watchers
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import BILLING_STREAM
from lcic_guard.store.status import Store
from lcic_guard.tasks import stop_task
from lcic_guard.tracing import Tracing

log = logging.getLogger("lcic_guard")


def configure_logging(level: str, fmt: str = "auto") -> None:
    """Logs to standard error, as text or JSON lines (see :mod:`lcic_guard.logs`)."""
    logs.configure(level, fmt, sys.stderr)


@contextlib.asynccontextmanager
async def redis_for(settings: Settings) -> AsyncIterator[tuple[str, EmbeddedRedis | None]]:
    """The Redis URL to use, starting a private redis-server if none is given."""
    if settings.redis_url:
        yield settings.redis_url, None
        return
    embedded = EmbeddedRedis()
    await asyncio.to_thread(embedded.start)
    log.info("started a private redis-server on 127.0.0.1:%d", embedded.port)
    try:
        yield embedded.url, embedded
    finally:
        embedded.stop()


async def redis_trouble(store: Store) -> str | None:
    """Why Redis cannot be used now (one line), or None when it answers."""
    try:
        await store.ping()
    except Exception as exc:  # any failure to answer is the same to a person
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    return None


async def require_redis(store: Store, url: str) -> None:
    """Fail with one line when the Redis a command needs does not answer."""
    why = await redis_trouble(store)
    if why is not None:
        raise CommandError(
            f"cannot reach Redis at {redact_url(url)} ({why}); is it running? check --redis-url"
        )


def probe_listen(listen: str) -> None:
    """Fail with one line when ``listen`` cannot be bound: a port another
    program (or another lcic-guard) holds, or a host this machine has not.

    The probe binds without SO_REUSEPORT, so a listener that has it on (the
    workers of another sidecar) counts as holding the port too."""
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        raise CommandError(
            f"cannot listen on {listen}: unknown host {host!r}; check --listen (HOST:PORT)"
        ) from None
    if port == 0:
        return
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            raise bind_error(listen, exc) from None


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def build_reconciler(
    settings: Settings,
    store: Store,
    events: Path | None,
    *,
    clock: Callable[[], Millis],
    metrics: ReconcilerMetrics | None = None,
    traced: Tracing | None = None,
) -> Reconciler:
    """The reconciler over ``events`` (a file, if any) and, with
    ``--consume-stream``, the billing stream; traced by hooks given at its
    construction when tracing is on."""
    sources: list[BillingSource] = []
    if events is not None:
        sources.append(FileSource(events, clock_ms=store.server_time))
    if settings.consume_stream:
        claim_idle_ms = settings.reconciler.claim_idle_ms
        sources.append(StreamSource(store.redis, claim_idle_ms=claim_idle_ms))
    hooks = (
        traced.reconciler_hooks(dry_run=settings.reconciler.release_dry_run)
        if traced is not None
        else NO_HOOKS
    )
    return Reconciler(
        store,
        settings.policy,
        settings.reconciler,
        sources,
        clock=clock,
        metrics=metrics,
        hooks=hooks,
    )


@dataclass
class RunningSidecar:
    """A running sidecar process's parts, stopped together."""

    server: RunningServer
    checker: Checker
    feed: ChangeFeedReader
    metrics: SidecarMetrics | None = None
    metrics_server: MetricsServer | None = None  # when it serves its own registry
    watchers: Watchers | None = None
    readiness: Readiness | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0, drain: float = 0.0) -> None:
        """Health NOT_SERVING (still answering for ``drain`` s), then close the
        port, end watch streams and give in-flight calls ``grace`` s."""
        if self.readiness is not None:
            await self.readiness.stop()  # it must not turn health back on
        await self.server.stop(grace, drain, self.watchers.close if self.watchers else None)
        if self.watchers is not None:
            await asyncio.to_thread(self.watchers.join)
        await self.feed.stop()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)


async def build_sidecar(
    settings: Settings,
    store: Store,
    *,
    clock: Callable[[], Millis] = wall_clock,
    registry: CollectorRegistry | None = None,
    traced: Tracing | None = None,
) -> RunningSidecar:
    """The sidecar: cache, change-feed reader, checker, gRPC server.

    Metrics go to ``registry`` (served by the caller) if given, else, with
    ``--metrics-listen``, to a registry of its own served on that address.
    """
    cache = StatusCache(settings.cache_size, settings.cache_max_age_ms)
    metrics_server: MetricsServer | None = None
    wants_metrics = registry is not None or settings.metrics_listen
    metrics = SidecarMetrics(registry) if wants_metrics else None
    observer = DecisionObserver(metrics, settings.shadow)
    # The checker's answers are made by the observer's renderer (shadow mode,
    # the bytes on the wire).
    checker = Checker(
        store,
        settings.policy,
        read_timeout=settings.redis_timeout_ms / 1000,
        store_down_timeout=settings.store_down_ms / 1000,
        clock=clock,
        cache=cache,
        render=observer.render,
    )
    watchers = Watchers(
        max_streams=settings.max_watch_streams,
        render=WatchRenderer(settings.policy, observer),
        render_discontinuity=render_discontinuity,
        clock=clock,
        read_owners=StatusRefresh(store, STORE_TIMEOUT_S),
    )
    servicer = EnforcementServicer(checker, store, watchers=watchers, observer=observer)
    tls = (
        TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if (settings.tls_cert and settings.tls_key)
        else None
    )
    auth_config = AuthConfig(
        settings.auth_token_file, settings.auth_allow_identities, settings.auth_checks
    )
    if settings.auth_token_file and tls is None:
        log.warning("bearer tokens are accepted without TLS: anyone on the path can read them")
    # Tracing outermost, so that calls refused by auth are traced too.
    hooks = [*(traced.hooks() if traced else ()), *auth.hooks(auth_config)]
    # NOT_SERVING until the whole status table is loaded (and the
    # reconciler's heartbeat is fresh, with --max-heartbeat-age).
    try:
        server = await start_server(
            servicer,
            settings.listen,
            tls=tls,
            hooks=hooks,
            reuse_port=settings.workers > 1,
            serving=False,
            max_streams=settings.max_watch_streams,
        )
    except (RuntimeError, OSError) as exc:  # grpc says only "Failed to bind"
        raise bind_error(settings.listen, exc if isinstance(exc, OSError) else None) from exc
    # Built in the order they depend on each other: the feed tells readiness
    # when it holds the whole table, so readiness comes first.
    readiness = Readiness(store, server, settings.max_heartbeat_age_ms, clock, follows_feed=True)
    feed = ChangeFeedReader(
        store,
        cache,
        clock,
        on_change=watchers.publish,
        on_sync=readiness.feed_synced,
        on_discontinuity=watchers.discontinuity,
        breaker=checker.breaker,
    )
    if metrics is not None:
        metrics.watch(checker, feed, watchers)
    feed.start()
    await readiness.check_once()
    readiness.start()
    watchers.start(cache, asyncio.get_running_loop())
    if metrics is not None and registry is None:
        metrics_server = serve_metrics(metrics.registry, settings.metrics_listen)
        metrics_server.probes.ready = lambda: server.serving
    if settings.shadow:
        log.warning(
            "shadow mode for %s checks: they are always allowed; would-be denials are "
            "logged and counted",
            ",".join(sorted(c.value for c in settings.shadow)),
        )
    return RunningSidecar(server, checker, feed, metrics, metrics_server, watchers, readiness)


def _stopping(settings: Settings) -> dict[str, float]:
    return {
        "grace": settings.shutdown_grace_ms / 1000,
        "drain": settings.shutdown_delay_ms / 1000,
    }


def _worker_main(settings: Settings) -> None:
    """Entry point of one serving process of ``--workers N``."""
    configure_logging(settings.log_level, settings.log_format)

    async def work() -> None:
        stop = _stop_event()
        store = Store(connect(settings.redis_url or ""))
        traced = tracing.setup("lcic-guard")
        try:
            sidecar = await build_sidecar(settings, store, traced=traced)
            await stop.wait()
            await sidecar.stop(**_stopping(settings))
        finally:
            await store.close()
            if traced is not None:
                await asyncio.to_thread(traced.shutdown)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(work())


def _start_workers(settings: Settings, url: str) -> tuple[list[BaseProcess], int]:
    host, _, port_text = settings.listen.rpartition(":")
    port = int(port_text) or free_port()
    # The workers share the port (SO_REUSEPORT) with each other only: it must
    # be free before the first of them binds it.
    probe_listen(f"{host}:{port}")
    worker_settings = replace(settings, redis_url=url, listen=f"{host}:{port}")
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    for n in range(settings.workers):
        mine = replace(worker_settings, metrics_listen=worker_listen(settings.metrics_listen, n))
        proc = ctx.Process(target=_worker_main, args=(mine,), name=f"lcic-guard-{n}")
        proc.start()
        procs.append(proc)
    return procs, port


async def _wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"workers did not listen on port {port} within {timeout}s")


async def _report_sample_rooms(store: Store, settings: Settings, now: Millis) -> None:
    for app_id, room_id, start, end in SAMPLE_ROOMS:
        room = Room(started_at=now + start, scheduled_end=now + end)
        await store.report_room(
            app_id,
            room_id,
            now=now,
            until=protected_until(room, settings.policy),
            started_at=room.started_at,
            scheduled_end=room.scheduled_end,
        )


def _program() -> str:
    """This lcic-guard as a person in the current directory runs it: the bare
    name when PATH finds this one, else its path (``.venv/bin/lcic-guard``)."""
    exe = Path(sys.executable).with_name("lcic-guard").absolute()
    found = shutil.which("lcic-guard")
    if found is not None and Path(found).absolute() == exe:
        return "lcic-guard"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def _print_howto(
    listen: str, port: int, embedded: EmbeddedRedis | None, redis_down: str | None
) -> None:
    prog = _program()
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    target = f"{host}:{port}"
    lines = [
        "",
        f"lcic-guard is serving on {target}"
        + (" (embedded default: private Redis, sample billing data)" if embedded else ""),
        "",
    ]
    if redis_down is not None:
        lines += [
            f"WARNING: Redis does not answer ({redis_down}).",
            "  Until it does, checks are answered from the failure modes (R13: allow by",
            "  default, --failure-mode-* to deny) and marked degraded. Is Redis running?",
            "  Check --redis-url.",
            "",
        ]
    if embedded is not None:
        lines.append(f"Private Redis (stopped with this process): {embedded.url}")
        lines.append("")
        lines.append("Sample applications:")
        lines += [f"  {app:<14} {what}" for app, what in SAMPLE_APPS.items()]
        lines += [
            "",
            "Ask the sidecar:",
            f"  {prog} check create app-overdue --target {target}",
            f"  {prog} check enter app-quota --room room-live --target {target}",
            f"  {prog} explain app-grace --check create --target {target}",
            "",
            f"Publish a billing event to its {BILLING_STREAM} (format: docs/events.md),",
            "e.g. acct-overdue pays its arrears:",
            f"  {prog} events new arrears_settled account_id=acct-overdue \\",
            f"    | {prog} events publish - --redis-url {embedded.url}",
            "",
            "From Python:",
            "  from lcic_guard_client import GuardClient",
            f"  with GuardClient('{target}') as guard:",
            "      d = guard.can_create_classroom('app-grace')",
            "      print(d.allowed, d.message)",
        ]
    else:
        lines += [
            "Ask it:",
            f"  {prog} check create APP_ID --target {target}",
            f"  {prog} status APP_ID --target {target}",
        ]
    lines += ["", "Press Ctrl-C to stop.", ""]
    print("\n".join(lines), flush=True)


async def serve(
    settings: Settings,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the sidecar (and, in the embedded default, Redis and the reconciler)."""
    stop = stop or _stop_event()
    if settings.redis_url is None and settings.events is not None:
        check_readable(settings.events, "--events")
    probe_listen(settings.listen)  # before a private Redis is started for nothing
    # One endpoint for this process: the sidecar's metrics (one worker) and,
    # in the embedded default, the reconciler's.
    registry = CollectorRegistry() if settings.metrics_listen else None
    metrics_server = serve_metrics(registry, settings.metrics_listen) if registry else None
    traced = tracing.setup("lcic-guard")
    async with redis_for(settings) as (url, embedded):
        store = Store(connect(url))
        background: list[asyncio.Task[None]] = []
        try:
            # The sidecar still starts without Redis (it answers by R13), but
            # says so plainly instead of printing the usual banner alone.
            redis_down = await redis_trouble(store) if embedded is None else None
            if embedded is not None:
                background = await _embedded_reconciler(settings, store, stop, registry, traced)

            def started(port: int) -> None:
                _print_howto(settings.listen, port, embedded, redis_down)
                if ready:
                    ready(port)

            if settings.workers > 1:
                await _serve_workers(settings, url, stop, metrics_server, started)
            else:
                sidecar = await build_sidecar(settings, store, registry=registry, traced=traced)
                if metrics_server is not None:
                    metrics_server.probes.ready = lambda: sidecar.server.serving
                started(sidecar.port)
                await stop.wait()
                log.info("stopping: health NOT_SERVING, finishing in-flight calls")
                await sidecar.stop(**_stopping(settings))
        finally:
            stop.set()
            for task in background:
                await task
            await _close(store, metrics_server, traced)


async def _embedded_reconciler(
    settings: Settings,
    store: Store,
    stop: asyncio.Event,
    registry: CollectorRegistry | None,
    traced: Tracing | None,
) -> list[asyncio.Task[None]]:
    """The embedded default's reconciler: the sample (or ``--events``)
    applied before the sidecar starts, then its loops (and its metrics
    poller) running until ``stop``."""
    metrics = ReconcilerMetrics(registry) if registry else None
    with tempfile.TemporaryDirectory(prefix="lcic-sample-") as tmp:
        events = settings.events
        recorded_at: Millis | None = None
        if events is None:
            sample_at = wall_clock()
            events = Path(tmp) / "sample-events.jsonl"
            await asyncio.to_thread(events.write_text, sample_jsonl(sample_at))
            # A history as if read live all along: its facts are stamped
            # recorded long ago, not today (R6, R10 read when a fact became known).
            recorded_at = sample_recorded_at(sample_at)
        reconciler = build_reconciler(
            settings, store, events, clock=wall_clock, metrics=metrics, traced=traced
        )
        await reconciler.drain(reconciler.sources[0], recorded_at=recorded_at)
        if settings.events is None:
            await reconciler.notices_of_history()
    if settings.events is None:
        await _report_sample_rooms(store, settings, wall_clock())
    tasks = [asyncio.create_task(reconciler.run(stop))]
    if metrics is not None:
        tasks.append(asyncio.create_task(metrics.poll_forever(reconciler, stop, wall_clock)))
    return tasks


async def _serve_workers(
    settings: Settings,
    url: str,
    stop: asyncio.Event,
    metrics_server: MetricsServer | None,
    started: Callable[[int], None],
) -> None:
    """``--workers N``: N serving processes on one port until ``stop``."""
    procs, port = _start_workers(settings, url)
    try:
        await _wait_listening(port)
        if metrics_server is not None:
            metrics_server.probes.ready = lambda: all(p.is_alive() for p in procs)
        started(port)
        await stop.wait()
    finally:
        for proc in procs:
            proc.terminate()  # SIGTERM: each drains like a single process
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)


async def _close(
    store: Store, metrics_server: MetricsServer | None, traced: Tracing | None
) -> None:
    """What serve and reconcile release last, once their loops have ended."""
    await store.close()
    if metrics_server is not None:
        metrics_server.stop()
    if traced is not None:
        await asyncio.to_thread(traced.shutdown)


async def reconcile(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the reconciler until stopped."""
    stop = stop or _stop_event()
    if settings.events is not None:
        check_readable(settings.events, "--events")
    async with redis_for(settings) as (url, _embedded):
        store = Store(connect(url, timeout=10.0))
        metrics = ReconcilerMetrics() if settings.metrics_listen else None
        metrics_server = None
        poller = None
        traced = tracing.setup("lcic-guard-reconciler")
        try:
            await require_redis(store, url)
            reconciler = build_reconciler(
                settings, store, settings.events, clock=wall_clock, metrics=metrics, traced=traced
            )
            if metrics is not None:
                metrics_server = serve_metrics(metrics.registry, settings.metrics_listen)
                # Ready once its loops run; stopping, it says so first.
                metrics_server.probes.ready = lambda: not stop.is_set()
                metrics_server.probes.detail = lambda: reconciler.continuity_detail
                poller = asyncio.create_task(metrics.poll_forever(reconciler, stop, wall_clock))
            log.info("reconciler %s started", reconciler.name)
            await reconciler.run(stop)
        finally:
            await stop_task(poller)
            await _close(store, metrics_server, traced)
