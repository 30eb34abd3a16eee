"""The reconciler on a real redis-server (issue 3).

Sources (the billing stream's consumer group), idempotence, dead letters,
order independence (a hypothesis property), deadlines, release of resources
(R10), leadership, and classes in progress (R6) end to end through the gRPC
sidecar. Nothing stands in for Redis or the network; where a test needs a
replica to pause or a write to fail, it subclasses the real :class:`Store`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.facts import ResourcesReleased
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, AppStatus, PolicyConfig, Reason, State
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.announce import ledger_record
from lcic_guard.reconciler.sources import FileSource, StreamSource
from lcic_guard.sidecar.wire import timestamp
from lcic_guard.store.connect import RedisClient, connect
from lcic_guard.store.keys import (
    BILLING_STREAM,
    DEAD_LETTER_STREAM,
    GUARD_STREAM,
    STATUS_PATTERN,
    deadline_key,
    facts_key,
    meta_key,
    parked_key,
    status_key,
    status_key_app,
)
from lcic_guard.store.status import AccountFacts, Store, WriteResult
from lcic_guard.tasks import stop_task, stop_tasks

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

GRACE = PolicyConfig().grace_ms
RELEASE_AFTER = PolicyConfig().release_after_ms


# ---------------------------------------------------------------------------
# Helpers: read what the reconciler left in Redis.


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def guard_events(store: Store, kind: str | None = None) -> list[dict[str, Any]]:
    """The reconciler's announcements on lcic:guard:events, oldest first."""
    rows: Any = await store.redis.xrange(GUARD_STREAM)
    out = [json.loads(fields[b"event"]) for _id, fields in rows]
    return [e for e in out if kind is None or e["type"] == kind]


async def changes_of(store: Store, app_id: str) -> list[tuple[str | None, str]]:
    """(old_state, new_state) of every status_changed announced for an app."""
    return [
        (e["old_state"], e["new_state"])
        for e in await guard_events(store, "status_changed")
        if e["app_id"] == app_id
    ]


async def due_at(store: Store, member: str) -> float | None:
    """When a deadline member is due, wherever it lives (its shard, or the
    leader's set for a release)."""
    return await store.redis.zscore(deadline_key(member), member)


async def dead_letters(store: Store) -> list[dict[str, str]]:
    rows: Any = await store.redis.xrange(DEAD_LETTER_STREAM)
    return [{_s(k): _s(v) for k, v in fields.items()} for _id, fields in rows]


async def seq_of(store: Store, account_id: str) -> int:
    return int(await store.redis.hget(meta_key(account_id), "seq") or 0)


async def status_of(store: Store, app_id: str) -> AppStatus:
    status, _room = await store.read_status(app_id)
    assert status is not None, f"no status for {app_id}"
    return status


async def status_table(redis: RedisClient) -> dict[str, str]:
    """The ``data`` field of every status hash."""
    out: dict[str, str] = {}
    async for key in redis.scan_iter(match=STATUS_PATTERN, count=1000):
        data = await redis.hget(key, "data")
        if data is not None:
            out[_s(key)] = _s(data)
    return out


async def fact_table(redis: RedisClient) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    async for key in redis.scan_iter(match="lcic:acct:{*}:facts", count=1000):
        raw = await redis.hgetall(key)
        out[_s(key)] = {_s(k): _s(v) for k, v in raw.items()}
    return out


async def publish(redis: RedisClient, evs: list[dict[str, Any]] | list[str]) -> list[str]:
    ids = []
    for e in evs:
        ids.append(
            _s(
                await redis.xadd(
                    BILLING_STREAM, {"event": e if isinstance(e, str) else json.dumps(e)}
                )
            )
        )
    return ids


async def pending_count(redis: RedisClient, group: str) -> int:
    info = await redis.xpending(BILLING_STREAM, group)
    return int(info["pending"])


def stream_source(store: Store, consumer: str, *, claim_idle_ms: int = 60_000) -> StreamSource:
    return StreamSource(store.redis, group="g", consumer=consumer, claim_idle_ms=claim_idle_ms)


async def feed(
    rec: Reconciler,
    src: StreamSource,
    evs: list[dict[str, Any]],
    *,
    recorded_at: Millis | None = None,
) -> None:
    """Publish onto the billing stream and ingest until the group is drained;
    with ``recorded_at``, as if the reconciler had stored the facts then (a
    history read live rather than backfilled today)."""
    await publish(rec.store.redis, evs)
    while (await rec.ingest_source(src, recorded_at=recorded_at)).received:
        pass


class FlakyStore(Store):
    """The real store whose next status write fails, as if Redis dropped the
    connection in the middle of an ingest."""

    fail_next = False

    async def write_status(self, status: AppStatus) -> WriteResult:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("injected: connection lost")
        return await super().write_status(status)


class PausingStore(Store):
    """The real store; once armed, its next ``load_account_facts`` stalls after
    reading until released, as a replica that pauses (GC, preemption) between
    reading an account's facts and acting on them."""

    def __init__(self, redis: RedisClient) -> None:
        super().__init__(redis)
        self.gate: asyncio.Event | None = None
        self.paused = asyncio.Event()

    def arm(self) -> asyncio.Event:
        self.gate = asyncio.Event()
        self.paused.clear()
        return self.gate

    async def load_account_facts(self, account_id: str) -> AccountFacts:
        result = await super().load_account_facts(account_id)
        if self.gate is not None:
            gate, self.gate = self.gate, None
            self.paused.set()
            await gate.wait()
        return result


def quick(**overrides: Any) -> ReconcilerConfig:
    """A reconciler config for tests: no release margin, short waits."""
    base: dict[str, Any] = {"release_margin_ms": 0, "block_ms": 10, "announce_settle_ms": 0}
    return ReconcilerConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------
# (1) The billing stream through a consumer group.


async def test_stream_entries_acked_only_after_their_effect_is_durable(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    src = stream_source(store, "c1")
    await publish(store.redis, events.app("acct-1", "app-1"))

    got = await src.fetch(10, 10)
    assert len(got) == 2
    assert await pending_count(store.redis, "g") == 2
    rec = Reconciler(store, policy, quick(), [src], clock=clock)
    await rec.ingest(got)
    assert (await status_of(store, "app-1")).at(T0).state is State.ACTIVE
    assert await pending_count(store.redis, "g") == 2, "ingest itself must not acknowledge"
    await src.ack(got)
    assert await pending_count(store.redis, "g") == 0


async def test_failed_ingest_leaves_entries_pending_and_they_are_redone(
    redis_server: EmbeddedRedis,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    flaky = FlakyStore(connect(redis_server.url))
    try:
        src = StreamSource(flaky.redis, group="g", consumer="c1", claim_idle_ms=60_000)
        rec = Reconciler(flaky, policy, quick(), [src], clock=clock)
        await publish(store.redis, [*events.app("acct-1", "app-1")])
        flaky.fail_next = True
        with pytest.raises(ConnectionError):
            await rec.ingest_source(src)
        # The facts may be stored, but the status was not: nothing acknowledged.
        assert await pending_count(store.redis, "g") == 2
        assert await store.redis.hget(status_key("app-1"), "data") is None

        stats = await rec.ingest_source(src)  # the same consumer re-reads its pending entries
        assert stats.received == 2
        assert await pending_count(store.redis, "g") == 0
        assert (await status_of(store, "app-1")).at(T0).state is State.ACTIVE
        assert await seq_of(store, "acct-1") == 1, "redelivered facts are stored once"
    finally:
        await flaky.close()


async def test_entries_of_a_dead_consumer_are_claimed_by_another(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    evs = [*events.app("acct-1", "app-1"), events("overdue_alert", T0 - HOUR, account_id="acct-1")]
    ids = await publish(store.redis, evs)
    dead = stream_source(store, "dies", claim_idle_ms=200)
    taken = await dead.fetch(10, 10)  # and never acknowledges: it died
    assert [d.token for d in taken] == ids

    survivor = stream_source(store, "survivor", claim_idle_ms=200)
    rec = Reconciler(store, policy, quick(), [survivor], clock=clock)
    assert (await rec.ingest_source(survivor)).received == 0, "claimed before claim_idle_ms"
    assert await store.redis.hget(status_key("app-1"), "data") is None

    await asyncio.sleep(0.3)
    stats = await rec.ingest_source(survivor)
    assert stats.received == 3
    assert await pending_count(store.redis, "g") == 0
    assert (await status_of(store, "app-1")).at(T0).state is State.GRACE


async def test_stream_entry_without_event_field_is_dead_lettered(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> None:
    await store.redis.xadd(BILLING_STREAM, {"payload": '{"type":"overdue_alert"}'})
    src = stream_source(store, "c1")
    rec = Reconciler(store, policy, quick(), [src], clock=clock)
    stats = await rec.ingest_source(src)
    assert stats.dead_lettered == 1
    [dl] = await dead_letters(store)
    assert dl["reason"] and dl["source"] == "stream"
    assert "payload" in dl["event"]
    assert await pending_count(store.redis, "g") == 0
    assert await status_table(store.redis) == {}


async def test_entry_deleted_while_pending_is_dropped_not_dead_lettered(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    [first] = await publish(store.redis, [events("overdue_alert", T0, account_id="acct-1")])
    src = stream_source(store, "c1")
    assert len(await src.fetch(10, 10)) == 1  # pending, then the stream is trimmed
    await store.redis.xdel(BILLING_STREAM, first)
    await publish(store.redis, events.app("acct-1", "app-1"))
    rec = Reconciler(store, policy, quick(), [src], clock=clock)
    for _ in range(3):
        await rec.ingest_source(src)
    assert (await status_of(store, "app-1")).at(T0).state is State.ACTIVE
    assert await pending_count(store.redis, "g") == 0
    assert await dead_letters(store) == [], "a trimmed entry is not a malformed event"


# ---------------------------------------------------------------------------
# (2) Idempotence.


async def test_repeated_event_id_is_a_no_op(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    evs = [*events.app("acct-1", "app-1"), events("overdue_alert", T0 - HOUR, account_id="acct-1")]
    await reconciler.ingest(deliveries(evs))
    seq = await seq_of(store, "acct-1")
    before = await status_of(store, "app-1")
    announced = await guard_events(store)
    assert [(c[0], c[1]) for c in await changes_of(store, "app-1")] == [(None, "GRACE")]

    stats = await reconciler.ingest(deliveries([*evs, *evs]))  # again, twice in one batch
    assert stats.applied == 0 and stats.duplicates == 2 * len(evs)
    # The alert alone, redelivered later: a duplicate. Its account is looked
    # at again (a redelivery finishes what a crash cut short), to no effect.
    again = await reconciler.ingest(deliveries(evs[2:]))
    assert (again.received, again.applied, again.duplicates) == (1, 0, 1)
    assert (again.dead_lettered, again.parked, again.accounts) == (0, 0, {"acct-1"})
    assert await seq_of(store, "acct-1") == seq
    after = await status_of(store, "app-1")
    assert after.version == before.version and after.segments == before.segments
    assert await guard_events(store) == announced
    assert await dead_letters(store) == []


async def test_reused_event_id_with_other_content_is_dead_lettered(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    alert = events("overdue_alert", T0 - HOUR, account_id="acct-1")
    await reconciler.ingest(deliveries([alert]))
    seq = await seq_of(store, "acct-1")
    before = await status_of(store, "app-1")

    forged = {**alert, "occurred_at": format_time(T0 - 30 * HOUR)}  # would suspend at once
    stats = await reconciler.ingest(deliveries([forged]))
    assert stats.dead_lettered == 1 and stats.applied == 0
    [dl] = await dead_letters(store)
    assert "reused" in dl["reason"] and alert["event_id"] in dl["reason"] + dl["event"]
    assert json.loads(dl["event"]).get("occurred_at") == forged["occurred_at"], (
        "the dead letter keeps the rejected event itself"
    )
    assert await seq_of(store, "acct-1") == seq
    after = await status_of(store, "app-1")
    assert after.version == before.version and after.at(T0).state is State.GRACE


# ---------------------------------------------------------------------------
# (3) Invalid events; facts of applications not yet registered.


async def test_invalid_events_are_dead_lettered_with_a_reason_and_change_nothing(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    before = await status_of(store, "app-1")
    seq = await seq_of(store, "acct-1")
    announced = await guard_events(store)
    at = format_time(T0 - HOUR)
    bad: list[tuple[str, str]] = [
        ('{"event_id": "x1", "type": "overdue_alert",', "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        (json.dumps({"event_id": "x2", "occurred_at": at, "account_id": "acct-1"}), "type"),
        (
            json.dumps({"event_id": "x3", "type": "refund_issued", "occurred_at": at}),
            "unknown event type",
        ),
        (
            json.dumps(
                {
                    "event_id": "x4",
                    "type": "resources_released",
                    "occurred_at": at,
                    "account_id": "acct-1",
                }
            ),
            "unknown event type",
        ),
        (json.dumps({"event_id": "x5", "type": "overdue_alert", "occurred_at": at}), "account_id"),
        (
            json.dumps({"event_id": "x6", "type": "overdue_alert", "account_id": "acct-1"}),
            "occurred_at",
        ),
        (
            json.dumps(
                {
                    "event_id": "x7",
                    "type": "overdue_alert",
                    "occurred_at": "2026-09-21 10:00",
                    "account_id": "acct-1",
                }
            ),
            "occurred_at",
        ),
        (
            json.dumps(
                {
                    "event_id": "x8",
                    "type": "package_usage",
                    "occurred_at": at,
                    "app_id": "app-1",
                    "package_id": "pkg-app-1",
                    "used_minutes": "6000",
                }
            ),
            "used_minutes",
        ),
        (
            json.dumps(
                {
                    "event_id": "x9",
                    "type": "payg_changed",
                    "occurred_at": at,
                    "app_id": "app-1",
                    "enabled": "yes",
                }
            ),
            "enabled",
        ),
        (
            json.dumps(
                {
                    "event_id": "x10",
                    "type": "compliance_ban",
                    "occurred_at": at,
                    "account_id": "acct 1!",
                }
            ),
            "account_id",
        ),
    ]
    stats = await reconciler.ingest(deliveries([raw for raw, _ in bad]))
    assert stats.dead_lettered == len(bad) and stats.applied == 0
    letters = await dead_letters(store)
    assert len(letters) == len(bad)
    for (raw, why), dl in zip(bad, letters, strict=True):
        assert why in dl["reason"], (raw, dl["reason"])
        assert dl["event"] == raw
    after = await status_of(store, "app-1")
    assert after.version == before.version and after.segments == before.segments
    assert await seq_of(store, "acct-1") == seq
    assert await guard_events(store) == announced


async def test_facts_of_an_unknown_app_are_parked_until_it_is_registered(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    reg, pkg = events.app("acct-1", "app-9", quota=600)
    usage = events(
        "package_usage", T0 - 2 * HOUR, app_id="app-9", package_id="pkg-app-9", used_minutes=600
    )
    alert = events("overdue_alert", T0 - HOUR, account_id="acct-1")

    stats = await reconciler.ingest(deliveries([pkg, usage]))
    assert stats.parked == 2 and stats.applied == 0
    assert await store.redis.hget(status_key("app-9"), "data") is None
    assert await store.redis.hlen(parked_key("app-9")) == 2
    # Parked, not dead: the dead-letter stream holds only what is never applied.
    assert await dead_letters(store) == []

    await reconciler.ingest(deliveries([alert]))  # the account is known before its app
    assert await store.redis.hget(status_key("app-9"), "data") is None

    await reconciler.ingest(deliveries([reg]))
    status = await status_of(store, "app-9")
    seg = status.at(T0)
    assert seg.state is State.SUSPENDED
    assert seg.reasons == (Reason.PACKAGE_QUOTA_EXHAUSTED, Reason.OVERDUE_GRACE)
    assert await store.redis.hlen(parked_key("app-9")) == 0
    late = await status_table(store.redis)

    # Same facts in order, from scratch: the same status.
    await store.redis.flushall()
    await reconciler.ingest(deliveries([reg, pkg, usage, alert]))
    assert await status_table(store.redis) == late


# ---------------------------------------------------------------------------
# (4) Order independence, as a property over random histories.

HOURS = st.integers(-96, 96).map(lambda h: T0 + h * HOUR)


@st.composite
def histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A random billing history of two accounts with one to three apps each."""
    ev = Events()
    for acct in ("acct-a", "acct-b"):
        for i in range(draw(st.integers(1, 3))):
            app = f"{acct}-app{i}"
            for _ in range(draw(st.integers(1, 2))):  # a registration may be repeated
                ev("application_registered", draw(HOURS), account_id=acct, app_id=app)
            packages = []
            for k in range(draw(st.integers(0, 2))):
                start = draw(HOURS)
                pkg = f"{app}-p{k}"
                packages.append(pkg)
                ev(
                    "package_purchased",
                    draw(HOURS),
                    app_id=app,
                    package_id=pkg,
                    starts_at=start,
                    expires_at=start + draw(st.integers(1, 120)) * HOUR,
                    quota_minutes=draw(st.integers(0, 100)),
                )
            for _ in range(draw(st.integers(0, 3))):
                ev(
                    "package_usage",
                    draw(HOURS),
                    app_id=app,
                    package_id=draw(st.sampled_from([*packages, f"{app}-unbought"])),
                    used_minutes=draw(st.integers(0, 150)),
                )
            for _ in range(draw(st.integers(0, 2))):
                ev("payg_changed", draw(HOURS), app_id=app, enabled=draw(st.booleans()))
        for _ in range(draw(st.integers(0, 3))):
            ev("overdue_alert", draw(HOURS), account_id=acct, amount_due="12.50")
        for _ in range(draw(st.integers(0, 2))):
            ev("arrears_settled", draw(HOURS), account_id=acct)
        if draw(st.integers(0, 4)) == 0:
            ev("compliance_ban", draw(HOURS), account_id=acct, note="terms")
    if draw(st.booleans()):  # facts of an app that is never registered
        ev("payg_changed", draw(HOURS), app_id="ghost-app", enabled=True)
    return ev.made


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories(), rnd=st.randoms(use_true_random=False))
async def test_any_delivery_order_gives_the_same_status_table(
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    history: list[dict[str, Any]],
    rnd: random.Random,
) -> None:
    raws = [json.dumps(e) for e in history]
    # Read after the history's last fact: one dated ahead of the reconciler's
    # clock would be dead-lettered (SPEC §2), which is not what this is about.
    clock.now = T0 + 96 * HOUR

    await store.redis.flushall()
    rec = Reconciler(store, policy, quick(), clock=clock)
    await rec.ingest(deliveries(raws))
    expected = await status_table(store.redis)
    expected_facts = await fact_table(store.redis)
    registered = {e["app_id"] for e in history if e["type"] == "application_registered"}
    assert {status_key_app(k) for k in expected} == registered

    # Permuted, with duplicates, in random batches, through a fresh replica.
    shuffled = [*raws, *rnd.choices(raws, k=rnd.randint(0, len(raws)))]
    rnd.shuffle(shuffled)
    cuts = sorted(rnd.sample(range(1, len(shuffled)), k=min(len(shuffled) - 1, rnd.randint(0, 6))))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]

    await store.redis.flushall()
    other = Reconciler(store, policy, quick(), clock=clock)
    for batch in batches:
        await other.ingest(deliveries(batch))
    assert await status_table(store.redis) == expected
    assert await fact_table(store.redis) == expected_facts


# ---------------------------------------------------------------------------
# (5) Deadlines and announcements.


async def test_deadlines_hold_the_next_transition(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-1", "app-1"),
                events("overdue_alert", T0 - HOUR, account_id="acct-1"),
            ]
        )
    )
    grace_end = T0 - HOUR + GRACE
    assert await due_at(store, "app:app-1") == grace_end
    assert await due_at(store, "release:acct-1") == grace_end + RELEASE_AFTER

    # Settled in grace: the next transition is the package's expiry; no release.
    await reconciler.ingest(deliveries([events("arrears_settled", T0 - 1, account_id="acct-1")]))
    assert await due_at(store, "app:app-1") == T0 + 20 * DAY
    assert await due_at(store, "release:acct-1") is None


async def test_grace_end_is_announced_exactly_once_when_due(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-1", "app-1"),
                events("overdue_alert", T0 - HOUR, account_id="acct-1"),
            ]
        )
    )
    grace_end = T0 - HOUR + GRACE
    assert await changes_of(store, "app-1") == [(None, "GRACE")]

    # Only the suspension_scheduled reminder (an hour before) is due by then.
    await reconciler.run_deadlines(grace_end - 1)
    assert await changes_of(store, "app-1") == [(None, "GRACE")]

    assert await reconciler.run_deadlines(grace_end) >= 1
    for _ in range(3):
        await reconciler.run_deadlines(grace_end + MINUTE)
    changes = await guard_events(store, "status_changed")
    assert [(c["old_state"], c["new_state"]) for c in changes] == [
        (None, "GRACE"),
        ("GRACE", "SUSPENDED"),
    ]
    last = changes[-1]
    assert last["app_id"] == "app-1" and last["account_id"] == "acct-1"
    assert last["old_reasons"] == ["OVERDUE_GRACE"] and last["reasons"] == ["ACCOUNT_OVERDUE"]
    assert last["occurred_at"] == format_time(grace_end)
    assert last["suspended_at"] == format_time(grace_end)
    assert last["release_at"] == format_time(grace_end + RELEASE_AFTER)
    # The next deadline is the package's expiry.
    assert await due_at(store, "app:app-1") == T0 + 20 * DAY


async def test_racing_replicas_announce_each_change_once(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    r1 = Reconciler(store, policy, quick(), clock=clock, name="r1")
    r2 = Reconciler(store, policy, quick(), clock=clock, name="r2")
    batch = deliveries(
        [
            *events.app("acct-1", "app-1"),
            *events.app("acct-1", "app-2"),
            events("overdue_alert", T0 - HOUR, account_id="acct-1"),
        ]
    )
    # Both replicas got the same batch (an at-least-once redelivery).
    await asyncio.gather(r1.ingest(batch), r2.ingest(batch), r1.ingest(batch))
    assert await seq_of(store, "acct-1") == 1
    assert await store.redis.hlen(facts_key("acct-1")) == 5

    grace_end = T0 - HOUR + GRACE
    await asyncio.gather(
        r1.run_deadlines(grace_end), r2.run_deadlines(grace_end), r2.run_deadlines(grace_end)
    )
    for app in ("app-1", "app-2"):
        assert await changes_of(store, app) == [(None, "GRACE"), ("GRACE", "SUSPENDED")]


async def test_a_paused_replica_cannot_undo_a_newer_status(
    redis_server: EmbeddedRedis,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    """A replica that read the facts, paused, and resumed after another added
    an alert must not announce, schedule or unschedule from its old view."""
    paused_store = PausingStore(connect(redis_server.url))
    try:
        slow = Reconciler(paused_store, policy, quick(), clock=clock, name="slow")
        fast = Reconciler(store, policy, quick(), clock=clock, name="fast")
        await fast.ingest(deliveries(events.app("acct-1", "app-1")))
        gate = paused_store.arm()
        task = asyncio.create_task(slow.recompute("acct-1"))
        await asyncio.wait_for(paused_store.paused.wait(), 5)

        await fast.ingest(deliveries([events("overdue_alert", T0 - HOUR, account_id="acct-1")]))
        gate.set()
        await asyncio.wait_for(task, 5)

        assert (await status_of(store, "app-1")).at(T0).state is State.GRACE
        assert await changes_of(store, "app-1") == [(None, "ACTIVE"), ("ACTIVE", "GRACE")]
        grace_end = T0 - HOUR + GRACE
        assert await due_at(store, "app:app-1") == grace_end
        assert await due_at(store, "release:acct-1") == grace_end + RELEASE_AFTER
        # ... so the leader still announces the suspension when it falls due.
        await fast.run_deadlines(grace_end)
        assert (await changes_of(store, "app-1"))[-1] == ("GRACE", "SUSPENDED")
    finally:
        await paused_store.close()


# ---------------------------------------------------------------------------
# (6) Release of resources (R10).


def overdue_history(
    events: Events, account: str, apps: list[str], alert_at: Millis
) -> list[dict[str, Any]]:
    """Apps whose packages last for ages; the account alerted at ``alert_at``
    and never settles: suspended only for ACCOUNT_OVERDUE."""
    evs: list[dict[str, Any]] = []
    for app in apps:
        evs += events.app(account, app, at=alert_at - 10 * DAY, expires=alert_at + 400 * DAY)
    evs.append(events("overdue_alert", alert_at, account_id=account))
    return evs


async def leader(
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    name: str,
    sources: list[StreamSource],
    **cfg: Any,
) -> Reconciler:
    """A reconciler that holds the leader lease."""
    rec = Reconciler(store, policy, quick(**cfg), sources, clock=clock, name=name)
    rec.token = await rec.coord.hold_lease(name, 60_000)
    assert rec.token > 0
    return rec


async def noticed(rec: Reconciler, account: str, at: Millis) -> None:
    """Give the account's release the notice R10 requires, as made at ``at``
    (these tests feed a history today as if it had been read live: its first
    notice would have been made when the suspension became known)."""
    loaded = await rec.store.load_account_facts(account)
    statuses = rec._compute(loaded)
    release_at = next(iter(statuses.values())).at(rec.clock()).release_at
    assert release_at is not None
    record = await rec.announcer.evidence_notice(account, loaded, statuses, release_at, 0, at)
    assert record is not None and record.committed_at == at


async def released_facts(store: Store, account: str) -> list[str]:
    raw = await store.redis.hgetall(facts_key(account))
    return [_s(k) for k, v in raw.items() if b"resources_released" in v]


async def test_release_happens_once_when_due_and_never_before(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    alert_at = now - 62 * DAY
    release_at = alert_at + GRACE + RELEASE_AFTER  # a day ago
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(
        rec,
        src,
        overdue_history(events, "acct-1", ["app-1", "app-2"], alert_at),
        recorded_at=alert_at,
    )
    await noticed(rec, "acct-1", alert_at + GRACE)
    assert await due_at(store, "release:acct-1") == release_at

    clock.now = release_at - 1
    plan = await rec.try_release("acct-1", clock.now)
    assert not plan.eligible and "due at" in plan.why
    seg = (await status_of(store, "app-1")).at(clock.now)
    assert seg.reasons == (Reason.ACCOUNT_OVERDUE,) and seg.release_at == release_at

    # With a margin, not even at release_at.
    careful = Reconciler(
        store, policy, quick(release_margin_ms=HOUR), [src], clock=clock, name="r1"
    )
    careful.token = rec.token
    assert not (await careful.try_release("acct-1", release_at + 30 * MINUTE)).eligible
    assert await released_facts(store, "acct-1") == []
    assert await guard_events(store, "resources_released") == []

    clock.now = now
    plan = await rec.try_release("acct-1", now)
    assert plan.eligible and plan.app_ids == ("app-1", "app-2")
    for _ in range(3):
        await rec.try_release("acct-1", now)
    await rec.run_deadlines(now + DAY)
    assert rec.releases_done == ["acct-1"]
    assert len(await released_facts(store, "acct-1")) == 1
    [announced] = await guard_events(store, "resources_released")
    assert announced["account_id"] == "acct-1" and announced["app_ids"] == ["app-1", "app-2"]
    for app in ("app-1", "app-2"):
        seg = (await status_of(store, app)).at(now)
        assert seg.state is State.RELEASED and seg.reasons[0] is Reason.RESOURCES_RELEASED
        assert await changes_of(store, app) == [(None, "SUSPENDED"), ("SUSPENDED", "RELEASED")]
    assert await due_at(store, "release:acct-1") is None


async def test_release_is_announced_once_by_racing_reconcilers(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    r1 = await leader(store, policy, clock, "r1", [src])
    r2 = Reconciler(store, policy, quick(), [src], clock=clock, name="r2")
    await feed(
        r1,
        src,
        overdue_history(events, "acct-1", ["app-1"], now - 62 * DAY),
        recorded_at=now - 62 * DAY,
    )
    await feed(
        r1,
        src,
        overdue_history(events, "acct-2", ["app-2"], now - 62 * DAY),
        recorded_at=now - 62 * DAY,
    )
    await feed(
        r1,
        src,
        overdue_history(events, "acct-3", ["app-3"], now - 62 * DAY),
        recorded_at=now - 62 * DAY,
    )
    for account in ("acct-1", "acct-2", "acct-3"):
        await noticed(r1, account, now - 61 * DAY)
    payload: dict[str, dict[str, Any]] = {}

    await asyncio.gather(*(r.try_release("acct-1", now) for r in (r1, r2, r1, r2)))
    await asyncio.gather(*(r.try_release("acct-1", now) for r in (r2, r1)))
    assert len(await released_facts(store, "acct-1")) == 1
    assert [e["account_id"] for e in await guard_events(store, "resources_released")] == ["acct-1"]
    # r2 never held the lease (r1 does): it could not commit, and left the lease to r1.
    assert r1.releases_done == ["acct-1"] and r2.releases_done == []
    assert r2.token == 0 and await r1.coord.lease_token("r1") == r1.token

    # A leader that recorded a release and claimed its announcement is about
    # to add it to the stream (acct-2), or died before it could (acct-3).
    for account in ("acct-2", "acct-3"):
        plan, seq = await r1.release_plan(account, now)
        assert plan.eligible
        fact = ResourcesReleased(f"lcic-guard:release:{account}:{plan.release_at}", now, account)
        assert await r1.coord.record_release(account, r1.token, seq, fact) == seq + 1
        payload[account] = {
            "type": "resources_released",
            "announcement_id": f"release:{account}",
            "occurred_at": format_time(now),
            "account_id": account,
            "app_ids": list(plan.app_ids),
        }
        claim = json.dumps({"claimed_at": now, "payload": payload[account]}, sort_keys=True)
        assert await r1.coord.ledger_claim(account, f"release:{account}", claim, now, 10_000) == 1
    # Others come by while the writer of acct-2 is still at work: they leave it be.
    await asyncio.gather(*(r.try_release(a, now) for r in (r2, r1) for a in ("acct-2", "acct-3")))
    assert await guard_events(store, "resources_released") != []  # acct-1 only
    assert len(await guard_events(store, "resources_released")) == 1
    await store.announce(payload["acct-2"])
    record = ledger_record(payload["acct-2"], now, "run").to_json()
    await r1.coord.ledger_commit("acct-2", "release:acct-2", record)
    # Later, the abandoned announcement of acct-3 is finished, once.
    clock.now = now + 60_000
    await asyncio.gather(r1.run_deadlines(clock.now), r2.run_deadlines(clock.now))
    await asyncio.gather(
        *(r.try_release(a, clock.now) for r in (r2, r1) for a in ("acct-2", "acct-3"))
    )
    assert Counter(e["account_id"] for e in await guard_events(store, "resources_released")) == {
        "acct-1": 1,
        "acct-2": 1,
        "acct-3": 1,
    }


async def test_release_needs_a_watermark_past_release_at(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, tmp_path: Path
) -> None:
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(
        rec,
        src,
        overdue_history(events, "acct-1", ["app-1"], now - 62 * DAY),
        recorded_at=now - 62 * DAY,
    )

    blind = await leader(store, policy, clock, "r1", [])  # no source: no watermark
    assert await blind.watermark() is None
    plan = await blind.try_release("acct-1", now)
    assert not plan.eligible and "unknown" in plan.why
    assert await released_facts(store, "acct-1") == []

    # A snapshot file not yet applied vouches for nothing either.
    path = tmp_path / "snapshot.jsonl"
    path.write_text(json.dumps(events("overdue_alert", now - DAY, account_id="acct-9")) + "\n")
    file_src = FileSource(path, clock_ms=store.server_time)
    with_file = Reconciler(store, policy, quick(), [file_src, src], clock=clock, name="r1")
    with_file.token = rec.token
    assert await with_file.watermark() is None
    assert not (await with_file.try_release("acct-1", now)).eligible
    await with_file.drain(file_src)
    assert (await with_file.watermark() or 0) >= now - 1000
    assert await released_facts(store, "acct-1") == []


async def test_release_waits_for_unread_entries_and_a_late_earlier_settlement_prevents_it(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    # release_at (+ margin 0) a moment from now, in Redis's own time.
    release_at = await store.server_time() + 400
    alert_at = release_at - GRACE - RELEASE_AFTER
    clock.now = release_at  # the settlement below is no fact from the future
    await feed(
        rec, src, overdue_history(events, "acct-1", ["app-1"], alert_at), recorded_at=alert_at
    )
    # The billing system settled before release_at; the entry is on the
    # stream (added before release_at) but not applied yet.
    await publish(store.redis, [events("arrears_settled", release_at - HOUR, account_id="acct-1")])
    await asyncio.sleep(max(0, release_at + 50 - await store.server_time()) / 1000)
    assert await store.server_time() > release_at

    clock.now = release_at + 100
    plan = await rec.try_release("acct-1", clock.now)
    assert not plan.eligible and "confirmed read only up to" in plan.why
    await rec.run_deadlines(clock.now + DAY)
    assert await released_facts(store, "acct-1") == []

    assert (await rec.ingest_source(src)).received == 1  # the late settlement arrives
    plan = await rec.try_release("acct-1", clock.now)
    assert not plan.eligible
    await rec.run_deadlines(clock.now + 2 * DAY)
    assert await released_facts(store, "acct-1") == []
    assert await guard_events(store, "resources_released") == []
    seg = (await status_of(store, "app-1")).at(clock.now)
    assert seg.state is State.ACTIVE
    assert await due_at(store, "release:acct-1") is None


async def test_release_is_abandoned_when_facts_arrive_between_plan_and_commit(
    redis_server: EmbeddedRedis,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    now = clock.now = wall_clock()
    release_at = now - 62 * DAY + GRACE + RELEASE_AFTER
    paused_store = PausingStore(connect(redis_server.url))
    try:
        src = StreamSource(paused_store.redis, group="g", consumer="c1", claim_idle_ms=60_000)
        rec = Reconciler(paused_store, policy, quick(), [src], clock=clock, name="r1")
        rec.token = await rec.coord.hold_lease("r1", 60_000)
        other = Reconciler(store, policy, quick(), clock=clock, name="r2")
        await feed(
            rec,
            src,
            overdue_history(events, "acct-1", ["app-1"], now - 62 * DAY),
            recorded_at=now - 62 * DAY,
        )

        gate = paused_store.arm()
        task = asyncio.create_task(rec.try_release("acct-1", now))
        await asyncio.wait_for(paused_store.paused.wait(), 5)  # it has decided to release...
        settled = events("arrears_settled", release_at - HOUR, account_id="acct-1")
        await other.ingest(deliveries([settled]))  # ... and a settlement lands meanwhile
        gate.set()
        await asyncio.wait_for(task, 5)

        assert await released_facts(store, "acct-1") == []
        assert rec.releases_done == []
        assert await guard_events(store, "resources_released") == []
        assert (await status_of(store, "app-1")).at(now).state is State.ACTIVE
    finally:
        await paused_store.close()


async def test_a_leader_with_an_older_token_cannot_release(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    old = Reconciler(store, policy, quick(), [src], clock=clock, name="old")
    await feed(
        old,
        src,
        overdue_history(events, "acct-1", ["app-1"], now - 62 * DAY),
        recorded_at=now - 62 * DAY,
    )
    await noticed(old, "acct-1", now - 61 * DAY)
    old.token = await old.coord.hold_lease("old", 100)
    plan, seq = await old.release_plan("acct-1", now)
    assert plan.eligible  # the old leader decided, then paused past its lease

    await asyncio.sleep(0.2)
    new = Reconciler(store, policy, quick(release_dry_run=True), [src], clock=clock, name="new")
    new.token = await new.coord.hold_lease("new", 60_000)
    assert new.token > old.token

    assert not (await old.try_release("acct-1", now)).eligible
    assert await released_facts(store, "acct-1") == []

    # The new leader looks at the account (a dry run: no facts change), so
    # even a commit of the old leader's plan on unchanged facts is refused.
    assert (await new.try_release("acct-1", now)).eligible
    fact = ResourcesReleased(f"lcic-guard:release:acct-1:{plan.release_at}", now, "acct-1")
    assert await old.coord.record_release("acct-1", old.token, seq, fact) == -1
    assert await released_facts(store, "acct-1") == []
    assert await guard_events(store, "resources_released") == []

    real = Reconciler(store, policy, quick(), [src], clock=clock, name="new")
    real.token = new.token
    assert (await real.try_release("acct-1", now)).eligible
    assert len(await guard_events(store, "resources_released")) == 1


async def test_dry_run_lists_the_release_but_does_not_perform_it(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    release_at = now - 62 * DAY + GRACE + RELEASE_AFTER
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src], release_dry_run=True)
    await feed(
        rec,
        src,
        overdue_history(events, "acct-1", ["app-1", "app-2"], now - 62 * DAY),
        recorded_at=now - 62 * DAY,
    )
    await feed(
        rec,
        src,
        overdue_history(events, "acct-2", ["app-3"], now - 30 * DAY),
        recorded_at=now - 30 * DAY,
    )
    await noticed(rec, "acct-1", now - 61 * DAY)

    await rec.run_deadlines(now)
    [planned] = rec.releases_planned
    assert planned.account_id == "acct-1" and planned.eligible
    assert planned.app_ids == ("app-1", "app-2") and planned.release_at == release_at
    plans = {p.account_id: p for p in await rec.plan_releases(now)}
    assert plans["acct-1"].eligible
    assert not plans["acct-2"].eligible and "due at" in plans["acct-2"].why
    assert await released_facts(store, "acct-1") == []
    assert rec.releases_done == []
    assert await guard_events(store, "resources_released") == []
    assert (await status_of(store, "app-1")).at(now).state is State.SUSPENDED
    # A dry run looks again in a minute, and lists it again then: once, however
    # often it looks.
    assert await due_at(store, "release:acct-1") == now + MINUTE
    for minute in range(1, 4):
        await rec.run_deadlines(now + minute * MINUTE)
    [again] = rec.releases_planned
    assert again.account_id == "acct-1" and again.eligible
    assert await due_at(store, "release:acct-1") == now + 4 * MINUTE


async def test_a_settlement_after_release_restores_nothing(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    alert_at = now - 62 * DAY
    release_at = alert_at + GRACE + RELEASE_AFTER
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(
        rec, src, overdue_history(events, "acct-1", ["app-1"], alert_at), recorded_at=alert_at
    )
    await noticed(rec, "acct-1", alert_at + GRACE)
    assert (await rec.try_release("acct-1", now)).eligible
    assert (await changes_of(store, "app-1"))[-1] == ("SUSPENDED", "RELEASED")

    clock.now = now + MINUTE
    await feed(
        rec,
        src,
        [
            events("arrears_settled", now + MINUTE, account_id="acct-1"),
            events("arrears_settled", release_at - HOUR, account_id="acct-1"),  # late
            events(
                "package_purchased",
                now + MINUTE,
                app_id="app-1",
                package_id="pkg-new",
                starts_at=now,
                expires_at=now + 30 * DAY,
                quota_minutes=600,
            ),
        ],
    )
    await rec.run_deadlines(now + DAY)
    for t in (clock.now, now + DAY, now + 100 * DAY):
        seg = (await status_of(store, "app-1")).at(t)
        assert seg.state is State.RELEASED and seg.reasons[0] is Reason.RESOURCES_RELEASED
    # Announced changes after the release stay RELEASED (the overdue reason
    # may go; the release stays).
    after = (await changes_of(store, "app-1"))[2:]
    assert all(new == "RELEASED" for _old, new in after)
    assert len(await guard_events(store, "resources_released")) == 1


# ---------------------------------------------------------------------------
# (7) The leader lease.


async def test_killing_the_leader_hands_over_within_seconds(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    cfg = quick(lease_ttl_ms=1000, tick_ms=50)
    r1 = Reconciler(store, policy, cfg, clock=clock, name="r1")
    r2 = Reconciler(store, policy, cfg, clock=clock, name="r2")
    stop = asyncio.Event()
    tasks = {
        r1: asyncio.create_task(r1._leader_loop(stop)),
        r2: asyncio.create_task(r2._leader_loop(stop)),
    }
    try:
        deadline = time.monotonic() + 5
        while not (r1.token or r2.token):
            assert time.monotonic() < deadline, "nobody took the lease"
            await asyncio.sleep(0.02)
        for _ in range(10):  # the lease is exclusive
            assert (r1.token > 0) != (r2.token > 0)
            await asyncio.sleep(0.05)
        old, new = (r1, r2) if r1.token else (r2, r1)
        first = old.token
        # Killed: it never resigns. Stopped as the product stops its tasks
        # (asking again if a library lost the cancellation).
        await stop_task(tasks[old])

        started = time.monotonic()
        while new.token == 0:
            assert time.monotonic() - started < 3.0, "no handover within 3 s"
            await asyncio.sleep(0.02)
        assert new.token > first

        # The new leader does the leader-only work: a grace end is announced.
        await new.ingest(
            deliveries(
                [
                    *events.app("acct-1", "app-1"),
                    events("overdue_alert", T0 - HOUR, account_id="acct-1"),
                ]
            )
        )
        clock.now = T0 - HOUR + GRACE
        while (await changes_of(store, "app-1"))[-1] != ("GRACE", "SUSPENDED"):
            assert time.monotonic() - started < 6.0, "the new leader ran no deadline"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await stop_tasks(list(tasks.values()))


# ---------------------------------------------------------------------------
# (8) Classes in progress (R6), end to end: billing events through the
# reconciler, start and end reports and checks through the gRPC sidecar.


async def test_classes_in_progress_end_to_end(
    reconciler: Reconciler,
    sidecar: SidecarUnderTest,
    store: Store,
    events: Events,
    clock: FakeClock,
) -> None:
    stub = sidecar.stub
    grace_end = T0 + HOUR
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-1", "app-1"),
                events("overdue_alert", grace_end - GRACE, account_id="acct-1"),
            ]
        )
    )

    async def started(room: str, at: Millis, end: Millis | None = None) -> None:
        # Reported as it happens: a report of the future is not believed (R6).
        clock.now = max(clock.now, at)
        await stub.ReportClassroomStarted(
            pb.ReportClassroomStartedRequest(
                app_id="app-1",
                room_id=room,
                started_at=timestamp(at),
                scheduled_end_time=timestamp(end),
            )
        )

    async def ended(room: str, at: Millis) -> None:
        clock.now = max(clock.now, at)
        await stub.ReportClassroomEnded(
            pb.ReportClassroomEndedRequest(app_id="app-1", room_id=room, ended_at=timestamp(at))
        )

    async def enter(room: str) -> pb.Decision:
        resp = await stub.CanEnterClassroom(
            pb.CanEnterClassroomRequest(app_id="app-1", room_id=room)
        )
        decision: pb.Decision = resp.decision
        return decision

    # In grace, three classes start.
    await started("room-live", T0, T0 + 2 * HOUR)  # protected until T0 + 3 h
    await started("room-short", T0 + 10 * MINUTE, T0 + 90 * MINUTE)
    await started("room-open", T0 + 20 * MINUTE)  # no scheduled end: + 12 h
    assert (await enter("room-live")).reason == pb.DECISION_REASON_OVERDUE_GRACE

    # The suspension begins while they run; the reconciler announces it.
    clock.now = grace_end
    await reconciler.run_deadlines(clock.now)
    assert (await changes_of(store, "app-1"))[-1] == ("GRACE", "SUSPENDED")
    create = await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"))
    assert not create.decision.allowed
    assert create.decision.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
    for room in ("room-live", "room-short", "room-open"):
        d = await enter(room)
        assert d.allowed and d.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED, room
    assert (await enter("room-live")).protected_until.ToMilliseconds() == T0 + 3 * HOUR

    # A class that starts during the suspension is not protected; nor is one never reported.
    clock.now = grace_end + 5 * MINUTE
    await started("room-new", clock.now, clock.now + HOUR)
    for room in ("room-new", "room-unreported"):
        d = await enter(room)
        assert not d.allowed and d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE, room

    # A class that ends is no longer protected.
    await ended("room-short", grace_end + 10 * MINUTE)
    clock.now = grace_end + 11 * MINUTE
    assert not (await enter("room-short")).allowed
    assert (await enter("room-live")).allowed

    # A class that overruns past protected_until is cut off there.
    clock.now = T0 + 3 * HOUR - 1
    assert (await enter("room-live")).allowed
    clock.now = T0 + 3 * HOUR
    d = await enter("room-live")
    assert not d.allowed and d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
    clock.now = T0 + 20 * MINUTE + 12 * HOUR - 1
    assert (await enter("room-open")).allowed
    clock.now = T0 + 20 * MINUTE + 12 * HOUR
    assert not (await enter("room-open")).allowed


async def test_quota_suspension_protects_running_classes_but_a_ban_does_not(
    reconciler: Reconciler,
    sidecar: SidecarUnderTest,
    store: Store,
    events: Events,
    clock: FakeClock,
) -> None:
    stub = sidecar.stub
    await reconciler.ingest(deliveries(events.app("acct-2", "app-2", quota=600)))
    await stub.ReportClassroomStarted(
        pb.ReportClassroomStartedRequest(
            app_id="app-2",
            room_id="room-1",
            started_at=timestamp(T0 - HOUR),
            scheduled_end_time=timestamp(T0 + HOUR),
        )
    )
    # The quota runs out (R7) while room-1 runs.
    await reconciler.ingest(
        deliveries(
            [
                events(
                    "package_usage",
                    T0 - 10 * MINUTE,
                    app_id="app-2",
                    package_id="pkg-app-2",
                    used_minutes=600,
                )
            ]
        )
    )
    assert (await changes_of(store, "app-2"))[-1] == ("ACTIVE", "SUSPENDED")

    async def enter(room: str) -> pb.Decision:
        resp = await stub.CanEnterClassroom(
            pb.CanEnterClassroomRequest(app_id="app-2", room_id=room)
        )
        decision: pb.Decision = resp.decision
        return decision

    d = await enter("room-1")
    assert d.allowed and d.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert list(d.reasons) == [pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED]
    await stub.ReportClassroomStarted(
        pb.ReportClassroomStartedRequest(app_id="app-2", room_id="room-2", started_at=timestamp(T0))
    )
    d = await enter("room-2")
    assert not d.allowed and d.reason == pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED

    # A compliance ban is not a billing suspension: no class is protected.
    await reconciler.ingest(
        deliveries([events("compliance_ban", T0, account_id="acct-2", note="x")])
    )
    d = await enter("room-1")
    assert not d.allowed and d.reason == pb.DECISION_REASON_ACCOUNT_BANNED


async def test_a_dropped_redis_connection_is_resumed(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    """Every connection Redis has is killed while the reconciler runs: its
    loops reconnect and the next event is still applied, exactly once."""
    src = stream_source(store, "c1")
    rec = Reconciler(store, policy, quick(), [src], clock=clock, name="r1")
    stop = asyncio.Event()
    task = asyncio.create_task(rec.run(stop))
    try:
        await publish(store.redis, events.app("acct-1", "app-1"))

        async def known(app: str) -> bool:
            return (await store.read_status(app))[0] is not None

        for _ in range(500):
            if await known("app-1"):
                break
            await asyncio.sleep(0.01)
        assert await known("app-1")
        killed = await store.redis.execute_command("CLIENT", "KILL", "TYPE", "normal")
        assert int(killed) >= 1
        await publish(store.redis, events.app("acct-2", "app-2"))
        for _ in range(500):
            if await known("app-2"):
                break
            await asyncio.sleep(0.01)
        assert await known("app-2")
        assert await seq_of(store, "acct-2") == 1  # applied once, not once per reconnect
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
