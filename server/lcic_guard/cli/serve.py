"""``serve``, ``reconcile`` and ``probe``: the two long-running processes,
and the health check that asks either of them whether it is ready."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from lcic_guard.cli._common import INTERRUPTED, needs_redis, settings
from lcic_guard.flags import (
    add_debug_flag,
    add_metrics_flags,
    add_policy_flags,
    add_reconcile_flags,
    add_serve_flags,
    add_store_flags,
)


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the sidecar (embedded default without --redis-url)",
        description="Run the gRPC sidecar. Without --redis-url: a private "
        "redis-server, the reconciler and sample billing data.",
    )
    add_store_flags(p, embedded=True)
    add_serve_flags(p)
    add_policy_flags(p)
    add_reconcile_flags(p, embedded=True)
    add_metrics_flags(p)
    add_debug_flag(p)


def add_reconcile_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reconcile",
        help="run the reconciler",
        description="Run the reconciler: consume the billing stream, keep "
        "statuses, run deadlines and releases. Needs --redis-url: it works on "
        "the Redis the sidecars read.",
    )
    add_store_flags(p)
    add_policy_flags(p, sidecar=False)
    add_reconcile_flags(p, embedded=False)
    add_metrics_flags(p)
    add_debug_flag(p)


def add_probe_parser(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="exit 0 if a running sidecar is ready (1 if not): for health checks",
        description="Ask a running sidecar's gRPC health service whether it is SERVING "
        "(ready: its statuses are fresh), or with --live only whether it runs. With --http, "
        "ask the process's metrics listener instead (/readyz, or /healthz with --live): the "
        "reconciler has no gRPC port, and a sidecar with TLS is probed there too. Exit 0: "
        "yes; 1: no or no answer.",
    )
    p.add_argument(
        "--target",
        default=None,
        help="sidecar address (default: LCIC_GUARD_LISTEN, with a wildcard host as "
        "127.0.0.1, else 127.0.0.1:50051)",
    )
    p.add_argument("--http", default=None, metavar="HOST:PORT", help="metrics listener to ask")
    p.add_argument("--live", action="store_true", help="alive rather than ready")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    add_debug_flag(p)


def serve(args: argparse.Namespace) -> int:
    from lcic_guard import runner

    s = settings(args)
    return asyncio.run(_until_signal(lambda stop: runner.serve(s, stop=stop)))


def reconcile(args: argparse.Namespace) -> int:
    from lcic_guard import runner

    s = settings(args)
    needs_redis(s, "the reconciler")
    return asyncio.run(_until_signal(lambda stop: runner.reconcile(s, stop=stop)))


async def _until_signal(run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    """Run a server until SIGINT or SIGTERM: exit status 130 after Ctrl-C (as
    a shell reports an interrupted command), 0 after SIGTERM (a normal stop
    by a service manager or an orchestrator)."""
    stop = asyncio.Event()
    got: list[int] = []

    def on(sig: int) -> None:
        got.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on, sig)
    await run(stop)
    return INTERRUPTED if signal.SIGINT in got else 0


# -- probe --------------------------------------------------------------------------


def _local(listen: str) -> str:
    """A listen address as a client on the same host reaches it."""
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def probe(args: argparse.Namespace) -> int:
    """Container health: gRPC health (or HTTP /readyz, /healthz); exit 0 or 1."""
    if args.http:
        return _probe_http(_local(args.http), args.live, args.timeout)
    target = args.target or _local(os.environ.get("LCIC_GUARD_LISTEN", "127.0.0.1:50051"))
    return _probe_grpc(target, args.live, args.timeout)


def _probe_http(address: str, live: bool, timeout: float) -> int:
    import urllib.error
    import urllib.request

    url = f"http://{address}/{'healthz' if live else 'readyz'}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            print(f"{url}: {resp.status}")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code}", file=sys.stderr)
    except OSError as exc:
        print(f"{url}: no answer ({exc})", file=sys.stderr)
    return 1


def _probe_grpc(target: str, live: bool, timeout: float) -> int:
    # gRPC's standard health service, not the sidecar's API: the client has
    # no call for it (it would need grpcio-health-checking), so this one
    # place speaks gRPC itself.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lcic_guard.sidecar.server import LIVENESS_SERVICE

    service = LIVENESS_SERVICE if live else ""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
