"""Benchmark of the reconciler's ingest (issue 3's closing figures).

Two measurements, each on a private redis-server started here:

1. **Stream ingest**: N billing events are put on ``lcic:billing:events``
   (not timed), then a real :class:`~lcic_guard.reconciler.reconciler.Reconciler` with a
   :class:`~lcic_guard.reconciler.sources.StreamSource` (consumer group, acknowledged
   after the effect is in Redis) runs as in production, leader loop
   included, and the time until the group has lag 0 and nothing pending is
   measured: events per second.
2. **Snapshot load**: a file of M applications (one registration and one
   package each, ``--apps-per-account`` to an account) is applied through
   :class:`~lcic_guard.reconciler.sources.FileSource` and ``Reconciler.drain`` into an
   empty Redis: the time to load it.

Usage::

    .venv/bin/python bench/ingest.py                     # 100,000 events, 100,000 apps
    .venv/bin/python bench/ingest.py --events 2000 --apps 2000   # a quick run

It prints the figures with the machine they were measured on and the exact
command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lcic_guard.demo import EmbeddedRedis, find_redis_server
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.sources import FileSource, StreamSource
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import BILLING_STREAM, STATUS_PATTERN
from lcic_guard.store.status import Store

GROUP = "lcic-guard"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def redis_version() -> str:
    out = subprocess.run(
        [find_redis_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())


def billing_events(n: int, seed: int, base: Millis) -> list[dict[str, Any]]:
    """``n`` valid events of accounts with 1-4 apps: registrations, packages,
    usage, pay-as-you-go, alerts and settlements; no release falls due."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []

    def ev(kind: str, at: Millis, **fields: Any) -> None:
        # Nothing occurs after ``base`` (now): the reconciler dead-letters a
        # fact from the future, and this measures applying facts.
        at = at if at <= base else 2 * base - at
        out.append(
            {"event_id": f"b{len(out):08d}", "type": kind, "occurred_at": format_time(at), **fields}
        )

    def when() -> Millis:
        return base + rnd.randint(-30 * 24, 29 * 24) * HOUR

    a = 0
    while len(out) < n:
        acct = f"acct-{a:06d}"
        a += 1
        for i in range(rnd.randint(1, 4)):
            app = f"{acct}-app{i}"
            ev("application_registered", base - 40 * DAY, account_id=acct, app_id=app)
            start = when()
            ev(
                "package_purchased",
                start,
                app_id=app,
                package_id=f"{app}-p",
                starts_at=format_time(start),
                expires_at=format_time(start + 30 * DAY),
                quota_minutes=6000,
            )
            for _ in range(rnd.randint(0, 3)):
                ev(
                    "package_usage",
                    start + rnd.randint(1, 29 * 24) * HOUR,
                    app_id=app,
                    package_id=f"{app}-p",
                    used_minutes=rnd.randint(0, 7000),
                )
            if rnd.random() < 0.3:
                ev("payg_changed", when(), app_id=app, enabled=rnd.random() < 0.5)
        for _ in range(rnd.randint(0, 2)):
            ev("overdue_alert", when(), account_id=acct, amount_due="10.00")
        if rnd.random() < 0.3:
            ev("arrears_settled", when(), account_id=acct)
    return out[:n]


def snapshot_lines(apps: int, per_account: int, base: Millis) -> list[str]:
    lines = []
    for n in range(apps):
        acct = f"acct-{n // per_account:06d}"
        app = f"app-{n:07d}"
        lines.append(
            json.dumps(
                {
                    "event_id": f"s{n:07d}r",
                    "type": "application_registered",
                    "occurred_at": format_time(base - 40 * DAY),
                    "account_id": acct,
                    "app_id": app,
                }
            )
        )
        lines.append(
            json.dumps(
                {
                    "event_id": f"s{n:07d}p",
                    "type": "package_purchased",
                    "occurred_at": format_time(base - 10 * DAY),
                    "app_id": app,
                    "package_id": f"{app}-p",
                    "starts_at": format_time(base - 10 * DAY),
                    "expires_at": format_time(base + 20 * DAY),
                    "quota_minutes": 6000,
                }
            )
        )
    return lines


async def group_state(store: Store) -> tuple[int | None, int]:
    groups = await store.redis.xinfo_groups(BILLING_STREAM)
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == GROUP:
            lag = g.get("lag")
            return (None if lag is None else int(lag)), int(g.get("pending", 0))
    return None, 0


async def bench_stream(url: str, n: int, batch_size: int) -> float:
    store = Store(connect(url, timeout=30.0))
    try:
        await store.redis.flushall()
        events = billing_events(n, seed=1, base=wall_clock() // HOUR * HOUR)
        for i in range(0, n, 5000):
            async with store.redis.pipeline(transaction=False) as pipe:
                for e in events[i : i + 5000]:
                    pipe.xadd(BILLING_STREAM, {"event": json.dumps(e)})
                await pipe.execute()
        source = StreamSource(store.redis, group=GROUP, consumer="bench")
        await source.ensure_group()
        rec = Reconciler(
            store, PolicyConfig(), ReconcilerConfig(batch_size=batch_size), [source], name="bench"
        )
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(rec.run(stop))
        try:
            while True:
                lag, pending = await group_state(store)
                if lag == 0 and pending == 0:
                    break
                if task.done():
                    task.result()
                    raise RuntimeError("the reconciler stopped before the stream was applied")
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            await task
        return elapsed
    finally:
        await store.close()


async def bench_snapshot(url: str, apps: int, per_account: int, batch_size: int) -> float:
    store = Store(connect(url, timeout=30.0))
    with tempfile.TemporaryDirectory(prefix="lcic-bench-") as tmp:
        path = Path(tmp) / "snapshot.jsonl"
        lines = snapshot_lines(apps, per_account, wall_clock() // HOUR * HOUR)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            await store.redis.flushall()
            source = FileSource(path, clock_ms=store.server_time)
            rec = Reconciler(store, PolicyConfig(), ReconcilerConfig(batch_size=batch_size))
            started = time.perf_counter()
            total = await rec.drain(source)
            elapsed = time.perf_counter() - started
            if total.received != 2 * apps or total.dead_lettered:
                raise RuntimeError(f"snapshot not applied cleanly: {total}")
            written = 0
            async for _key in store.redis.scan_iter(match=STATUS_PATTERN, count=5000):
                written += 1
            if written != apps:
                raise RuntimeError(f"{written} statuses written for {apps} applications")
            return elapsed
        finally:
            await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events on the stream")
    parser.add_argument("--apps", type=int, default=100_000, help="applications in the snapshot")
    parser.add_argument("--apps-per-account", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=ReconcilerConfig().batch_size)
    args = parser.parse_args(argv)

    print("lcic-guard reconciler ingest benchmark")
    print(f"  command:  {shlex.join([sys.executable, *sys.argv])}")
    print(f"  machine:  {os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.machine()}")
    print(f"  software: Python {platform.python_version()}, redis-server {redis_version()}")
    print(f"  batch size {args.batch_size}; one reconciler, one private redis-server (loopback)")
    with EmbeddedRedis() as server:
        if args.events:
            elapsed = asyncio.run(bench_stream(server.url, args.events, args.batch_size))
            print(
                f"stream ingest:  {args.events:,} events in {elapsed:.2f} s = "
                f"{args.events / elapsed:,.0f} events/s (until lag 0, pending 0)"
            )
        if args.apps:
            elapsed = asyncio.run(
                bench_snapshot(server.url, args.apps, args.apps_per_account, args.batch_size)
            )
            print(
                f"snapshot load:  {args.apps:,} applications ({2 * args.apps:,} lines, "
                f"{args.apps_per_account} apps an account) in {elapsed:.2f} s = "
                f"{args.apps / elapsed:,.0f} applications/s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
