"""Section ``watch`` of bench/fleet.py: check latency with
WatchApplicationStatus streams open under billing churn.

Real processes on one machine: a private redis-server holding 10,000
applications, ``lcic-guard reconcile`` (its progress marks keep the
sidecar's shards vouched), one ``lcic-guard serve``, a load process sending
``CanCreateClassroom`` for known applications (4 at a time) that writes a
new status of a random application after every 25 checks answered (what
the reconciler does when a usage report changes a status), and a watcher
process holding the streams. Three phases, each with its own figures:

* no streams;
* reading streams: 1 % watch every application, the others 10 named
  applications each (what one ``CachedGuardClient`` of a tenant watches),
  all read;
* non-reading streams: every one watches every application and reads
  nothing; the sidecar must cut them (RESOURCE_EXHAUSTED, counted in
  ``lcic_guard_watch_slow_cuts_total``) without the checks noticing.

Alone::

    .venv/bin/python bench/_fleet_watch.py            # 1,000 streams
    .venv/bin/python bench/_fleet_watch.py --quick    # 100 streams

or as ``bench/fleet.py --sections watch``. Roles of the child processes:
``python bench/_fleet_watch.py ROLE JSON``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._workers import percentile  # noqa: E402
from bench.checks import cpu_seconds  # noqa: E402

Row = tuple[str, str, str, bool]  # what, measured, target, met

APPS = 10_000
CHECKS_PER_CHANGE = 25
CONCURRENCY = 4
PER_CHANNEL = 100  # streams per connection (the sidecar allows 256)
NAMED = 10  # applications a named watch names
WATCH_ALL_SHARE = 0.01  # of the reading streams


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the roles, each in its own process ----------------------------------------------


def _status(n: int, version: int, exhausted: bool, now: int) -> Any:
    from lcic_guard.domain.policy import DAY, AppStatus, Reason, Segment

    from bench._dataset import account_id, app_id

    segments: tuple[Segment, ...] = (Segment(now - 10 * DAY),)
    if exhausted:
        segments += (
            Segment(now - 1000, (Reason.PACKAGE_QUOTA_EXHAUSTED,), suspended_at=now - 1000),
        )
    return AppStatus(app_id(n), account_id(n), segments, version, now)


async def checks(cfg: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop checks; after every 25 answered, a new status of a random
    application (its feed entry included) written by a task of its own."""
    import grpc
    from lcic.guard.v1 import enforcement_pb2 as pb
    from lcic_guard.domain.time import wall_clock
    from lcic_guard.store.connect import connect
    from lcic_guard.store.status import Store

    from bench._dataset import app_id

    rng = random.Random(cfg.get("seed", 1))
    bodies = [
        pb.CanCreateClassroomRequest(app_id=app_id(rng.randrange(APPS))).SerializeToString()
        for _ in range(5000)
    ]
    store = Store(connect(cfg["redis_url"]))
    channel = grpc.aio.insecure_channel(cfg["target"])
    await asyncio.wait_for(channel.channel_ready(), 10)
    call = channel.unary_unary("/lcic.guard.v1.EnforcementService/CanCreateClassroom")
    loop = asyncio.get_running_loop()
    t_start = loop.time() + float(cfg["warmup"])
    t_end = t_start + float(cfg["seconds"])
    latencies: list[float] = []
    errors = 0
    answered = 0
    due = asyncio.Event()
    versions: dict[int, int] = {}
    changes = 0

    async def churn() -> None:
        nonlocal changes
        while loop.time() < t_end:
            await due.wait()
            due.clear()
            n = rng.randrange(APPS)
            # Above every version an earlier phase wrote: an older one is refused.
            version = versions.get(n, int(cfg["versions_from"])) + 1
            versions[n] = version
            written = await store.write_status(_status(n, version, version % 2 == 0, wall_clock()))
            if not written.written:
                raise RuntimeError(f"status {version} of app {n} refused")
            if t_start <= loop.time() <= t_end:
                changes += 1

    async def worker(k: int) -> None:
        nonlocal answered, errors
        i = k * 7919
        while True:
            t0 = loop.time()
            if t0 >= t_end:
                return
            try:
                await call(bodies[i % len(bodies)], timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            finally:
                i += 1
            t1 = loop.time()
            answered += 1
            if answered % CHECKS_PER_CHANGE == 0:
                due.set()
            if t_start <= t0 and t1 <= t_end:
                latencies.append(t1 - t0)

    churner = asyncio.create_task(churn())
    await asyncio.gather(*(worker(k) for k in range(int(cfg["concurrency"]))))
    due.set()
    churner.cancel()
    await channel.close()
    await store.close()
    lat = sorted(latencies)
    return {
        "checks": len(lat),
        "checks_per_s": len(lat) / float(cfg["seconds"]),
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "errors": errors,
        "changes": changes,
    }


async def watchers(cfg: dict[str, Any]) -> None:
    """Open the streams, say so on stdout, then read them (or not) until
    stdin closes; finally print what was received and how streams ended."""
    import grpc
    from lcic.guard.v1 import enforcement_pb2 as pb

    from bench._dataset import app_id

    n, reading = int(cfg["streams"]), bool(cfg["reading"])
    watch_all = max(1, int(n * WATCH_ALL_SHARE)) if reading else n
    channels = [
        grpc.aio.insecure_channel(cfg["target"], options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range((n + PER_CHANNEL - 1) // PER_CHANNEL)
    ]
    method = "/lcic.guard.v1.EnforcementService/WatchApplicationStatus"
    received = [0, 0]  # statuses, heartbeats
    ended: dict[str, int] = {}
    details: list[str] = []
    calls = []
    for i in range(n):
        ids = [] if i < watch_all else [app_id((i * NAMED + k) % APPS) for k in range(NAMED)]
        stream = channels[i // PER_CHANNEL].unary_stream(method)
        calls.append(stream(pb.WatchApplicationStatusRequest(app_ids=ids).SerializeToString()))

    async def read(c: Any) -> None:
        try:
            async for raw in c:
                received[0 if raw else 1] += 1
        except grpc.aio.AioRpcError as exc:
            ended[exc.code().name] = ended.get(exc.code().name, 0) + 1
            if len(details) < 3:
                details.append(exc.details() or "")

    tasks = [asyncio.create_task(read(c)) for c in calls] if reading else []
    print("OPEN", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    if not reading:
        # What a cut client finds once it reads: what was sent, then the status.
        tasks = [asyncio.create_task(read(c)) for c in calls[:5]]
        await asyncio.wait(tasks, timeout=20)
    for t in tasks:
        t.cancel()
    for c in calls:
        c.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(
        "RESULT "
        + json.dumps(
            {"statuses": received[0], "heartbeats": received[1], "ended": ended, "why": details}
        ),
        flush=True,
    )
    for ch in channels:
        await ch.close()


# -- the driver ------------------------------------------------------------------------------


def role(name: str, cfg: dict[str, Any], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, name, json.dumps(cfg)], text=True, cwd=ROOT, **kw
    )


def result(proc: subprocess.Popen[str], out: str | None = None) -> dict[str, Any]:
    if out is None:
        out, _ = proc.communicate(timeout=600)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return dict(json.loads(line.removeprefix("RESULT ")))


_phases = [0]


def run_checks(url: str, target: str, seconds: float, pid: int) -> dict[str, Any]:
    """The checks' figures, with the sidecar's CPU (cores) over the run."""
    _phases[0] += 1
    cfg = {
        "redis_url": url,
        "target": target,
        "seconds": seconds,
        "warmup": 2.0,
        "concurrency": CONCURRENCY,
        "versions_from": 100_000 * _phases[0],
    }
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    out = result(role("checks", cfg, stdout=subprocess.PIPE))
    out["sidecar_cores"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    return out


def phase(
    car: Any, url: str, streams: int, reading: bool, seconds: float
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Checks with ``streams`` open; returns the checks' figures, the
    watchers', and the streams cut meanwhile."""
    target = f"127.0.0.1:{car.port}"
    cut0 = car.metric("lcic_guard_watch_slow_cuts_total") or 0.0
    cfg = {"target": target, "streams": streams, "reading": reading}
    w = role("watchers", cfg, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert w.stdout is not None and w.stdin is not None
    if w.stdout.readline().strip() != "OPEN":
        raise RuntimeError("the watcher process did not start")
    deadline = time.monotonic() + 120
    while (car.metric("lcic_guard_watch_streams") or 0) < streams:
        if time.monotonic() > deadline:
            raise RuntimeError("the streams did not open")
        time.sleep(0.2)
    time.sleep(3)  # named watches get their first statuses
    figures = run_checks(url, target, seconds, car.proc.pid)
    cuts = (car.metric("lcic_guard_watch_slow_cuts_total") or 0.0) - cut0
    out, _ = w.communicate("", timeout=120)
    return figures, result(w, out), cuts


def run(quick: bool) -> list[Row]:
    from bench._dataset import load_apps
    from bench.fleet import Sidecar, client, private_redis, reconciler

    streams = 100 if quick else 1000
    seconds = 8.0 if quick else 20.0
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"lcic-guard-fleet-watch-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    with private_redis() as server:
        from lcic_guard.domain.time import wall_clock

        load_apps("127.0.0.1", server.port, 0, APPS, wall_clock())
        rec = reconciler(server.url, workdir)
        car = Sidecar(server.url, workdir, 0)
        try:
            car.wait_ready(120)
            time.sleep(2)
            log("watch: no streams")
            alone = run_checks(server.url, f"127.0.0.1:{car.port}", seconds, car.proc.pid)
            log(f"watch: no streams: {alone}")
            log(f"watch: {streams} reading streams")
            read, read_w, read_cuts = phase(car, server.url, streams, True, seconds)
            log(f"watch: reading: {read} {read_w} cut {read_cuts:.0f}")
            log(f"watch: {streams} non-reading streams")
            # Long enough for each stream to be offered more changes than it may
            # hold unsent, beyond what its connection's windows take in.
            idle, idle_w, idle_cuts = phase(car, server.url, streams, False, 3 * seconds + 30)
            log(f"watch: non-reading: {idle} {idle_w} cut {idle_cuts:.0f}")
            rendered = car.metric("lcic_guard_watch_messages_rendered_total")
        finally:
            car.stop()
            rec.stop()
            client(server).close()
    log(f"watch: messages rendered in all: {rendered}")
    return rows(streams, alone, (read, read_w, read_cuts), (idle, idle_w, idle_cuts))


def rows(
    streams: int,
    alone: dict[str, Any],
    reading: tuple[dict[str, Any], dict[str, Any], float],
    idle: tuple[dict[str, Any], dict[str, Any], float],
) -> list[Row]:
    def lat(f: dict[str, Any]) -> str:
        return (
            f"p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.1f} ms, "
            f"{f['checks_per_s']:.0f}/s, {f['changes']} changes, "
            f"sidecar {f['sidecar_cores']:.2f} cores"
        )

    p50 = alone["p50_ms"]
    out: list[Row] = [(f"checks, no watch stream ({CONCURRENCY} at a time)", lat(alone), "-", True)]
    for name, (f, w, cuts) in (("reading", reading), ("non-reading", idle)):
        out.append(
            (
                f"checks, {streams:,} {name} streams, a change per {CHECKS_PER_CHANGE} checks",
                lat(f),
                "p99 <= 50 ms",
                f["p99_ms"] <= 50,
            )
        )
        out.append(
            (
                f"  p50 against no stream ({name})",
                f"{f['p50_ms'] / p50:.2f}x",
                "<= 1.5x",
                f["p50_ms"] <= 1.5 * p50,
            )
        )
        seen = f"{w['statuses']:,} statuses, {w['heartbeats']:,} heartbeats received"
        if name == "reading":
            out.append(
                (f"  reading streams cut (of {streams:,})", f"{cuts:.0f}; {seen}", "0", cuts == 0)
            )
        else:
            why = (w["why"] or ["-"])[0]
            out.append(
                (
                    f"  slow consumers cut (of {streams:,})",
                    f"{cuts:.0f}; a cut one read: {why}",
                    f"{streams:,}",
                    cuts == streams,
                )
            )
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("checks", "watchers"):
        cfg = json.loads(sys.argv[2])
        if sys.argv[1] == "checks":
            print("RESULT " + json.dumps(asyncio.run(checks(cfg))), flush=True)
        else:
            asyncio.run(watchers(cfg))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100 streams, shorter phases")
    args = p.parse_args()
    table = run(args.quick)
    width = max(len(r[0]) for r in table)
    for what, measured, target, met in table:
        print(f"{what:<{width}}  {measured:<60}  {target:<14}  {'yes' if met else 'NO'}")


if __name__ == "__main__":
    main()
