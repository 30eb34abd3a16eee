"""Section ``watch`` of bench/fleet.py: check latency with
WatchApplicationStatus streams open under billing churn.

Real processes on one machine: a private redis-server holding 10,000
applications, ``lcic-guard reconcile`` (its progress marks keep the
sidecar's shards vouched), one ``lcic-guard serve``, a load process sending
``CanCreateClassroom`` for known applications (4 at a time) that writes a
new status of a random application after every 25 checks answered (what
the reconciler does when a usage report changes a status), and a watcher
process holding the streams. Four phases, each with its own figures:

* no streams;
* reading streams: 1 % watch every application, the others 10 named
  applications each (what one ``CachedGuardClient`` of a tenant watches),
  all read; none may be cut;
* reading streams that all watch every application: each change is a
  message for every stream, more than the sidecar's paced rate (2,000 a
  second), so they fall behind and are cut; the checks must not notice;
* non-reading streams: every one watches every application and reads
  nothing; the sidecar must cut them all (RESOURCE_EXHAUSTED, counted in
  ``lcic_guard_watch_slow_cuts_total``) without the checks noticing.

Then, on a table of its own (100,000 applications; 10,000 with
``--quick``), every package expires at the same instant: every transition
must be pushed, from the statuses the sidecar holds, to a stream watching
every application, while the checks (and the churn) go on.

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
            n = int(cfg.get("churn_from", 0)) + rng.randrange(APPS)
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
    watch_all = max(1, int(n * float(cfg["watch_all"])))
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


async def instant_reader(cfg: dict[str, Any]) -> None:
    """One watch-all stream, read: when did it hold a suspension of every
    application (wall clock, ms)?"""
    import grpc
    from lcic.guard.v1 import enforcement_pb2 as pb
    from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
    from lcic_guard.domain.time import wall_clock

    from bench._dataset import app_id

    want = int(cfg["apps"])
    expiring = {app_id(n) for n in range(want)}
    seen: set[str] = set()
    done_at = 0
    async with grpc.aio.insecure_channel(cfg["target"]) as channel:
        call = pb_grpc.EnforcementServiceStub(channel).WatchApplicationStatus(
            pb.WatchApplicationStatusRequest()
        )
        print("OPEN", flush=True)
        try:
            async with asyncio.timeout(float(cfg["timeout"])):
                async for msg in call:
                    app = msg.status.app_id
                    if msg.status.state == pb.APPLICATION_STATE_SUSPENDED and app in expiring:
                        seen.add(app)
                        if len(seen) == want:
                            done_at = wall_clock()
                            break
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            print(f"reader stopped: {exc!r}", file=sys.stderr, flush=True)
        call.cancel()
    print("RESULT " + json.dumps({"seen": len(seen), "done_at": done_at}), flush=True)


def write_expiring(port: int, apps: int, at: int) -> None:
    """Write ``apps`` statuses (status hash and snapshot entry, as
    lua/write_status.lua does) whose package expires at ``at``."""
    import socket

    from lcic_guard.domain.policy import DAY, AppStatus, Reason, Segment
    from lcic_guard.domain.time import wall_clock
    from lcic_guard.store.codec import encode_segments
    from lcic_guard.store.keys import feed_shard, snapshot_key_of, status_key
    from lcic_guard.store.packed import pack

    from bench._dataset import _resp, account_id, app_id

    now = wall_clock()
    segments = (
        Segment(now - 10 * DAY),
        Segment(at, (Reason.PACKAGE_EXPIRED,), suspended_at=at),
    )
    data = encode_segments(segments).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for start in range(0, apps, 5000):
            parts = []
            for n in range(start, min(apps, start + 5000)):
                app = app_id(n)
                status = AppStatus(app, account_id(n), segments, 1, now)
                parts.append(
                    _resp(
                        b"HSET",
                        status_key(app).encode(),
                        b"version",
                        b"1",
                        b"data",
                        data,
                        b"account",
                        account_id(n).encode(),
                        b"updated_at",
                        str(now).encode(),
                    )
                )
                parts.append(
                    _resp(
                        b"HSET",
                        snapshot_key_of(app).encode(),
                        app.encode(),
                        # A snapshot entry: the app id, a NUL, the packed record.
                        app.encode() + b"\0" + pack(status, 0, feed_shard(app)),
                    )
                )
            sock.sendall(b"".join(parts))
            want, got = len(parts), b""
            while got.count(b"\r\n") < want:
                chunk = sock.recv(1 << 16)
                if not chunk or chunk.startswith(b"-"):
                    raise RuntimeError(f"HSET failed: {chunk[:200]!r}")
                got += chunk


def instant(quick: bool, workdir: Path) -> list[Row]:
    """Every package expires at the same instant."""
    from lcic_guard.domain.time import wall_clock

    from bench.fleet import Sidecar, private_redis, reconciler

    apps = 10_000 if quick else 100_000
    lead_s = 25.0 if quick else 50.0  # start, load, owners read ahead
    with private_redis() as server:
        at = wall_clock() + int(lead_s * 1000)
        write_expiring(server.port, apps, at)
        rec = reconciler(server.url, workdir)
        car = Sidecar(server.url, workdir, 1)
        try:
            car.wait_ready(120)
            target = f"127.0.0.1:{car.port}"
            cfg = {"target": target, "apps": apps, "timeout": lead_s + 600}
            reader = role("instant_reader", cfg, stdout=subprocess.PIPE)
            assert reader.stdout is not None
            if reader.stdout.readline().strip() != "OPEN":
                raise RuntimeError("the reader did not start")
            # The checks are measured from the instant on, while the pushes go out.
            warmup = max(0.0, (at - wall_clock()) / 1000)
            checks_cfg = {
                "redis_url": server.url,
                "target": target,
                "seconds": 30.0 if quick else 60.0,
                "warmup": warmup,
                "concurrency": CONCURRENCY,
                "versions_from": 100_000,
                "churn_from": 1_000_000,  # applications of their own: new ones
            }
            load_proc = role("checks", checks_cfg, stdout=subprocess.PIPE)
            seen = result(reader)
            during = result(load_proc)
            pushed = car.metric("lcic_guard_watch_transitions_pushed_total") or 0.0
            not_fresh = car.metric("lcic_guard_watch_transitions_not_fresh_total") or 0.0
        finally:
            car.stop()
            rec.stop()
    took = (seen["done_at"] - at) / 1000 if seen["done_at"] else float("nan")
    log(f"instant: {seen} pushed {pushed:.0f} not fresh {not_fresh:.0f}; checks {during}")
    return [
        (
            f"{apps:,} packages expiring at one instant: pushed",
            f"{pushed:,.0f} pushed, {not_fresh:.0f} not fresh; a watch-all reader had all "
            f"{seen['seen']:,} after {took:.1f} s",
            f"all {apps:,}",
            pushed == apps and seen["seen"] == apps,
        ),
        (
            "  checks meanwhile",
            f"p50 {during['p50_ms']:.2f} ms, p99 {during['p99_ms']:.1f} ms, "
            f"{during['checks_per_s']:.0f}/s",
            "p99 <= 50 ms",
            during["p99_ms"] <= 50,
        ),
    ]


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
    car: Any, url: str, streams: int, reading: bool, seconds: float, watch_all: float = 1.0
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Checks with ``streams`` open (a share ``watch_all`` of them watching
    every application, the others 10 each); returns the checks' figures,
    the watchers', and the streams cut meanwhile."""
    target = f"127.0.0.1:{car.port}"
    cut0 = car.metric("lcic_guard_watch_slow_cuts_total") or 0.0
    cfg = {"target": target, "streams": streams, "reading": reading, "watch_all": watch_all}
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
    cpu0, t0 = cpu_seconds(w.pid), time.monotonic()
    figures = run_checks(url, target, seconds, car.proc.pid)
    figures["watchers_cores"] = (cpu_seconds(w.pid) - cpu0) / (time.monotonic() - t0)
    cuts = (car.metric("lcic_guard_watch_slow_cuts_total") or 0.0) - cut0
    out, _ = w.communicate("", timeout=120)
    # The next phase opens as many: these must be gone from the sidecar first.
    deadline = time.monotonic() + 60
    while car.metric("lcic_guard_watch_streams") != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the streams did not close")
        time.sleep(0.2)
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
            read = phase(car, server.url, streams, True, seconds, WATCH_ALL_SHARE)
            log(f"watch: reading: {read}")
            log(f"watch: {streams} reading watch-all streams")
            every = phase(car, server.url, streams, True, seconds)
            log(f"watch: reading watch-all: {every}")
            log(f"watch: {streams} non-reading streams")
            # Long enough for each stream to be offered more changes than it may
            # hold unsent, beyond what its connection's windows take in.
            idle = phase(car, server.url, streams, False, 90.0)
            log(f"watch: non-reading: {idle}")
            rendered = car.metric("lcic_guard_watch_messages_rendered_total")
        finally:
            car.stop()
            rec.stop()
            client(server).close()
    log(f"watch: messages rendered in all: {rendered}")
    return rows(streams, alone, read, every, idle, quick) + instant(quick, workdir)


Phase = tuple[dict[str, Any], dict[str, Any], float]  # checks, watchers, streams cut


def rows(
    streams: int, alone: dict[str, Any], read: Phase, every: Phase, idle: Phase, quick: bool
) -> list[Row]:
    def lat(f: dict[str, Any]) -> str:
        return (
            f"p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.1f} ms, "
            f"{f['checks_per_s']:.0f}/s, {f['changes']} changes, "
            f"sidecar {f['sidecar_cores']:.2f} cores"
        )

    def received(w: dict[str, Any]) -> str:
        return f"{w['statuses']:,} statuses, {w['heartbeats']:,} heartbeats received"

    p50 = alone["p50_ms"]
    out: list[Row] = [(f"checks, no watch stream ({CONCURRENCY} at a time)", lat(alone), "-", True)]
    kinds = (
        ("reading (1 % watch-all, others 10 apps)", read),
        ("reading watch-all", every),
        ("non-reading watch-all", idle),
    )
    for name, (f, _w, _cuts) in kinds:
        out.append(
            (
                f"checks, {streams:,} {name} streams, a change per {CHECKS_PER_CHANGE} checks",
                lat(f) + f", their client {f['watchers_cores']:.2f} cores",
                "p99 <= 50 ms",
                f["p99_ms"] <= 50,
            )
        )
        out.append(
            (
                "  p50 against no stream",
                f"{f['p50_ms'] / p50:.2f}x",
                "<= 1.5x",
                f["p50_ms"] <= 1.5 * p50,
            )
        )
    out.append(
        (
            f"  named reading streams cut (of {streams:,})",
            f"{read[2]:.0f}; {received(read[1])}",
            "0",
            read[2] == 0,
        )
    )
    out.append(
        (
            f"  watch-all reading streams cut (of {streams:,})",
            f"{every[2]:.0f}; {received(every[1])}",
            "- (more than the paced rate)",
            True,
        )
    )
    why = (idle[1]["why"] or ["-"])[0]
    out.append(
        (
            f"  slow consumers cut (of {streams:,})",
            f"{idle[2]:.0f}; a cut one read: {why}",
            # With 100, the last ones get so much of the paced rate that their
            # connections' windows take it for longer than the phase.
            f"{streams:,}" + (" (quick: some)" if quick else ""),
            idle[2] == streams or (quick and idle[2] > 0),
        )
    )
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("checks", "watchers", "instant_reader"):
        cfg = json.loads(sys.argv[2])
        if sys.argv[1] == "checks":
            print("RESULT " + json.dumps(asyncio.run(checks(cfg))), flush=True)
        elif sys.argv[1] == "watchers":
            asyncio.run(watchers(cfg))
        else:
            asyncio.run(instant_reader(cfg))
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
