"""The store, the reconciler and the sidecar on a real Redis Cluster of three
masters, and on a master found through a real Redis Sentinel (issue 4, item 6).

Every process is real: three ``redis-server --cluster-enabled yes`` joined by
``redis-cli --cluster create``, the real reconciler, the real gRPC sidecar
(with its cache and change feed) on a real socket, and ``redis-server
--sentinel`` watching a password-protected master.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, AppStatus, PolicyConfig, Segment
from lcic_guard.domain.time import Millis
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.release import ALREADY_RELEASED
from lcic_guard.reconciler.sources import FileSource, StreamSource
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.connect import connect, parse_sentinel_url
from lcic_guard.store.keys import (
    BILLING_STREAM,
    DEADLINES,
    FENCE,
    GUARD_STREAM,
    HEARTBEAT,
    LEADER,
    deadline_key,
    facts_key,
    feed_key,
    feed_seq_key,
    feed_shard,
    legacy_app_key,
    meta_key,
    parked_key,
    snapshot_key_of,
    status_key,
)
from lcic_guard.store.status import Store
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import AuthenticationError

from tests.support.clock import T0, FakeClock, recorded_clock
from tests.support.cluster import RedisClusterProcs, SentinelProcs, command
from tests.support.events import Events, deliveries
from tests.support.settings import sidecar_settings

ACCT = "acct-1"

# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcs]:
    procs = RedisClusterProcs().start()
    yield procs
    procs.stop()


@pytest_asyncio.fixture
async def cstore(redis_cluster: RedisClusterProcs) -> AsyncIterator[Store]:
    """A Store on the cluster, every master flushed first."""
    redis_cluster.flushall()
    store = Store(connect(redis_cluster.url))
    assert isinstance(store.redis, RedisCluster)
    yield store
    await store.close()


@pytest_asyncio.fixture
async def crec(cstore: Store, policy: PolicyConfig, clock: FakeClock) -> Reconciler:
    cfg = ReconcilerConfig(release_margin_ms=0, announce_settle_ms=0)
    return Reconciler(cstore, policy, cfg, clock=clock)


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@dataclass
class ClusterSidecar:
    """The real sidecar (runner.build_sidecar) with a stub on a real channel."""

    sidecar: RunningSidecar
    stub: pb_grpc.EnforcementServiceStub

    async def create(self, app_id: str) -> pb.Decision:
        req = pb.CanCreateClassroomRequest(app_id=app_id)
        resp: pb.CanCreateClassroomResponse = await self.stub.CanCreateClassroom(req, timeout=5)
        return resp.decision

    async def enter(self, app_id: str, room_id: str) -> pb.Decision:
        req = pb.CanEnterClassroomRequest(app_id=app_id, room_id=room_id)
        resp: pb.CanEnterClassroomResponse = await self.stub.CanEnterClassroom(req, timeout=5)
        return resp.decision

    async def recording(self, app_id: str) -> pb.Decision:
        req = pb.CanAccessRecordingRequest(app_id=app_id, recording_id="rec-1")
        resp: pb.CanAccessRecordingResponse = await self.stub.CanAccessRecording(req, timeout=5)
        return resp.decision

    async def three(self, app_id: str, room_id: str = "room-x") -> list[pb.Decision]:
        return [
            await self.create(app_id),
            await self.enter(app_id, room_id),
            await self.recording(app_id),
        ]


@pytest_asyncio.fixture
async def csidecar(
    redis_cluster: RedisClusterProcs, cstore: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[ClusterSidecar]:
    settings = sidecar_settings(
        redis_url=redis_cluster.url, redis_timeout_ms=2000, cache_size=1000, policy=policy
    )
    sidecar = await build_sidecar(settings, cstore, clock=clock)

    async def healthy() -> bool:
        return sidecar.checker.cache.feed_healthy

    await eventually(healthy)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    yield ClusterSidecar(sidecar, pb_grpc.EnforcementServiceStub(channel))
    await channel.close()
    await sidecar.stop(grace=0.2)


def ts(ms: Millis) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(ms)
    return out


def ms(t: Timestamp) -> int:
    return int(t.ToMilliseconds())


def nodes_of(store: Store, keys: list[str]) -> set[str]:
    """The cluster nodes (masters) holding these keys."""
    redis = store.redis
    assert isinstance(redis, RedisCluster)
    nodes = [redis.get_node_from_key(k) for k in keys]
    return {n.name for n in nodes if n is not None}


async def announcements(store: Store) -> list[dict[str, Any]]:
    rows: Any = await store.redis.xrange(GUARD_STREAM)
    return [json.loads(fields[b"event"]) for _id, fields in rows]


# -- keys and slots -------------------------------------------------------------------


@pytest.mark.parametrize("ident", ["a", "app-1", "acct.9:x_Y", "Z" * 64, "lcic:app:x"])
def test_keys_a_script_uses_together_share_a_hash_slot(ident: str) -> None:
    slot = key_slot(status_key(ident).encode())
    shard = feed_shard(ident)
    # An app's keys share its feed shard's slot: one script writes the
    # status, the shard's feed and sequence, and its snapshot entry.
    for key in (parked_key(ident), feed_key(shard), feed_seq_key(shard), snapshot_key_of(ident)):
        assert key_slot(key.encode()) == slot, key
    account = key_slot(facts_key(ident).encode())
    assert key_slot(meta_key(ident).encode()) == account == key_slot(ident.encode())
    assert key_slot(LEADER.encode()) == key_slot(FENCE.encode()) == key_slot(b"leader")


async def test_the_servers_own_keyslot_agrees_with_the_tags(
    redis_cluster: RedisClusterProcs,
) -> None:
    port = redis_cluster.ports[0]
    for a, b in [
        (status_key("app-1"), parked_key("app-1")),
        (facts_key(ACCT), meta_key(ACCT)),
        (LEADER, FENCE),
    ]:
        slot_a = int(command(port, "CLUSTER", "KEYSLOT", a))
        assert slot_a == int(command(port, "CLUSTER", "KEYSLOT", b)) == key_slot(a.encode())
    # and the tags do spread data: the feed shards land on different slots
    assert len({key_slot(status_key(f"app-{n}").encode()) for n in range(200)}) == 16


async def test_cluster_flag_is_taken_out_of_the_url_query(
    redis_cluster: RedisClusterProcs,
) -> None:
    port = redis_cluster.ports[1]
    store = Store(connect(f"redis://127.0.0.1:{port}/0?cluster=true&socket_keepalive=true"))
    try:
        assert isinstance(store.redis, RedisCluster)
        assert await store.ping()
        assert len(store.redis.get_primaries()) == 3
    finally:
        await store.close()


@dataclass
class ScriptCall:
    script: str
    keys: tuple[str, ...]


def script_names(*holders: object) -> dict[str, str]:
    """The registered Lua scripts held by these objects, by SHA1."""
    return {
        value.sha: f"{type(holder).__name__}.{attr}"
        for holder in holders
        for attr, value in vars(holder).items()
        if isinstance(value, AsyncScript)
    }


def observe_evalsha(redis: RedisCluster, names: dict[str, str], calls: list[ScriptCall]) -> None:
    """Record the keys of every script call the client makes (every
    registered script runs through its EVALSHA), then make the real call."""
    original = redis.evalsha

    def evalsha(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        keys = tuple(str(k) for k in keys_and_args[: int(numkeys)])
        calls.append(ScriptCall(names.get(sha, sha), keys))
        return original(sha, numkeys, *keys_and_args)

    setattr(redis, "evalsha", evalsha)  # noqa: B010 - an instance attribute on purpose


async def test_every_lua_script_call_stays_in_one_slot(
    cstore: Store,
    csidecar: ClusterSidecar,
    policy: PolicyConfig,
    events: Events,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """One scenario that runs the scripts (ingest with a parked fact, room
    reports, lease, announcements, deadlines, release, resign) on the
    cluster; each call's keys must hash to one slot."""
    feed = tmp_path / "events.jsonl"
    evs = [
        *events.app(ACCT, "app-1", at=T0 - 200 * DAY),
        *events.app(ACCT, "app-2", at=T0 - 200 * DAY),
        events("overdue_alert", T0 - 100 * DAY, account_id=ACCT),
        # a fact about an app not yet registered (parked), then its registration
        events("payg_changed", T0 - 5 * DAY, app_id="app-3", enabled=True),
        *events.app("acct-2", "app-3", at=T0 - 4 * DAY),
    ]
    feed.write_text("".join(json.dumps(e) + "\n" for e in evs))
    source = FileSource(feed, clock_ms=cstore.server_time)
    # Loaded back when the alert was sent (loaded today, R10's notice would run first).
    rec = Reconciler(
        cstore,
        policy,
        ReconcilerConfig(release_margin_ms=0),
        [source],
        clock=clock,
        recorded_clock=recorded_clock(T0 - 100 * DAY),
    )
    assert isinstance(cstore.redis, RedisCluster)
    names = script_names(cstore, rec.coord)
    calls: list[ScriptCall] = []
    observe_evalsha(cstore.redis, names, calls)

    stats = await rec.drain(source)
    # The parked fact was applied once its app was registered.
    assert stats.applied == len(evs)
    assert await cstore.redis.exists(parked_key("app-3")) == 0
    usage = events("package_usage", T0, app_id="app-3", package_id="pkg-app-3", used_minutes=5)
    await rec.ingest(deliveries([usage]))
    # An app registered to acct-2, then to ACCT earlier: it moves to ACCT
    # (the scripts that clean its facts out of acct-2 run too).
    late = events("application_registered", T0 - 3 * DAY, account_id="acct-2", app_id="app-4")
    early = events("application_registered", T0 - 300 * DAY, account_id=ACCT, app_id="app-4")
    await rec.ingest(deliveries([late]))
    await rec.ingest(deliveries([early]))
    assert await cstore.app_owner("app-4") == ACCT
    await csidecar.stub.ReportClassroomStarted(
        pb.ReportClassroomStartedRequest(
            app_id="app-3", room_id="room-1", started_at=ts(T0 - 30 * MINUTE)
        ),
        timeout=5,
    )
    # Progress marks, a reader's starting point, and a status carried over
    # from the layout before feed shards (its keys tagged by the app).
    await cstore.mark_progress()
    assert (await cstore.feed_head(feed_shard("app-3")))[0] > 0
    held: Any = await cstore.redis.hgetall(status_key("app-1"))
    await cstore.redis.hset(legacy_app_key("app-9", "status"), mapping=held)
    assert await cstore.migrate_legacy_layout() == 1
    carried, _ = await cstore.read_status("app-9")
    assert carried is not None and carried.version == int(held[b"version"])
    rec.token = await rec.coord.hold_lease(rec.name, 5000)
    assert rec.token > 0
    await rec.notices_of_history()  # read live: noticed when the suspension became known
    # The due release deadline releases the account (leader, fenced, CAS).
    assert await rec.run_deadlines() > 0
    assert rec.releases_done == [ACCT]
    plan = await rec.try_release(ACCT, clock())
    assert plan.why == ALREADY_RELEASED
    await rec.coord.resign(rec.name)
    assert await cstore.redis.get(LEADER) is None

    ran = {c.script for c in calls}
    store_scripts = {n for n in names.values() if n.startswith("Store.")}
    assert store_scripts <= ran, store_scripts - ran  # every Store script ran
    assert {"Coordination._lease", "Coordination._resign", "Coordination._release"} <= ran
    multi = {c.script for c in calls if len(c.keys) > 1}
    assert multi >= {
        "Store._add_facts",
        "Store._load_account",
        "Store._register_owner",
        "Store._route_app_fact",
        "Store._write_status",
        "Store._publish_status",
        "Store._report_room",
        "Store._feed_mark",
        "Store._feed_head",
        "Coordination._lease",
        "Coordination._release",
    }
    for call in calls:
        assert call.keys, call
        assert len({key_slot(k.encode()) for k in call.keys}) == 1, call


# -- the core scenarios over gRPC on the cluster ------------------------------------


async def test_grace_then_suspension_flips_on_time_and_is_announced(
    crec: Reconciler, csidecar: ClusterSidecar, cstore: Store, events: Events, clock: FakeClock
) -> None:
    evs = [*events.app(ACCT, "app-1"), events("overdue_alert", T0 - HOUR, account_id=ACCT)]
    await crec.ingest(deliveries(evs))

    d = await csidecar.create("app-1")
    assert d.allowed
    assert d.reason == pb.DECISION_REASON_OVERDUE_GRACE
    assert ms(d.grace_ends_at) == T0 + 23 * HOUR

    clock.now = T0 + 23 * HOUR - 1
    assert (await csidecar.create("app-1")).allowed
    clock.now = T0 + 23 * HOUR  # R2: no process ran at that moment
    for d in await csidecar.three("app-1"):
        assert not d.allowed
        assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
        assert ms(d.suspended_at) == T0 + 23 * HOUR

    # The deadline (zset on another node than the app) announces the flip.
    assert await cstore.redis.zscore(deadline_key("app:app-1"), "app:app-1") is not None
    assert await crec.run_deadlines(clock()) >= 1
    states = [
        (a["old_state"], a["new_state"])
        for a in await announcements(cstore)
        if a["type"] == "status_changed"
    ]
    assert states == [(None, "GRACE"), ("GRACE", "SUSPENDED")]


async def test_quota_exhaustion_and_payg_restore(
    crec: Reconciler, csidecar: ClusterSidecar, events: Events
) -> None:
    await crec.ingest(deliveries(events.app(ACCT, "app-q", quota=600)))
    assert (await csidecar.create("app-q")).allowed
    await crec.ingest(
        deliveries(
            [
                events(
                    "package_usage",
                    T0 - HOUR,
                    app_id="app-q",
                    package_id="pkg-app-q",
                    used_minutes=600,
                )
            ]
        )
    )

    async def reason_is(reason: int) -> bool:
        return (await csidecar.create("app-q")).reason == reason

    # The cached entry is replaced by the change feed (on another node).
    await eventually(lambda: reason_is(pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED))
    d = await csidecar.recording("app-q")
    assert not d.allowed and ms(d.suspended_at) == T0 - HOUR
    await crec.ingest(deliveries([events("payg_changed", T0, app_id="app-q", enabled=True)]))
    await eventually(lambda: reason_is(pb.DECISION_REASON_OK))


async def test_ban_denies_everything_for_good(
    crec: Reconciler, csidecar: ClusterSidecar, events: Events, clock: FakeClock
) -> None:
    await crec.ingest(deliveries([*events.app(ACCT, "app-1"), *events.app(ACCT, "app-2")]))
    await crec.ingest(
        deliveries([events("compliance_ban", T0 - MINUTE, account_id=ACCT, note="x")])
    )
    await crec.ingest(deliveries([events("arrears_settled", T0, account_id=ACCT)]))
    clock.advance(DAY)
    for app_id in ("app-1", "app-2"):
        for d in await csidecar.three(app_id):
            assert not d.allowed
            assert d.reason == pb.DECISION_REASON_ACCOUNT_BANNED
            assert d.state == pb.APPLICATION_STATE_BANNED
    assert (await csidecar.create("app-unknown")).reason == pb.DECISION_REASON_UNKNOWN_APPLICATION


async def test_class_in_progress_is_protected_until_reported_ended(
    crec: Reconciler, csidecar: ClusterSidecar, events: Events, clock: FakeClock
) -> None:
    clock.now = T0 - 2 * HOUR
    await crec.ingest(deliveries(events.app(ACCT, "app-1")))
    req = pb.ReportClassroomStartedRequest(
        app_id="app-1", room_id="room-1", started_at=ts(T0 - 2 * HOUR)
    )
    req.scheduled_end_time.CopyFrom(ts(T0 + HOUR))
    await csidecar.stub.ReportClassroomStarted(req, timeout=5)
    # Suspended from T0 - 1 h (alert at T0 - 25 h), learned late.
    await crec.ingest(deliveries([events("overdue_alert", T0 - 25 * HOUR, account_id=ACCT)]))
    clock.now = T0

    d = await csidecar.enter("app-1", "room-1")
    assert d.allowed
    assert d.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert ms(d.protected_until) == T0 + 2 * HOUR
    assert ms(d.suspended_at) == T0 - HOUR
    d = await csidecar.enter("app-1", "room-new")
    assert not d.allowed and d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
    assert not (await csidecar.create("app-1")).allowed

    await csidecar.stub.ReportClassroomEnded(
        pb.ReportClassroomEndedRequest(app_id="app-1", room_id="room-1", ended_at=ts(T0 + MINUTE)),
        timeout=5,
    )
    clock.now = T0 + 2 * MINUTE
    d = await csidecar.enter("app-1", "room-1")
    assert not d.allowed
    assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE


async def test_release_across_nodes_is_done_and_announced_once(
    cstore: Store,
    csidecar: ClusterSidecar,
    policy: PolicyConfig,
    events: Events,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    apps = ["app-1", "app-2", "app-4"]
    # The apps' statuses live on all three masters (the account on one).
    assert len(nodes_of(cstore, [status_key(a) for a in apps])) == 3
    evs = [*(e for a in apps for e in events.app(ACCT, a, at=T0 - 200 * DAY))]
    evs.append(events("overdue_alert", T0 - 100 * DAY, account_id=ACCT))
    feed = tmp_path / "events.jsonl"
    feed.write_text("".join(json.dumps(e) + "\n" for e in evs))
    source = FileSource(feed, clock_ms=cstore.server_time)
    # Loaded back when the alert was sent (loaded today, R10's notice would run first).
    rec = Reconciler(
        cstore,
        policy,
        ReconcilerConfig(release_margin_ms=0),
        [source],
        clock=clock,
        recorded_clock=recorded_clock(T0 - 100 * DAY),
    )

    # Before the file is applied there is no watermark: no release.
    plan, _ = await rec.release_plan(ACCT, clock())
    assert not plan.eligible
    assert (await rec.drain(source)).applied == len(evs)
    mark = await rec.watermark()
    # The file vouches for the moment it was applied, in Redis time (TIME).
    assert mark is not None and abs(mark - await cstore.server_time()) < 5_000
    for d in await csidecar.three("app-2"):
        assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
        assert ms(d.release_at) == T0 - 39 * DAY

    rec.token = await rec.coord.hold_lease(rec.name, 5000)
    await rec.notices_of_history()  # read live: noticed when the suspension became known
    plan = await rec.try_release(ACCT, clock())
    assert plan.eligible, plan.why
    assert plan.app_ids == tuple(apps)
    await rec.try_release(ACCT, clock())  # again: nothing more happens

    async def all_released() -> bool:
        for a in apps:
            for d in await csidecar.three(a):
                if d.reason != pb.DECISION_REASON_RESOURCES_RELEASED or d.allowed:
                    return False
        return True

    await eventually(all_released)
    released = [a for a in await announcements(cstore) if a["type"] == "resources_released"]
    assert [(a["account_id"], a["app_ids"]) for a in released] == [(ACCT, apps)]
    assert await cstore.redis.zscore(DEADLINES, f"release:{ACCT}") is None

    # Irreversible: a settlement restores nothing.
    await rec.ingest(deliveries([events("arrears_settled", T0 + MINUTE, account_id=ACCT)]))
    clock.advance(HOUR)
    assert (await csidecar.create("app-1")).reason == pb.DECISION_REASON_RESOURCES_RELEASED


# -- the change feed and the cache ------------------------------------------------


async def test_steady_state_checks_make_no_redis_call_on_any_node(
    crec: Reconciler, csidecar: ClusterSidecar, cstore: Store, events: Events
) -> None:
    apps = ["app-1", "app-2", "app-3"]
    await crec.ingest(deliveries([e for a in apps for e in events.app(ACCT, a)]))
    for a in [*apps, "app-unknown"]:
        await csidecar.create(a)  # warm the cache
    redis = cstore.redis
    assert isinstance(redis, RedisCluster)
    await redis.config_resetstat(target_nodes=RedisCluster.ALL_NODES)
    for _ in range(50):
        for a in apps:
            d = await csidecar.create(a)
            assert d.allowed and not d.degraded
        assert (await csidecar.recording("app-unknown")).reason == (
            pb.DECISION_REASON_UNKNOWN_APPLICATION
        )
    batch = pb.CheckBatchRequest(
        checks=[pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id=a)) for a in apps]
        * 30
    )
    assert all(d.allowed for d in (await csidecar.stub.CheckBatch(batch, timeout=5)).decisions)
    per_node: Any = await redis.info("commandstats", target_nodes=RedisCluster.ALL_NODES)
    assert len(per_node) == 3
    for node, stats in per_node.items():
        called = {k.removeprefix("cmdstat_") for k in stats}
        assert called <= {"xread", "info", "config|resetstat"}, (node, called)
    assert csidecar.sidecar.checker.cache.hits >= 200


async def test_a_change_reaches_the_cache_through_the_feed(
    crec: Reconciler, csidecar: ClusterSidecar, cstore: Store, events: Events
) -> None:
    await crec.ingest(deliveries(events.app(ACCT, "app-2")))
    assert (await csidecar.create("app-2")).reason == pb.DECISION_REASON_OK
    # The app's status and its feed shard share a slot; the shards span the masters.
    shard = feed_shard("app-2")
    assert len(nodes_of(cstore, [feed_key(shard), status_key("app-2")])) == 1
    assert len(nodes_of(cstore, [feed_key(s) for s in range(16)])) == 3
    misses = csidecar.sidecar.checker.cache.misses
    applied = csidecar.sidecar.feed.applied_changes
    seq = csidecar.sidecar.feed.applied[shard]
    await crec.ingest(deliveries([events("compliance_ban", T0 - HOUR, account_id=ACCT)]))

    async def banned() -> bool:
        return (await csidecar.create("app-2")).reason == pb.DECISION_REASON_ACCOUNT_BANNED

    await eventually(banned)
    assert csidecar.sidecar.checker.cache.misses == misses  # no Redis read
    assert csidecar.sidecar.feed.applied_changes == applied + 1
    assert csidecar.sidecar.feed.applied[shard] == (seq or 0) + 1  # no gap


async def test_cold_batch_reads_statuses_from_every_master_in_one_call(
    crec: Reconciler, csidecar: ClusterSidecar, cstore: Store, events: Events
) -> None:
    apps = [f"app-{n}" for n in range(12)]
    assert len(nodes_of(cstore, [status_key(a) for a in apps])) == 3
    await crec.ingest(deliveries([e for a in apps[:6] for e in events.app(ACCT, a)]))
    rows = await cstore.read_rows([(a, None) for a in apps] + [("app-0", "room-9")])
    assert not any(isinstance(r, Exception) for r in rows), rows
    found = [r[0] for r in rows if not isinstance(r, Exception)]
    assert [s is not None for s in found] == [True] * 6 + [False] * 6 + [True]
    assert {s.app_id for s in found if s is not None} == set(apps[:6])
    batch = pb.CheckBatchRequest(
        checks=[pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id=a)) for a in apps]
    )
    decisions = (await csidecar.stub.CheckBatch(batch, timeout=5)).decisions
    assert [d.allowed for d in decisions] == [True] * 6 + [False] * 6
    assert all(d.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION for d in decisions[6:]), decisions


# -- the billing stream's consumer group --------------------------------------------


async def test_stream_consumer_group_ingests_claims_and_acks(
    cstore: Store, policy: PolicyConfig, events: Events, clock: FakeClock
) -> None:
    redis = cstore.redis
    for e in events.app(ACCT, "app-1"):
        await redis.xadd(BILLING_STREAM, {"event": json.dumps(e)})
    source = StreamSource(redis, consumer="c-1", claim_idle_ms=0)
    # Loaded back when the alert was sent (loaded today, R10's notice would run first).
    rec = Reconciler(
        cstore,
        policy,
        ReconcilerConfig(release_margin_ms=0),
        [source],
        clock=clock,
        recorded_clock=recorded_clock(T0 - 100 * DAY),
    )
    stats = await rec.ingest_source(source)
    assert stats.applied == 2
    status, _ = await cstore.read_status("app-1")
    assert status is not None and status.account_id == ACCT
    pending: Any = await redis.xpending(BILLING_STREAM, "lcic-guard")
    assert pending["pending"] == 0

    # A consumer that died holding an entry: XAUTOCLAIM hands it over.
    ban = events("compliance_ban", T0, account_id=ACCT, note="x")
    entry_id: Any = await redis.xadd(BILLING_STREAM, {"event": json.dumps(ban)})
    got: Any = await redis.xreadgroup("lcic-guard", "c-dead", {BILLING_STREAM: ">"}, count=10)
    assert got[0][1][0][0] == entry_id
    assert (await source.watermark() or 0) < int(entry_id.decode().split("-")[0])
    stats = await rec.ingest_source(source)
    assert stats.applied == 1
    status, _ = await cstore.read_status("app-1")
    assert status is not None and status.at(T0).state.value == "BANNED"
    pending = await redis.xpending(BILLING_STREAM, "lcic-guard")
    assert pending["pending"] == 0
    assert (await source.watermark() or 0) >= int(entry_id.decode().split("-")[0])


async def test_running_reconciler_follows_the_stream_into_decisions(
    cstore: Store, csidecar: ClusterSidecar, policy: PolicyConfig, events: Events, clock: FakeClock
) -> None:
    """The whole loop: XADD -> consumer group -> leader lease -> statuses ->
    change feed -> sidecar cache -> gRPC answer, with nothing stepped by hand."""
    source = StreamSource(cstore.redis, consumer="c-run")
    config = ReconcilerConfig(release_margin_ms=0, block_ms=50, tick_ms=20)
    rec = Reconciler(cstore, policy, config, [source], clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(rec.run(stop))
    try:
        assert (await csidecar.create("app-5")).reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
        for e in events.app(ACCT, "app-5"):
            await cstore.redis.xadd(BILLING_STREAM, {"event": json.dumps(e)})

        async def reason_is(reason: int) -> bool:
            return (await csidecar.create("app-5")).reason == reason

        await eventually(lambda: reason_is(pb.DECISION_REASON_OK))
        ban = events("compliance_ban", T0, account_id=ACCT, note="x")
        await cstore.redis.xadd(BILLING_STREAM, {"event": json.dumps(ban)})
        await eventually(lambda: reason_is(pb.DECISION_REASON_ACCOUNT_BANNED))

        async def leading() -> bool:
            return rec.token > 0

        await eventually(leading)
        assert int(await cstore.redis.get(HEARTBEAT) or 0) == clock()
    finally:
        stop.set()
        await task
    assert await cstore.redis.get(LEADER) is None  # resigned on stop


# -- Sentinel ------------------------------------------------------------------------

SENTINEL_PASSWORD = "s3cr%t"  # '%' must be %-encoded in the URL


@pytest.fixture(scope="session")
def sentinel() -> Iterator[SentinelProcs]:
    procs = SentinelProcs(password=SENTINEL_PASSWORD).start()
    yield procs
    procs.stop()


def test_sentinel_urls_are_parsed() -> None:
    t = parse_sentinel_url("redis+sentinel://u:p%40ss@10.0.0.1:26380,sent-2,[::1]:26381/svc/3")
    assert t.sentinels == (("10.0.0.1", 26380), ("sent-2", 26379), ("::1", 26381))
    assert (t.service, t.db) == ("svc", 3)
    assert t.master_options == {"username": "u", "password": "p@ss"}
    assert t.sentinel_options == {}
    t = parse_sentinel_url("rediss+sentinel://:pw@h:1/svc?sentinel_password=sp")
    assert (t.service, t.db, t.sentinels) == ("svc", 0, (("h", 1),))
    assert t.master_options == {"password": "pw", "ssl": True}
    assert t.sentinel_options == {"password": "sp"}
    for bad in (
        "redis+sentinel://h:1",
        "redis+sentinel://h:1/",
        "redis+sentinel:///svc",
        "redis+sentinel://h:x/svc",
        "redis+sentinel://h:1/svc/one",
        "redis+sentinel://h:1/svc/0/extra",
    ):
        with pytest.raises(ValueError, match="redis_url"):
            parse_sentinel_url(bad)


def _status(app_id: str, version: int) -> AppStatus:
    return AppStatus(app_id, ACCT, (Segment(0, ()),), version=version, updated_at=T0)


async def test_store_through_sentinel_writes_and_reads_on_the_master(
    sentinel: SentinelProcs,
) -> None:
    # A dead sentinel first: the next one in the list answers.
    dead = sentinel.dead_port
    url = sentinel.url(db=2, sentinels=[f"127.0.0.1:{dead}", f"127.0.0.1:{sentinel.port}"])
    store = Store(connect(url))
    try:
        assert not isinstance(store.redis, RedisCluster)
        assert (await store.write_status(_status("app-s", 3))).written
        assert not (await store.write_status(_status("app-s", 2))).written  # versioned
        status, _ = await store.read_status("app-s")
        assert status is not None and status.version == 3 and status.account_id == ACCT
    finally:
        await store.close()
    # It went to the master the sentinel names, in the database the URL names.
    db2 = Redis(port=sentinel.master.port, db=2, password=SENTINEL_PASSWORD)
    db0 = Redis(port=sentinel.master.port, db=0, password=SENTINEL_PASSWORD)
    try:
        assert await db2.hget(status_key("app-s"), "version") == b"3"
        assert await db0.exists(status_key("app-s")) == 0
    finally:
        await db2.aclose()
        await db0.aclose()


async def test_sentinel_url_credentials_reach_the_master(sentinel: SentinelProcs) -> None:
    bad = Store(connect(sentinel.url(password="wrong")))
    try:
        # The password of the URL is the one sent (not none: that says NOAUTH).
        with pytest.raises(AuthenticationError, match="invalid username-password"):
            await bad.read_status("app-s")
    finally:
        await bad.close()


async def test_run_ids_name_every_primary_of_the_cluster(cstore: Store) -> None:
    ids = await cstore.run_ids()
    assert len(ids) == 3 and all(len(i) == 40 for i in ids)
