"""Benchmark of the lcic-guard sidecar against the gRPC runtime's own limit.

One run, on one machine, with one load generator process at a time:

(a) two no-op servers implementing ``lcic.guard.v1.EnforcementService``, one
    on grpc.aio and one threaded (``grpc.server`` with a ThreadPoolExecutor),
    each in its own process: they parse the request and answer the bytes of a
    real answer (an application suspended for an overdue account);
(b) ``lcic-guard serve --redis-url URL --listen ...`` (the real CLI, default
    settings) against a private redis-server holding ``--apps`` applications,
    measured only once it reports ready (the whole status table loaded);
    for all three: throughput, p50/p99 latency and server CPU per check of
    ``CanCreateClassroom`` at each ``--concurrency`` and of ``CheckBatch`` of
    ``--batch`` checks, under one byte-level load generator (requests
    serialized once, responses not parsed while measuring), with the
    sidecar's figures as ratios to the *faster* no-op at that concurrency;
    and the sidecar's ``CanEnterClassroom`` of a protected room and
    ``CanAccessRecording`` against its ``CanCreateClassroom``;
(c) change propagation: from the XADD of a billing event onto the billing
    stream (consumed by ``lcic-guard reconcile``) to the first changed
    decision a client polling ``CanCreateClassroom`` every millisecond sees;
(d) the sidecar's resident memory with ``--apps`` and ``--rss-apps`` cached
    applications.

It prints every figure next to its target with PASS or MISS and writes
``docs/benchmarks.md`` (keeping a hand-written analysis after its marker).
Full size (the defaults) takes about nine minutes on a 2-core machine; logs
and raw results go to a temporary directory (``--logs``). A quick run::

    .venv/bin/python bench/checks.py --apps 1000 --rss-apps 5000 --seconds 2 \\
        --warmup 0.5 --repeat 1 --changes 20 --out /tmp/benchmarks.md

A quick A/B of single checks only (``--scenarios`` picks what runs)::

    .venv/bin/python bench/checks.py --scenarios create --concurrency 8,32 \\
        --seconds 3 --repeat 2 --rss-apps 0 --changes 0 --out /tmp/ab.md

The production settings of the check path: ``--auth-token TOKEN`` runs the
sidecar with ``--auth-checks`` and that token (every generator sends it),
``--trace-ratio 0.01`` with tracing on, sampling 1 % of the calls.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.time import wall_clock
from lcic_guard.flags import parse_duration

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench._dataset import TEMPLATE_CYCLE, load_apps, load_rooms  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

# The targets (each against the faster no-op at the same concurrency).
T_THROUGHPUT = 0.9  # single-check throughput >= 0.9 x, at concurrency >= 8
T_P50 = 1.1  # p50 at concurrency 1 <= 1.1 x
T_CPU = 1.15  # server CPU per check <= 1.15 x, at concurrency >= 8
T_PROPAGATION_MS = 100.0  # propagation p99 <= 100 ms
T_BATCH = 40.0  # CheckBatch(100) checks/s >= 40 x single-check checks/s
T_OTHER_CHECKS = 0.9  # enter (protected room) and recording >= 0.9 x create
T_RSS_MB = 300.0  # RSS <= 300 MB at 1,000,000 apps
NOOPS = ("aio", "threaded")
SERVERS = (*NOOPS, "sidecar")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its
    child processes (the workers of ``--workers N``)."""
    total = 0.0
    for p in [pid, *children_of(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
            if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores)."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    import google.protobuf

    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "server", "client"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "redis-server": redis_version.split(" sha=")[0],
        "commit": git + (" + uncommitted changes under server/ or client/" if dirty else ""),
    }


# -- child processes -------------------------------------------------------------


@dataclass
class Children:
    """Every process this run started, stopped in reverse order."""

    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    def start(
        self, args: list[str], logfile: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        out: Any = subprocess.PIPE
        if logfile is not None:
            out = open(logfile, "w")  # noqa: SIM115 - closed in stop_all
            self.logs.append(out)
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT if logfile else None,
            text=True,
            cwd=ROOT,
            env=None if env is None else {**os.environ, **env},
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)
        for fh in self.logs:
            fh.close()


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def alive(proc: subprocess.Popen[Any], logfile: Path) -> None:
    """Fail with the end of its log if a long-running child has exited."""
    if proc.poll() is not None:
        tail = logfile.read_text(errors="replace").splitlines()[-15:] if logfile.exists() else []
        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n" + "\n".join(tail))


def worker_args(role: str, cfg: dict[str, Any]) -> list[str]:
    return [sys.executable, str(BENCH / "_workers.py"), role, json.dumps(cfg)]


def run_worker(
    children: Children,
    role: str,
    cfg: dict[str, Any],
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a worker to completion; its last line is ``RESULT {json}``."""
    proc = children.start(worker_args(role, cfg))
    assert proc.stdout is not None
    result: dict[str, Any] | None = None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        elif on_line is not None:
            on_line(line)
    proc.wait()
    children.procs.remove(proc)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"worker {role} failed (exit {proc.returncode})")
    return result


# -- measurement -----------------------------------------------------------------


@dataclass
class Probe:
    """What is sampled as the load generator's window opens and closes."""

    server_pid: int
    other_pids: list[int]
    redis: redis.Redis

    def sample(self) -> dict[str, float]:
        stats: Any = self.redis.info("commandstats")
        reads = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("hmget", "hget"))
        return {
            "t": time.monotonic(),
            "server": cpu_seconds(self.server_pid),
            "others": sum(cpu_seconds(p) for p in self.other_pids),
            "busy": busy_seconds(),
            "redis_reads": reads,
        }


def measure(children: Children, cfg: dict[str, Any], probe: Probe) -> dict[str, Any]:
    marks: dict[str, dict[str, float]] = {}

    def on_line(line: str) -> None:
        if line == "MEASURE_START":
            marks["start"] = probe.sample()
        elif line == "MEASURE_END":
            marks["end"] = probe.sample()

    res = run_worker(children, "load", cfg, on_line)
    a, b = marks["start"], marks["end"]
    span = b["t"] - a["t"]
    res["server_cores"] = (b["server"] - a["server"]) / span
    res["client_cores"] = res["client_cpu_s"] / res["seconds"]
    ours = (b["server"] - a["server"]) + (b["others"] - a["others"]) + res["client_cpu_s"]
    res["foreign_cores"] = max(0.0, (b["busy"] - a["busy"] - ours) / span)
    res["redis_reads"] = int(b["redis_reads"] - a["redis_reads"])
    res["cpu_us"] = (b["server"] - a["server"]) / max(res["checks"], 1) * 1e6
    res["loadavg"] = os.getloadavg()[0]
    return res


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


_WHAT = {
    "create": "CanCreateClassroom",
    "enter": "CanEnterClassroom (protected room)",
    "recording": "CanAccessRecording",
    "batch": "CheckBatch({batch})",
}


@dataclass
class Scenario:
    rpc: str  # "create", "enter", "recording" or "batch"
    concurrency: int

    @property
    def label(self) -> str:
        return f"{_WHAT[self.rpc]} c={self.concurrency}"

    @property
    def servers(self) -> tuple[str, ...]:
        # Enter and recording are compared with the sidecar's own create.
        return SERVERS if self.rpc in ("create", "batch") else ("sidecar",)


# -- report ------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    op: str  # ">=" or "<="
    wanted: float
    unit: str
    detail: str
    digits: int = 3

    @property
    def ok(self) -> bool:
        return self.value >= self.wanted if self.op == ">=" else self.value <= self.wanted

    @property
    def gap(self) -> str:
        """By how much a missed target is missed, relative to the target."""
        if self.ok:
            return ""
        return f"{abs(self.value - self.wanted) / self.wanted:.0%}"

    def show(self, x: float) -> str:
        return f"{fmt(x, self.digits)}{self.unit}"


ANALYSIS_MARKER = "<!-- analysis: kept by bench/checks.py across runs -->"


@dataclass
class Report:
    args: argparse.Namespace
    command: str
    machine: dict[str, str]
    started: str
    notes: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    propagation: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    expired: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    elapsed_s: float = 0.0
    load_start: float = field(default_factory=lambda: os.getloadavg()[0])
    load_end: float = 0.0

    def label(self, sc: Scenario) -> str:
        return sc.label.format(batch=self.args.batch)

    def med(self, server: str, sc: Scenario, key: str) -> float:
        return median_of(self.runs[self.label(sc)][server], key)

    def faster_noop(self, sc: Scenario) -> str:
        """The no-op with the higher throughput at this scenario."""
        return max(NOOPS, key=lambda n: self.med(n, sc, "checks_per_s"))

    def evaluate(self, scenarios: list[Scenario]) -> None:
        a = self.args
        single = sorted((s for s in scenarios if s.rpc == "create"), key=lambda s: s.concurrency)
        for sc in single:
            if sc.concurrency < 8:
                continue
            best = self.faster_noop(sc)
            side_t, noop_t = (
                self.med("sidecar", sc, "checks_per_s"),
                self.med(best, sc, "checks_per_s"),
            )
            self.targets.append(
                Target(
                    f"single-check throughput, {self.label(sc)}",
                    side_t / noop_t,
                    ">=",
                    T_THROUGHPUT,
                    "x faster no-op",
                    f"{fmt(side_t, 0)} vs {fmt(noop_t, 0)} checks/s ({best})",
                )
            )
        for sc in single:
            if sc.concurrency < 8:
                continue
            best = self.faster_noop(sc)
            side_c, noop_c = self.med("sidecar", sc, "cpu_us"), self.med(best, sc, "cpu_us")
            self.targets.append(
                Target(
                    f"server CPU per check, {self.label(sc)}",
                    side_c / noop_c,
                    "<=",
                    T_CPU,
                    "x faster no-op",
                    f"{fmt(side_c, 0)} vs {fmt(noop_c, 0)} µs/check ({best})",
                )
            )
        if single and single[0].concurrency == 1:
            low = single[0]
            best = min(NOOPS, key=lambda n: self.med(n, low, "p50_ms"))
            side_p, noop_p = self.med("sidecar", low, "p50_ms"), self.med(best, low, "p50_ms")
            self.targets.append(
                Target(
                    f"p50 latency, {self.label(low)}",
                    side_p / noop_p,
                    "<=",
                    T_P50,
                    "x faster no-op",
                    f"{fmt(side_p, 3)} vs {fmt(noop_p, 3)} ms ({best})",
                )
            )
        by_c = {s.concurrency: s for s in single}
        for sc in scenarios:
            if sc.rpc not in ("enter", "recording") or sc.concurrency not in by_c:
                continue
            create = by_c[sc.concurrency]
            other_t = self.med("sidecar", sc, "checks_per_s")
            create_t = self.med("sidecar", create, "checks_per_s")
            self.targets.append(
                Target(
                    f"sidecar {self.label(sc)} over CanCreateClassroom",
                    other_t / create_t,
                    ">=",
                    T_OTHER_CHECKS,
                    "x",
                    f"{fmt(other_t, 0)} vs {fmt(create_t, 0)} checks/s; "
                    f"{fmt(self.med('sidecar', sc, 'cpu_us'), 0)} vs "
                    f"{fmt(self.med('sidecar', create, 'cpu_us'), 0)} µs/check",
                )
            )
        for sc in scenarios:
            if sc.rpc != "batch" or sc.concurrency not in by_c:
                continue
            create = by_c[sc.concurrency]
            bs = self.med("sidecar", sc, "checks_per_s")
            side_t = self.med("sidecar", create, "checks_per_s")
            batch_cpu = self.med("sidecar", sc, "cpu_us")
            side_cpu = self.med("sidecar", create, "cpu_us")
            self.targets.append(
                Target(
                    f"sidecar {self.label(sc)} checks/s over single checks/s",
                    bs / side_t,
                    ">=",
                    T_BATCH,
                    "x",
                    f"{fmt(bs, 0)} vs {fmt(side_t, 0)} checks/s; at equal server CPU "
                    f"{fmt(side_cpu / batch_cpu, 1)}x ({fmt(batch_cpu, 1)} vs "
                    f"{fmt(side_cpu, 0)} µs/check)",
                    1,
                )
            )
        if self.propagation:
            p = self.propagation["all"]
            self.targets.append(
                Target(
                    f"change propagation p99 ({p['n']} changes)",
                    p["p99_ms"],
                    "<=",
                    T_PROPAGATION_MS,
                    " ms",
                    f"p50 {fmt(p['p50_ms'], 1)} ms, max {fmt(p['max_ms'], 1)} ms",
                    1,
                )
            )
        if "big" in self.rss:
            self.targets.append(
                Target(
                    f"sidecar RSS with {a.rss_apps:,} cached apps",
                    self.rss["big"],
                    "<=",
                    T_RSS_MB,
                    " MB",
                    f"{fmt(self.rss['small'], 0)} MB with {a.apps:,}",
                    0,
                )
            )

    def markdown(self, scenarios: list[Scenario]) -> str:
        a, m = self.args, self.machine
        out: list[str] = []
        w = out.append
        w("# lcic-guard benchmarks\n")
        w(
            "Written by `bench/checks.py` (run it again rather than edit by hand; only "
            "the analysis at the end, after its marker, is kept across runs). "
            "Figures are from one run on one machine; every throughput and latency "
            f"figure is the median of {a.repeat} repetition(s) of a {a.seconds:g} s "
            f"window after a {a.warmup:g} s warm-up.\n"
        )
        w(f"- Date: {self.started} (took {self.elapsed_s / 60:.1f} min)")
        w(f"- Command: `{self.command}`")
        for k in ("nproc", "cpu", "memory", "kernel", "python", "grpcio", "protobuf"):
            w(f"- {k}: {m[k]}")
        w(f"- {m['redis-server']}; repository at {m['commit']}")
        w(
            f"- 1-minute load average at start {self.load_start:.1f}, at end "
            f"{self.load_end:.1f} (other users' work shares the machine: see the "
            "'foreign cpu' column)"
        )
        w("")
        w("## Targets\n")
        w("| target | measured | wanted | | missed by | detail |")
        w("|---|---|---|---|---|---|")
        for t in self.targets:
            w(
                f"| {t.name} | {t.show(t.value)} | {t.op} {t.show(t.wanted)} | "
                f"**{verdict(t.ok)}** | {t.gap} | {t.detail} |"
            )
        w("")
        w(
            "The throughput and latency targets compare processes on a 2-core "
            "machine shared with the load generator and with other users' work (the "
            "'foreign cpu' column below), so they move with the load; the server CPU "
            "time per check ('at equal server CPU') is the steadier measure of what "
            "the sidecar itself costs.\n"
        )
        w("## Throughput and latency\n")
        w(
            "Load generator: one process, grpc.aio, N concurrent tasks over "
            f"{a.channels} channel(s) (1 at concurrency 1), byte-level: requests "
            "serialized up front, responses not parsed while measuring (they are "
            "counted by their bytes and each distinct one parsed afterwards), so the "
            "generator costs the same against every server. Each request names a "
            f"uniformly random application out of {a.apps:,}; a CheckBatch carries "
            f"{a.batch} CanCreateClassroom checks; CanEnterClassroom names a class in "
            "progress on a suspended application (answered IN_PROGRESS_PROTECTED). "
            "Throughput is in checks/s; ratios are the sidecar's over the faster "
            "no-op's at that scenario (marked *).\n"
        )
        w(
            "| scenario | aio no-op checks/s | threaded no-op checks/s | sidecar checks/s | "
            "throughput ratio | p50 ms aio / threaded / sidecar | p99 ms sidecar | "
            "p50 ratio | server CPU µs/check aio / threaded / sidecar | CPU ratio |"
        )
        w("|---|---|---|---|---|---|---|---|---|---|")
        for sc in scenarios:
            s_t = self.med("sidecar", sc, "checks_per_s")
            s50 = self.med("sidecar", sc, "p50_ms")
            s99 = self.med("sidecar", sc, "p99_ms")
            s_c = self.med("sidecar", sc, "cpu_us")
            if sc.servers != SERVERS:
                w(
                    f"| {self.label(sc)} | | | {fmt(s_t, 0)} | | - / - / {fmt(s50, 3)} | "
                    f"{fmt(s99, 3)} | | - / - / {fmt(s_c, 1)} | |"
                )
                continue
            best = self.faster_noop(sc)

            def mark(n: str, text: str, best: str = best) -> str:
                return text + ("*" if n == best else "")

            rates = " | ".join(mark(n, fmt(self.med(n, sc, "checks_per_s"), 0)) for n in NOOPS)
            p50 = " / ".join(fmt(self.med(n, sc, "p50_ms"), 3) for n in NOOPS)
            cpu = " / ".join(fmt(self.med(n, sc, "cpu_us"), 1) for n in NOOPS)
            w(
                f"| {self.label(sc)} | {rates} | {fmt(s_t, 0)} | "
                f"{fmt(s_t / self.med(best, sc, 'checks_per_s'))} | {p50} / {fmt(s50, 3)} | "
                f"{fmt(s99, 3)} | {fmt(s50 / self.med(best, sc, 'p50_ms'))} | "
                f"{cpu} / {fmt(s_c, 1)} | {fmt(s_c / self.med(best, sc, 'cpu_us'))} |"
            )
        w("")
        w(
            "Server CPU µs/check is the server process's CPU time (all threads) over the "
            "checks it answered in the window: the cost of a check independent of how "
            "much CPU the machine could give the server.\n"
        )
        w("### Every window\n")
        w(
            "CPU is in cores (1.0 = one core busy for the whole window): the server "
            "process, the load generator, and everything else on the machine that "
            "is not part of this run (other users' work competing for the 2 cores). "
            "Redis reads are HMGET/HGET calls Redis served during the window "
            "(the sidecar reads nothing in the background: its feed proves it current).\n"
        )
        w(
            "| scenario | server | rep | checks/s | p50 ms | p99 ms | server cpu | "
            "µs/check | client cpu | foreign cpu | redis reads | degraded | errors |"
        )
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for sc in scenarios:
            for server in sc.servers:
                for i, r in enumerate(self.runs[self.label(sc)][server], 1):
                    w(
                        f"| {self.label(sc)} | {server} | {i} | {fmt(r['checks_per_s'], 0)} | "
                        f"{fmt(r['p50_ms'], 3)} | {fmt(r['p99_ms'], 3)} | "
                        f"{fmt(r['server_cores'])} | {fmt(r['cpu_us'], 1)} | "
                        f"{fmt(r['client_cores'])} | "
                        f"{fmt(r['foreign_cores'])} | {r['redis_reads']} | {r['degraded']} | "
                        f"{sum(r['errors'].values())} |"
                    )
        w("")
        if self.propagation:
            p = self.propagation
            w("## Change propagation\n")
            w(
                "Time from the XADD of a billing event onto `lcic:billing:events` to the "
                "first CanCreateClassroom answer that reflects it, polled every "
                f"{a.poll_ms:g} ms by a client in its own process (`lcic-guard reconcile` "
                "and the sidecar otherwise idle). Changes alternate between a "
                "`compliance_ban` of a fresh account (OK -> ACCOUNT_BANNED) and a "
                "`payg_changed` toggle on a quota-exhausted app "
                "(PACKAGE_QUOTA_EXHAUSTED <-> OK). The apps were registered through "
                f"the billing stream first ({p['setup_events']} events, "
                f"{fmt(p['setup_s'], 1)} s until the sidecar answered them all).\n"
            )
            w("| changes | n | p50 ms | p99 ms | max ms |")
            w("|---|---|---|---|---|")
            for kind in ("all", "compliance_ban", "payg_changed"):
                st = p[kind]
                w(
                    f"| {kind} | {st['n']} | {fmt(st['p50_ms'], 1)} | {fmt(st['p99_ms'], 1)} | "
                    f"{fmt(st['max_ms'], 1)} |"
                )
            w("")
        if self.rss:
            w("## Sidecar memory\n")
            w("VmRSS of the `lcic-guard serve` process (from /proc/PID/status).\n")
            w("| cached applications | RSS MB |")
            w("|---|---|")
            w(f"| 0 (just started) | {fmt(self.rss['empty'], 0)} |")
            w(f"| {a.apps:,} | {fmt(self.rss['small'], 0)} |")
            if "big" in self.rss:
                w(f"| {a.rss_apps:,} | {fmt(self.rss['big'], 0)} |")
                per = (
                    (self.rss["big"] - self.rss["small"]) * 1024 * 1024 / (a.rss_apps - a.apps)
                    if a.rss_apps > a.apps
                    else float("nan")
                )
                w(f"\nAbout {fmt(per, 0)} bytes per additional cached application.")
            w("")
        if self.expired:
            e = self.expired
            w("## Checks past the freshness bound\n")
            w(
                f"CanCreateClassroom c={e['concurrency']} over the first {a.apps:,} apps "
                "once every entry was loaded longer ago than the freshness bound "
                "(--cache-max-age, default 60 s): the reconcilers' progress marks keep "
                "every feed shard confirmed, so no check reads Redis for its age. "
                f"{fmt(e['checks_per_s'], 0)} "
                f"checks/s, p50 {fmt(e['p50_ms'], 3)} ms, p99 {fmt(e['p99_ms'], 3)} ms, "
                f"{e['redis_reads']} Redis reads, "
                f"{e['degraded']} of {e['checks']} answers "
                "degraded (the read missed its deadline; answered from the last status "
                "seen).\n"
            )
        w("## How the data was made\n")
        for note in self.notes:
            w(f"- {note}")
        w("")
        return "\n".join(out)


# -- the run -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--apps", type=int, default=100_000, help="apps in Redis for (a)-(c)")
    p.add_argument("--rss-apps", type=int, default=1_000_000, help="apps cached for (d); 0: skip")
    p.add_argument("--seconds", type=float, default=4.0, help="measured window")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window")
    p.add_argument("--repeat", type=int, default=3, help="windows per scenario and server")
    p.add_argument(
        "--concurrency", default="1,8,32,64", help="comma-separated, for CanCreateClassroom"
    )
    p.add_argument(
        "--scenarios",
        default="create,batch,enter,recording",
        help="comma-separated subset of create, batch, enter, recording",
    )
    p.add_argument(
        "--other-concurrency",
        type=int,
        default=32,
        help="concurrency of CheckBatch, CanEnterClassroom and CanAccessRecording",
    )
    p.add_argument("--batch", type=int, default=100, help="checks per CheckBatch")
    p.add_argument("--channels", type=int, default=4, help="channels of the load generator")
    p.add_argument("--changes", type=int, default=250, help="changes for (c); 0: skip")
    p.add_argument("--poll-ms", type=float, default=1.0, help="poll interval for (c)")
    p.add_argument(
        "--expired",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure checks of expired cache entries (waits out --cache-max-age)",
    )
    p.add_argument("--sweep-batch", type=int, default=100, help="batch size to warm the cache")
    p.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        help="extra flag for lcic-guard serve (repeatable), e.g. --sidecar-arg=--cache-max-age=10m",
    )
    p.add_argument(
        "--auth-token",
        default=None,
        help="run the sidecar with --auth-checks and this bearer token (sent by every "
        "generator, to the no-ops too, so that sending it costs all servers alike)",
    )
    p.add_argument(
        "--trace-ratio",
        type=float,
        default=None,
        help="run the sidecar with tracing on, sampling this fraction of the calls "
        "(parentbased_traceidratio; spans exported by the console exporter to its log)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--logs", type=Path, default=None, help="directory for logs and raw results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    command = shlex.join(
        [os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT), *sys.argv[1:]]
    )
    report = Report(
        args,
        command,
        machine(),
        dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = args.logs or Path(tempfile.gettempdir()) / f"lcic-guard-bench-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    log(f"logs and raw results in {logs}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    wanted = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(_WHAT))
    if unknown:
        raise SystemExit(f"--scenarios: unknown {', '.join(unknown)} (use {', '.join(_WHAT)})")
    scenarios = [Scenario("create", c) for c in concurrencies if "create" in wanted]
    scenarios += [
        Scenario(rpc, args.other_concurrency)
        for rpc in ("batch", "enter", "recording")
        if rpc in wanted
    ]
    guard = str(Path(sys.executable).parent / "lcic-guard")
    children = Children()
    embedded = EmbeddedRedis()
    try:
        embedded.start()
        assert embedded.proc is not None
        url = embedded.url
        client = redis.Redis(port=embedded.port)
        now = wall_clock()
        t0 = time.perf_counter()
        load_apps("127.0.0.1", embedded.port, 0, args.apps, now)
        load_s = time.perf_counter() - t0
        log(f"loaded {args.apps:,} app statuses into Redis in {load_s:.2f} s")
        report.notes.append(
            f"Redis: a private redis-server (lcic_guard.demo.EmbeddedRedis, persistence "
            f"off). Statuses of {args.apps:,} apps (app-0000000...) were written in "
            f"{load_s:.2f} s as raw HSETs streamed over one socket (Redis mass insertion) "
            "with the fields Store.write_status writes (version, data = "
            "store.encode_segments(...), account, updated_at). The timelines are "
            "lcic_guard.domain.policy.compute_account of five template accounts: of every "
            f"{TEMPLATE_CYCLE} apps, 16 are ACTIVE and one each is in GRACE, "
            "PACKAGE_QUOTA_EXHAUSTED, ACCOUNT_OVERDUE and PACKAGE_EXPIRED, each with its "
            "own account id."
        )

        reconciler_cmd = [guard, "reconcile", "--redis-url", url, "--log-level", "WARNING"]
        reconciler = children.start(reconciler_cmd, logs / "reconciler.log")

        if "enter" in wanted:
            n_rooms = load_rooms("127.0.0.1", embedded.port, args.apps, now)
            report.notes.append(
                f"Every quota-exhausted app ({n_rooms:,} of them) has a class reported started "
                "90 minutes before the run (before its suspension took effect) and due to "
                "end an hour after: the rooms CanEnterClassroom asks about (the sidecar "
                "caches each on its first check, done before measuring)."
            )
        noop_ports: dict[str, int] = {}
        noop_procs: dict[str, subprocess.Popen[Any]] = {}
        for model in NOOPS:
            noop_ports[model] = free_port()
            noop_procs[model] = children.start(
                worker_args("noop", {"listen": f"127.0.0.1:{noop_ports[model]}", "model": model})
            )
        for model in NOOPS:
            wait_port(noop_ports[model], noop_procs[model])
        time.sleep(0.5)
        alive(reconciler, logs / "reconciler.log")

        sidecar_port = free_port()
        sidecar_cmd = [
            guard,
            "serve",
            "--redis-url",
            url,
            "--listen",
            f"127.0.0.1:{sidecar_port}",
            "--cache-size",
            str(max(1_000_000, args.rss_apps)),
            "--log-level",
            "WARNING",
            # Metrics on, as deployments run it: their counting is measured too.
            "--metrics-listen",
            f"127.0.0.1:{free_port()}",
            *args.sidecar_arg,
        ]
        sidecar_env: dict[str, str] | None = None
        metadata: list[list[str]] = []
        if args.auth_token is not None:
            tokens = logs / "tokens"
            tokens.write_text(f"bench:check:{args.auth_token}\n")
            sidecar_cmd += ["--auth-token-file", str(tokens), "--auth-checks"]
            metadata = [["authorization", f"Bearer {args.auth_token}"]]
            report.notes.append(
                "Checks need a bearer token (`--auth-checks`, one token of scope `check`); "
                "every load generator sends it, to the no-ops too."
            )
        if args.trace_ratio is not None:
            sidecar_env = {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": repr(args.trace_ratio),
            }
            report.notes.append(
                "Tracing on in the sidecar: "
                + " ".join(f"{k}={v}" for k, v in sidecar_env.items())
                + " (sampled spans go to its log)."
            )
        report.notes.append(
            "Sidecar: `"
            + shlex.join([Path(guard).name, *sidecar_cmd[1:]]).replace(url, "URL")
            + "` (`--redis-url` pointing at that Redis); reconciler: `"
            + shlex.join([Path(guard).name, *reconciler_cmd[1:]]).replace(url, "URL")
            + "`; the no-op servers: `bench/_workers.py noop` (grpc.aio, and with "
            '`\'{"model": "threaded"}\'` grpc.server over a ThreadPoolExecutor of 16 '
            "threads). Each is its own process."
        )
        report.notes.append(
            "In each repetition the three servers take turns scenario by scenario (which "
            "goes first rotates between repetitions). The sidecar is one process for the "
            "whole run, measured only once its health service says SERVING (the whole "
            "status table loaded from Redis and followed on the change feed), with its "
            "default settings: the run lasts well past the freshness bound "
            "(--cache-max-age, 60 s), which the reconciler's progress marks renew every "
            "second (a check that had to read Redis would show in the 'redis reads' "
            "column, 'degraded' and the latency). The checks of the last section start "
            "after every entry is older than the bound."
        )
        report.runs = {report.label(sc): {n: [] for n in sc.servers} for sc in scenarios}
        sidecar: subprocess.Popen[Any] | None = None
        others = [embedded.proc.pid, reconciler.pid]
        noop_pids = [proc.pid for proc in noop_procs.values()]

        def load_cfg(target: str, sc: Scenario, rep: int) -> dict[str, Any]:
            return {
                "target": target,
                "rpc": sc.rpc,
                "concurrency": sc.concurrency,
                "channels": 1 if sc.concurrency == 1 else args.channels,
                "warmup": args.warmup,
                "seconds": args.seconds,
                "apps": args.apps,
                "batch": args.batch,
                "seed": rep,
                "metadata": metadata,
            }

        sweeps: list[dict[str, Any]] = []
        max_age = cache_max_age_s(args.sidecar_arg)
        warm_since = 0.0
        starts = 0

        def fresh_sidecar() -> subprocess.Popen[Any]:
            """A new sidecar process whose cache holds every app."""
            nonlocal sidecar, warm_since, starts
            if sidecar is not None:
                children.stop(sidecar)
            starts += 1
            sidecar = children.start(sidecar_cmd, logs / f"sidecar-{starts}.log", sidecar_env)
            t0 = time.monotonic()
            wait_port(sidecar_port, sidecar)
            if "empty" not in report.rss:
                report.rss["empty"] = rss_mb(sidecar.pid)
            wait_serving(sidecar_port, sidecar)
            warm_since = time.monotonic()
            ready_s = warm_since - t0
            sw = {"seconds": 0.0, "degraded_answers_retried": 0, "ready_s": ready_s}
            if "enter" in wanted:
                sw = sweep(
                    children,
                    sidecar_port,
                    0,
                    args.apps,
                    args.sweep_batch,
                    client,
                    rooms=True,
                    metadata=metadata,
                )
                sw["ready_s"] = ready_s
            sweeps.append(sw)
            log(
                f"sidecar #{starts}: ready (whole table loaded) {ready_s:.1f} s after start; "
                f"rooms cached in {sw['seconds']:.1f} s"
            )
            return sidecar

        def other_noops(server: str) -> list[int]:
            return [p for p in noop_pids if p != noop_procs[server].pid]

        def window(server: str, sc: Scenario, rep: int) -> None:
            assert sidecar is not None
            if server in NOOPS:
                res = measure(
                    children,
                    load_cfg(f"127.0.0.1:{noop_ports[server]}", sc, rep),
                    Probe(
                        noop_procs[server].pid,
                        [
                            *others,
                            sidecar.pid,
                            *(p for p in noop_pids if p != noop_procs[server].pid),
                        ],
                        client,
                    ),
                )
            else:
                res = measure(
                    children,
                    load_cfg(f"127.0.0.1:{sidecar_port}", sc, rep),
                    Probe(sidecar.pid, [*others, *noop_pids], client),
                )
            alive(reconciler, logs / "reconciler.log")
            alive(sidecar, logs / f"sidecar-{starts}.log")
            report.runs[report.label(sc)][server].append(res)
            log(f"rep {rep} {server:<7} {report.label(sc)}: {summary(res)}")

        for rep in range(1, args.repeat + 1):
            # The two servers take turns, scenario by scenario (the first one
            # alternating between repetitions), so that drifts in what else
            # the machine runs hit both alike.
            shift = (rep - 1) % len(SERVERS)
            order = SERVERS[shift:] + SERVERS[:shift]
            for sc in scenarios:
                servers = [s for s in order if s in sc.servers]
                if sidecar is None:
                    fresh_sidecar()
                for server in servers:
                    window(server, sc, rep)
        assert sidecar is not None
        report.setup["sweeps"] = sweeps
        report.notes.append(
            f"A fresh sidecar with {args.apps:,} apps in Redis said SERVING after "
            + ", ".join(f"{s['ready_s']:.1f} s" for s in sweeps)
            + "."
        )
        report.rss["small"] = rss_mb(sidecar.pid)
        log(f"sidecar RSS with {args.apps:,} cached apps: {report.rss['small']:.0f} MB")

        if args.changes > 0:
            alive(reconciler, logs / "reconciler.log")
            report.propagation = run_worker(
                children,
                "propagate",
                {
                    "target": f"127.0.0.1:{sidecar_port}",
                    "redis_url": url,
                    "changes": args.changes,
                    "poll_ms": args.poll_ms,
                    "metadata": metadata,
                },
            )
            p = report.propagation["all"]
            log(
                f"propagation over {p['n']} changes: p50 {p['p50_ms']:.1f} ms, "
                f"p99 {p['p99_ms']:.1f} ms, max {p['max_ms']:.1f} ms"
            )

        if args.rss_apps > args.apps:
            t0 = time.perf_counter()
            load_apps("127.0.0.1", embedded.port, args.apps, args.rss_apps - args.apps, now)
            big_load_s = time.perf_counter() - t0
            log(f"loaded {args.rss_apps - args.apps:,} more app statuses in {big_load_s:.1f} s")
            # A new sidecar loads the whole table (as one does on start).
            children.stop(sidecar)
            starts += 1
            t0 = time.monotonic()
            sidecar = children.start(sidecar_cmd, logs / f"sidecar-{starts}.log", sidecar_env)
            wait_port(sidecar_port, sidecar)
            wait_serving(sidecar_port, sidecar, timeout=300)
            big_ready_s = time.monotonic() - t0
            report.rss["big"] = rss_mb(sidecar.pid)
            log(
                f"sidecar RSS with {args.rss_apps:,} cached apps: {report.rss['big']:.0f} MB "
                f"(SERVING {big_ready_s:.1f} s after start)"
            )
            report.notes.append(
                f"For the memory figure, {args.rss_apps - args.apps:,} more statuses were "
                f"written the same way ({big_load_s:.1f} s) and a new sidecar (`--cache-size "
                f"{max(1_000_000, args.rss_apps)}`) was started; it said SERVING (the "
                f"{args.rss_apps:,} statuses loaded) after {big_ready_s:.1f} s, and RSS was "
                "read right after."
            )
            warm_since = time.monotonic()  # every entry loaded by now
        if args.expired and concurrencies and "create" in wanted:
            # Every entry of the last sidecar loaded past the freshness bound.
            time.sleep(max(0.0, warm_since + max_age + 1 - time.monotonic()))
            sc = Scenario("create", max(concurrencies))
            res = measure(
                children,
                {**load_cfg(f"127.0.0.1:{sidecar_port}", sc, 99), "warmup": 0},
                Probe(sidecar.pid, others, client),
            )
            report.expired = res
            log(f"sidecar, expired entries, {report.label(sc)}: {summary(res)}")
        report.elapsed_s = time.monotonic() - started
        report.load_end = os.getloadavg()[0]
        report.evaluate(scenarios)
        text = report.markdown(scenarios)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        kept = ""
        if args.out.exists():
            old_text = args.out.read_text()
            if ANALYSIS_MARKER in old_text:
                kept = old_text[old_text.index(ANALYSIS_MARKER) :]
        args.out.write_text(text + "\n" + (kept or ANALYSIS_MARKER + "\n"))
        (logs / "results.json").write_text(
            json.dumps(
                {
                    "runs": report.runs,
                    "propagation": report.propagation,
                    "rss": report.rss,
                    "expired": report.expired,
                    "setup": report.setup,
                },
                indent=1,
            )
        )
        print()
        for t in report.targets:
            miss = f", missed by {t.gap}" if t.gap else ""
            print(
                f"{verdict(t.ok)}  {t.name}: {t.show(t.value)} (target {t.op} "
                f"{t.show(t.wanted)}{miss}; {t.detail})"
            )
        print(f"\nwrote {args.out} in {report.elapsed_s / 60:.1f} min; raw results in {logs}")
        return 0 if all(t.ok for t in report.targets) else 1
    finally:
        children.stop_all()
        embedded.stop()


def summary(r: dict[str, Any]) -> str:
    return (
        f"{r['checks_per_s']:,.0f} checks/s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
        f"server {r['server_cores']:.2f} / client {r['client_cores']:.2f} / foreign "
        f"{r['foreign_cores']:.2f} cores, redis reads {r['redis_reads']}, degraded {r['degraded']}"
    )


def wait_serving(port: int, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    """Until the sidecar's health service says SERVING (whole table loaded)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            with contextlib.suppress(grpc.RpcError):
                got = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"the sidecar on port {port} was not SERVING after {timeout}s")


def sweep(
    children: Children,
    port: int,
    first: int,
    count: int,
    batch: int,
    client: redis.Redis,
    *,
    rooms: bool = False,
    metadata: list[list[str]] | None = None,
) -> dict[str, Any]:
    """Check apps [first, first+count) through CheckBatch so that the sidecar caches them."""

    def reads() -> int:
        stats: Any = client.info("commandstats")
        return int(stats.get("cmdstat_hmget", {}).get("calls", 0))

    reads0 = reads()
    res = run_worker(
        children,
        "sweep",
        {
            "target": f"127.0.0.1:{port}",
            "first": first,
            "count": count,
            "batch": batch,
            "rooms": rooms,
            "metadata": metadata or [],
        },
    )
    res["redis_reads"] = reads() - reads0
    res["ended"] = time.monotonic()
    return res


def cache_max_age_s(sidecar_args: list[str]) -> float:
    """The sidecar's freshness bound, from its flags (default 60 s)."""
    value = "60s"
    for i, flag in enumerate(sidecar_args):
        if flag.startswith("--cache-max-age="):
            value = flag.split("=", 1)[1]
        elif flag == "--cache-max-age" and i + 1 < len(sidecar_args):
            value = sidecar_args[i + 1]
    return parse_duration(value) / 1000


if __name__ == "__main__":
    sys.exit(main())
