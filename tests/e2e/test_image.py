"""The container image (issue 13): built from the Dockerfile, then run as
production runs it (``--read-only`` with a tmpfs, host network) against a
real redis-server on loopback: the reconciler and the sidecar from the image,
billing events published with the image's own command, checks answered over
gRPC, the image's health check passing, SIGTERM ending both with exit 0."""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest
import redis as redis_sync
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.policy import DAY
from lcic_guard.domain.time import wall_clock

from tests.support.docker import (
    ROOT,
    NoDaemon,
    base_image,
    build_context,
    build_image,
    cache_dir,
    docker,
    docker_daemon,
    run_detached,
)
from tests.support.events import Events

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        with docker_daemon():
            tag = f"lcic-guard:{VERSION}-test"
            context = build_context(tmp_path_factory.mktemp("image"))
            seconds = build_image(context, tag, base_image(), VERSION)
            size = int(docker("image", "inspect", tag, "--format", "{{.Size}}"))
            (cache_dir() / "last-build.json").write_text(
                json.dumps({"build_seconds": round(seconds, 1), "size_bytes": size}) + "\n"
            )
            yield tag
    except NoDaemon as exc:  # a set-up problem, not a reason to run less
        pytest.fail(
            f"no Docker daemon can be started here ({exc}); scripts/bootstrap installs "
            "docker.io, and the test starts dockerd itself as root"
        )


def wait(cond: object, what: str, timeout: float = 60.0, logs: tuple[str, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            detail = "\n".join(container_logs(c) for c in logs)
            raise AssertionError(f"{what} not within {timeout}s\n{detail}")
        time.sleep(0.1)


def publish(image: str, url: str, events: list[dict[str, object]]) -> None:
    """With the image's own command, from standard input."""
    out = docker(
        "run",
        "--rm",
        "--interactive",
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        image,
        "events",
        "publish",
        "-",
        "--redis-url",
        url,
        input="".join(json.dumps(e) + "\n" for e in events),
    )
    assert f"published {len(events)} events" in out


def test_image_metadata(image: str) -> None:
    config = json.loads(docker("image", "inspect", image, "--format", "{{json .Config}}"))
    assert config["Entrypoint"] == ["lcic-guard"]
    assert config["User"] == "10001:10001"  # numeric: verifiably not root
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION
    assert config["Labels"]["org.opencontainers.image.title"] == "lcic-guard"
    assert config["Healthcheck"]["Test"] == ["CMD", "lcic-guard", "probe"]
    # No build tools, no test dependencies, no pip in the final image.
    listing = docker(
        "run",
        "--rm",
        "--network",
        "host",
        "--read-only",
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        "ls /opt/lcic-guard/bin; ls /opt/lcic-guard/lib/python3*/site-packages; "
        "command -v gcc cc make || true; test ! -e /src && echo no-sources",
    ).split()
    assert "lcic-guard" in listing and "no-sources" in listing
    for absent in ("pip", "pytest", "mypy", "ruff", "hypothesis", "grpc_tools", "gcc", "make"):
        assert absent not in listing, absent
    assert "opentelemetry" in listing  # the otel extra: tracing is a variable away


def test_image_runs_read_only_reconciles_serves_and_stops_on_sigterm(
    image: str, redis_server: EmbeddedRedis
) -> None:
    url = redis_server.url
    grpc_port, serve_http, rec_http = free_port(), free_port(), free_port()
    suffix = uuid.uuid4().hex[:8]
    rec, side = f"lcic-test-reconcile-{suffix}", f"lcic-test-serve-{suffix}"
    with redis_sync.Redis.from_url(url) as client:
        client.flushall()
    try:
        run_detached(
            image,
            rec,
            ["reconcile", "--release-dry-run", "true"],
            {"LCIC_GUARD_REDIS_URL": url, "LCIC_GUARD_METRICS_LISTEN": f"127.0.0.1:{rec_http}"},
        )
        run_detached(
            image,
            side,
            ["serve"],
            {
                "LCIC_GUARD_REDIS_URL": url,
                "LCIC_GUARD_LISTEN": f"127.0.0.1:{grpc_port}",
                "LCIC_GUARD_METRICS_LISTEN": f"127.0.0.1:{serve_http}",
            },
        )
        now = wall_clock()
        ev = Events()
        publish(image, url, ev.app("acct-1", "app-1", at=now - DAY, expires=now + 30 * DAY))

        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pb_grpc.EnforcementServiceStub(channel)

        def create() -> pb.Decision | None:
            try:
                resp = stub.CanCreateClassroom(
                    pb.CanCreateClassroomRequest(app_id="app-1"), timeout=2
                )
            except grpc.RpcError:
                return None
            decision: pb.Decision = resp.decision
            return decision

        def allowed() -> bool:
            d = create()
            return d is not None and d.allowed and d.reason == pb.DECISION_REASON_OK

        wait(allowed, "app-1 allowed", logs=(rec, side))
        # A billing change published now reaches the sidecar's answer.
        ban = ev("compliance_ban", now, account_id="acct-1")
        publish(image, url, [ban])

        def banned() -> bool:
            d = create()
            return d is not None and not d.allowed

        wait(banned, "app-1 denied after the ban", logs=(rec, side))
        decision = create()
        assert decision is not None
        assert pb.DECISION_REASON_ACCOUNT_BANNED in decision.reasons
        channel.close()

        # The image's own health check, and the HTTP probes, say ready.
        def healthy() -> bool:
            return docker("inspect", side, "--format", "{{.State.Health.Status}}").strip() == (
                "healthy"
            )

        wait(healthy, "the sidecar container healthy", logs=(side,))
        for port in (serve_http, rec_http):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                assert r.status == 200
        assert docker("exec", side, "lcic-guard", "probe").strip().endswith("SERVING")
        # Read-only root, not root.
        assert docker("exec", side, "id", "-u").strip() == "10001"
        assert "Read-only file system" in _stderr_of_exec(side, ["touch", "/opt/lcic-guard/x"])

        for name in (side, rec):
            docker("kill", "--signal", "TERM", name)
        for name in (side, rec):
            code = docker("wait", name, timeout=60).strip()
            assert code == "0", container_logs(name)
        assert "Traceback" not in container_logs(side) + container_logs(rec)
        assert "stopping: health NOT_SERVING" in container_logs(side)
    finally:
        docker("rm", "-f", side, rec, check=False)


def container_logs(name: str) -> str:
    done = subprocess.run(
        ["docker", "logs", "--tail", "60", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


def _stderr_of_exec(container: str, cmd: list[str]) -> str:
    done = subprocess.run(
        ["docker", "exec", container, *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    return done.stderr


def test_image_test_builds_from_the_dockerfile_default_base_unchanged() -> None:
    """The Dockerfile the test builds is the one users build: its default base
    is the official slim Python image, and the test only overrides it."""
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert f"ARG VERSION={VERSION}" in text
