"""Ingest of billing events on a real redis-server (issue 9, findings 3-7;
issue 10, the ingest limits).

Event ids are unique across the whole feed (an index of every id entered,
before any other effect); a dead-lettered event has no effect at all; the
earliest registration owns an application whatever the arrival order (the
application moves when an earlier one arrives late); ids of the
reconciler's own facts cannot come from the feed; RFC 3339 in any case;
oversized events, the dead-letter stream and parked facts are bounded.

A property test checks that random fact sets with repeats, reused ids,
contested registrations, random arrival orders and batch splits end in the
status table and dead letters of one ordered run.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic_guard.domain.facts import ApplicationRegistered, ResourcesReleased
from lcic_guard.domain.policy import DAY, HOUR, AppStatus, PolicyConfig, Reason, Segment, State
from lcic_guard.domain.time import Millis, format_time
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.reconciler.sources import StreamSource
from lcic_guard.store.connect import RedisClient
from lcic_guard.store.keys import (
    BILLING_STREAM,
    DEAD_LETTER_STREAM,
    GUARD_STREAM,
    STATUS_PATTERN,
    facts_key,
    feed_key,
    feed_shard,
    parked_key,
    status_key,
    status_key_app,
)
from lcic_guard.store.status import AddResult, Store

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def quick(**overrides: Any) -> ReconcilerConfig:
    base: dict[str, Any] = {"release_margin_ms": 0, "block_ms": 10}
    return ReconcilerConfig(**{**base, **overrides})


async def dead_letters(store: Store) -> list[dict[str, str]]:
    rows: Any = await store.redis.xrange(DEAD_LETTER_STREAM)
    return [{_s(k): _s(v) for k, v in fields.items()} for _id, fields in rows]


def dead_id(entry: dict[str, str]) -> str:
    """The event id a dead letter is about (its raw event's ``event_id``)."""
    try:
        raw = json.loads(entry["event"])
    except ValueError:
        return "?"
    return str(raw.get("event_id")) if isinstance(raw, dict) else "?"


async def facts_of(store: Store, account: str) -> dict[str, dict[str, Any]]:
    raw = await store.redis.hgetall(facts_key(account))
    return {_s(k): json.loads(v) for k, v in raw.items()}


async def owner_and_data(store: Store, app_id: str) -> tuple[str | None, str | None]:
    account, data = await store.redis.hmget(status_key(app_id), ["account", "data"])
    return (_s(account) if account is not None else None, _s(data) if data is not None else None)


async def reasons_at(store: Store, app_id: str, at: int = T0) -> tuple[Reason, ...]:
    status, _ = await store.read_status(app_id)
    assert status is not None, f"no status for {app_id}"
    return status.at(at).reasons


# ---------------------------------------------------------------------------
# Finding 3: event ids are unique across the whole feed.


async def test_an_event_id_reused_by_another_account_is_dead_lettered_and_changes_nothing(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    evs = [*events.app("acct-a", "app-a"), *events.app("acct-b", "app-b")]
    alert = events("overdue_alert", T0 - 3 * DAY, account_id="acct-a", amount_due="10.00")
    await reconciler.ingest(deliveries([*evs, alert]))
    assert Reason.ACCOUNT_OVERDUE in await reasons_at(store, "app-a")
    before_b = await facts_of(store, "acct-b")

    reuse = {**alert, "account_id": "acct-b"}  # same id, another account
    stats = await reconciler.ingest(deliveries([reuse]))
    assert stats.dead_lettered == 1 and stats.applied == 0
    [dl] = await dead_letters(store)
    assert dl["reason"] == (
        f"event_id: {alert['event_id']} reused with different content (the first one is kept)"
    )
    assert json.loads(dl["event"])["account_id"] == "acct-b"
    assert await facts_of(store, "acct-b") == before_b
    assert await reasons_at(store, "app-b") == ()  # acct-b stays in good standing

    # A plain repeat of the original is a no-op, not a conflict.
    stats = await reconciler.ingest(deliveries([alert, alert]))
    assert stats.dead_lettered == 0 and stats.applied == 0 and stats.duplicates == 2


async def test_in_one_batch_the_first_content_of_an_id_wins_and_repeats_are_no_ops(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    evs = [*events.app("acct-a", "app-a"), *events.app("acct-b", "app-b")]
    first = events("overdue_alert", T0 - 3 * DAY, account_id="acct-b")
    reuse = {**first, "account_id": "acct-a"}
    await reconciler.ingest(deliveries([*evs, first, reuse, first, reuse]))
    assert Reason.ACCOUNT_OVERDUE in await reasons_at(store, "app-b")
    assert await reasons_at(store, "app-a") == ()
    letters = await dead_letters(store)
    assert [json.loads(d["event"])["account_id"] for d in letters] == ["acct-a", "acct-a"]


# ---------------------------------------------------------------------------
# Finding 4: a dead-lettered event has no effect at all.


async def test_a_dead_lettered_registration_owns_no_application(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    [reg, pkg] = events.app("acct-1", "app-1")
    await reconciler.ingest(deliveries([reg, pkg]))
    # The id of app-1's registration, reused for another app.
    forged = {**reg, "app_id": "app-2"}
    stats = await reconciler.ingest(deliveries([forged]))
    assert stats.dead_lettered == 1
    assert await store.redis.exists(status_key("app-2")) == 0
    # Nothing owns app-2: a classroom report for it is refused.
    assert not await store.report_room("app-2", "room-1", now=T0, until=T0 + HOUR, started_at=T0)

    # app-2's own registration, to another account, is applied.
    await reconciler.ingest(deliveries(events.app("acct-2", "app-2")))
    owner, data = await owner_and_data(store, "app-2")
    assert owner == "acct-2" and data is not None
    assert await reasons_at(store, "app-2") == ()
    assert len(await dead_letters(store)) == 1


# ---------------------------------------------------------------------------
# Finding 5: the earliest registration owns the app, whatever the order.


def contested(events: Events) -> dict[str, Any]:
    """app-x registered to acct-a (overdue, earlier) and to acct-b (in good
    standing, later); acct-b has many facts, so its sequence is higher."""
    reg_a = events("application_registered", T0 - 20 * DAY, account_id="acct-a", app_id="app-x")
    reg_b = events("application_registered", T0 - 10 * DAY, account_id="acct-b", app_id="app-x")
    pkg = events(
        "package_purchased",
        T0 - 10 * DAY,
        app_id="app-x",
        package_id="pkg-x",
        starts_at=T0 - 10 * DAY,
        expires_at=T0 + 20 * DAY,
        quota_minutes=600,
    )
    usage = events("package_usage", T0 - DAY, app_id="app-x", package_id="pkg-x", used_minutes=5)
    alert = events("overdue_alert", T0 - 3 * DAY, account_id="acct-a", amount_due="10.00")
    b_other = events.app("acct-b", "app-b")
    b_history = [
        events("arrears_settled", T0 - (30 + i) * DAY, account_id="acct-b") for i in range(6)
    ]
    return {
        "reg_a": reg_a,
        "reg_b": reg_b,
        "app": [pkg, usage],
        "alert": alert,
        "b_side": [*b_other, *b_history],
    }


async def assert_owned_by_a(store: Store, c: dict[str, Any]) -> None:
    owner, _ = await owner_and_data(store, "app-x")
    assert owner == "acct-a"
    status, _ = await store.read_status("app-x")
    assert status is not None and status.account_id == "acct-a"
    seg = status.at(T0)
    assert seg.state is State.SUSPENDED and Reason.ACCOUNT_OVERDUE in seg.reasons
    # acct-b keeps nothing of app-x; acct-a has all of it.
    b_facts = await facts_of(store, "acct-b")
    assert not [f for f in b_facts.values() if f.get("app_id") == "app-x"]
    a_ids = set(await facts_of(store, "acct-a"))
    assert {c["reg_a"]["event_id"], *(f["event_id"] for f in c["app"])} <= a_ids
    # The later registration is dead-lettered, naming the owner.
    regs = [d for d in await dead_letters(store) if dead_id(d) == c["reg_b"]["event_id"]]
    assert regs and all("acct-a" in d["reason"] for d in regs)
    assert {dead_id(d) for d in await dead_letters(store)} == {c["reg_b"]["event_id"]}
    # acct-b's own app is unaffected.
    assert await reasons_at(store, "app-b") == ()


@pytest.mark.parametrize("split", [True, False], ids=["batches", "one-batch"])
async def test_earliest_registration_owns_the_app_in_either_arrival_order(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, split: bool
) -> None:
    c = contested(events)
    ordered = [c["reg_a"], c["reg_b"], *c["app"], c["alert"], *c["b_side"]]
    rec = Reconciler(store, policy, quick(), clock=clock)
    await rec.ingest(deliveries(ordered))
    await assert_owned_by_a(store, c)
    reference = await owner_and_data(store, "app-x")

    await store.redis.flushall()
    rec = Reconciler(store, policy, quick(), clock=clock)
    late_first = [*c["b_side"], c["reg_b"], *c["app"], c["alert"], c["reg_a"]]
    if split:
        for e in late_first[:-1]:  # one at a time: acct-b's sequence grows
            await rec.ingest(deliveries([e]))
        # app-x belongs to acct-b for now, at acct-b's (higher) sequence.
        owner, _ = await owner_and_data(store, "app-x")
        assert owner == "acct-b" and await reasons_at(store, "app-x") == ()
        version_before = int(await store.redis.hget(status_key("app-x"), "version") or 0)
        assert version_before >= 7
        await rec.ingest(deliveries(late_first[-1:]))
        # The status moved with a newer version, although acct-a's sequence
        # is lower than acct-b's: the sidecars' caches take it.
        status, _ = await store.read_status("app-x")
        assert status is not None and status.version > version_before
        rows: Any = await store.redis.xrevrange(feed_key(feed_shard("app-x")), count=50)
        feed = [f for _id, f in rows if f.get(b"a") == b"app-x" and b"d" in f]
        assert feed[0][b"acct"] == b"acct-a" and int(feed[0][b"v"]) == status.version
    else:
        await rec.ingest(deliveries(late_first))
    await assert_owned_by_a(store, c)
    assert await owner_and_data(store, "app-x") == reference


async def test_a_later_registration_to_another_account_changes_nothing(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    c = contested(events)
    await reconciler.ingest(deliveries([c["reg_a"], *c["app"], c["alert"], *c["b_side"]]))
    before = (await owner_and_data(store, "app-x"), await facts_of(store, "acct-b"))
    stats = await reconciler.ingest(deliveries([c["reg_b"]]))
    assert stats.dead_lettered == 1 and stats.applied == 0
    assert (await owner_and_data(store, "app-x"), await facts_of(store, "acct-b")) == before


async def test_ownership_through_the_billing_stream_with_the_real_reconciler(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    c = contested(events)
    source = StreamSource(store.redis, group="g", consumer="c1", claim_idle_ms=60_000)
    rec = Reconciler(store, policy, quick(batch_size=3), [source], clock=clock)
    for e in [*c["b_side"], c["reg_b"], *c["app"], c["alert"], c["reg_a"]]:
        await store.redis.xadd(BILLING_STREAM, {"event": json.dumps(e)})
    while (await rec.ingest_source(source)).received:
        pass
    await assert_owned_by_a(store, c)
    assert int((await store.redis.xpending(BILLING_STREAM, "g"))["pending"]) == 0


class CrashingStore(Store):
    """The real store whose ``remove_facts`` fails once, as if the process
    died in the middle of moving an application between accounts."""

    crash = True

    async def remove_facts(self, account_id: str, event_ids: Any) -> int:
        if self.crash:
            self.crash = False
            raise ConnectionError("injected: died in the middle of a move")
        return await super().remove_facts(account_id, event_ids)


async def test_a_move_cut_short_is_finished_by_the_redelivery(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    c = contested(events)
    crashing = CrashingStore(store.redis)
    rec = Reconciler(crashing, policy, quick(), clock=clock)
    await rec.ingest(deliveries([*c["b_side"], c["reg_b"], *c["app"], c["alert"]]))
    with pytest.raises(ConnectionError):
        await rec.ingest(deliveries([c["reg_a"]]))
    # Owner switched, but acct-b still has the app's facts: half done.
    assert (await owner_and_data(store, "app-x"))[0] == "acct-a"
    assert c["reg_b"]["event_id"] in await facts_of(store, "acct-b")
    # The unacknowledged entry comes again, to a fresh process.
    rec = Reconciler(Store(store.redis), policy, quick(), clock=clock)
    await rec.ingest(deliveries([c["reg_a"]]))
    await assert_owned_by_a(store, c)
    assert await store.redis.hget(status_key("app-x"), "moved_from") is None


class GatedStore(Store):
    """The real store; adding facts to one account (after ``skip`` adds to
    it) waits until released, as a replica that found an app's owner and
    paused before storing facts there."""

    def __init__(self, redis: RedisClient, account: str, skip: int = 0) -> None:
        super().__init__(redis)
        self.account = account
        self.skip = skip
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def add_facts(
        self, account_id: str, facts: Any, *, recorded_at: Millis | None = None
    ) -> AddResult:
        facts = list(facts)
        if account_id == self.account:
            if self.skip:
                self.skip -= 1
            else:
                self.waiting.set()
                await self.gate.wait()
        return await super().add_facts(account_id, facts, recorded_at=recorded_at)


async def test_an_app_fact_routed_to_the_old_owner_during_a_move_follows_the_app(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    c = contested(events)
    rec = Reconciler(store, policy, quick(), clock=clock)
    await rec.ingest(deliveries([*c["b_side"], c["reg_b"], *c["app"], c["alert"]]))
    exhausting = events(
        "package_usage", T0 - HOUR, app_id="app-x", package_id="pkg-x", used_minutes=600
    )
    gated = GatedStore(store.redis, "acct-b")
    slow = Reconciler(gated, policy, quick(), clock=clock)
    task = asyncio.create_task(slow.ingest(deliveries([exhausting])))
    await asyncio.wait_for(gated.waiting.wait(), 10)
    await rec.ingest(deliveries([c["reg_a"]]))  # the app moves meanwhile
    gated.gate.set()
    await asyncio.wait_for(task, 10)
    assert exhausting["event_id"] in await facts_of(store, "acct-a")
    assert exhausting["event_id"] not in await facts_of(store, "acct-b")
    assert Reason.PACKAGE_QUOTA_EXHAUSTED in await reasons_at(store, "app-x")
    await assert_owned_by_a(store, c)


async def test_facts_moving_with_an_app_that_moves_again_end_with_the_last_owner_only(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    reg_c = events("application_registered", T0 - 5 * DAY, account_id="acct-c", app_id="app-x")
    reg_b = events("application_registered", T0 - 10 * DAY, account_id="acct-b", app_id="app-x")
    reg_a = events("application_registered", T0 - 20 * DAY, account_id="acct-a", app_id="app-x")
    app = contested(events)["app"]
    rec = Reconciler(store, policy, quick(), clock=clock)
    await rec.ingest(deliveries([reg_c, *app]))
    # acct-b's earlier registration moves the app from acct-c; its replica
    # pauses while copying the app's facts to acct-b ...
    gated = GatedStore(store.redis, "acct-b", skip=1)
    slow = Reconciler(gated, policy, quick(), clock=clock)
    task = asyncio.create_task(slow.ingest(deliveries([reg_b])))
    await asyncio.wait_for(gated.waiting.wait(), 10)
    # ... and meanwhile acct-a's even earlier one moves it on to acct-a.
    await rec.ingest(deliveries([reg_a]))
    gated.gate.set()
    await asyncio.wait_for(task, 10)
    app_ids = {e["event_id"] for e in app}
    assert app_ids | {reg_a["event_id"]} <= set(await facts_of(store, "acct-a"))
    for loser in ("acct-b", "acct-c"):
        left = await facts_of(store, loser)
        assert not [f for f in left.values() if f.get("app_id") == "app-x"], loser
    assert (await owner_and_data(store, "app-x"))[0] == "acct-a"
    assert {dead_id(d) for d in await dead_letters(store)} == {reg_b["event_id"], reg_c["event_id"]}


# ---------------------------------------------------------------------------
# Finding 6: the reconciler's own ids are reserved.


async def test_billing_events_with_reserved_ids_are_dead_lettered_and_stored_nowhere(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    forged = events("overdue_alert", T0 - 63 * DAY, account_id="acct-1")
    forged["event_id"] = f"lcic-guard:release:acct-1:{T0}"
    stats = await reconciler.ingest(deliveries([forged]))
    assert stats.dead_lettered == 1 and stats.applied == 0
    [dl] = await dead_letters(store)
    assert dl["reason"].startswith("event_id: ")
    assert "lcic-guard:" in dl["reason"]
    assert forged["event_id"] not in await facts_of(store, "acct-1")
    assert await reasons_at(store, "app-1") == ()
    # The reconciler's own release fact is still stored and read back.
    own = ResourcesReleased(f"lcic-guard:release:acct-1:{T0}", T0, "acct-1")
    await store.add_facts("acct-1", [own])
    facts = (await store.load_account_facts("acct-1")).facts
    assert own in facts


# ---------------------------------------------------------------------------
# Finding 7: timestamps.


async def test_rfc3339_in_any_case_and_offset_is_applied_and_years_past_9998_are_not(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    at = format_time(T0 - 3 * DAY)  # e.g. 2026-09-18T14:13:20.000Z
    lower = events("overdue_alert", T0, account_id="acct-1")
    lower["occurred_at"] = at.replace("T", "t").replace("Z", "z")
    stats = await reconciler.ingest(deliveries([lower]))
    assert stats.applied == 1 and stats.dead_lettered == 0
    stored = (await facts_of(store, "acct-1"))[lower["event_id"]]
    assert stored["occurred_at"] == at  # normalised to UTC, upper case
    assert Reason.ACCOUNT_OVERDUE in await reasons_at(store, "app-1")

    far = events("arrears_settled", T0, account_id="acct-1")
    far["occurred_at"] = "9999-12-31T23:00:00Z"
    offset = events("arrears_settled", T0, account_id="acct-1")
    offset["occurred_at"] = "9998-12-31T23:00:00-01:00"  # 9999 in UTC
    stats = await reconciler.ingest(deliveries([far, offset]))
    assert stats.dead_lettered == 2 and stats.applied == 0
    reasons = [d["reason"] for d in await dead_letters(store)]
    assert all(r.startswith("occurred_at: timestamp out of range") for r in reasons)
    assert Reason.ACCOUNT_OVERDUE in await reasons_at(store, "app-1")


# ---------------------------------------------------------------------------
# Issue 10: ingest limits.


async def test_an_event_over_64_kib_is_dead_lettered_unparsed_with_a_truncated_copy(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    metrics = ReconcilerMetrics()
    rec = Reconciler(store, policy, quick(), clock=clock, metrics=metrics)
    await rec.ingest(deliveries(events.app("acct-1", "app-1")))
    big = events("overdue_alert", T0 - 3 * DAY, account_id="acct-1", padding="x" * 70_000)
    small = events("overdue_alert", T0 - 3 * DAY, account_id="acct-1", padding="x" * 60_000)
    stats = await rec.ingest(deliveries([big, small]))
    assert stats.dead_lettered == 1 and stats.applied == 1
    [dl] = await dead_letters(store)
    raw = json.dumps(big)
    assert dl["reason"] == (
        f"event: {len(raw)} bytes, over the limit of 65536 "
        "(not parsed; its first 4096 characters are kept)"
    )
    assert dl["event"] == raw[:4096]
    assert big["event_id"] not in await facts_of(store, "acct-1")
    # Not parsed, so not indexed either: a corrected event may reuse its id.
    fixed = {k: v for k, v in big.items() if k != "padding"}
    assert (await rec.ingest(deliveries([fixed]))).applied == 1
    assert metrics.dead_letters.labels("too_large")._value.get() == 1


async def test_dead_letters_are_trimmed_to_about_the_maxlen_and_counted_by_reason(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    metrics = ReconcilerMetrics()
    rec = Reconciler(store, policy, quick(deadletter_maxlen=50), clock=clock, metrics=metrics)
    await rec.ingest(deliveries(events.app("acct-1", "app-1")))
    bad = ['{"type": "overdue_alert"}'] * 600
    reused = {**events("overdue_alert", T0, account_id="acct-1"), "event_id": "ev-1"}
    reserved = {**events("arrears_settled", T0, account_id="acct-1"), "event_id": "lcic-guard:x"}
    await rec.ingest(deliveries([*bad, json.dumps(reused), json.dumps(reserved)]))
    length = await store.redis.xlen(DEAD_LETTER_STREAM)
    # Approximate MAXLEN trims whole stream nodes (100 entries each).
    assert 50 <= length <= 50 + 100
    counts = {r: metrics.dead_letters.labels(r)._value.get() for r in metrics.DEAD_LETTER_REASONS}
    assert counts == {
        "too_large": 0,
        "invalid": 600,
        "reserved_id": 1,
        "conflict": 1,
        "registration": 0,
    }
    # The newest are the ones kept.
    last = await dead_letters(store)
    assert {dead_id(d) for d in last[-2:]} == {"ev-1", "lcic-guard:x"}


async def test_parked_facts_expire_after_the_parked_ttl(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec = Reconciler(store, policy, quick(), clock=clock)
    assert rec.config.parked_ttl_ms == 30 * DAY
    ghost = events("payg_changed", T0, app_id="ghost", enabled=True)
    stats = await rec.ingest(deliveries([ghost]))
    assert stats.parked == 1 and stats.dead_lettered == 0
    ttl = await store.redis.pttl(parked_key("ghost"))
    assert 29 * DAY < ttl <= 30 * DAY

    short = Reconciler(store, policy, quick(parked_ttl_ms=300), clock=clock)
    await short.ingest(deliveries([events("payg_changed", T0, app_id="brief", enabled=True)]))
    assert 0 < await store.redis.pttl(parked_key("brief")) <= 300
    for _ in range(100):
        if not await store.redis.exists(parked_key("brief")):
            break
        await asyncio.sleep(0.05)
    assert not await store.redis.exists(parked_key("brief"))


# ---------------------------------------------------------------------------
# Order independence, as a property over random fact sets.

ACCOUNTS = ("acct-a", "acct-b", "acct-c")
HOURS = st.integers(-96, 96).map(lambda h: T0 + h * HOUR)
# When facts occurred: up to the reconciler's clock, never from the future
# (SPEC §2: those are dead-lettered); package dates may lie ahead (HOURS).
OCCURRED = st.integers(-96, 0).map(lambda h: T0 + h * HOUR)


@st.composite
def fact_sets(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """Random billing events, plus (original, reuse) index pairs: a reuse has
    the original's id with other content and is delivered after it.

    Apps are registered to one account (possibly several times) or contested
    by two or three accounts (one registration each, times may tie)."""
    ev = Events()
    for n in range(draw(st.integers(1, 4))):
        app = f"app-{n}"
        if draw(st.booleans()):
            owners = draw(st.lists(st.sampled_from(ACCOUNTS), min_size=2, max_size=3, unique=True))
            for acct in owners:
                ev("application_registered", draw(OCCURRED), account_id=acct, app_id=app)
        else:
            acct = draw(st.sampled_from(ACCOUNTS))
            for _ in range(draw(st.integers(1, 2))):
                ev("application_registered", draw(OCCURRED), account_id=acct, app_id=app)
        for k in range(draw(st.integers(0, 2))):
            start = draw(HOURS)
            ev(
                "package_purchased",
                draw(OCCURRED),
                app_id=app,
                package_id=f"{app}-p{k}",
                starts_at=start,
                expires_at=start + draw(st.integers(1, 120)) * HOUR,
                quota_minutes=draw(st.integers(0, 100)),
            )
            for _ in range(draw(st.integers(0, 2))):
                ev(
                    "package_usage",
                    draw(OCCURRED),
                    app_id=app,
                    package_id=f"{app}-p{k}",
                    used_minutes=draw(st.integers(0, 150)),
                )
        if draw(st.booleans()):
            ev("payg_changed", draw(OCCURRED), app_id=app, enabled=draw(st.booleans()))
    for acct in ACCOUNTS:
        for _ in range(draw(st.integers(0, 2))):
            ev("overdue_alert", draw(OCCURRED), account_id=acct, amount_due="12.50")
        for _ in range(draw(st.integers(0, 1))):
            ev("arrears_settled", draw(OCCURRED), account_id=acct)
        if draw(st.integers(0, 6)) == 0:
            ev("compliance_ban", draw(OCCURRED), account_id=acct, note="terms")
    if draw(st.booleans()):  # facts of an app that is never registered
        ev("payg_changed", draw(OCCURRED), app_id="ghost-app", enabled=True)
    made = list(ev.made)
    reuses: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(ev.made) - 1))
        original = made[i]
        other = draw(st.sampled_from(ACCOUNTS))
        if "account_id" in original:
            copy = {**original, "account_id": other, "occurred_at": format_time(draw(OCCURRED))}
        else:
            copy = {**original, "occurred_at": format_time(draw(OCCURRED))}
        if copy != original:
            reuses.append((i, len(made)))
            made.append(copy)
    if draw(st.booleans()):
        made.append({**made[0], "event_id": "bad-1", "occurred_at": "9999-01-01T00:00:00Z"})
    return made, reuses


async def run_table(store: Store, rec: Reconciler) -> tuple[dict[str, Any], list[str], Any]:
    """Per app: owner and status timeline; the dead-lettered ids; the facts."""
    table: dict[str, Any] = {}
    async for key in store.redis.scan_iter(match=STATUS_PATTERN, count=1000):
        account, data, moved = await store.redis.hmget(key, ["account", "data", "moved_from"])
        assert moved is None, "a move was left unfinished"
        table[_s(key)] = (_s(account), _s(data) if data is not None else None)
    ids = sorted({dead_id(d) for d in await dead_letters(store)})
    facts: dict[str, Any] = {}
    async for key in store.redis.scan_iter(match="lcic:acct:{*}:facts", count=1000):
        facts[_s(key)] = {_s(k): _s(v) for k, v in (await store.redis.hgetall(key)).items()}
    return table, ids, facts


async def settled_announcements(
    store: Store, rec: Reconciler, clock: FakeClock
) -> list[tuple[Any, ...]]:
    """Once every new state has held for the settle time: what was announced,
    without what only says which run made it (versions, announcement ids)."""
    clock.now = T0 + rec.config.announce_settle_ms + 1
    for _ in range(5):
        if not await rec.run_deadlines(clock.now):
            break
    rows: Any = await store.redis.xrange(GUARD_STREAM)
    out: list[tuple[Any, ...]] = []
    for _id, fields in rows:
        event = json.loads(fields[b"event"])
        kind = event["type"]
        keys: tuple[str, ...]
        if kind == "status_changed":
            keys = ("app_id", "account_id", "old_state", "old_reasons", "new_state", "reasons")
        elif kind == "release_scheduled":
            keys = ("account_id", "app_ids", "release_at", "notice")
        else:
            keys = ("account_id", "app_ids")
        out.append((kind, *(json.dumps(event.get(k), sort_keys=True) for k in keys)))
    assert out, "nothing was announced"
    return sorted(out)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=fact_sets(), rnd=st.randoms(use_true_random=False))
async def test_any_arrival_order_and_batching_gives_the_ordered_runs_table_and_dead_letters(
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    data: tuple[list[dict[str, Any]], list[tuple[int, int]]],
    rnd: random.Random,
) -> None:
    made, reuses = data
    raws = [json.dumps(e) for e in made]

    await store.redis.flushall()
    clock.now = T0
    first = Reconciler(store, policy, quick(), clock=clock)
    await first.ingest(deliveries(raws))
    expected_announced = await settled_announcements(store, first, clock)
    expected = await run_table(store, Reconciler(store, policy, quick(), clock=clock))
    registered = {e["app_id"] for e in made if e["type"] == "application_registered"}
    assert {status_key_app(k) for k in expected[0]} <= registered

    # Permuted (each reuse still after its original), with repeats, in
    # random batches, through a fresh replica.
    order = list(range(len(raws))) + rnd.choices(range(len(raws)), k=rnd.randint(0, len(raws)))
    rnd.shuffle(order)
    for original, reuse in reuses:
        first_original = order.index(original)
        for pos, item in enumerate(order):
            if item == reuse and pos < first_original:
                order[pos], order[first_original] = order[first_original], order[pos]
                first_original = pos
    shuffled = [raws[i] for i in order]
    cuts = sorted(rnd.sample(range(1, len(shuffled)), k=min(len(shuffled) - 1, rnd.randint(0, 6))))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]

    await store.redis.flushall()
    clock.now = T0
    other = Reconciler(store, policy, quick(), clock=clock)
    for batch in batches:
        await other.ingest(deliveries(batch))
    got_announced = await settled_announcements(store, other, clock)
    got = await run_table(store, other)
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert got[2] == expected[2]
    # What notification jobs are told: the same changes, notices and releases
    # (a state passed through between batches is never announced).
    assert got_announced == expected_announced


def test_limit_flags_reach_the_reconciler(monkeypatch: pytest.MonkeyPatch) -> None:
    from lcic_guard.cli import build_parser
    from lcic_guard.flags import settings_from

    defaults = settings_from(build_parser().parse_args(["reconcile"])).reconciler
    assert (defaults.deadletter_maxlen, defaults.parked_ttl_ms) == (100_000, 30 * DAY)
    monkeypatch.setenv("LCIC_GUARD_PARKED_TTL", "2h")
    args = build_parser().parse_args(["reconcile", "--deadletter-maxlen", "10"])
    s = settings_from(args).reconciler
    assert (s.deadletter_maxlen, s.parked_ttl_ms) == (10, 2 * HOUR)
    off = settings_from(build_parser().parse_args(["reconcile", "--parked-ttl", "0"])).reconciler
    assert off.parked_ttl_ms == 0
    with pytest.raises(SystemExit):
        settings_from(build_parser().parse_args(["reconcile", "--deadletter-maxlen", "-1"]))


async def test_the_store_assigns_versions_and_accepts_writes_only_from_the_owner(
    store: Store,
) -> None:
    def status(account: str, seq: int) -> AppStatus:
        return AppStatus("app-v", account, (Segment(T0, ()),), version=seq, updated_at=T0)

    late = ApplicationRegistered("r-late", T0, "acct-b", "app-v")
    early = ApplicationRegistered("r-early", T0 - DAY, "acct-a", "app-v")
    assert (await store.register_owner(late)).verdict == "own"
    res = await store.write_status(status("acct-b", 40))
    assert res.written and res.version == 40  # the account's seq while it owns the app
    again = await store.write_status(status("acct-b", 40))  # same facts: already stored
    assert not again.written and again.version == 40
    stale = await store.write_status(status("acct-b", 39))
    assert not stale.written and stale.version == 0
    assert (await store.write_status(status("acct-a", 3))).version == 0  # not the owner

    got = await store.register_owner(early)
    assert (got.verdict, got.owner, got.moved_from) == ("moved", "acct-a", ("acct-b",))
    assert (await store.write_status(status("acct-b", 41))).version == 0  # no longer the owner
    moved = await store.write_status(status("acct-a", 3))
    assert moved.written and moved.version == 41  # past acct-b's, although seq 3 is lower
    assert (await store.write_status(status("acct-a", 4))).version == 42
    stored, _ = await store.read_status("app-v")
    assert stored is not None and (stored.account_id, stored.version) == ("acct-a", 42)
    # A registration of acct-b later than acct-a's changes nothing.
    assert (await store.register_owner(late)).verdict == "later"
    await store.move_done("app-v", "acct-b")
    assert await store.redis.hget(status_key("app-v"), "moved_from") is None
