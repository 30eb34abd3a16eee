"""Deadline shards with real ``lcic-guard reconcile`` processes (ADR 0033).

Two replicas split the shards; the one holding the leader lease is
SIGKILLed while it works the deadlines of many packages expiring at the same
instant. The other takes over its shards once their leases lapse and works
them, including the deadlines that fell due while no one held them, and
every state change is announced exactly once (none lost to the kill, none
repeated by the takeover).

Every child process is killed in a ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import redis
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.store.keys import (
    BILLING_STREAM,
    DEADLINE_SHARDS,
    GUARD_STREAM,
    LEADER,
    app_deadline,
    deadline_shard,
    shard_fence,
    shard_lease,
)

from tests.reconciler.test_reconciler_crash import (
    announcements,
    drained,
    no_outbox,
    running,
    stop,
    wait_for,
)

AT_ONCE = 1500  # expiring at the same instant, while the leader is killed
AFTER = 300  # expiring while the killed leader's leases have not lapsed yet


def package_events(n: int, expires: Millis, prefix: str) -> list[dict[str, Any]]:
    bought = wall_clock() - 10 * DAY
    out: list[dict[str, Any]] = []
    for i in range(n):
        app, acct = f"{prefix}-{i:05d}", f"acct-{prefix}-{i:05d}"
        out.append(
            {
                "event_id": f"reg-{app}",
                "type": "application_registered",
                "occurred_at": format_time(bought),
                "account_id": acct,
                "app_id": app,
            }
        )
        out.append(
            {
                "event_id": f"pkg-{app}",
                "type": "package_purchased",
                "occurred_at": format_time(bought),
                "app_id": app,
                "package_id": f"pkg-{app}",
                "starts_at": format_time(bought),
                "expires_at": format_time(expires),
                "quota_minutes": 6000,
            }
        )
    return out


def holders(r: redis.Redis) -> list[str | None]:
    """Who holds each shard's lease (the holder's name), None if no one."""
    raw: Any = r.mget([shard_lease(s) for s in range(DEADLINE_SHARDS)])
    return [None if v is None else v.decode().rsplit("|", 1)[0] for v in raw]


def pid_of(name: str) -> int:
    """A reconciler's name is HOST-PID-RANDOM."""
    return int(name.rsplit("-", 2)[1])


def test_a_killed_leaders_shards_are_taken_over_and_every_change_announced_once(
    tmp_path: Path,
) -> None:
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        try:
            instant = wall_clock() + 30_000
            evs = package_events(AT_ONCE, instant, "now") + package_events(
                AFTER, instant + 3_000, "later"
            )
            with r.pipeline(transaction=False) as pipe:
                for e in evs:
                    pipe.xadd(BILLING_STREAM, {"event": json.dumps(e)})
                pipe.execute()
            with running(server.url, tmp_path / "replica", count=2) as procs:
                wait_for("the ingest", lambda: drained(r), 60)
                wait_for(
                    "an even split of the shards",
                    lambda: sorted(Counter(holders(r)).values()) == [8, 8],
                    30,
                )
                wait_for("a leader", lambda: r.get(LEADER) is not None, 30)
                leader = r.get(LEADER).decode().rsplit("|", 1)[0]  # type: ignore[union-attr]
                [killed] = [p for p in procs if p.pid == pid_of(leader)]
                [survivor] = [p for p in procs if p is not killed]
                theirs = [s for s, h in enumerate(holders(r)) if h == leader]
                counters = {s: int(r.get(shard_fence(s)) or 0) for s in theirs}

                # Every application's ACTIVE and its warning first; then
                # killed as the instant's deadlines are being worked.
                before = 2 * (AT_ONCE + AFTER)
                wait_for("the first announcements", lambda: r.xlen(GUARD_STREAM) >= before, 60)
                wait_for("the instant", lambda: wall_clock() >= instant, 60, every=0.01)
                wait_for("the first suspensions", lambda: r.xlen(GUARD_STREAM) > before, 30, 0.002)
                killed.send_signal(signal.SIGKILL)
                killed.wait(timeout=10)
                print(f"killed after {r.xlen(GUARD_STREAM) - before} of {AT_ONCE + AFTER}")

                wait_for(
                    "the survivor to hold every shard",
                    lambda: len(set(holders(r))) == 1 and None not in holders(r),
                    30,
                )
                [name] = set(holders(r))
                assert name is not None and pid_of(name) == survivor.pid
                for shard, token in counters.items():
                    assert int(r.get(shard_fence(shard)) or 0) == token + 1, "taken over"

                everything = before + AT_ONCE + AFTER
                wait_for("every suspension", lambda: r.xlen(GUARD_STREAM) >= everything, 60)
                wait_for("the announcements cut short", lambda: no_outbox(r), 30)
                stop([survivor])
            assert_each_change_announced_once(r, theirs)
        finally:
            r.close()


def assert_each_change_announced_once(r: redis.Redis, theirs: list[int]) -> None:
    changes = announcements(r, "status_changed")
    ids = Counter(e["announcement_id"] for e in changes)
    assert [i for i, n in ids.items() if n > 1] == []
    chains: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
    for e in changes:
        chains[e["app_id"]].append((e["old_state"], e["new_state"]))
    assert len(chains) == AT_ONCE + AFTER
    for app, chain in chains.items():
        assert chain == [(None, "ACTIVE"), ("ACTIVE", "SUSPENDED")], app
    # Deadlines fell due in the killed leader's shards while no one held them
    # (the later packages): the survivor did them.
    later = [a for a in chains if a.startswith("later-")]
    assert any(deadline_shard(app_deadline(a)) in theirs for a in later)
    warned = Counter(e["announcement_id"] for e in announcements(r, "suspension_scheduled"))
    assert [i for i, n in warned.items() if n > 1] == []
    assert len({e["account_id"] for e in announcements(r, "suspension_scheduled")}) == len(chains)
