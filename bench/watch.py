"""Check latency with watch streams open under billing churn, against none.

One machine, three processes besides Redis: ``lcic-guard serve`` (the real
CLI) against a private redis-server holding ``--apps`` applications; a churn
process that writes a new status version for random applications and
announces it on the change feed (what the reconciler does), ``--churn``
times a second; a watcher process opening ``--streams`` watch-all streams
(over several connections) and reading them. A checker process sends
``CanCreateClassroom`` for known applications one at a time and reports p50
and p99. Run once with no streams and once with them::

    .venv/bin/python bench/watch.py --streams 2000 --churn 50 --seconds 20

It prints one line per phase and, with ``--out``, appends the figures to a
Markdown file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.policy import DAY, AppStatus, Segment
from lcic_guard.domain.time import wall_clock
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def app(n: int) -> str:
    return f"app-{n:07d}"


def status(n: int, version: int, now: int) -> AppStatus:
    return AppStatus(app(n), f"acct-{n:07d}", (Segment(now - 10 * DAY),), version, now)


async def seed(url: str, apps: int) -> None:
    store = Store(connect(url))
    now = wall_clock()
    for i in range(0, apps, 200):
        await asyncio.gather(
            *(store.write_status(status(n, 1, now)) for n in range(i, min(apps, i + 200)))
        )
    await store.close()


# -- the roles, each in its own process -------------------------------------------


async def churn(url: str, apps: int, rate: float, seconds: float) -> None:
    store = Store(connect(url))
    version = 1
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        version += 1
        st = status(random.randrange(apps), version, wall_clock())
        await store.write_status(st)
        await asyncio.sleep(1 / rate)
    await store.close()


async def watchers(target: str, streams: int, seconds: float) -> None:
    per_channel = 100  # under the server's 256 concurrent streams per connection
    channels = [
        grpc.aio.insecure_channel(target) for _ in range((streams + per_channel - 1) // per_channel)
    ]
    received = 0
    ended: dict[str, int] = {}

    async def one(i: int) -> None:
        nonlocal received
        stub = pb_grpc.EnforcementServiceStub(channels[i // per_channel])
        call = stub.WatchApplicationStatus(pb.WatchApplicationStatusRequest())
        try:
            async for msg in call:
                if msg.HasField("status"):
                    received += 1
        except grpc.aio.AioRpcError as exc:
            ended[exc.code().name] = ended.get(exc.code().name, 0) + 1

    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"received": received, "ended": ended}), flush=True)
    for c in channels:
        await c.close()


async def checker(target: str, apps: int, seconds: float, warmup: float) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        took: list[float] = []
        errors = 0
        start = time.monotonic()
        while time.monotonic() - start < warmup + seconds:
            req = pb.CanCreateClassroomRequest(app_id=app(random.randrange(apps)))
            t0 = time.perf_counter()
            try:
                await stub.CanCreateClassroom(req, timeout=5)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if time.monotonic() - start >= warmup:
                took.append(time.perf_counter() - t0)
    took.sort()
    print(
        json.dumps(
            {
                "checks": len(took),
                "errors": errors,
                "p50_ms": statistics.median(took) * 1000,
                "p99_ms": took[int(len(took) * 0.99)] * 1000,
            }
        ),
        flush=True,
    )


# -- the driver ---------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    return dict(json.loads(out.strip().splitlines()[-1]))


def phase(args: argparse.Namespace, url: str, target: str, streams: int) -> dict[str, Any]:
    seconds = args.seconds + args.warmup
    w = (
        spawn(
            "--role",
            "watchers",
            "--target",
            target,
            "--streams",
            str(streams),
            "--seconds",
            str(seconds + 2),
        )
        if streams
        else None
    )
    if w is not None:
        time.sleep(2)  # let the streams open
    c = spawn(
        "--role",
        "churn",
        "--url",
        url,
        "--apps",
        str(args.apps),
        "--churn",
        str(args.churn),
        "--seconds",
        str(seconds + 1),
    )
    k = spawn(
        "--role",
        "checker",
        "--target",
        target,
        "--apps",
        str(args.apps),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    )
    out = result(k)
    c.wait(timeout=600)
    if w is not None:
        out["watch"] = result(w)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--role", default="driver", choices=["driver", "churn", "watchers", "checker"])
    p.add_argument("--url", default="")
    p.add_argument("--target", default="")
    p.add_argument("--apps", type=int, default=10_000)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--churn", type=float, default=50.0, help="status changes a second")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.role == "churn":
        asyncio.run(churn(args.url, args.apps, args.churn, args.seconds))
        return
    if args.role == "watchers":
        asyncio.run(watchers(args.target, args.streams, args.seconds))
        return
    if args.role == "checker":
        asyncio.run(checker(args.target, args.apps, args.seconds, args.warmup))
        return
    with EmbeddedRedis() as redis:
        asyncio.run(seed(redis.url, args.apps))
        port = free_port()
        target = f"127.0.0.1:{port}"
        env = {**os.environ, "LCIC_GUARD_LOG_LEVEL": "WARNING"}
        cmd = [
            str(ROOT / ".venv/bin/lcic-guard"),
            "serve",
            "--redis-url",
            redis.url,
            "--listen",
            target,
            "--max-heartbeat-age",
            "0",
            "--max-watch-streams",
            str(max(args.streams, 1)),
        ]
        server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)
            rows = []
            for streams in (0, args.streams):
                log(f"{streams} watch-all streams, {args.churn:g} changes/s, {args.seconds:g}s")
                out = phase(args, redis.url, target, streams)
                log(json.dumps(out))
                rows.append((streams, out))
        finally:
            server.terminate()
            server.wait(timeout=30)
    lines = [
        "",
        f"### Checks with watch streams open ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/watch.py', *sys.argv[1:]])}`: "
        f"{args.apps:,} applications, {args.churn:g} status changes a second, "
        f"one client sending CanCreateClassroom one at a time for {args.seconds:g} s.",
        "",
        "| watch-all streams | checks | check p50 | check p99 | watch messages received "
        "| streams ended |",
        "|---|---|---|---|---|---|",
    ]
    for streams, out in rows:
        w = out.get("watch", {})
        lines.append(
            f"| {streams:,} | {out['checks']:,} | {out['p50_ms']:.2f} ms | {out['p99_ms']:.2f} ms "
            f"| {w.get('received', 0):,} | {w.get('ended', {}) or '-'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        with args.out.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
