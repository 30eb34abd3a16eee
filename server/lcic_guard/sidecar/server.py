"""The sidecar's gRPC server: EnforcementService (see
:mod:`lcic_guard.sidecar.service`), health and reflection, and the connection
limits, served by gRPC's threaded server over the serving core: the threads
(:mod:`~lcic_guard.sidecar.threads`), the one way into a call with its hooks
(:mod:`~lcic_guard.sidecar.calls`), the checks' fast path
(:mod:`~lcic_guard.sidecar.checks`) and the bridge to the event loop
(:mod:`~lcic_guard.sidecar.bridge`). How a failed call ends is
:mod:`lcic_guard.sidecar.errors`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.sidecar import calls
from lcic_guard.sidecar import threads as threads_
from lcic_guard.sidecar.bridge import Bridge
from lcic_guard.sidecar.certs import CertificateFiles, reloading_server_credentials
from lcic_guard.sidecar.service import EnforcementServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EnforcementService"].full_name
# A health service name that is SERVING for as long as the server runs, for
# liveness probes: the server's own health ("") turns NOT_SERVING while the
# statuses are not fresh, which must take the sidecar out of rotation, not
# get it restarted.
LIVENESS_SERVICE = "liveness"


@dataclass
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    certificates: CertificateFiles | None = None  # with TLS: reloaded when they change
    serving: bool = False  # what the health service says (read by the HTTP /readyz)
    pools: threads_.Pools | None = None  # the server's threads, ended after it stops

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)
        self.serving = serving

    async def stop(
        self, grace: float = 5.0, drain: float = 0.0, drained: Callable[[], None] | None = None
    ) -> None:
        # Probes see NOT_SERVING first (for `drain` seconds, still answering,
        # so that load balancers stop sending), then ``drained`` runs (the
        # sidecar ends its watch streams there) and in-flight calls get `grace`.
        await self.set_serving(False)
        if drain > 0:
            await asyncio.sleep(drain)
        if drained is not None:
            drained()
        stopped = self.server.stop(grace)
        # The event loop keeps running meanwhile: the calls bridged to it
        # (reports, watches) finish on it.
        await asyncio.to_thread(stopped.wait)
        if self.pools is not None:
            self.pools.shutdown(wait=False)


# A connection that has not completed the TLS and HTTP/2 handshake (the
# client's preface and first SETTINGS) by then is closed: an idle socket must
# not hold a slot for ever.
HANDSHAKE_TIMEOUT_MS = 10_000


def connection_limits(handshake_timeout_ms: int = HANDSHAKE_TIMEOUT_MS) -> list[tuple[str, Any]]:
    """gRPC server options that bound what one peer can hold open."""
    return [
        ("grpc.server_handshake_timeout_ms", handshake_timeout_ms),
        # Streams one connection may have open at once (watches included).
        ("grpc.max_concurrent_streams", 256),
        # A connection with no call for 5 minutes is closed (GOAWAY: a client
        # reconnects on its next call).
        ("grpc.max_connection_idle_ms", 300_000),
        # Dead peers are found by keepalive pings, and clients may ping no
        # more often than every 10 s.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ]


async def start_server(
    servicer: EnforcementServicer,
    listen: str,
    *,
    tls: TlsFiles | None = None,
    options: list[tuple[str, Any]] | None = None,
    hooks: Sequence[calls.Hook] = (),
    reuse_port: bool = False,
    serving: bool = True,
    handshake_timeout_ms: int | None = None,
    threads: int = threads_.CHECK_THREADS,
    max_streams: int = 1000,
) -> RunningServer:
    """Start EnforcementService, health and reflection on ``listen``, served
    by the threaded core bridged to the running event loop.

    With ``tls``, each new connection uses the certificate files as they are
    then (changed files are loaded again: see :mod:`lcic_guard.sidecar.certs`).
    ``hooks`` (auth's scope check, the tracing span; outermost first) run
    on the serving thread around every EnforcementService call they want.
    ``reuse_port`` only for the processes of one ``--workers N``: gRPC turns
    SO_REUSEPORT on by default, and with it a second sidecar on a taken port
    would silently share it and half the checks would reach the wrong one.
    With ``serving=False`` health says NOT_SERVING until the caller says
    otherwise. ``threads`` serve the unary calls; a watch stream (at most
    ``max_streams``) opens on a thread of the streams' pool and then holds
    none (the watchers' sender threads send on it); a health watch or a
    reflection stream holds one of that pool while it is open.
    """
    pools = threads_.Pools(threads, max_streams + 64)  # + health watches, reflection, refusals
    bridge = Bridge(asyncio.get_running_loop(), pools.calls)
    server = grpc.server(
        pools,
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *connection_limits(handshake_timeout_ms or HANDSHAKE_TIMEOUT_MS),
            *(options or []),
        ],
    )
    handlers = calls.handlers(servicer, bridge, calls.Entry(hooks))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    certificates = None
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        certificates = CertificateFiles(tls.cert, tls.key, tls.client_ca)
        port = server.add_secure_port(listen, reloading_server_credentials(certificates))
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    running = RunningServer(server, port, health_servicer, certificates, pools=pools)
    health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await running.set_serving(serving)
    return running
