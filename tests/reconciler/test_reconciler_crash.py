"""The reconciler as real processes on a real redis-server (issue 3, item 9).

10,000 billing events are published with ``lcic-guard events publish`` and
applied by ``lcic-guard reconcile`` processes:

* one is SIGKILLed in the middle of the stream and restarted; once the
  consumer group has nothing left (lag 0, pending 0) the status table is the
  one an uninterrupted run produced, and every fact is stored once;
* two replicas race on the same stream: same table, and every announcement
  (state change, release) is made once.

Every child process is killed in a ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, HOUR, AppStatus, Reason
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.domain.warnings import scheduled_suspensions
from lcic_guard.store.codec import decode_segments, encode_segments
from lcic_guard.store.keys import BILLING_STREAM, GUARD_STREAM, STATUS_PATTERN, status_key_app

LCIC_GUARD = str(Path(sys.executable).with_name("lcic-guard"))
GROUP = "lcic-guard"
N_EVENTS = 10_000
RELEASABLE = 4  # accounts overdue for more than 60 days: released during the run


# ---------------------------------------------------------------------------
# The data set


@dataclass(frozen=True)
class DataSet:
    path: Path
    events: list[dict[str, Any]]
    facts_per_account: dict[str, int]  # distinct event ids each account must keep
    releasable: frozenset[str]


def make_events(n: int, seed: int, base: Millis, releasable: int = 0) -> list[dict[str, Any]]:
    """``n`` valid billing events of many accounts and apps, deterministic for
    ``seed``: shuffled within windows (late and out of order), about 2 % sent
    twice. Overdue alerts lie within 30 days of ``base`` (no release is due
    at ``base``) except for the first ``releasable`` accounts, alerted 70 days
    before ``base`` and never settled."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []

    def ev(kind: str, at: Millis, **fields: Any) -> None:
        # Nothing occurs after ``base`` (the reconciler's clock dead-letters
        # facts from the future, SPEC §2): a later time is mirrored before it.
        at = at if at <= base else 2 * base - at
        for key in ("starts_at", "expires_at"):
            if key in fields:
                fields[key] = format_time(fields[key])
        out.append(
            {"event_id": f"e{len(out):06d}", "type": kind, "occurred_at": format_time(at), **fields}
        )

    def hours(lo_days: int, hi_days: int) -> Millis:
        return base + rnd.randint(lo_days * 24, hi_days * 24) * HOUR

    n_unique = n - n // 50
    a = 0
    while len(out) < n_unique - 40:
        acct = f"acct-{a:04d}"
        overdue_long = a < releasable
        a += 1
        for i in range(rnd.randint(1, 4)):
            app = f"{acct}-app{i}"
            ev("application_registered", hours(-40, -31), account_id=acct, app_id=app)
            for k in range(rnd.randint(1, 3)):
                start = hours(-30, 25)
                pkg = f"{app}-p{k}"
                ev(
                    "package_purchased",
                    start - HOUR,
                    app_id=app,
                    package_id=pkg,
                    starts_at=start,
                    expires_at=start + (120 if overdue_long else 30) * DAY,
                    quota_minutes=rnd.choice([600, 3000, 6000]),
                )
                for _ in range(rnd.randint(0, 3)):
                    ev(
                        "package_usage",
                        start + rnd.randint(1, 29 * 24) * HOUR,
                        app_id=app,
                        package_id=pkg,
                        used_minutes=rnd.randint(0, 7000),
                    )
            for _ in range(rnd.randint(0, 2)):
                ev("payg_changed", hours(-30, 29), app_id=app, enabled=rnd.random() < 0.5)
        if overdue_long:
            ev("overdue_alert", base - 70 * DAY, account_id=acct, amount_due="99.00")
            continue
        for _ in range(rnd.randint(0, 3)):
            ev(
                "overdue_alert",
                hours(-30, 29),
                account_id=acct,
                amount_due=f"{rnd.randint(1, 999)}.00",
            )
        for _ in range(rnd.randint(0, 2)):
            ev("arrears_settled", hours(-30, 29), account_id=acct)
        if rnd.random() < 0.03:
            ev("compliance_ban", hours(-30, 29), account_id=acct, note="terms violation")
    window = 120
    for i in range(0, len(out), window):
        chunk = out[i : i + window]
        rnd.shuffle(chunk)
        out[i : i + window] = chunk
    while len(out) < n:  # redeliveries, later in the stream
        j = rnd.randrange(len(out))
        out.insert(rnd.randint(j + 1, len(out)), dict(out[j]))
    return out


def expected_facts(events: list[dict[str, Any]]) -> dict[str, int]:
    owner = {e["app_id"]: e["account_id"] for e in events if e["type"] == "application_registered"}
    ids: dict[str, set[str]] = defaultdict(set)
    for e in events:
        account = e.get("account_id") or owner[e["app_id"]]
        ids[account].add(e["event_id"])
    return {account: len(s) for account, s in ids.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DataSet:
    base = wall_clock() // HOUR * HOUR
    events = make_events(N_EVENTS, seed=20261126, base=base, releasable=RELEASABLE)
    assert len(events) == N_EVENTS
    path = tmp_path_factory.mktemp("crash") / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    releasable = frozenset(f"acct-{a:04d}" for a in range(RELEASABLE))
    return DataSet(path, events, expected_facts(events), releasable)


# ---------------------------------------------------------------------------
# Processes and waiting


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_for(what: str, cond: Callable[[], bool], timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def publish(url: str, path: Path) -> None:
    done = subprocess.run(
        [LCIC_GUARD, "events", "publish", str(path), "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"published {N_EVENTS} events" in done.stdout and "(0 invalid)" in done.stdout


@contextmanager
def running(url: str, log: Path, count: int = 1) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` ``lcic-guard reconcile`` processes; always killed on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            out = log.with_name(f"{log.stem}-{i}-{time.monotonic_ns()}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [
                        LCIC_GUARD,
                        "reconcile",
                        "--redis-url",
                        url,
                        "--claim-idle",
                        "500ms",
                        # The data set is published now: its old alerts are
                        # learned now, so with no notice period and no margin
                        # their releases fall due at once; every state is
                        # announced as soon as it is computed.
                        "--release-notice",
                        "0",
                        "--release-margin",
                        "0s",
                        "--announce-settle",
                        "0",
                        "--log-level",
                        "WARNING",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            out.close()
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait(timeout=30)


def handles_sigterm(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process has its SIGTERM handler in place (Linux: the
    caught-signals mask in /proc); before that, SIGTERM just kills it."""
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return True  # gone: nothing to wait for
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        # A process still starting up (imports) would die of the signal
        # rather than stop cleanly: wait until it can handle it.
        def ready(p: subprocess.Popen[bytes] = proc) -> bool:
            return p.poll() is not None or handles_sigterm(p)

        wait_for("the SIGTERM handler", ready, 30)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            assert proc.wait(timeout=20) == 0, "the reconciler did not stop cleanly on SIGTERM"
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def group(r: redis.Redis) -> dict[str, Any]:
    try:
        groups = r.xinfo_groups(BILLING_STREAM)
    except redis.ResponseError:
        return {}
    return next(({_s(k): v for k, v in g.items()} for g in groups if _s(g["name"]) == GROUP), {})


def drained(r: redis.Redis) -> bool:
    g = group(r)
    return bool(g) and g.get("lag") == 0 and int(g.get("pending", 1)) == 0


def no_outbox(r: redis.Redis) -> bool:
    """No announcement claimed and not yet on the stream (an app's outbox,
    or a claim in an account's ledger)."""
    for key in r.scan_iter(match="lcic:*", count=2000):
        name = _s(key)
        if name.endswith(":status") and any(_s(f).endswith(":outbox") for f in r.hkeys(key)):
            return False
        if name.endswith(":ledger") and any(b'"claimed_at"' in v for v in r.hvals(key)):
            return False
    return True


def released_everything(r: redis.Redis, data: DataSet) -> Callable[[], bool]:
    def check() -> bool:
        return len(announcements(r, "resources_released")) >= len(data.releasable)

    return check


# ---------------------------------------------------------------------------
# What a run leaves in Redis


@dataclass
class Snapshot:
    table: dict[str, str]  # app id -> status data
    cursor: dict[str, str]  # app id -> last announced state
    facts: dict[str, dict[str, str]]  # account -> event id -> fact JSON


def snapshot(r: redis.Redis) -> Snapshot:
    snap = Snapshot({}, {}, {})
    for key in r.scan_iter(match=STATUS_PATTERN, count=2000):
        app = status_key_app(key) or ""
        data, cursor = r.hmget(key, ["data", "announced"])
        if data is not None:
            snap.table[app] = _s(data)
            snap.cursor[app] = _s(cursor)
    for key in r.scan_iter(match="lcic:acct:{*}:facts", count=2000):
        account = _s(key).split("{", 1)[1].split("}", 1)[0]
        snap.facts[account] = {_s(k): _s(v) for k, v in r.hgetall(key).items()}
    return snap


def announcements(r: redis.Redis, kind: str) -> list[dict[str, Any]]:
    out = []
    rows: Any = r.xrange(GUARD_STREAM)
    for _id, fields in rows:
        event = json.loads(fields[b"event"])
        if event["type"] == kind:
            out.append(event)
    return out


def released_apps(snap: Snapshot, data: DataSet) -> set[str]:
    owner = {
        e["app_id"]: e["account_id"] for e in data.events if e["type"] == "application_registered"
    }
    return {app for app in snap.table if owner[app] in data.releasable}


def on_business_time(data: str) -> str:
    """A status without R6's effective times: those say when each run read
    the facts (Redis's clock), which no two runs share; the rest must match."""
    segments = decode_segments(data)
    for seg in segments:
        assert seg.suspended_at is None or (seg.effective_at or 0) >= seg.suspended_at
    return encode_segments([replace(s, effective_at=s.suspended_at) for s in segments])


def assert_same_table(got: Snapshot, ref: Snapshot, data: DataSet) -> None:
    released = released_apps(ref, data)
    assert set(got.table) == set(ref.table)
    assert len(ref.table) > 1000
    differing = [
        app
        for app in ref.table
        if app not in released
        and on_business_time(got.table[app]) != on_business_time(ref.table[app])
    ]
    if differing:  # say how, so that a rare difference can be told from a bug
        first = differing[0]
        raise AssertionError(
            f"{len(differing)} statuses differ, e.g. {differing[:5]}; {first}: "
            f"got {decode_segments(got.table[first])}, "
            f"reference {decode_segments(ref.table[first])}"
        )
    for app in released:  # the release time is the run's own; the outcome is not
        for snap in (got, ref):
            last = decode_segments(snap.table[app])[-1]
            assert last.reasons[0] is Reason.RESOURCES_RELEASED, app
    # Each fact stored once: exactly the distinct event ids (and one release).
    for account, n in data.facts_per_account.items():
        extra = 1 if account in data.releasable else 0
        assert len(got.facts[account]) == n + extra, account
    for account, facts in ref.facts.items():
        if account not in data.releasable:
            assert got.facts[account] == facts, account


def assert_announced_once(r: redis.Redis, snap: Snapshot, data: DataSet) -> None:
    """Every status change announced once: per app, the announcements are one
    unbroken chain from nothing to the last announced state (a repeat or a
    lost one breaks the balance of the chain), and ids never repeat."""
    changes = announcements(r, "status_changed")
    ids = Counter(e["announcement_id"] for e in changes)
    assert [i for i, n in ids.items() if n > 1] == []
    balance: dict[str, Counter[str]] = defaultdict(Counter)
    for e in changes:
        old = json.dumps([e["old_state"], e["old_reasons"]], separators=(",", ":"))
        new = json.dumps([e["new_state"], e["reasons"]], separators=(",", ":"))
        assert old != new
        balance[e["app_id"]][old] -= 1
        balance[e["app_id"]][new] += 1
    start = json.dumps([None, []], separators=(",", ":"))
    assert set(balance) == set(snap.table)
    for app, b in balance.items():
        expected = Counter({start: -1, snap.cursor[app]: 1})
        assert +b == +expected and -b == -expected, (app, dict(b))
    released = announcements(r, "resources_released")
    assert sorted(e["account_id"] for e in released) == sorted(data.releasable)
    # Warnings before a cut (issue 15): each one once, whoever made it, and
    # none lost: every suspension the final table has ahead was warned of.
    warned = Counter(e["announcement_id"] for e in announcements(r, "suspension_scheduled"))
    assert warned and [i for i, n in warned.items() if n > 1] == []
    by_account: dict[str, dict[str, AppStatus]] = defaultdict(dict)
    for key in r.scan_iter(match=STATUS_PATTERN, count=2000):
        app = status_key_app(key) or ""
        raw, account = r.hmget(key, ["data", "account"])
        if raw is not None:
            by_account[_s(account)][app] = AppStatus(app, _s(account), decode_segments(_s(raw)))
    now = wall_clock()
    for account, statuses in by_account.items():
        for ahead in scheduled_suspensions(statuses, now):
            assert any(i.startswith(f"warn:{ahead.key}:") for i in warned), (account, ahead)


# ---------------------------------------------------------------------------
# The uninterrupted reference run


@pytest.fixture(scope="module")
def reference(dataset: DataSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    logs = tmp_path_factory.mktemp("reference")
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        try:
            publish(server.url, dataset.path)
            with running(server.url, logs / "reconcile") as procs:
                wait_for("the reference run", lambda: drained(r), 120)
                wait_for("its releases", released_everything(r, dataset), 30)
                wait_for("its announcements", lambda: no_outbox(r), 30)
                stop(procs)
            snap = snapshot(r)
            assert_announced_once(r, snap, dataset)
            yield snap
        finally:
            r.close()


# ---------------------------------------------------------------------------
# The tests


def test_sigkill_mid_stream_then_restart_gives_the_uninterrupted_table(
    dataset: DataSet, reference: Snapshot, tmp_path: Path
) -> None:
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        try:
            publish(server.url, dataset.path)
            with running(server.url, tmp_path / "first") as [first]:
                wait_for(
                    "partial progress",
                    lambda: int(group(r).get("entries-read") or 0) >= N_EVENTS // 4,
                    60,
                    every=0.01,
                )
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=10)
            g = group(r)
            assert int(g["lag"]) + int(g["pending"]) > 0, "killed after the end, not mid-stream"
            partial = sum(1 for _ in r.scan_iter(match="lcic:acct:{*}:meta", count=2000))
            assert 0 < partial < len(dataset.facts_per_account)

            with running(server.url, tmp_path / "restarted") as procs:
                wait_for("the restarted run", lambda: drained(r), 120)
                wait_for("the releases", released_everything(r, dataset), 30)
                wait_for("unfinished announcements", lambda: no_outbox(r), 40)
                stop(procs)
            got = snapshot(r)
            assert_same_table(got, reference, dataset)
            assert_announced_once(r, got, dataset)
        finally:
            r.close()


def test_two_replicas_racing_give_the_same_table_and_announce_once(
    dataset: DataSet, reference: Snapshot, tmp_path: Path
) -> None:
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        try:
            publish(server.url, dataset.path)
            worked: set[str] = set()

            def done() -> bool:
                worked.update(busy_consumers(r))
                return drained(r)

            with running(server.url, tmp_path / "replica", count=2) as procs:
                wait_for("the replicas", done, 120, every=0.01)
                wait_for("the releases", released_everything(r, dataset), 30)
                wait_for("the announcements", lambda: no_outbox(r), 30)
                stop(procs)
            assert len(worked) == 2, f"only {worked} took entries from the stream"
            got = snapshot(r)
            assert_same_table(got, reference, dataset)
            assert_announced_once(r, got, dataset)
        finally:
            r.close()


def busy_consumers(r: redis.Redis) -> set[str]:
    """The consumers of the group that hold entries they have not acknowledged."""
    try:
        rows = r.xinfo_consumers(BILLING_STREAM, GROUP)
    except redis.ResponseError:
        return set()
    return {_s(c["name"]) for c in rows if int(c.get("pending", 0)) > 0}


def test_generator_is_deterministic_and_valid() -> None:
    from lcic_guard.domain.facts import parse_event

    a = make_events(2000, seed=7, base=0 + 100 * DAY, releasable=1)
    b = make_events(2000, seed=7, base=0 + 100 * DAY, releasable=1)
    assert a == b and len(a) == 2000
    for e in a:
        parse_event(e)
    assert len({e["event_id"] for e in a}) < len(a)  # some are sent twice
