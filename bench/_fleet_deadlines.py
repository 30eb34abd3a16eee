"""Fleet benchmark section: 100,000 packages expiring at the same instant.

Real processes on one machine: a private redis-server, ``--replicas``
``lcic-guard reconcile`` processes and one ``lcic-guard serve`` sidecar
following the change feed. N applications (one account each, one package
bought ten days ago) are put on the billing stream, all packages expiring at
the same instant T, chosen far enough ahead for the reconcilers to ingest
them and make their first announcements; one more application, the canary,
expires 15 s after T. Then, with the default settle time (10 s):

* every application's ``status_changed`` to ``SUSPENDED`` (PACKAGE_EXPIRED)
  must be announced within 60 s of T (its ``occurred_at``): lateness is the
  stream entry's time (Redis's clock) minus T;
* every ``suspension_scheduled`` (made while the data is ingested, each once
  its suspension ahead has been known for the settle time) within 60 s of
  when it fell due: the account's facts' recording time plus the settle time
  (an upper bound of the lateness: the account is noted a little after);
* the canary's deadline must be processed within 5 s of its instant, while
  the backlog of T is being worked off: the time its new state was first
  noted (``announced:cand_at`` in its status hash, sampled every 50 ms) minus
  T + 15 s; its announcement's lateness beyond the settle time is shown too;
* no lease may change hands from shortly before T to the end: the counters
  of the leader lease and of every deadline shard's lease (each holder takes
  a new token) must not move.

``run(quick)`` returns the rows (what, measured, target, met); ``quick``
uses 10,000 applications. Standalone::

    .venv/bin/python bench/_fleet_deadlines.py --apps 100000 --replicas 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.policy import DAY
from lcic_guard.domain.time import Millis, format_time, parse_time, wall_clock
from lcic_guard.store.keys import (
    BILLING_STREAM,
    DEADLINE_SHARDS,
    FENCE,
    GUARD_STREAM,
    recorded_key,
    shard_fence,
    status_key,
)

ROOT = Path(__file__).resolve().parent.parent
LCIC_GUARD = str(Path(sys.executable).with_name("lcic-guard"))
GROUP = "lcic-guard"
SETTLE_MS = 10_000
CANARY_AFTER_MS = 15_000
CANARY = "app-canary"
CANARY_ACCOUNT = "acct-canary"
TARGET_LATENESS_S = 60.0
TARGET_CANARY_S = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] fleet-deadlines: {msg}", file=sys.stderr, flush=True)


def app_id(n: int) -> str:
    return f"app-{n:07d}"


def account_id(n: int) -> str:
    return f"acct-{n:07d}"


def package_event(n: int) -> str:
    return f"pkg-{n:07d}"


# -- the data ---------------------------------------------------------------------


def events(apps: int, base: Millis, expires: Millis) -> list[dict[str, Any]]:
    """One account, one application and one package expiring at ``expires``
    per application, then the canary's, expiring 15 s later."""
    bought = base - 10 * DAY
    out: list[dict[str, Any]] = []

    def one(acct: str, app: str, reg_id: str, pkg_id: str, until: Millis) -> None:
        out.append(
            {
                "event_id": reg_id,
                "type": "application_registered",
                "occurred_at": format_time(bought),
                "account_id": acct,
                "app_id": app,
            }
        )
        out.append(
            {
                "event_id": pkg_id,
                "type": "package_purchased",
                "occurred_at": format_time(bought),
                "app_id": app,
                "package_id": pkg_id,
                "starts_at": format_time(bought),
                "expires_at": format_time(until),
                "quota_minutes": 6000,
            }
        )

    for n in range(apps):
        one(account_id(n), app_id(n), f"reg-{n:07d}", package_event(n), expires)
    one(CANARY_ACCOUNT, CANARY, "reg-canary", "pkg-canary", expires + CANARY_AFTER_MS)
    return out


def publish(r: redis.Redis, evs: list[dict[str, Any]]) -> None:
    for i in range(0, len(evs), 5000):
        with r.pipeline(transaction=False) as pipe:
            for e in evs[i : i + 5000]:
                pipe.xadd(BILLING_STREAM, {"event": json.dumps(e)})
            pipe.execute()


# -- the processes ------------------------------------------------------------------


@dataclass
class Fleet:
    url: str
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, replicas: int, sidecar: bool) -> None:
        env = {**os.environ, "LCIC_GUARD_LOG_LEVEL": "WARNING"}
        for i in range(replicas):
            self._spawn(
                f"reconcile-{i}",
                [LCIC_GUARD, "reconcile", "--redis-url", self.url, "--log-level", "WARNING"],
                env,
            )
        if sidecar:
            port = free_port()
            self._spawn(
                "serve",
                [
                    LCIC_GUARD,
                    "serve",
                    "--redis-url",
                    self.url,
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--max-heartbeat-age",
                    "0",
                    "--log-level",
                    "WARNING",
                ],
                env,
            )

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        with (self.logs / f"{name}.log").open("wb") as out:
            self.procs.append(
                subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a process exited ({proc.returncode}); logs in {self.logs}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# -- watching -----------------------------------------------------------------------


def wait_for(what: str, cond: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def drained(r: redis.Redis) -> bool:
    try:
        groups: Any = r.xinfo_groups(BILLING_STREAM)
    except redis.ResponseError:
        return False
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == GROUP:
            return g.get("lag") == 0 and int(g.get("pending", 1)) == 0
    return False


def lease_counters(r: redis.Redis) -> int:
    """Every lease's counter summed: each new holder of a lease takes the next
    token of its counter, so a change of the sum is a change of hands."""
    keys = [FENCE, *(shard_fence(s) for s in range(DEADLINE_SHARDS))]
    return sum(int(v or 0) for v in r.mget(keys))


def stream_entries(r: redis.Redis) -> list[tuple[Millis, dict[str, Any]]]:
    out: list[tuple[Millis, dict[str, Any]]] = []
    last = "-"
    while True:
        rows: Any = r.xrange(GUARD_STREAM, min=last, count=10_000)
        if last != "-":
            rows = rows[1:]
        if not rows:
            return out
        for entry_id, fields in rows:
            out.append((int(entry_id.split(b"-")[0]), json.loads(fields[b"event"])))
        last = rows[-1][0].decode()


class TooSlow(RuntimeError):
    """The setup did not finish before the instant: nothing was measured."""


@dataclass
class Figures:
    apps: int
    replicas: int
    ingest_s: float
    ready_before_t_s: float
    changes: list[float]  # status_changed lateness, s
    warnings: list[float]  # suspension_scheduled lateness, s
    canary_noted_s: float | None
    canary_announced_s: float | None
    lease_changes: int


def measure(apps: int, replicas: int, sidecar: bool, lead_s: float) -> Figures:
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        r = redis.Redis.from_url(server.url)
        fleet = Fleet(server.url, Path(tmp))
        try:
            fleet.start(replicas, sidecar)
            base = wall_clock()
            t = (base + int(lead_s * 1000)) // 1000 * 1000
            evs = events(apps, base, t)
            publish(r, evs)
            log(f"{len(evs):,} events published; the packages expire at {format_time(t)}")
            ingest_s = wait_for("the ingest", lambda: drained(r), lead_s + 600)
            log(f"ingested in {ingest_s:.1f} s")
            # The first announcements (ACTIVE, and the warnings) settle too.
            wait_for(
                "the first announcements",
                lambda: r.xlen(GUARD_STREAM) >= 2 * (apps + 1) or wall_clock() > t - 3000,
                lead_s + 600,
            )
            ready = (t - wall_clock()) / 1000
            if ready < 5:
                raise TooSlow(
                    f"the {apps:,} applications were ingested {ingest_s:.0f} s after being "
                    f"published, {-ready + 5:.0f} s too late for an instant {lead_s:.0f} s ahead: "
                    "give a longer --lead, or run on a less loaded machine"
                )
            log(f"first announcements made {ready:.1f} s before the instant")
            while wall_clock() < t - 3000:
                fleet.check_alive()
                time.sleep(0.2)
            counters = lease_counters(r)
            canary_noted: Millis | None = None
            # Each application's ACTIVE, its warning and its SUSPENDED: only
            # the stream's length is watched meanwhile (reading the entries
            # would take the reconcilers' CPU); they are read once, after.
            expected = 3 * (apps + 1)
            give_up = t + CANARY_AFTER_MS + 120_000 + apps * 2
            while r.xlen(GUARD_STREAM) < expected and wall_clock() < give_up:
                fleet.check_alive()
                if canary_noted is None and wall_clock() >= t + CANARY_AFTER_MS - 1000:
                    noted = r.hget(status_key(CANARY), "announced:cand_at")
                    canary_noted = int(noted) if noted is not None else None
                time.sleep(0.05)
            lease_changes = lease_counters(r) - counters
            entries = stream_entries(r)
            changes: list[float] = []
            canary_announced: float | None = None
            warned: dict[str, Millis] = {}
            for added, e in entries:
                if e["type"] == "status_changed" and e["new_state"] == "SUSPENDED":
                    late = (added - parse_time(e["occurred_at"], "occurred_at")) / 1000
                    if e["app_id"] == CANARY:
                        canary_announced = late - SETTLE_MS / 1000
                    else:
                        changes.append(late)
                elif e["type"] == "suspension_scheduled":
                    warned[e["account_id"]] = added
            warnings = warning_lateness(r, warned)
            return Figures(
                apps,
                replicas,
                ingest_s,
                ready,
                changes,
                warnings,
                None if canary_noted is None else (canary_noted - t - CANARY_AFTER_MS) / 1000,
                canary_announced,
                lease_changes,
            )
        finally:
            fleet.stop()
            r.close()


def warning_lateness(r: redis.Redis, warned: dict[str, Millis]) -> list[float]:
    """Each suspension_scheduled's time on the stream minus when it fell due
    (its account's package recorded, plus the settle time)."""
    accounts = list(warned)
    out: list[float] = []
    for i in range(0, len(accounts), 5000):
        chunk = accounts[i : i + 5000]
        with r.pipeline(transaction=False) as pipe:
            for acct in chunk:
                pipe.hvals(recorded_key(acct))
            rows = pipe.execute()
        for acct, recorded in zip(chunk, rows, strict=True):
            if recorded:
                due = max(int(v) for v in recorded) + SETTLE_MS
                out.append((warned[acct] - due) / 1000)
    return out


# -- the section --------------------------------------------------------------------


def rows_of(f: Figures) -> list[tuple[str, str, str, bool]]:
    n = f"{f.apps:,}"

    def lateness(values: list[float]) -> str:
        if not values:
            return "none announced"
        return f"max {max(values):.1f} s, p50 {statistics.median(values):.1f} s"

    canary = f.canary_noted_s
    return [
        (
            f"{n} packages expiring at once: status_changed announced after the instant "
            f"({f.replicas} reconcilers)",
            lateness(f.changes),
            f"every one within {TARGET_LATENESS_S:.0f} s (settle time 10 s included)",
            len(f.changes) == f.apps and max(f.changes) <= TARGET_LATENESS_S,
        ),
        (
            f"{n} status_changed announced",
            f"{len(f.changes):,}",
            n,
            len(f.changes) == f.apps,
        ),
        (
            f"{n} suspension_scheduled after they fell due (ingest: {f.ingest_s:.0f} s)",
            lateness(f.warnings),
            f"every one within {TARGET_LATENESS_S:.0f} s",
            len(f.warnings) >= f.apps and max(f.warnings) <= TARGET_LATENESS_S,
        ),
        (
            "canary due 15 s after the instant: deadline processed after its instant",
            "never" if canary is None else f"{canary:.1f} s",
            f"within {TARGET_CANARY_S:.0f} s",
            canary is not None and canary <= TARGET_CANARY_S,
        ),
        (
            "canary: announced after its instant + the settle time",
            "never" if f.canary_announced_s is None else f"{f.canary_announced_s:.1f} s",
            "(shown)",
            True,
        ),
        (
            "leases changing hands from 3 s before the instant to the last announcement",
            str(f.lease_changes),
            "0",
            f.lease_changes == 0,
        ),
    ]


def run(quick: bool) -> list[tuple[str, str, str, bool]]:
    apps = 10_000 if quick else 100_000
    try:
        return rows_of(measure(apps, replicas=2, sidecar=True, lead_s=lead_for(apps)))
    except TooSlow as exc:
        return [(f"{apps:,} packages expiring at once", "not measured", str(exc), False)]


def lead_for(apps: int) -> float:
    """Seconds from publishing to the instant: ingest and the first
    announcements of ``apps`` applications on this kind of machine (about
    700 events a second with two reconcilers, two events an application),
    with room for other work sharing it."""
    return 60.0 + apps * 0.006


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--apps", type=int, default=100_000)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--no-sidecar", action="store_true")
    p.add_argument("--lead", type=float, default=None, help="seconds until the instant")
    args = p.parse_args()
    figures = measure(
        args.apps, args.replicas, not args.no_sidecar, args.lead or lead_for(args.apps)
    )
    print(f"`{' '.join(['.venv/bin/python', 'bench/_fleet_deadlines.py', *sys.argv[1:]])}`")
    print()
    print("| what | measured | target | met |")
    print("|---|---|---|---|")
    for what, measured, target, met in rows_of(figures):
        print(f"| {what} | {measured} | {target} | {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()
