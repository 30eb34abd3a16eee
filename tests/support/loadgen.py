"""A paced check load against a sidecar, run as its own process by the fault
tests (so that the load's timing is not the sidecar's event loop's).

    python tests/support/loadgen.py TARGET RATE

Sends ``RATE`` checks a second, in a fixed rotation of (check, app) pairs
where ``*`` in an app id is replaced by a number never used before (an app
the sidecar cannot have seen). Prints ``ready`` once connected, runs until a
line (or EOF) arrives on stdin, then prints one JSON line per call:
``[sent_at, latency_s, code, allowed, reason, degraded, kind, app]`` with
``sent_at`` on the system-wide monotonic clock and ``code`` the gRPC status
name (``OK`` for an answer).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from typing import Any

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

ROTATION: list[tuple[str, str]] = [
    ("create", "app-good"),
    ("create", "app-susp"),
    ("recording", "app-good"),
    ("recording", "app-susp"),
    ("create", "app-nope"),
    ("create", "fresh-*"),
    ("recording", "fresh-*"),
]
MAX_IN_FLIGHT = 128


async def one(
    stub: pb_grpc.EnforcementServiceStub, kind: str, app: str, out: list[list[Any]]
) -> None:
    sent = time.monotonic()
    try:
        if kind == "create":
            d = (
                await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id=app), timeout=5)
            ).decision
        else:
            req = pb.CanAccessRecordingRequest(app_id=app, recording_id="rec-1")
            d = (await stub.CanAccessRecording(req, timeout=5)).decision
        row = [sent, time.monotonic() - sent, "OK", d.allowed, d.reason, d.degraded]
    except grpc.aio.AioRpcError as exc:
        row = [sent, time.monotonic() - sent, exc.code().name, False, 0, False]
    out.append([*row, kind, app])


async def main(target: str, rate: float) -> None:
    out: list[list[Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def wait_stdin() -> None:
        await reader.readline()
        stop.set()

    stdin_task = asyncio.create_task(wait_stdin())
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb_grpc.EnforcementServiceStub(channel)
        print("ready", flush=True)
        fresh = itertools.count()
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for n in itertools.count():
            if stop.is_set():
                break
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(tasks) >= MAX_IN_FLIGHT:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            kind, app = ROTATION[n % len(ROTATION)]
            if "*" in app:
                app = app.replace("*", str(next(fresh)))
            task = asyncio.create_task(one(stub, kind, app, out))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
    stdin_task.cancel()
    sys.stdout.write("".join(json.dumps(row) + "\n" for row in out))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
