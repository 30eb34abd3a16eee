"""HTTP probes on the metrics listener and the ``lcic-guard probe`` command
(issue 13): ``/healthz`` while alive, ``/readyz`` with the same meaning as
gRPC health, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2
from lcic_guard import cli, runner
from lcic_guard.config import Settings
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.time import wall_clock
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.sidecar.server import LIVENESS_SERVICE
from lcic_guard.store.keys import HEARTBEAT
from lcic_guard.store.status import Store

from tests.sidecar.test_readiness import health_of
from tests.support.settings import sidecar_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BOUND_MS = 600


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening (yet)
        return 0, str(exc)


async def http(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_http, port, path)


async def http_becomes(port: int, path: str, status: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await http(port, path))[0] != status:
        assert asyncio.get_running_loop().time() < deadline, f"{path} did not become {status}"
        await asyncio.sleep(0.02)


def probe(*args: str) -> int:
    return cli.main(["probe", "--timeout", "2", *args])


@pytest_asyncio.fixture
async def probed(store: Store) -> AsyncIterator[RunningSidecar]:
    """A sidecar whose readiness follows the reconciler's heartbeat, with its
    metrics listener (and so its HTTP probes) on a free port."""
    settings = Settings(
        listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", max_heartbeat_age_ms=BOUND_MS
    )
    sidecar = await build_sidecar(settings, store)
    yield sidecar
    await sidecar.stop(grace=0.2)


def http_port(sidecar: RunningSidecar) -> int:
    assert sidecar.metrics_server is not None
    return sidecar.metrics_server.port


async def test_readyz_says_what_grpc_health_says_and_healthz_stays_alive(
    probed: RunningSidecar, store: Store
) -> None:
    port = http_port(probed)
    # No heartbeat yet: not ready, over gRPC and over HTTP alike; alive.
    assert await health_of(probed.port) == NOT_SERVING
    assert await http(port, "/readyz") == (503, "not ready\n")
    assert await http(port, "/healthz") == (200, "ok\n")
    assert await asyncio.to_thread(probe, "--target", f"127.0.0.1:{probed.port}") == 1
    assert await asyncio.to_thread(probe, "--http", f"127.0.0.1:{port}") == 1
    # Liveness does not follow readiness: a stale sidecar is not restarted.
    target = f"127.0.0.1:{probed.port}"
    assert await asyncio.to_thread(probe, "--target", target, "--live") == 0
    assert await asyncio.to_thread(probe, "--http", f"127.0.0.1:{port}", "--live") == 0

    await store.redis.set(HEARTBEAT, wall_clock())
    await http_becomes(port, "/readyz", 200)
    assert await health_of(probed.port) == SERVING
    assert await http(port, "/readyz") == (200, "ok\n")
    assert await asyncio.to_thread(probe, "--target", target) == 0
    assert await asyncio.to_thread(probe, "--http", f"127.0.0.1:{port}") == 0

    # The heartbeat ages past the bound: both say not ready again.
    await http_becomes(port, "/readyz", 503)
    assert await health_of(probed.port) == NOT_SERVING
    # The metrics are still where they were.
    status, text = await http(port, "/metrics")
    assert status == 200 and "lcic_guard_decisions_total" in text


async def test_readyz_fails_first_on_shutdown_while_the_port_still_answers(store: Store) -> None:
    await store.redis.set(HEARTBEAT, wall_clock())
    settings = Settings(
        listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", max_heartbeat_age_ms=30_000
    )
    sidecar = await build_sidecar(settings, store)
    port = http_port(sidecar)
    await http_becomes(port, "/readyz", 200)
    stopping = asyncio.create_task(sidecar.stop(grace=0.2, drain=1.0))
    try:
        await http_becomes(port, "/readyz", 503)
        assert await health_of(sidecar.port) == NOT_SERVING  # still answering gRPC
        assert await http(port, "/healthz") == (200, "ok\n")
    finally:
        await stopping


async def test_liveness_service_is_serving_from_the_start(store: Store) -> None:
    sidecar = await build_sidecar(
        Settings(listen="127.0.0.1:0", max_heartbeat_age_ms=BOUND_MS), store
    )
    try:
        target = f"127.0.0.1:{sidecar.port}"
        assert await health_of(sidecar.port) == NOT_SERVING
        assert await asyncio.to_thread(probe, "--target", target, "--live") == 0
        assert LIVENESS_SERVICE == "liveness"  # the name the manifests probe
    finally:
        await sidecar.stop(grace=0.2)


async def test_probe_fails_when_nothing_answers() -> None:
    dead = f"127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(probe, "--target", dead) == 1
    assert await asyncio.to_thread(probe, "--http", dead) == 1


async def test_probe_finds_the_sidecar_from_its_listen_variable(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's health check runs ``lcic-guard probe`` with no flags."""
    sidecar = await build_sidecar(sidecar_settings(listen="0.0.0.0:0"), store)
    try:
        await asyncio.wait_for(sidecar.feed.synced.wait(), 10)
        monkeypatch.setenv("LCIC_GUARD_LISTEN", f"0.0.0.0:{sidecar.port}")
        assert await asyncio.to_thread(probe) == 0
    finally:
        await sidecar.stop(grace=0.2)


async def test_the_serve_and_reconcile_processes_answer_probes_on_their_listener(
    redis_server: EmbeddedRedis, store: Store
) -> None:
    """Through the runner: the process's one metrics listener says ready when
    its sidecar's health does, and the reconciler's once its loops run."""
    serve_http, rec_http = free_port(), free_port()
    base = Settings(redis_url=redis_server.url, max_heartbeat_age_ms=30_000)
    stop = asyncio.Event()
    reconciling = asyncio.create_task(
        runner.reconcile(
            Settings(redis_url=redis_server.url, metrics_listen=f"127.0.0.1:{rec_http}"),
            stop=stop,
        )
    )
    serving = asyncio.create_task(
        runner.serve(
            Settings(
                **{
                    **base.__dict__,
                    "listen": "127.0.0.1:0",
                    "metrics_listen": f"127.0.0.1:{serve_http}",
                }
            ),
            stop=stop,
        )
    )
    try:
        await http_becomes(rec_http, "/readyz", 200, timeout=15)
        # The reconciler's heartbeat makes the sidecar ready.
        await http_becomes(serve_http, "/readyz", 200, timeout=15)
        assert await http(serve_http, "/healthz") == (200, "ok\n")
        assert await http(rec_http, "/healthz") == (200, "ok\n")
    finally:
        stop.set()
        for task in (serving, reconciling):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError("no run of free ports")


async def test_workers_each_answer_probes_and_the_main_process_while_all_run(
    redis_server: EmbeddedRedis,
) -> None:
    """``serve --workers 2``: the main process on PORT, worker i on PORT+1+i."""
    http_first = free_ports(3)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("lcic-guard")),
        "serve",
        "--redis-url",
        redis_server.url,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "2",
        "--max-heartbeat-age",
        "0",
        "--shutdown-delay",
        "0",
        "--metrics-listen",
        f"127.0.0.1:{http_first}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for port in range(http_first, http_first + 3):
            await http_becomes(port, "/readyz", 200, timeout=30)
            assert await http(port, "/healthz") == (200, "ok\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
