"""``--workers N``: N serving processes on one port, each with its own cache."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.reconciler import Reconciler
from lcic_guard.store.status import Store

from tests.support.events import Events, deliveries

LCIC_GUARD = str(Path(sys.executable).with_name("lcic-guard"))


def feed_readers(store_url: str) -> int:
    out = subprocess.run(
        ["redis-cli", "-u", store_url, "CLIENT", "LIST"], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if "cmd=xread" in line.split())


async def test_workers_share_the_port_each_with_its_own_feed(
    redis_server: EmbeddedRedis, store: Store, reconciler: Reconciler, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    assert await asyncio.to_thread(serve_with_workers, redis_server.url) == 0


def serve_with_workers(url: str) -> int:
    """Run ``serve --workers 2``, check it, SIGTERM it; its exit code."""
    port = free_port()
    env = {**os.environ, "LCIC_GUARD_LOG_FORMAT": "text"}
    proc = subprocess.Popen(
        [
            LCIC_GUARD,
            "serve",
            "--redis-url",
            url,
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--redis-timeout",
            "1s",
            "--max-heartbeat-age",
            "0s",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while feed_readers(url) < 2:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "two workers did not start following the feed"
            time.sleep(0.1)
        for _ in range(20):  # new connections land on either process
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.EnforcementServiceStub(channel)
                d = stub.CanAccessRecording(
                    pb.CanAccessRecordingRequest(app_id="app-1", recording_id="r"), timeout=5
                ).decision
                # Checked with the wall clock: the test package may have expired.
                assert d.reason in (pb.DECISION_REASON_OK, pb.DECISION_REASON_PACKAGE_EXPIRED)
                assert d.status_version >= 1
        assert feed_readers(url) == 2  # one change-feed reader per process
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return code
