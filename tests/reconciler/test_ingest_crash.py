"""The reconciler as a real process, SIGKILLed at random points while it
ingests a feed with repeats, ids reused across accounts and applications
registered to two accounts (issue 9: global idempotency and ownership are
crash-safe).

The feed goes onto the billing stream of a real redis-server; ``lcic-guard
reconcile`` is killed with SIGKILL several times at random points and
restarted until the consumer group has nothing left. The result must be the
one of a single ordered, uninterrupted run: the same status table (owner and
timeline of every application), the same dead-lettered ids, every account
holding exactly the same facts (none twice, no reused id's other content),
no move left unfinished, and no release (nothing is due).

Every child process is killed in a ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import (
    BILLING_STREAM,
    DEAD_LETTER_STREAM,
    GUARD_STREAM,
    STATUS_PATTERN,
    status_key_app,
)
from lcic_guard.store.status import Store

from tests.reconciler.test_reconciler_crash import (
    drained,
    group,
    on_business_time,
    running,
    stop,
    wait_for,
)
from tests.support.events import deliveries

BATCH = 500  # the reconciler's default batch size
# A reused id comes this many entries after its original: more than two
# batches, so that even after a crash the original is claimed first (the
# dead consumer's entries are claimed back before new ones are read).
REUSE_GAP = 2 * BATCH + 200
KILLS = 4


def make_feed(seed: int, base: Millis, n_accounts: int = 300) -> list[dict[str, Any]]:
    """A deterministic feed, in stream order. Every fact happened before
    ``base`` and no overdue alert is older than 30 days: no release is due.
    About one app in eight is also registered to a second account (earlier
    or later than its first); about 2 % of events are sent twice; about 1 %
    are followed, much later, by an event reusing their id for another
    account."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    n = 0

    def ev(kind: str, at: Millis, **fields: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        for key in ("starts_at", "expires_at"):
            if key in fields:
                fields[key] = format_time(fields[key])
        event = {"event_id": f"c{n:06d}", "type": kind, "occurred_at": format_time(at), **fields}
        out.append(event)
        return event

    def past(lo_days: int, hi_days: int) -> Millis:
        return base - rnd.randint(lo_days * 24, hi_days * 24) * HOUR

    accounts = [f"acct-{a:04d}" for a in range(n_accounts)]
    for acct in accounts:
        for i in range(rnd.randint(1, 3)):
            app = f"{acct}-app{i}"
            ev("application_registered", past(35, 40), account_id=acct, app_id=app)
            if rnd.random() < 0.125:
                rival = rnd.choice([a for a in accounts if a != acct])
                ev("application_registered", past(33, 42), account_id=rival, app_id=app)
            for k in range(rnd.randint(1, 2)):
                start = past(2, 30)
                pkg = f"{app}-p{k}"
                ev(
                    "package_purchased",
                    start - HOUR,
                    app_id=app,
                    package_id=pkg,
                    starts_at=start,
                    expires_at=start + 30 * DAY,
                    quota_minutes=rnd.choice([0, 600, 3000]),
                )
                for _ in range(rnd.randint(0, 2)):
                    ev(
                        "package_usage",
                        past(1, 2),
                        app_id=app,
                        package_id=pkg,
                        used_minutes=rnd.randint(0, 4000),
                    )
            if rnd.random() < 0.3:
                ev("payg_changed", past(1, 30), app_id=app, enabled=rnd.random() < 0.5)
        for _ in range(rnd.randint(0, 2)):
            ev("overdue_alert", past(1, 30), account_id=acct, amount_due="19.00")
        if rnd.random() < 0.5:
            ev("arrears_settled", past(1, 30), account_id=acct)
        if rnd.random() < 0.03:
            ev("compliance_ban", past(1, 30), account_id=acct, note="terms violation")
    for i in range(0, len(out), 120):  # late and out of order within windows
        chunk = out[i : i + 120]
        rnd.shuffle(chunk)
        out[i : i + 120] = chunk
    for _ in range(len(out) // 50):  # sent twice, later
        j = rnd.randrange(len(out))
        out.insert(rnd.randint(j + 1, len(out)), dict(out[j]))
    account_events = [e for e in out if "account_id" in e and "app_id" not in e]
    for original in rnd.sample(account_events, k=len(out) // 100):
        i = next(j for j, e in enumerate(out) if e is original)
        if i + REUSE_GAP >= len(out):
            continue
        other = rnd.choice([a for a in accounts if a != original["account_id"]])
        out.insert(rnd.randint(i + REUSE_GAP, len(out)), {**original, "account_id": other})
    return out


@dataclass
class Outcome:
    table: dict[str, tuple[str, str]]  # app -> (owner, timeline)
    dead_ids: set[str]
    facts: dict[str, dict[str, str]]  # account -> event id -> fact JSON
    unfinished_moves: list[str]
    releases: int


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def outcome(r: redis.Redis) -> Outcome:
    got = Outcome({}, set(), {}, [], 0)
    for key in r.scan_iter(match=STATUS_PATTERN, count=2000):
        app = status_key_app(key) or ""
        account, data, moved = r.hmget(key, ["account", "data", "moved_from"])
        if data is not None:
            got.table[app] = (_s(account), _s(data))
        if moved is not None:
            got.unfinished_moves.append(app)
    rows: Any = r.xrange(DEAD_LETTER_STREAM)
    for _id, fields in rows:
        got.dead_ids.add(json.loads(fields[b"event"])["event_id"])
    for key in r.scan_iter(match="lcic:acct:{*}:facts", count=2000):
        account = _s(key).split("{", 1)[1].split("}", 1)[0]
        got.facts[account] = {_s(k): _s(v) for k, v in r.hgetall(key).items()}
    rows = r.xrange(GUARD_STREAM)
    for _id, fields in rows:
        if json.loads(fields[b"event"])["type"] == "resources_released":
            got.releases += 1
    return got


def reference_run(feed: list[dict[str, Any]]) -> Outcome:
    """The single ordered run: the feed in stream order, in the reconciler's
    batches, through one uninterrupted in-process reconciler."""

    async def run(url: str) -> None:
        store = Store(connect(url))
        try:
            rec = Reconciler(store, PolicyConfig(), ReconcilerConfig(), clock=wall_clock)
            for i in range(0, len(feed), BATCH):
                await rec.ingest(deliveries(feed[i : i + BATCH]))
        finally:
            await store.close()

    with EmbeddedRedis() as server:
        asyncio.run(run(server.url))
        r = redis.Redis.from_url(server.url)
        try:
            return outcome(r)
        finally:
            r.close()


def test_sigkill_at_random_points_gives_the_ordered_runs_outcome(tmp_path: Path) -> None:
    base = wall_clock() // HOUR * HOUR
    feed = make_feed(seed=20261127, base=base)
    ids = [e["event_id"] for e in feed]
    assert len(set(ids)) < len(ids)  # repeats and reuses are there
    expected = reference_run(feed)
    # The feed exercises what it is meant to: moved apps, reused ids.
    losers = {
        e["event_id"]
        for e in feed
        if e["type"] == "application_registered"
        and expected.table.get(e["app_id"], ("", ""))[0] != e["account_id"]
    }
    assert len(losers) >= 5 and losers <= expected.dead_ids
    assert len(expected.dead_ids - losers) >= 5  # the reused ids
    assert expected.releases == 0 and not expected.unfinished_moves

    rnd = random.Random(time.monotonic_ns())
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        try:
            pipe = r.pipeline(transaction=False)
            for e in feed:
                pipe.xadd(BILLING_STREAM, {"event": json.dumps(e)})
            pipe.execute()
            kills = 0
            mid_stream = 0
            while kills < KILLS and not drained(r):
                start = int(group(r).get("entries-read") or 0)
                target = start + rnd.randint(1, BATCH + 300)
                with running(server.url, tmp_path / f"run{kills}") as [proc]:
                    wait_for(
                        "progress",
                        lambda t=target: (
                            drained(r)  # type: ignore[misc]
                            or int(group(r).get("entries-read") or 0) >= t
                        ),
                        60,
                        every=0.005,
                    )
                    time.sleep(rnd.random() * 0.2)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=10)
                kills += 1
                g = group(r)
                if int(g.get("lag") or 0) + int(g.get("pending") or 0) > 0:
                    mid_stream += 1
                # Past --claim-idle: the restarted process takes the dead
                # one's entries back before reading new ones.
                time.sleep(0.6)
            assert mid_stream >= 1, "no kill landed in the middle of the stream"
            with running(server.url, tmp_path / "last") as procs:
                wait_for("the last run", lambda: drained(r), 120)
                stop(procs)
            got = outcome(r)
        finally:
            r.close()

    assert got.unfinished_moves == []
    assert got.releases == 0
    assert not [i for f in got.facts.values() for i in f if i.startswith("lcic-guard:")]
    assert set(got.table) == set(expected.table)

    def business(row: tuple[str, str]) -> tuple[str, str]:
        account, data = row
        return account, on_business_time(data) if data else data

    differing = [
        app for app in expected.table if business(got.table[app]) != business(expected.table[app])
    ]
    assert differing == [], f"{len(differing)} statuses differ, e.g. {differing[:5]}"
    assert got.dead_ids == expected.dead_ids
    # Every account holds exactly the ordered run's facts: none twice (the
    # facts are keyed by id), none of a reused id's other content.
    assert got.facts == expected.facts
