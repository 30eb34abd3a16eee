"""What tracing costs on the check path: an A/B of the sidecar.

Four sidecars (``lcic-guard serve``, each its own process) over one private
redis-server holding ``--apps`` applications, measured in turns with the
load generator of ``bench/checks.py``:

``before``
    the code as it was before tracing existed (``--baseline``, by default the
    parent of the commit that added ``server/lcic_guard/tracing.py``), run
    from a ``git archive`` of that revision;
``off``
    this code, no ``OTEL_*`` variable: tracing off;
``on, ratio 0``
    this code, tracing on with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``
    and argument 0: every call goes through the tracing hook, none is sampled;
``on, always``
    this code, every call traced and exported over OTLP/gRPC to a receiver
    in its own process that drops what it gets.

Each sidecar's cache is warmed first and runs with ``--cache-max-age 1h``
so that every window measures the warm cache. Figures are medians over
``--repeat`` repetitions; the variants take turns scenario by scenario, the
order rotating between repetitions. The table replaces the section between
its markers in ``docs/benchmarks.md`` (after the analysis marker, which
``bench/checks.py`` keeps). About five minutes at the defaults::

    .venv/bin/python bench/tracing.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import redis
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.time import wall_clock

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench._dataset import load_apps  # noqa: E402
from bench.checks import (  # noqa: E402
    ANALYSIS_MARKER,
    Children,
    Probe,
    alive,
    log,
    machine,
    measure,
    sweep,
    wait_port,
)

START = "<!-- tracing A/B: written by bench/tracing.py -->"
END = "<!-- end of tracing A/B -->"
VARIANTS = ("before", "off", "on, ratio 0", "on, always")


def receiver_main(port: int) -> None:
    """An OTLP/gRPC trace receiver that counts spans and drops them."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Drop(trace_service_pb2_grpc.TraceServiceServicer):
        spans = 0

        def Export(self, request: Any, context: Any) -> Any:
            Drop.spans += sum(
                len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
            )
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Drop(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    server.stop(0)
    print(f"received {Drop.spans:,} spans", flush=True)


def baseline_revision(given: str | None) -> str:
    if given:
        return given
    added = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "log",
            "--diff-filter=A",
            "--format=%H",
            "--",
            "server/lcic_guard/tracing.py",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not added:
        raise SystemExit("no commit adds server/lcic_guard/tracing.py: pass --baseline REV")
    return f"{added[-1]}^"


def checkout(rev: str, dest: Path) -> Path:
    """The server and client code of ``rev``, without touching the work tree."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "server", "client"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def sidecar_command(code: Path | None, url: str, port: int) -> list[str]:
    args = [
        "serve",
        "--redis-url",
        url,
        "--listen",
        f"127.0.0.1:{port}",
        "--cache-max-age",
        "1h",
        "--log-level",
        "WARNING",
    ]
    if code is None:
        return [str(Path(sys.executable).parent / "lcic-guard"), *args]
    boot = (
        "import sys; "
        f"sys.path[:0] = [{str(code / 'server')!r}, {str(code / 'client')!r}]; "
        "import lcic_guard; "
        f"assert lcic_guard.__file__.startswith({str(code)!r}), lcic_guard.__file__; "
        "from lcic_guard.cli import main; sys.exit(main())"
    )
    return [sys.executable, "-c", boot, *args]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--apps", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--baseline", default=None, help="revision measured as 'before'")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--receiver", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.receiver is not None:
        receiver_main(args.receiver)
        return 0
    started = time.monotonic()
    rev = baseline_revision(args.baseline)
    short = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    info = machine()
    logs = Path(tempfile.mkdtemp(prefix="lcic-guard-tracing-"))
    log(f"logs in {logs}; baseline {rev} ({short})")
    children = Children()
    embedded = EmbeddedRedis()
    results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    try:
        embedded.start()
        assert embedded.proc is not None
        client = redis.Redis(port=embedded.port)
        load_apps("127.0.0.1", embedded.port, 0, args.apps, wall_clock())
        guard = str(Path(sys.executable).parent / "lcic-guard")
        reconciler = children.start(
            [guard, "reconcile", "--redis-url", embedded.url, "--log-level", "WARNING"],
            logs / "reconciler.log",
        )
        receiver_port = free_port()
        receiver = children.start(
            [sys.executable, __file__, "--receiver", str(receiver_port)], logs / "receiver.log"
        )
        wait_port(receiver_port, receiver)
        base_code = checkout(rev, Path(tempfile.mkdtemp(prefix="lcic-guard-before-")))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        otel = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }
        envs: dict[str, dict[str, str]] = {
            "before": clean,
            "off": clean,
            "on, ratio 0": clean
            | otel
            | {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
            "on, always": clean | otel | {"OTEL_TRACES_SAMPLER": "always_on"},
        }
        sidecars: dict[str, tuple[subprocess.Popen[Any], int]] = {}
        for n, variant in enumerate(VARIANTS):
            port = free_port()
            code = base_code if variant == "before" else None
            logfile = logs / f"sidecar-{n}.log"
            with logfile.open("w") as out:
                proc = subprocess.Popen(
                    sidecar_command(code, embedded.url, port),
                    env=envs[variant],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            children.procs.append(proc)
            wait_port(port, proc)
            sw = sweep(children, port, 0, args.apps, 1000, client)
            log(f"{variant}: warmed {args.apps:,} apps in {sw['seconds']:.1f} s")
            sidecars[variant] = (proc, port)
        pids = [embedded.proc.pid, reconciler.pid, receiver.pid]
        for rep in range(args.repeat):
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for c in concurrencies:
                for variant in order:
                    proc, port = sidecars[variant]
                    others = [*pids, *(p.pid for p, _ in sidecars.values() if p is not proc)]
                    cfg = {
                        "target": f"127.0.0.1:{port}",
                        "rpc": "create",
                        "concurrency": c,
                        "channels": 1 if c == 1 else args.channels,
                        "warmup": args.warmup,
                        "seconds": args.seconds,
                        "apps": args.apps,
                        "batch": 100,
                        "seed": rep,
                    }
                    res = measure(children, cfg, Probe(proc.pid, others, client))
                    alive(proc, logs / f"sidecar-{VARIANTS.index(variant)}.log")
                    results.setdefault((variant, c), {}).setdefault("runs", []).append(res)
                    log(
                        f"rep {rep + 1} c={c} {variant:<12} {res['checks_per_s']:,.0f}/s "
                        f"p50 {res['p50_ms']:.3f} ms, {res['cpu_us']:.1f} µs/check, "
                        f"redis reads {res['redis_reads']}"
                    )
    finally:
        children.stop_all()
        embedded.stop()
    spans = (logs / "receiver.log").read_text().strip()
    minutes = (time.monotonic() - started) / 60
    section = report(args, results, concurrencies, info, short, spans, minutes)
    write(args.out, section)
    log(f"wrote the tracing A/B into {args.out}")
    return 0


def med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]],
    concurrencies: list[int],
    info: dict[str, str],
    baseline: str,
    spans: str,
    minutes: float,
) -> str:
    command = shlex.join(
        [os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT), *sys.argv[1:]]
    )
    lines = [
        START,
        "",
        "## Tracing: what it costs on the check path (A/B)",
        "",
        f"Written by `bench/tracing.py` ({command}; {minutes:.1f} min, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {info['nproc']} cores, "
        f"{info['cpu']}, python {info['python']}, grpcio {info['grpcio']}, repository at "
        f"{info['commit']}). `CanCreateClassroom` against four sidecars over one Redis "
        f"with {args.apps:,} apps, every check answered from the warm cache; medians of "
        f"{args.repeat} windows of {args.seconds:g} s after {args.warmup:g} s of warm-up, "
        "the variants taking turns. `before` is the code at "
        f"{baseline}, before tracing existed; `off` is this code without `OTEL_*` "
        "variables; `on, ratio 0` has tracing on but samples nothing "
        "(`parentbased_traceidratio`, 0); `on, always` traces and exports every call to an "
        f"OTLP receiver in its own process ({spans}).",
        "",
        "| check | variant | checks/s | vs before | p50 ms | p99 ms | server CPU µs/check "
        "| vs before | foreign cpu |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in concurrencies:
        base = results[("before", c)]["runs"]
        for variant in VARIANTS:
            runs = results[(variant, c)]["runs"]
            tput, cpu = med(runs, "checks_per_s"), med(runs, "cpu_us")
            lines.append(
                f"| CanCreateClassroom c={c} | {variant} | {tput:,.0f} | "
                f"{tput / med(base, 'checks_per_s'):.3f}x | {med(runs, 'p50_ms'):.3f} | "
                f"{med(runs, 'p99_ms'):.3f} | {cpu:.1f} | {cpu / med(base, 'cpu_us'):.3f}x | "
                f"{med(runs, 'foreign_cores'):.2f} |"
            )
    spread = []
    for c in concurrencies:
        for variant in ("before", "off"):
            cpus = [r["cpu_us"] for r in results[(variant, c)]["runs"]]
            spread.append(f"{variant} c={c}: {min(cpus):.1f}-{max(cpus):.1f}")
    lines += [
        "",
        "Spread of server CPU µs/check across the windows (min-max): " + "; ".join(spread) + ". "
        "'foreign cpu' is the cores busy with work that is not this run's (other users of "
        "the machine), as in the tables above.",
        "",
        END,
    ]
    return "\n".join(lines)


def write(out: Path, section: str) -> None:
    text = out.read_text() if out.exists() else ANALYSIS_MARKER + "\n"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        if ANALYSIS_MARKER not in text:
            text += "\n" + ANALYSIS_MARKER + "\n"
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
