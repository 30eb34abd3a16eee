"""A fleet of sidecars on one store: what each costs Redis, how fast they
start, and whether they stay right and in rotation when Redis restarts or
the feed is trimmed under them. Real processes on one machine: a private
redis-server, ``lcic-guard reconcile`` (its progress marks), and
``lcic-guard serve`` sidecars; Redis's own counters (``INFO commandstats``,
``INFO stats``) measure what they cost it, so the figures do not depend on
the machine's speed. Each row prints the figure and its target::

    .venv/bin/python bench/fleet.py                    # every section, full size
    .venv/bin/python bench/fleet.py --quick            # smaller tables, a few minutes
    .venv/bin/python bench/fleet.py --sections idle,start --sizes 10000,100000

Sections: ``idle`` (commands/s of an idle sidecar by table size, and five
against one), ``start`` (cold start at the largest size, bytes read against
the packed table, five together against one), ``restart`` (Redis restarted
from its snapshot under five sidecars), ``trim`` (the feed trimmed while a
sidecar loads and writes go on), ``deadlines`` and ``watch`` (in
bench/_fleet_deadlines.py and bench/_fleet_watch.py, when present).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import redis as sync_redis
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.policy import DAY, AppStatus, Reason, Segment
from lcic_guard.domain.time import wall_clock
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import FEED_SHARDS, SNAPSHOT_CHUNKS, feed_key, snapshot_key
from lcic_guard.store.status import Store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._dataset import app_id, load_apps  # noqa: E402

LCIC_GUARD = str(ROOT / ".venv" / "bin" / "lcic-guard")
Row = tuple[str, str, str, bool]  # what, measured, target, met


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------


class Proc:
    """A ``lcic-guard`` child process, its log kept in a file."""

    def __init__(self, args: list[str], logfile: Path) -> None:
        self.logfile = logfile
        self.out = logfile.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [LCIC_GUARD, *args], stdout=self.out, stderr=subprocess.STDOUT, env=env
        )
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


class Sidecar(Proc):
    def __init__(self, url: str, workdir: Path, n: int) -> None:
        self.port, self.metrics = free_port(), free_port()
        super().__init__(
            [
                "serve",
                "--redis-url",
                url,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--metrics-listen",
                f"127.0.0.1:{self.metrics}",
                "--cache-size",
                "2000000",
                "--log-level",
                "INFO",
            ],
            workdir / f"sidecar-{n}.log",
        )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics}/readyz", timeout=1
            ) as resp:
                return bool(resp.status == 200)
        except Exception:
            return False

    def metric(self, name: str, labels: str = "") -> float | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics}/metrics", timeout=2
            ) as resp:
                text = resp.read().decode()
        except Exception:
            return None
        want = name + (f"{{{labels}}}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return None

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the process's start to SERVING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.logfile.read_text()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"sidecar not SERVING in {timeout}s")


def reconciler(url: str, workdir: Path) -> Proc:
    return Proc(
        ["reconcile", "--redis-url", url, "--log-level", "WARNING"], workdir / "reconcile.log"
    )


@contextlib.contextmanager
def private_redis(persist: bool = False) -> Iterator[EmbeddedRedis]:
    extra = ["--save", "3600 1"] if persist else []
    server = EmbeddedRedis(extra_args=extra).start()
    try:
        yield server
    finally:
        server.stop()


def client(server: EmbeddedRedis) -> sync_redis.Redis:
    return sync_redis.Redis(host="127.0.0.1", port=server.port)


def commands(r: sync_redis.Redis) -> int:
    stats: Any = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if not k.endswith("|info"))


def sent_bytes(r: sync_redis.Redis) -> int:
    return int(r.info("stats")["total_net_output_bytes"])


def packed_size(r: sync_redis.Redis) -> int:
    """What the packed snapshot holds: each app's id and packed record."""
    total = 0
    for shard in range(FEED_SHARDS):
        pipe = r.pipeline(transaction=False)
        for chunk in range(SNAPSHOT_CHUNKS):
            pipe.hvals(snapshot_key(shard, chunk))
        for values in pipe.execute():
            total += sum(len(v) - 1 for v in values)  # id and record, not the NUL between
    return total


def rate(r: sync_redis.Redis, seconds: float) -> float:
    """Commands per second Redis served over ``seconds`` (INFO itself excluded)."""
    before = commands(r)
    time.sleep(seconds)
    return (commands(r) - before) / seconds


def load(server: EmbeddedRedis, apps: int) -> None:
    started = time.monotonic()
    load_apps("127.0.0.1", server.port, 0, apps, wall_clock())
    log(f"{apps:,} applications written in {time.monotonic() - started:.1f}s")


# -- idle -----------------------------------------------------------------------------


def idle(sizes: list[int], window: float, workdir: Path) -> list[Row]:
    rows: list[Row] = []
    for apps in sizes:
        with private_redis() as server:
            load(server, apps)
            r = client(server)
            rec = reconciler(server.url, workdir)
            cars: list[Sidecar] = []
            try:
                time.sleep(3)
                base = rate(r, window)
                cars.append(Sidecar(server.url, workdir, 0))
                cars[0].wait_ready(300)
                time.sleep(2)
                cpu_before = cpu_seconds(cars[0].proc.pid)
                one = rate(r, window) - base
                cpu = (cpu_seconds(cars[0].proc.pid) - cpu_before) / window
                rss = rss_mb(cars[0].proc.pid, "VmRSS")
                for n in range(1, 5):
                    cars.append(Sidecar(server.url, workdir, n))
                for car in cars[1:]:
                    car.wait_ready(600)
                time.sleep(2)
                five = rate(r, window) - base
            finally:
                for car in cars:
                    car.stop()
                rec.stop()
                r.close()
            log(
                f"idle at {apps:,}: reconciler {base:.1f}/s, one {one:.1f}/s, five {five:.1f}/s; "
                f"one sidecar {cpu:.3f} cores, {rss:.0f} MB"
            )
            rows.append(
                (f"idle sidecar, {apps:,} apps: Redis commands/s", f"{one:.1f}", "<= 20", one <= 20)
            )
            rows.append(
                (f"  its CPU (cores) and RSS, {apps:,} apps", f"{cpu:.3f}, {rss:.0f} MB", "-", True)
            )
            rows.append(
                (
                    f"5 idle sidecars, {apps:,} apps: commands/s (x one)",
                    f"{five:.1f} ({five / max(one, 1e-9):.2f}x)",
                    "<= 5x one",
                    five <= 5 * one + 1,
                )
            )
    return rows


# -- start ----------------------------------------------------------------------------


def start(apps: int, workdir: Path) -> list[Row]:
    with private_redis() as server:
        load(server, apps)
        r = client(server)
        size = packed_size(r)
        # The reconcilers run, as in production: health also waits for their heartbeat.
        rec = reconciler(server.url, workdir)
        time.sleep(2)
        # What the reconciler alone makes Redis send, taken off the start's bytes.
        idle_start, idle_t = sent_bytes(r), time.monotonic()
        time.sleep(3)
        idle_rate = (sent_bytes(r) - idle_start) / (time.monotonic() - idle_t)
        before = sent_bytes(r)
        redis_cpu = redis_cpu_seconds(r)
        car = Sidecar(server.url, workdir, 0)
        try:
            alone = car.wait_ready(600)
            read = sent_bytes(r) - before - idle_rate * alone
            cpu_alone = cpu_seconds(car.proc.pid)
            redis_alone = redis_cpu_seconds(r) - redis_cpu
            rss = rss_mb(car.proc.pid)
            loaded = load_seconds(car.logfile)
        finally:
            car.stop()
        log(
            f"one start at {apps:,}: {alone:.1f}s (table load {loaded:.1f}s), "
            f"read {read / 1e6:.1f} MB of {size / 1e6:.1f} MB"
        )
        redis_cpu = redis_cpu_seconds(r)
        cars = [Sidecar(server.url, workdir, n) for n in range(1, 6)]
        try:
            together = max(c.wait_ready(900) for c in cars)
            cpu_five = sum(cpu_seconds(c.proc.pid) for c in cars)
            redis_five = redis_cpu_seconds(r) - redis_cpu
            loads_together = max(load_seconds(c.logfile) for c in cars)
        finally:
            for c in cars:
                c.stop()
            rec.stop()
        r.close()
    log(f"five started together at {apps:,}: the last SERVING after {together:.1f}s")
    cores = os.cpu_count() or 1
    # Five starts need their CPU whatever the order: on this machine's cores
    # they cannot all be SERVING before (their CPU + Redis's) / cores.
    bound = (cpu_five + redis_five) / cores
    return [
        (f"cold start to SERVING, {apps:,} apps", f"{alone:.1f} s", "<= 10 s", alone <= 10),
        (
            "read from Redis / packed table",
            f"{read / 1e6:.1f} MB / {size / 1e6:.1f} MB ({read / size:.2f}x)",
            "<= 1.2x",
            read <= 1.2 * size,
        ),
        (f"peak RSS after start, {apps:,} apps", f"{rss:.0f} MB", "-", True),
        (
            "five started together (the last) / one alone",
            f"{together:.1f} s ({together / alone:.2f}x)",
            "<= 2x",
            together <= 2 * alone,
        ),
        (
            f"  CPU of a start: one alone (+ Redis) / five (+ Redis), {cores} cores",
            f"{cpu_alone:.1f} s (+{redis_alone:.1f}) / {cpu_five:.1f} s (+{redis_five:.1f}): "
            f"five need >= {bound:.1f} s here ({bound / alone:.2f}x one alone)",
            "-",
            True,
        ),
        (
            "  of which the table load (the slowest of five / one alone)",
            f"{loads_together:.1f} s / {loaded:.1f} s ({loads_together / loaded:.2f}x)",
            "-",
            True,
        ),
    ]


def load_seconds(logfile: Path) -> float:
    """The table load's own time, as the sidecar logged it."""
    for line in logfile.read_text(errors="replace").splitlines():
        found = re.search(r"status table loaded \(start\).* in ([0-9.]+)s", line)
        if found:
            return float(found.group(1))
    return float("nan")


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """A process's peak (VmHWM) or current (VmRSS) resident memory, in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def redis_cpu_seconds(r: sync_redis.Redis) -> float:
    cpu: Any = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- answers against Redis ------------------------------------------------------------


def expected_allowed(r: sync_redis.Redis, apps: list[str]) -> dict[str, tuple[int, bool]]:
    """(version, allowed to create a classroom) of each app as Redis holds it now."""
    store = Store(connect(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0"))

    async def read() -> dict[str, tuple[int, bool]]:
        from lcic_guard.domain.policy import Check, PolicyConfig, decide

        rows = await store.read_rows([(a, None) for a in apps])
        now = wall_clock()
        out = {}
        for a, row in zip(apps, rows, strict=True):
            if isinstance(row, Exception) or row[0] is None:
                continue
            d = decide(Check.CREATE_CLASSROOM, row[0], now, PolicyConfig())
            out[a] = (row[0].version, d.allowed)
        await store.close()
        return out

    return asyncio.run(read())


class Prober:
    """Checks sampled apps on every sidecar and polls their health, in a
    thread, counting answers that contradict what Redis holds (not marked
    degraded) and health probes that said NOT_SERVING."""

    def __init__(
        self, cars: list[Sidecar], apps: list[str], truth: Callable[[], dict[str, Any]]
    ) -> None:
        self.cars, self.apps, self.truth = cars, apps, truth
        self.not_serving = 0
        self.probes = 0
        self.answers = 0
        self.degraded = 0
        self.wrong = 0
        self.errors = 0
        self.stop = False

    def run(self) -> None:
        channels = [grpc.insecure_channel(f"127.0.0.1:{c.port}") for c in self.cars]
        stubs = [pb_grpc.EnforcementServiceStub(ch) for ch in channels]
        while not self.stop:
            for car, stub in zip(self.cars, stubs, strict=True):
                self.probes += 1
                if not car.ready():
                    self.not_serving += 1
                app = random.choice(self.apps)
                try:
                    d = stub.CanCreateClassroom(
                        pb.CanCreateClassroomRequest(app_id=app), timeout=2
                    ).decision
                except grpc.RpcError:
                    self.errors += 1
                    continue
                self.answers += 1
                if d.degraded:
                    self.degraded += 1
                    continue
                want = self.truth().get(app)
                if want is not None and d.status_version < want[0] and d.allowed != want[1]:
                    self.wrong += 1
            time.sleep(0.01)
        for ch in channels:
            ch.close()


def reloads(car: Sidecar) -> float:
    """Whole-table loads after a discontinuity (a restart may read as a new
    data set when the snapshot predates the generation id)."""
    return sum(
        car.metric("lcic_guard_table_loads_total", f'cause="{cause}"') or 0
        for cause in ("restart", "generation", "rollback")
    )


# -- restart ----------------------------------------------------------------------------


def restart(apps: int, workdir: Path) -> list[Row]:
    import threading

    with private_redis(persist=True) as server:
        load(server, apps)
        r = client(server)
        r.save()
        sample = [app_id(n) for n in random.sample(range(apps), 500)]
        truth = expected_allowed(r, sample)
        rec = reconciler(server.url, workdir)
        cars = [Sidecar(server.url, workdir, n) for n in range(5)]
        try:
            for c in cars:
                c.wait_ready(600)
            time.sleep(2)
            prober = Prober(cars, sample, lambda: truth)
            thread = threading.Thread(target=prober.run, daemon=True)
            thread.start()
            time.sleep(1)
            r.close()
            server.kill()
            down_at = time.monotonic()
            time.sleep(1.0)
            server.start()
            back_at = time.monotonic()
            r = client(server)
            fresh_at: list[float] = []
            for c in cars:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    vouched = c.metric("lcic_guard_feed_shards_vouched") or 0
                    if reloads(c) >= 1 and vouched == FEED_SHARDS:
                        fresh_at.append(time.monotonic())
                        break
                    time.sleep(0.05)
                else:
                    fresh_at.append(float("inf"))
            time.sleep(1)
            prober.stop = True
            thread.join()
        finally:
            for c in cars:
                c.stop()
            rec.stop()
            r.close()
    fresh = max(fresh_at) - back_at
    log(
        f"restart: down {back_at - down_at:.1f}s; {prober.not_serving} NOT_SERVING of "
        f"{prober.probes} probes; {prober.answers} answers, {prober.degraded} degraded, "
        f"{prober.wrong} wrong, {prober.errors} errors; all fresh {fresh:.1f}s after"
    )
    return [
        (
            f"Redis restarted from its snapshot, 5 sidecars, {apps:,} apps: probes NOT_SERVING",
            f"{prober.not_serving} of {prober.probes}",
            "0 (no sidecar leaves rotation)",
            prober.not_serving == 0,
        ),
        (
            "  answers wrong (not degraded) / degraded / total",
            f"{prober.wrong} / {prober.degraded} / {prober.answers}",
            "0 wrong",
            prober.wrong == 0,
        ),
        (
            "  every sidecar fresh again after Redis is back",
            f"{fresh:.1f} s",
            "<= 5 s",
            fresh <= 5,
        ),
    ]


# -- trim -------------------------------------------------------------------------------


def trim(apps: int, workdir: Path, seconds: float) -> list[Row]:
    """Writes go on (as fast as one writer goes) while a sidecar loads, and
    every feed shard is trimmed to nothing during the load and every 2 s
    after: the sidecar must see the gaps and repair them, never answering an
    old status as current for longer than the marks take to show a gap."""
    import threading

    with private_redis() as server:
        load(server, apps)
        r = client(server)
        rec = reconciler(server.url, workdir)
        written: dict[str, tuple[int, float]] = {}  # app -> (version, when written)
        stop = threading.Event()
        writes = [0]

        def writer() -> None:
            async def go() -> None:
                store = Store(connect(server.url))
                now = wall_clock()
                version = 1_000
                while not stop.is_set():
                    batch = [app_id(random.randrange(apps)) for _ in range(200)]
                    version += 1
                    statuses = [
                        AppStatus(
                            a,
                            "acct-" + a.removeprefix("app-"),
                            (Segment(now - 10 * DAY, (Reason.ACCOUNT_OVERDUE,)),),
                            version,
                            now,
                        )
                        for a in batch
                    ]
                    res = await asyncio.gather(*(store.write_status(s) for s in statuses))
                    at = time.monotonic()
                    for s, w in zip(statuses, res, strict=True):
                        if w.version:
                            written[s.app_id] = (w.version, at)
                    writes[0] += len(batch)
                await store.close()

            asyncio.run(go())

        def trimmer() -> None:
            # Every shard's feed emptied every 2 s, the first time while the
            # sidecar loads: whatever a reader had not read yet is gone.
            time.sleep(0.3)
            while not stop.is_set():
                pipe = r.pipeline(transaction=False)
                for shard in range(FEED_SHARDS):
                    pipe.xtrim(feed_key(shard), maxlen=0)
                pipe.execute()
                stop.wait(2.0)

        threads = [threading.Thread(target=writer), threading.Thread(target=trimmer)]
        for t in threads:
            t.start()
        started = time.monotonic()
        car = Sidecar(server.url, workdir, 0)
        wrong = answers = degraded = 0
        worst = 0.0
        try:
            car.wait_ready(600)
            with grpc.insecure_channel(f"127.0.0.1:{car.port}") as ch:
                stub = pb_grpc.EnforcementServiceStub(ch)
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    for app, (version, at) in random.sample(
                        list(written.items()), min(200, len(written))
                    ):
                        d = stub.CanCreateClassroom(
                            pb.CanCreateClassroomRequest(app_id=app), timeout=5
                        ).decision
                        answers += 1
                        if d.degraded:
                            degraded += 1
                            continue
                        if d.status_version < version:
                            late = time.monotonic() - at
                            worst = max(worst, late)
                            # Older than a write made more than two mark
                            # intervals ago: not a propagation delay.
                            if late > 2.0:
                                wrong += 1
            gaps = car.metric("lcic_guard_table_loads_total", 'cause="gap"') or 0
        finally:
            stop.set()
            for t in threads:
                t.join()
            car.stop()
            rec.stop()
            r.close()
    rate_ = writes[0] / (time.monotonic() - started)
    log(
        f"trim: {rate_:.0f} writes/s, {gaps:.0f} shard repairs, {answers} answers, "
        f"{degraded} degraded, {wrong} wrong, worst lag {worst:.2f}s"
    )
    return [
        (
            f"feed trimmed during a load, {apps:,} apps, {rate_:,.0f} writes/s: shard repairs",
            f"{gaps:.0f}",
            "gaps detected and repaired (> 0)",
            gaps > 0,
        ),
        (
            "  answers older than a write made > 2 s before (not degraded)",
            f"{wrong} of {answers} (worst lag seen {worst:.2f} s)",
            "0 wrong",
            wrong == 0,
        ),
    ]


# -- the table ----------------------------------------------------------------------------


def section(name: str) -> Callable[[bool], list[Row]] | None:
    """A section written as bench/_fleet_NAME.py (its ``run(quick)``), if present."""
    try:
        module = importlib.import_module(f"bench._fleet_{name}")
    except ModuleNotFoundError:
        return None
    run: Callable[[bool], list[Row]] = module.run
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller tables")
    parser.add_argument(
        "--sections", default="idle,start,restart,trim,deadlines,watch", help="which to run"
    )
    parser.add_argument("--sizes", default="", help="table sizes of the idle section")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per idle window")
    args = parser.parse_args()
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    )
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"lcic-guard-fleet-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in args.sections.split(","):
        log(f"section {name}")
        if name == "idle":
            rows += idle(sizes, args.window, workdir)
        elif name == "start":
            rows += start(100_000 if args.quick else 1_000_000, workdir)
        elif name == "restart":
            rows += restart(20_000 if args.quick else 100_000, workdir)
        elif name == "trim":
            rows += trim(30_000 if args.quick else 300_000, workdir, 10 if args.quick else 20)
        else:
            run = section(name)
            if run is None:
                log(f"no section {name}")
                continue
            rows += run(args.quick)
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'what':<{width}}  {'measured':<40}  {'target':<32}  met")
    for what, measured, target, met in rows:
        print(f"{what:<{width}}  {measured:<40}  {target:<32}  {'yes' if met else 'NO'}")
    print(f"\nlogs: {workdir}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
