"""Late facts end to end (issue 9): two clocks per fact, notice before a
release, settled announcements. Real redis-server, the real reconciler and
the real gRPC sidecar; the clocks are the tests' own (a FakeClock and the
reconciler's injected recording clock), so nothing waits for real time.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.facts import parse_event_json
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, SECOND, PolicyConfig, Reason, State
from lcic_guard.domain.time import Millis, format_time, parse_time, wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.sources import FileSource
from lcic_guard.render import render_status
from lcic_guard.store.status import Store
from lcic_guard_client import ApplicationStatus

from tests.reconciler.test_reconciler import (
    changes_of,
    feed,
    guard_events,
    leader,
    noticed,
    overdue_history,
    released_facts,
    status_of,
    stream_source,
)
from tests.sidecar.test_sidecar_rpc import enter, ms, report_started, status, three
from tests.support.clock import T0, FakeClock, recorded_clock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

GRACE = PolicyConfig().grace_ms
NOTICE = PolicyConfig().release_notice_ms


def _t(text: str | None) -> Millis:
    assert text is not None
    return parse_time(text, "t")


# ---------------------------------------------------------------------------
# Finding 1: an old debt learned today is never released within a second.


@pytest.mark.parametrize("order", ["alert-then-settlement", "settlement-then-alert"])
async def test_a_backfilled_alert_and_its_settlement_never_release(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, order: str
) -> None:
    now = clock.now = wall_clock()
    alert_at = now - 63 * DAY
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src], announce_settle_ms=0)
    await feed(rec, src, events.app("acct-1", "app-1", at=now - 100 * DAY, expires=now + 300 * DAY))
    alert = events("overdue_alert", alert_at, account_id="acct-1")
    settled = events("arrears_settled", alert_at + HOUR, account_id="acct-1")  # inside grace
    first, second = (alert, settled) if order == "alert-then-settlement" else (settled, alert)

    await feed(rec, src, [first])
    # The leader runs its deadlines and tries the release within the second.
    for dt in (200, 500, 1500):
        clock.now = now + dt
        await rec.run_deadlines()
        await rec.try_release("acct-1", clock.now)
        assert (await status_of(store, "app-1")).at(clock.now).state is not State.RELEASED
    assert await released_facts(store, "acct-1") == []
    if first is alert:
        seg = (await status_of(store, "app-1")).at(now)
        assert seg.reasons == (Reason.ACCOUNT_OVERDUE,)
        recorded = (await store.load_account_facts("acct-1")).recorded_at[alert["event_id"]]
        assert recorded == now
        assert seg.release_at is not None and seg.release_at >= recorded + NOTICE
    clock.now = now + 1500
    await feed(rec, src, [second])
    for t in (now + 2000, now + NOTICE + HOUR, now + 70 * DAY):
        clock.now = t
        await rec.run_deadlines()
        await rec.try_release("acct-1", t)
        assert (await status_of(store, "app-1")).at(t).state is State.ACTIVE
    assert await released_facts(store, "acct-1") == []
    assert await guard_events(store, "resources_released") == []
    assert all(new != "RELEASED" for _, new in await changes_of(store, "app-1"))


# ---------------------------------------------------------------------------
# Finding 2: a class that started while every answer allowed it.


async def test_a_late_alert_does_not_cut_off_a_class_started_while_ok(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    clock.now = T0 - 10 * MINUTE
    assert (await enter(sidecar, "room-1")).reason == pb.DECISION_REASON_OK
    await report_started(sidecar, "room-1", clock.now, T0 + HOUR)

    clock.now = T0  # a 30-hour-old alert is read now
    await reconciler.ingest(
        deliveries([events("overdue_alert", T0 - 30 * HOUR, account_id="acct-1")])
    )
    kept = await enter(sidecar, "room-1")
    assert kept.allowed and kept.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED
    assert ms(kept.protected_until) == T0 + 2 * HOUR
    assert ms(kept.suspended_at) == T0 - 6 * HOUR  # business time, backdated
    fresh = await enter(sidecar, "room-2")
    assert not fresh.allowed and fresh.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
    assert not (await three(sidecar)).create.allowed
    st = await status(sidecar)
    assert ms(st.suspended_at) == T0 - 6 * HOUR
    assert ms(st.suspension_effective_at) == T0
    assert any("R6 in effect since" in rule for rule in st.rules)
    text = render_status(ApplicationStatus.from_proto(st), T0)
    assert f"in effect since {format_time(T0)}" in text and "learned late" in text
    # A class started after the alert was learned is not protected.
    clock.now = T0 + MINUTE
    await report_started(sidecar, "room-3", T0 + 1, T0 + HOUR)
    assert not (await enter(sidecar, "room-3")).allowed


async def test_status_shows_the_effective_time_equal_to_suspended_at_when_learned_on_time(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(
        deliveries(
            [
                *events.app("acct-1", "app-1"),
                events("overdue_alert", T0 - 30 * HOUR, account_id="acct-1"),
            ]
        ),
        recorded_at=T0 - 30 * HOUR,
    )
    st = await status(sidecar)
    assert ms(st.suspension_effective_at) == ms(st.suspended_at) == T0 - 6 * HOUR


# ---------------------------------------------------------------------------
# Finding 8: no usage report means 0 used.


async def test_a_zero_minute_package_without_a_report_is_exhausted(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1", quota=0)))
    for d in (await three(sidecar)).all():
        assert not d.allowed
        assert d.reason == pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED
    await reconciler.ingest(
        deliveries(
            [
                events(
                    "package_usage",
                    T0 - HOUR,
                    app_id="app-1",
                    package_id="pkg-app-1",
                    used_minutes=0,
                )
            ]
        )
    )
    assert (await three(sidecar)).create.reason == pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED


# ---------------------------------------------------------------------------
# Finding 10 and the settle time of status_changed.


def settled(clock: FakeClock, store: Store, policy: PolicyConfig, name: str = "r1") -> Reconciler:
    return Reconciler(
        store, policy, ReconcilerConfig(announce_settle_ms=10 * SECOND), clock=clock, name=name
    )


async def test_registration_and_package_in_separate_batches_announce_no_suspension(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec = settled(clock, store, policy)
    registration, package = events.app("acct-1", "app-1")
    await rec.ingest(deliveries([registration]))
    assert (await status_of(store, "app-1")).at(clock.now).state is State.SUSPENDED
    clock.advance(2 * SECOND)
    await rec.run_deadlines()
    await rec.ingest(deliveries([package]))
    assert await guard_events(store, "status_changed") == []
    clock.advance(9 * SECOND)  # 11 s after the registration, 9 s after the package
    await rec.run_deadlines()
    assert await guard_events(store, "status_changed") == []
    clock.advance(SECOND)
    await rec.run_deadlines()
    assert await changes_of(store, "app-1") == [(None, "ACTIVE")]
    for _ in range(3):
        clock.advance(20 * SECOND)
        await rec.run_deadlines()
    assert await changes_of(store, "app-1") == [(None, "ACTIVE")]


async def test_a_change_is_announced_once_it_has_held_with_old_and_new_state(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec = settled(clock, store, policy)
    await rec.ingest(deliveries(events.app("acct-1", "app-1")))
    clock.advance(10 * SECOND)
    await rec.run_deadlines()
    assert await changes_of(store, "app-1") == [(None, "ACTIVE")]

    # A 30-hour-old alert, read now: suspended, announced after the settle time.
    learned = clock.now
    await rec.ingest(deliveries([events("overdue_alert", T0 - 30 * HOUR, account_id="acct-1")]))
    clock.advance(5 * SECOND)
    await rec.run_deadlines()
    assert len(await guard_events(store, "status_changed")) == 1
    clock.advance(5 * SECOND)
    await rec.run_deadlines()
    last = (await guard_events(store, "status_changed"))[-1]
    assert (last["old_state"], last["new_state"]) == ("ACTIVE", "SUSPENDED")
    assert last["old_reasons"] == [] and last["reasons"] == ["ACCOUNT_OVERDUE"]
    assert _t(last["suspended_at"]) == T0 - 6 * HOUR
    assert _t(last["effective_at"]) == learned

    # Paid within the settle time of a new alert's suspension: nothing to say.
    await rec.ingest(deliveries([events("arrears_settled", clock.now, account_id="acct-1")]))
    clock.advance(10 * SECOND)
    await rec.run_deadlines()
    assert (await changes_of(store, "app-1"))[-1] == ("SUSPENDED", "ACTIVE")
    await rec.ingest(
        deliveries([events("overdue_alert", clock.now - 25 * HOUR, account_id="acct-1")])
    )
    clock.advance(3 * SECOND)
    await rec.run_deadlines()
    await rec.ingest(deliveries([events("arrears_settled", clock.now, account_id="acct-1")]))
    for _ in range(3):
        clock.advance(10 * SECOND)
        await rec.run_deadlines()
    assert await changes_of(store, "app-1") == [
        (None, "ACTIVE"),
        ("ACTIVE", "SUSPENDED"),
        ("SUSPENDED", "ACTIVE"),
    ]


async def test_racing_replicas_announce_a_settled_change_once(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    r1, r2 = settled(clock, store, policy, "r1"), settled(clock, store, policy, "r2")
    batch = deliveries(events.app("acct-1", "app-1"))
    await asyncio.gather(r1.ingest(batch), r2.ingest(batch))
    clock.advance(10 * SECOND)
    await asyncio.gather(r1.run_deadlines(), r2.run_deadlines(), r1.recompute("acct-1"))
    await asyncio.gather(r1.run_deadlines(), r2.run_deadlines())
    assert await changes_of(store, "app-1") == [(None, "ACTIVE")]


# ---------------------------------------------------------------------------
# R10's notices: release_scheduled when known and at each reminder, once.


async def notices(store: Store) -> list[dict[str, Any]]:
    return await guard_events(store, "release_scheduled")


async def test_release_scheduled_once_per_reminder_across_two_replicas(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    alert_at = T0
    r1 = Reconciler(store, policy, ReconcilerConfig(release_margin_ms=0), clock=clock, name="r1")
    r2 = Reconciler(store, policy, ReconcilerConfig(release_margin_ms=0), clock=clock, name="r2")
    batch = deliveries(overdue_history(events, "acct-1", ["app-1", "app-2"], alert_at))
    await asyncio.gather(r1.ingest(batch), r2.ingest(batch))  # read live, in grace
    assert await notices(store) == []  # not suspended yet: nothing known to announce

    release_at = alert_at + GRACE + policy.release_after_ms
    moments = [
        alert_at + GRACE,
        release_at - 30 * DAY,
        release_at - 7 * DAY,
        release_at - DAY,
    ]
    settle = r1.config.announce_settle_ms  # a notice, like a change, waits for it
    for n, at in enumerate(moments, start=1):
        for t in (at - 1, at, at + settle - 1):
            clock.now = t
            await asyncio.gather(
                r1.run_deadlines(), r2.run_deadlines(), r1.recompute("acct-1"), r2.ingest(batch)
            )
        assert len(await notices(store)) == n - 1
        for t in (at + settle, at + MINUTE):
            clock.now = t
            await asyncio.gather(
                r1.run_deadlines(), r2.run_deadlines(), r1.recompute("acct-1"), r2.ingest(batch)
            )
        sent = await notices(store)
        assert len(sent) == n, sent
    sent = await notices(store)
    assert [e["notice"] for e in sent] == ["initial", "30d", "7d", "1d"]
    assert Counter(e["announcement_id"] for e in sent).most_common(1)[0][1] == 1
    for e in sent:
        assert e["account_id"] == "acct-1" and e["app_ids"] == ["app-1", "app-2"]
        assert _t(e["release_at"]) == release_at
    assert [_t(e["occurred_at"]) for e in sent] == [m + settle for m in moments]

    plans = await r1.plan_releases(release_at - HOUR)
    assert [(n.kind, n.sent) for n in plans[0].notices] == [
        ("initial", True),
        ("30d", True),
        ("7d", True),
        ("1d", True),
    ]


async def test_a_backfilled_history_gets_its_notice_now_and_only_reminders_ahead(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec = Reconciler(store, policy, ReconcilerConfig(release_margin_ms=0), clock=clock)
    await rec.ingest(deliveries(overdue_history(events, "acct-1", ["app-1"], T0 - 63 * DAY)))
    assert await notices(store) == []  # not before the facts have settled
    clock.now = T0 + rec.config.announce_settle_ms
    await rec.run_deadlines()
    [first] = await notices(store)
    assert first["notice"] == "initial" and _t(first["release_at"]) == T0 + NOTICE
    [plan] = await rec.plan_releases()
    assert [(n.kind, n.at, n.sent) for n in plan.notices] == [
        ("initial", T0, True),
        ("1d", T0 + NOTICE - DAY, False),  # 7d would coincide with the first notice; 30d is past
    ]
    # A settlement ends the episode: no reminder, nothing scheduled.
    await rec.ingest(deliveries([events("arrears_settled", T0, account_id="acct-1")]))
    clock.now = T0 + NOTICE
    await rec.run_deadlines()
    assert [e["notice"] for e in await notices(store)] == ["initial"]
    assert await rec.coord.scheduled("notice:") == []


# ---------------------------------------------------------------------------
# Finding 11.


async def test_suspended_at_is_never_before_the_apps_registration(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await reconciler.ingest(
        deliveries(
            [
                events("overdue_alert", T0 - 100 * DAY, account_id="acct-1"),
                *events.app("acct-1", "app-1", at=T0 - 30 * DAY),
            ]
        )
    )
    d = (await three(sidecar)).create
    assert d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
    assert ms(d.suspended_at) == T0 - 30 * DAY


async def test_an_app_registered_after_the_release_is_announced_released_once(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    alert_at = now - 62 * DAY
    await feed(
        rec, src, overdue_history(events, "acct-1", ["app-1"], alert_at), recorded_at=alert_at
    )
    await noticed(rec, "acct-1", alert_at + GRACE)  # read live: noticed then
    assert (await rec.try_release("acct-1", now)).eligible

    other = Reconciler(store, policy, ReconcilerConfig(), clock=clock, name="r2")
    late = deliveries(events.app("acct-1", "app-9", at=now - HOUR, expires=now + DAY))
    await asyncio.gather(rec.ingest(late), other.ingest(late), rec.ingest(late))
    seg = (await status_of(store, "app-9")).at(now)
    assert seg.state is State.RELEASED
    await asyncio.gather(rec.run_deadlines(now + DAY), other.recompute("acct-1"))
    await rec.try_release("acct-1", now + DAY)
    released = await guard_events(store, "resources_released")
    assert [e["app_ids"] for e in released] == [["app-1"], ["app-9"]]
    assert len({e["announcement_id"] for e in released}) == 2


async def test_after_a_release_release_at_shows_r10s_time_not_the_commits(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, sidecar: SidecarUnderTest
) -> None:
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    alert_at = now - 62 * DAY
    await feed(
        rec, src, overdue_history(events, "acct-1", ["app-1"], alert_at), recorded_at=alert_at
    )
    await noticed(rec, "acct-1", alert_at + GRACE)  # read live: noticed then
    assert (await rec.try_release("acct-1", now)).eligible
    release_at = alert_at + GRACE + policy.release_after_ms  # a day before the commit
    assert (await status_of(store, "app-1")).at(now).release_at == release_at
    d = (await three(sidecar)).create
    assert d.reason == pb.DECISION_REASON_RESOURCES_RELEASED
    assert ms(d.release_at) == release_at


# ---------------------------------------------------------------------------
# The second clock in the store.


async def test_a_fact_keeps_the_time_it_was_first_recorded(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, tmp_path: Path
) -> None:
    batch = events.app("acct-1", "app-1")
    rec = Reconciler(store, policy, ReconcilerConfig(), clock=clock)
    await rec.ingest(deliveries(batch), recorded_at=T0 - HOUR)
    await rec.ingest(
        deliveries(batch), recorded_at=T0
    )  # redelivered later: still first recorded then
    loaded = await store.load_account_facts("acct-1")
    assert loaded.recorded_at == {e["event_id"]: T0 - HOUR for e in batch}

    # A snapshot file's facts are recorded when it is loaded.
    alert = events("overdue_alert", T0 - 30 * DAY, account_id="acct-1")
    path = tmp_path / "snapshot.jsonl"
    path.write_text(json.dumps(alert) + "\n")
    source = FileSource(path, clock_ms=store.server_time)
    loader = Reconciler(
        store, policy, ReconcilerConfig(), [source], clock=clock, recorded_clock=recorded_clock(T0)
    )
    await loader.drain(source)
    assert (await store.load_account_facts("acct-1")).recorded_at[alert["event_id"]] == T0

    # Without a recording clock of its own the store stamps Redis's clock.
    late = events("arrears_settled", T0, account_id="acct-1")
    before = await store.server_time()
    await store.add_facts("acct-1", [parse_event_json(json.dumps(late))])
    stamped = (await store.load_account_facts("acct-1")).recorded_at[late["event_id"]]
    assert before <= stamped <= await store.server_time()
