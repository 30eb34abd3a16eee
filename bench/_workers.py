"""The child processes of the benchmark (``python bench/_workers.py ROLE JSON``).

``noop``
    A grpc.aio server implementing ``lcic.guard.v1.EnforcementService`` that
    parses each request like any server and answers a constant ``Decision``
    (one per check for ``CheckBatch``): the runtime's own limit.
``load``
    The load generator: N concurrent tasks over one or a few grpc.aio
    channels, a warm-up, then a fixed measured window. Requests are
    serialized once up front; every response is parsed and its decisions
    counted. Prints ``MEASURE_START`` and ``MEASURE_END`` as the window opens
    and closes (the parent samples the server's CPU time and Redis's command
    counters then), and finally one JSON line of results.
``sweep``
    Checks every application of a range with ``CheckBatch`` so that the
    sidecar caches them; batches answered degraded are asked again.
``propagate``
    Adds billing events to the billing stream and measures the time from the
    XADD to the first changed decision a client polling ``CanCreateClassroom``
    sees.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcic_guard.domain.policy import AppStatus

from bench._dataset import app_id, protected_rooms

SERVICE = "/lcic.guard.v1.EnforcementService/"
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Separate connections, not one shared subchannel.
    ("grpc.use_local_subchannel_pool", 1),
]
_REASON_NAME = {v: k.removeprefix("DECISION_REASON_") for k, v in pb.DecisionReason.items()}


def call_metadata(cfg: dict[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """What every call sends (a bearer token, when the sidecar wants one)."""
    return tuple((str(k), str(v)) for k, v in cfg.get("metadata", ())) or None


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-q * len(sorted_values) // 100)))  # ceil
    return sorted_values[min(rank, len(sorted_values)) - 1]


# -- the no-op servers ---------------------------------------------------------


def real_answer() -> bytes:
    """The serialized CanCreateClassroomResponse the sidecar gives an
    application suspended for an overdue account (the benchmark data's own
    timeline): what both no-op servers send, so that every server under test
    sends bytes of the same size."""
    from lcic_guard.domain.policy import Check, PolicyConfig, decide
    from lcic_guard.domain.time import wall_clock
    from lcic_guard.sidecar import wire
    from lcic_guard.store.codec import decode_segments

    from bench._dataset import templates

    overdue = templates(wall_clock())[18]
    assert overdue.name == "overdue"
    status = AppStatus("app-0000018", "", decode_segments(overdue.data), overdue.version)
    d = decide(Check.CREATE_CLASSROOM, status, wall_clock(), PolicyConfig())
    return pb.CanCreateClassroomResponse(decision=wire.decision_to_pb(d)).SerializeToString()


class NoopAnswers:
    """The same answer to every check (one per check for CheckBatch): the
    request is parsed like any server parses it; nothing else is done."""

    def __init__(self) -> None:
        self.single = real_answer()
        self.batches: dict[int, bytes] = {}

    def batch(self, n: int) -> bytes:
        out = self.batches.get(n)
        if out is None:
            # A CheckBatchResponse is its decisions as repeated field 1: the
            # single answer's bytes (field 1, the decision) n times.
            out = self.batches[n] = self.single * n
        return out


_NOOP_RPCS = ("CanCreateClassroom", "CanEnterClassroom", "CanAccessRecording", "CheckBatch")


def _noop_handlers(answers: NoopAnswers, threaded: bool) -> grpc.GenericRpcHandler:
    service = pb.DESCRIPTOR.services_by_name["EnforcementService"]
    handlers = {}
    for name in _NOOP_RPCS:
        method = service.methods_by_name[name]
        if name == "CheckBatch":

            def answer(request: Any, context: Any) -> bytes:
                return answers.batch(len(request.checks))

        else:

            def answer(request: Any, context: Any) -> bytes:
                return answers.single

        if not threaded:
            sync = answer

            async def answer_aio(
                request: Any, context: Any, sync: Callable[[Any, Any], bytes] = sync
            ) -> bytes:
                return sync(request, context)

            impl: Any = answer_aio
        else:
            impl = answer
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            impl,
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=None,  # already bytes
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def noop_aio(cfg: dict[str, Any]) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_noop_handlers(NoopAnswers(), threaded=False),))
    port = server.add_insecure_port(cfg.get("listen", "127.0.0.1:0"))
    await server.start()
    emit(f"READY {port}")
    await server.wait_for_termination()


def noop_threaded(cfg: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(
        ThreadPoolExecutor(max_workers=int(cfg.get("threads", 16))),
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((_noop_handlers(NoopAnswers(), threaded=True),))
    port = server.add_insecure_port(cfg.get("listen", "127.0.0.1:0"))
    server.start()
    emit(f"READY {port}")
    server.wait_for_termination()


# -- requests --------------------------------------------------------------------


def create_request(app: str, rng: random.Random, now_s: int) -> pb.CanCreateClassroomRequest:
    """A CanCreateClassroom request as the classroom service sends it."""
    req = pb.CanCreateClassroomRequest(app_id=app, room_id=f"room-{rng.randrange(10**9)}")
    start = now_s + rng.randrange(3600)
    req.start_time.seconds = start
    req.end_time.seconds = start + 2700
    return req


RPC_METHOD = {
    "create": "CanCreateClassroom",
    "enter": "CanEnterClassroom",
    "recording": "CanAccessRecording",
    "batch": "CheckBatch",
}


def payloads(cfg: dict[str, Any]) -> list[bytes]:
    """Serialized requests over uniformly random applications (``enter``:
    the protected rooms of :func:`bench._dataset.protected_rooms`)."""
    rng = random.Random(cfg.get("seed", 1))
    apps, first = int(cfg["apps"]), int(cfg.get("first", 0))
    now_s = int(time.time())
    pool = int(cfg.get("pool", 20_000))

    def create() -> pb.CanCreateClassroomRequest:
        return create_request(app_id(first + rng.randrange(apps)), rng, now_s)

    rpc = cfg["rpc"]
    if rpc == "create":
        return [create().SerializeToString() for _ in range(pool)]
    if rpc == "enter":
        rooms = protected_rooms(apps)
        out = []
        for _ in range(pool):
            app, room = rooms[rng.randrange(len(rooms))]
            req = pb.CanEnterClassroomRequest(
                app_id=app, room_id=room, user_id=f"user-{rng.randrange(10**6)}"
            )
            req.role = pb.ClassroomRole.Value("CLASSROOM_ROLE_STUDENT")
            out.append(req.SerializeToString())
        return out
    if rpc == "recording":
        return [
            pb.CanAccessRecordingRequest(
                app_id=app_id(first + rng.randrange(apps)),
                recording_id=f"rec-{rng.randrange(10**9)}",
            ).SerializeToString()
            for _ in range(pool)
        ]
    out = []
    for _ in range(int(cfg.get("pool", 400))):
        batch = pb.CheckBatchRequest()
        for _ in range(int(cfg["batch"])):
            batch.checks.add().create_classroom.CopyFrom(create())
        out.append(batch.SerializeToString())
    return out


# -- the load generator ------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.calls = 0
        self.checks = 0
        self.allowed = 0
        self.degraded = 0
        self.reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()


def count_decisions(tally: Tally, decisions: Sequence[pb.Decision], times: int = 1) -> None:
    for d in decisions:
        tally.checks += times
        tally.allowed += d.allowed * times
        tally.degraded += d.degraded * times
        tally.reasons[_REASON_NAME[d.reason]] += times


async def load(cfg: dict[str, Any]) -> dict[str, Any]:
    """Byte-level: requests serialized once, responses not parsed while
    measuring (counted by their bytes and parsed once each afterwards), so
    that the generator costs the same against every server."""
    target = cfg["target"]
    concurrency = int(cfg["concurrency"])
    n_channels = max(1, min(int(cfg.get("channels", 1)), concurrency))
    rpc = cfg["rpc"]
    batch = rpc == "batch"
    method = SERVICE + RPC_METHOD[rpc]
    bodies = payloads(cfg)
    channels = [
        grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(n_channels)
    ]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    # No serializers: bytes in, bytes out.
    stubs = [ch.unary_unary(method) for ch in channels]
    loop = asyncio.get_running_loop()
    warmup, seconds = float(cfg["warmup"]), float(cfg["seconds"])
    t_start = loop.time() + warmup
    t_end = t_start + seconds
    measured = Tally()
    answers: Counter[bytes] = Counter()
    usage: dict[str, float] = {}

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def opened() -> None:
        usage["cpu0"] = cpu()
        emit("MEASURE_START")

    def closed() -> None:
        usage["cpu1"] = cpu()
        emit("MEASURE_END")

    loop.call_at(t_start, opened)
    loop.call_at(t_end, closed)
    latencies = measured.latencies

    async def worker(k: int) -> None:
        call = stubs[k % n_channels]
        metadata = call_metadata(cfg)
        i = k * 7919
        clock = loop.time
        n_bodies = len(bodies)
        while True:
            body = bodies[i % n_bodies]
            i += 1
            t0 = clock()
            if t0 >= t_end:
                return
            try:
                raw = await call(body, timeout=10, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if t0 >= t_start:
                    measured.errors[exc.code().name] += 1
                continue
            t1 = clock()
            if t_start <= t1 <= t_end:  # completed in the window
                latencies.append(t1 - t0)
                answers[raw] += 1

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    for ch in channels:
        await ch.close()
    parse: Callable[[bytes], Any] = (
        pb.CheckBatchResponse.FromString if batch else pb.CanCreateClassroomResponse.FromString
    )
    for raw, times in answers.items():
        resp = parse(raw)
        count_decisions(measured, resp.decisions if batch else (resp.decision,), times)
    measured.calls = len(latencies)
    lat = sorted(latencies)
    return {
        "rpc": rpc,
        "batch": int(cfg["batch"]) if batch else 1,
        "concurrency": concurrency,
        "channels": n_channels,
        "seconds": seconds,
        "calls": measured.calls,
        "checks": measured.checks,
        "calls_per_s": measured.calls / seconds,
        "checks_per_s": measured.checks / seconds,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "mean_ms": (sum(lat) / len(lat) * 1000) if lat else float("nan"),
        "allowed": measured.allowed,
        "degraded": measured.degraded,
        "reasons": dict(measured.reasons),
        "errors": dict(measured.errors),
        "client_cpu_s": usage.get("cpu1", 0.0) - usage.get("cpu0", 0.0),
    }


# -- warming the sidecar's cache ---------------------------------------------------


async def sweep(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check apps [first, first+count) in batches until none is answered degraded."""
    first, count, size = int(cfg["first"]), int(cfg["count"]), int(cfg["batch"])
    # With "rooms": the protected rooms of apps [0, count) instead, through
    # enter-classroom checks (the sidecar caches a room on its first check).
    rooms = protected_rooms(count) if cfg.get("rooms") else None
    if rooms is not None:
        first, count = 0, len(rooms)
    concurrency = int(cfg.get("concurrency", 1))
    channel = grpc.aio.insecure_channel(cfg["target"], options=CHANNEL_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), 10)
    stub = pb_grpc.EnforcementServiceStub(channel)
    todo = [(s, min(s + size, first + count)) for s in range(first, first + count, size)]
    tally = Tally()
    rounds = 0
    started = time.perf_counter()
    while todo and rounds < int(cfg.get("max_rounds", 30)):
        if rounds:
            # Past the sidecar's circuit breaker cool-down (500 ms), which
            # opens after consecutive read timeouts and answers degraded.
            await asyncio.sleep(float(cfg.get("pause", 0.6)))
        rounds += 1
        again: list[tuple[int, int]] = []
        queue = list(reversed(todo))

        async def worker(queue: list[tuple[int, int]], again: list[tuple[int, int]]) -> None:
            while queue:
                lo, hi = queue.pop()
                req = pb.CheckBatchRequest()
                for n in range(lo, hi):
                    if rooms is None:
                        req.checks.add().create_classroom.app_id = app_id(n)
                    else:
                        enter = req.checks.add().enter_classroom
                        enter.app_id, enter.room_id = rooms[n]
                try:
                    resp = await stub.CheckBatch(req, timeout=30, metadata=call_metadata(cfg))
                except grpc.aio.AioRpcError as exc:
                    tally.errors[exc.code().name] += 1
                    again.append((lo, hi))
                    continue
                tally.calls += 1
                if any(d.degraded for d in resp.decisions):
                    tally.degraded += sum(d.degraded for d in resp.decisions)
                    again.append((lo, hi))
                else:
                    count_decisions(tally, resp.decisions)

        await asyncio.gather(*(worker(queue, again) for _ in range(concurrency)))
        todo = again
    await channel.close()
    return {
        "apps": count,
        "batch": size,
        "seconds": time.perf_counter() - started,
        "calls": tally.calls,
        "rounds": rounds,
        "degraded_answers_retried": tally.degraded,
        "unwarmed_batches": len(todo),
        "reasons": dict(tally.reasons),
        "errors": dict(tally.errors),
    }


# -- change propagation ----------------------------------------------------------


def _event(kind: str, event_id: str, at_ms: int, **fields: Any) -> str:
    from lcic_guard.domain.time import format_time

    body = {"event_id": event_id, "type": kind, "occurred_at": format_time(at_ms)}
    for key, value in fields.items():
        body[key] = format_time(value) if key in ("starts_at", "expires_at") else value
    return json.dumps(body)


async def propagate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bans on fresh accounts alternating with pay-as-you-go toggles on
    quota-exhausted apps; each changes CanCreateClassroom's answer."""
    from lcic_guard.domain.policy import DAY, HOUR
    from lcic_guard.store.keys import BILLING_STREAM
    from redis.asyncio import Redis

    changes = int(cfg["changes"])
    n_bans = (changes + 1) // 2
    n_payg = int(cfg.get("payg_apps", 10))
    poll_s = float(cfg.get("poll_ms", 1.0)) / 1000
    tag = cfg.get("tag", f"{int(time.time())}")
    redis = Redis.from_url(cfg["redis_url"])
    channel = grpc.aio.insecure_channel(cfg["target"], options=CHANNEL_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), 10)
    stub = pb_grpc.EnforcementServiceStub(channel)
    now = int(time.time() * 1000)
    seq = 0

    def eid() -> str:
        nonlocal seq
        seq += 1
        return f"bench-{tag}-{seq}"

    ban_apps = [f"prop-{tag}-ban-{i:04d}" for i in range(n_bans)]
    payg_apps = [f"prop-{tag}-payg-{i:02d}" for i in range(n_payg)]
    setup: list[str] = []
    for i, app in enumerate([*ban_apps, *payg_apps]):
        acct = f"acct-{app}"
        quota_app = i >= n_bans
        reg = now - 10 * DAY
        setup.append(_event("application_registered", eid(), reg, account_id=acct, app_id=app))
        setup.append(
            _event(
                "package_purchased",
                eid(),
                reg,
                app_id=app,
                package_id=f"pkg-{app}",
                starts_at=reg,
                expires_at=now + 20 * DAY,
                quota_minutes=100,
            )
        )
        used = 100 if quota_app else 10
        setup.append(
            _event(
                "package_usage",
                eid(),
                now - HOUR,
                app_id=app,
                package_id=f"pkg-{app}",
                used_minutes=used,
            )
        )
    async with redis.pipeline(transaction=False) as pipe:
        for raw in setup:
            pipe.xadd(BILLING_STREAM, {"event": raw})
        await pipe.execute()

    ok, quota = pb.DECISION_REASON_OK, pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED
    expected = {app: ok for app in ban_apps} | {app: quota for app in payg_apps}

    async def reason(app: str) -> int:
        resp = await stub.CanCreateClassroom(
            pb.CanCreateClassroomRequest(app_id=app), timeout=5, metadata=call_metadata(cfg)
        )
        return int(resp.decision.reason)

    setup_started = time.perf_counter()
    pending = dict(expected)
    while pending:
        if time.perf_counter() - setup_started > 60:
            raise RuntimeError(f"{len(pending)} setup apps never reached their decision")
        for app in list(pending):
            if await reason(app) == pending[app]:
                del pending[app]
        if pending:
            await asyncio.sleep(0.05)
    setup_s = time.perf_counter() - setup_started

    payg_on = dict.fromkeys(payg_apps, False)
    last_at = dict.fromkeys(payg_apps, 0)
    results: list[dict[str, Any]] = []
    rng = random.Random(7)
    ban_iter = iter(ban_apps)
    for n in range(changes):
        if n % 2 == 0:
            kind = "compliance_ban"
            app = next(ban_iter)
            want = pb.DECISION_REASON_ACCOUNT_BANNED
        else:
            kind = "payg_changed"
            app = payg_apps[(n // 2) % n_payg]
            want = quota if payg_on[app] else ok
        before = await reason(app)  # also makes sure the sidecar caches it
        if before != expected[app]:
            raise RuntimeError(f"{app}: expected {expected[app]} before the change, got {before}")
        at = int(time.time() * 1000)
        if kind == "compliance_ban":
            raw = _event(kind, eid(), at, account_id=f"acct-{app}", note="benchmark")
        else:
            at = max(at, last_at[app] + 1)
            last_at[app] = at
            raw = _event(kind, eid(), at, app_id=app, enabled=not payg_on[app])
        t0 = time.perf_counter()
        await redis.xadd(BILLING_STREAM, {"event": raw})
        polls = 0
        while True:
            polls += 1
            got = await reason(app)
            t1 = time.perf_counter()
            if got == want:
                break
            if got != before:
                raise RuntimeError(f"{app}: unexpected decision {got} after {kind}")
            if t1 - t0 > 10:
                raise RuntimeError(f"{app}: {kind} not seen within 10 s")
            await asyncio.sleep(poll_s)
        results.append({"kind": kind, "ms": (t1 - t0) * 1000, "polls": polls})
        expected[app] = want
        if kind == "payg_changed":
            payg_on[app] = not payg_on[app]
        await asyncio.sleep(rng.uniform(0.005, 0.03))
    await channel.close()
    await redis.aclose()

    def stats(values: list[float]) -> dict[str, float]:
        v = sorted(values)
        return {
            "n": len(v),
            "p50_ms": percentile(v, 50),
            "p99_ms": percentile(v, 99),
            "max_ms": v[-1] if v else float("nan"),
        }

    out: dict[str, Any] = {"setup_s": setup_s, "setup_events": len(setup)}
    out["all"] = stats([r["ms"] for r in results])
    for kind in ("compliance_ban", "payg_changed"):
        out[kind] = stats([r["ms"] for r in results if r["kind"] == kind])
    return out


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    if role == "noop":
        if cfg.get("model", "aio") == "threaded":
            noop_threaded(cfg)
        else:
            asyncio.run(noop_aio(cfg))
        return
    runs: dict[str, Callable[[dict[str, Any]], Any]] = {
        "load": load,
        "sweep": sweep,
        "propagate": propagate,
    }
    result = asyncio.run(runs[role](cfg))
    emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
