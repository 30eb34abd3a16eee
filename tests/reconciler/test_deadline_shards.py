"""Deadlines in shards, worked under leases (ADR 0033), on a real redis-server.

* members an earlier version left in the single set are moved to their
  shards, and none is lost;
* a deadline just due is processed in the first batch even behind a backlog
  of older due ones, and the backlog moves too;
* replicas split the shards fairly, and one stopping cleanly hands its share
  over at once;
* the leases are renewed while a batch is slow (the holder never changes),
  and a lease lost stops its work before the token is used again.

The two replicas with a killed leader, as real processes, are in
test_deadline_shards_crash.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, PolicyConfig
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.config import BACKLOG_LANE, FRESH_LANE, RECHECK_LANE
from lcic_guard.reconciler.deadlines import Lease, fair_share
from lcic_guard.store.connect import RedisClient, connect
from lcic_guard.store.keys import (
    DEADLINE_SHARDS,
    DEADLINES,
    FENCE,
    GUARD_STREAM,
    LEADER,
    REPLICAS,
    app_deadline,
    deadline_key,
    deadline_shard,
    shard_deadlines,
    shard_fence,
    shard_lease,
    status_key,
)
from lcic_guard.store.status import Store
from lcic_guard.tasks import stop_tasks

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries


def quick(**overrides: Any) -> ReconcilerConfig:
    base: dict[str, Any] = {"release_margin_ms": 0, "block_ms": 10, "announce_settle_ms": 0}
    return ReconcilerConfig(**{**base, **overrides})


async def suspensions(store: Store) -> list[str]:
    """The apps whose ACTIVE -> SUSPENDED was announced, in stream order."""
    rows: Any = await store.redis.xrange(GUARD_STREAM)
    out = []
    for _id, fields in rows:
        e = json.loads(fields[b"event"])
        if e["type"] == "status_changed" and (e["old_state"], e["new_state"]) == (
            "ACTIVE",
            "SUSPENDED",
        ):
            out.append(e["app_id"])
    return out


def apps_in_shard(shard: int, count: int, prefix: str = "app") -> list[str]:
    """``count`` application ids whose deadline lives in ``shard``."""
    out: list[str] = []
    n = 0
    while len(out) < count:
        app = f"{prefix}-{n}"
        if deadline_shard(app_deadline(app)) == shard:
            out.append(app)
        n += 1
    return out


async def ingest(rec: Reconciler, evs: list[dict[str, Any]]) -> None:
    for i in range(0, len(evs), 500):
        await rec.ingest(deliveries(evs[i : i + 500]))


async def eventually(
    what: str, cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got if isinstance(got, bool) else await got:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------
# Upgrading from the single set


async def test_deadlines_an_earlier_version_left_in_the_single_set_are_moved_and_kept(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    """An earlier version kept every deadline in lcic:guard:deadlines: after
    an upgrade each is moved to its shard (at start, or by the leader once
    due), none is lost, and a release stays where it was."""
    soon, later = T0 + HOUR, T0 + 10 * DAY
    await ingest(
        reconciler,
        [
            *events.app("acct-1", "app-soon", expires=soon),
            *events.app("acct-2", "app-later", expires=later),
            events("overdue_alert", T0 - 70 * DAY, account_id="acct-3"),
            *events.app("acct-3", "app-overdue", at=T0 - 80 * DAY, expires=T0 + 400 * DAY),
        ],
    )
    # As the earlier version left them: every member in the one set.
    everything = await reconciler.coord.scheduled()
    assert {m.split(":")[0] for m, _ in everything} >= {"app", "warn", "release"}
    for shard in range(DEADLINE_SHARDS):
        await store.redis.delete(shard_deadlines(shard))
    await store.redis.zadd(DEADLINES, dict(everything))

    # The leader moves one that falls due while still there, and it is done.
    assert await reconciler.run_deadlines(soon) >= 1
    assert await suspensions(store) == ["app-soon"]
    assert await store.redis.zscore(DEADLINES, "app:app-soon") is None
    assert await store.redis.zscore(DEADLINES, "app:app-later") == later, "not due: left"

    # At start the rest moves: each at its time, the release stays.
    assert await reconciler.migrate_deadlines() >= 2
    assert [m for m in await store.redis.zrange(DEADLINES, 0, -1)] == [b"release:acct-3"]
    for member, at in everything:
        if member != "app:app-soon":
            assert await store.redis.zscore(deadline_key(member), member) == at, member
    assert await reconciler.run_deadlines(later) >= 1
    assert await suspensions(store) == ["app-soon", "app-later"]


# ---------------------------------------------------------------------------
# A deadline just due, behind a backlog


async def noted(store: Store, apps: list[str]) -> list[str]:
    """The apps whose new state has been noted, waiting to settle."""
    async with store.redis.pipeline(transaction=False) as pipe:
        for app in apps:
            pipe.hget(status_key(app), "announced:cand")
        rows = await pipe.execute()
    return [app for app, cand in zip(apps, rows, strict=True) if cand is not None]


async def test_a_transition_just_due_goes_first_behind_a_backlog_and_a_burst_of_rechecks(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    """A burst's first pass notes each change, and each comes back a settle
    time later to be announced: those re-checks are due more recently than a
    transition that fell due meanwhile (the canary), and a backlog of older
    transitions is still waiting. The canary is in the very next batch, and
    the backlog and the re-checks both move in it."""
    rec = Reconciler(store, policy, quick(announce_settle_ms=10_000), clock=clock, name="r1")
    shard = 5
    batch = FRESH_LANE + BACKLOG_LANE + RECHECK_LANE
    burst = apps_in_shard(shard, batch, prefix="burst")
    backlog = apps_in_shard(shard, 2 * batch)
    [canary] = apps_in_shard(shard, 1, prefix="canary")
    flip = T0 + HOUR
    evs: list[dict[str, Any]] = []
    for app in burst:
        evs += events.app(f"acct-{app}", app, expires=flip)
    for i, app in enumerate(backlog):  # oldest first
        evs += events.app(f"acct-{app}", app, expires=flip + 2_000 + i)
    evs += events.app("acct-canary", canary, expires=flip + 5_000)
    await ingest(rec, evs)
    await rec.run_deadlines(T0 + 10_000)  # each ACTIVE announced once settled
    await rec.run_deadlines(flip + 1_000)  # the burst's first pass
    assert await noted(store, burst) == burst
    assert await suspensions(store) == []

    # Its re-checks fall due at flip + 11 s, after the canary (flip + 5 s).
    now = flip + 11_000
    assert await rec.deadline_batch(shard_deadlines(shard), now) == batch
    assert await noted(store, [canary]) == [canary], "the transition just due went first"
    assert set(backlog[:BACKLOG_LANE]) <= set(await noted(store, backlog)), "the backlog moves"
    announced = await suspensions(store)
    assert len(announced) == RECHECK_LANE and set(announced) <= set(burst), "so do the re-checks"

    # Everything else in the next batches, each announced once.
    await rec.run_deadlines(now)
    await rec.run_deadlines(now + 10_000)
    assert Counter(await suspensions(store)) == Counter([*burst, *backlog, canary])


# ---------------------------------------------------------------------------
# Replicas, the fair split and the leases


class SlowStore(Store):
    """The real store; once armed, its next batch read of status versions (a
    batch of deadlines checking that nothing changed under it) takes
    ``delay`` seconds, as a batch that is slow to work."""

    def __init__(self, redis: RedisClient, delay: float) -> None:
        super().__init__(redis)
        self.delay = delay
        self.armed = False
        self.entered = asyncio.Event()
        self.finished = False  # the slow batch went on to its end (not cancelled)

    async def read_versions(self, app_ids: Sequence[str]) -> list[int | None]:
        if self.armed:
            self.armed = False
            self.entered.set()
            await asyncio.sleep(self.delay)
            self.finished = True
        return await super().read_versions(app_ids)


def held(*recs: Reconciler) -> list[int]:
    return [len(r.lanes.held_shards()) for r in recs]


async def lease_holders(store: Store) -> list[str | None]:
    raw = await store.redis.mget([shard_lease(s) for s in range(DEADLINE_SHARDS)])
    names = [v.decode() if isinstance(v, bytes) else v for v in raw]
    return [None if v is None else v.rsplit("|", 1)[0] for v in names]


def test_each_replica_holds_its_fair_share() -> None:
    assert [fair_share(n) for n in (0, 1, 2, 3, 5, 16, 40)] == [16, 16, 8, 6, 4, 1, 1]


async def test_replicas_split_the_shards_and_a_clean_stop_hands_them_over_at_once(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> None:
    cfg = quick(lease_ttl_ms=60_000, tick_ms=50)
    r1 = Reconciler(store, policy, cfg, clock=clock, name="r1")
    r2 = Reconciler(store, policy, cfg, clock=clock, name="r2")
    stop1, stop2 = asyncio.Event(), asyncio.Event()
    t1 = asyncio.create_task(r1.run(stop1))
    await eventually("r1 alone holds every shard", lambda: held(r1) == [16])
    t2 = asyncio.create_task(r2.run(stop2))
    try:
        await eventually("an even split", lambda: held(r1, r2) == [8, 8])
        holders = await lease_holders(store)
        assert Counter(holders) == Counter({"r1": 8, "r2": 8})
        # A lease TTL of a minute: only a clean hand-over can be this quick.
        stop1.set()
        await asyncio.wait_for(t1, 10)
        await eventually("r2 takes r1's share", lambda: held(r2) == [16])
        assert await lease_holders(store) == ["r2"] * DEADLINE_SHARDS
        assert await store.redis.zrange(REPLICAS, 0, -1) == [b"r2"]
    finally:
        stop1.set()
        stop2.set()
        await stop_tasks([t1, t2])


async def test_a_slow_batch_keeps_its_lease_and_the_holder_never_changes(
    redis_server: EmbeddedRedis,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    """A batch that takes several lease TTLs: the lease is renewed in the
    background meanwhile, so the other replica never takes the shard, and the
    holder finishes the batch."""
    ttl = 600
    slow = SlowStore(connect(redis_server.url), delay=4 * ttl / 1000)
    cfg = quick(lease_ttl_ms=ttl, tick_ms=50)
    r1 = Reconciler(slow, policy, cfg, clock=clock, name="r1")
    r2 = Reconciler(store, policy, cfg, clock=clock, name="r2")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r1._leader_loop(stop))]
    try:
        await eventually("r1 leads", lambda: r1.token > 0 and held(r1) == [16])
        tasks.append(asyncio.create_task(r2._leader_loop(stop)))
        await eventually("an even split", lambda: held(r1, r2) == [8, 8])
        shard = r1.lanes.held_shards()[0]
        [app] = apps_in_shard(shard, 1)
        await r2.ingest(deliveries(events.app("acct-1", app, expires=T0 + MINUTE)))
        before = await store.redis.get(shard_lease(shard))
        counters = await store.redis.mget([FENCE, *(shard_fence(s) for s in range(16))])
        leader = await store.redis.get(LEADER)
        slow.armed = True
        clock.now = T0 + MINUTE  # the deadline falls due
        await asyncio.wait_for(slow.entered.wait(), 5)
        seen = set()
        give_up = time.monotonic() + 10
        while not slow.finished and time.monotonic() < give_up:
            seen.add(await store.redis.get(shard_lease(shard)))
            assert shard not in r2.lanes.held_shards()
            await asyncio.sleep(0.02)
        assert seen == {before}, "the holder and its token never changed"
        assert slow.finished, "the slow batch was never stopped for want of its lease"
        assert await suspensions(store) == [app], "and it announced the change, once"
        assert await store.redis.mget([FENCE, *(shard_fence(s) for s in range(16))]) == counters
        assert await store.redis.get(LEADER) == leader
        assert shard in r1.lanes.held_shards()
    finally:
        stop.set()
        await stop_tasks(tasks)
        await slow.close()


async def test_a_lease_lost_stops_its_work_before_the_token_is_used_again(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    """Another holder takes a shard's lease (this replica stalled past its
    TTL): the next renewal finds it lost, and the shard's deadlines are left
    to the new holder. The leader lease likewise: its token is dropped, so no
    release can use it."""
    cfg = quick(lease_ttl_ms=600, tick_ms=50)
    rec = Reconciler(store, policy, cfg, clock=clock, name="r1")
    stop = asyncio.Event()
    task = asyncio.create_task(rec._leader_loop(stop))
    try:
        await eventually("r1 leads", lambda: rec.token > 0 and held(rec) == [16])
        shard = rec.lanes.held_shards()[0]
        await store.redis.set(shard_lease(shard), "thief|99", px=60_000)
        await store.redis.set(LEADER, "thief|99", px=60_000)
        await eventually("the loss is seen", lambda: shard not in rec.lanes.held_shards())
        await eventually("the leader token dropped", lambda: rec.token == 0)
        assert rec.releaser.token == 0

        [app] = apps_in_shard(shard, 1)
        await rec.ingest(deliveries(events.app("acct-1", app, expires=T0 + MINUTE)))
        # Another shard's deadline falls due at the same time, and is done.
        [other] = apps_in_shard((shard + 1) % DEADLINE_SHARDS, 1, prefix="other")
        await rec.ingest(deliveries(events.app("acct-2", other, expires=T0 + MINUTE)))
        clock.now = T0 + MINUTE

        async def other_done() -> bool:
            return other in await suspensions(store)

        await eventually("the other shard's deadline", other_done)
        # The lost shard's worker ends (its cancellation lands on its own
        # turn of the loop): nothing is left to take its batch.
        await eventually(
            "the lost shard's worker ended",
            lambda: shard_deadlines(shard) not in rec.lanes._workers,
        )
    finally:
        stop.set()
        await stop_tasks([task])
    assert await suspensions(store) == [other], "nothing done in the shard it lost"
    assert await store.redis.get(shard_lease(shard)) == b"thief|99"


def test_a_lease_not_renewed_in_time_counts_as_lost_before_it_lapses_in_redis() -> None:
    lease = Lease()
    sent = time.monotonic()
    lease.note(7, sent, 1000)
    assert lease.held() and lease.token == 7
    # Its holder stops using it before the TTL is over (the clocks may not
    # run at the same rate), renewed or not.
    lease.note(7, sent - 0.85, 1000)
    assert not lease.held()
    lease.note(0, sent, 1000)
    assert not lease.held() and lease.expires == 0.0
