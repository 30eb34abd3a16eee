"""Support overrides as billing facts, end to end on a real redis-server:
a grace extension delays the overdue suspension and the release and ends by
itself; a release hold stops a due release, and clearing it waits the notice
period from when the clear was recorded (issue 15)."""

from __future__ import annotations

from typing import Any

from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, PolicyConfig, Reason
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.reconciler import Reconciler
from lcic_guard.reconciler.release import HELD_RECHECK_MS
from lcic_guard.store.keys import DEADLINES
from lcic_guard.store.status import Store

from tests.reconciler.test_reconciler import (
    GRACE,
    RELEASE_AFTER,
    dead_letters,
    feed,
    guard_events,
    leader,
    noticed,
    overdue_history,
    released_facts,
    status_of,
    stream_source,
)
from tests.sidecar.test_sidecar_rpc import ms, three
from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

ACCT = "acct-1"
APP = "app-1"
NOTICE = PolicyConfig().release_notice_ms
MAX_EXTENSION = PolicyConfig().max_grace_extension_ms


def override(events: Events, kind: str, at: Millis, **fields: Any) -> dict[str, Any]:
    if "until" in fields:
        fields["until"] = format_time(fields["until"])
    return events(kind, at, account_id=ACCT, actor="alice@support", reason="ticket 4411", **fields)


async def test_an_extension_delays_the_flip_and_ends_by_itself(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    alert_at = T0 - HOUR
    until = T0 + 2 * DAY
    await reconciler.ingest(
        deliveries(
            [
                *events.app(ACCT, APP, expires=T0 + 400 * DAY),
                events("overdue_alert", alert_at, account_id=ACCT),
                override(events, "grace_extended", T0 - 30 * MINUTE, until=until),
            ]
        )
    )
    for d in (await three(sidecar)).all():
        assert d.allowed and d.reason == pb.DECISION_REASON_OVERDUE_GRACE
        assert ms(d.grace_ends_at) == until
        assert ms(d.valid_until) == until
    clock.now = alert_at + GRACE  # the flip without the extension
    assert all(d.allowed for d in (await three(sidecar)).all())
    clock.now = until  # nothing new: the extension ends by itself
    for d in (await three(sidecar)).all():
        assert not d.allowed and d.reason == pb.DECISION_REASON_ACCOUNT_OVERDUE
        assert ms(d.suspended_at) == until
        # The release moves by the time the extension added.
        assert ms(d.release_at) == until + RELEASE_AFTER


async def test_an_extension_is_bounded_ends_with_a_settlement_and_needs_an_open_episode(
    reconciler: Reconciler, store: Store, events: Events, clock: FakeClock
) -> None:
    alert_at = T0 - HOUR
    early = override(events, "grace_extended", alert_at - DAY, until=T0 + 5 * DAY)
    await reconciler.ingest(
        deliveries(
            [
                *events.app(ACCT, APP, expires=T0 + 400 * DAY),
                early,  # before any alert: stored, no effect
                events("overdue_alert", alert_at, account_id=ACCT),
            ]
        )
    )
    assert (await status_of(store, APP)).at(T0).grace_ends_at == alert_at + GRACE
    assert await dead_letters(store) == []
    await reconciler.ingest(
        deliveries([override(events, "grace_extended", T0, until=T0 + 400 * DAY)])
    )
    limit = alert_at + GRACE + MAX_EXTENSION
    seg = (await status_of(store, APP)).at(T0)
    assert seg.grace_ends_at == limit and seg.reasons == (Reason.OVERDUE_GRACE,)
    clock.now = T0 + HOUR
    await reconciler.ingest(deliveries([events("arrears_settled", T0 + HOUR, account_id=ACCT)]))
    status = await status_of(store, APP)
    assert status.at(T0 + HOUR).reasons == ()
    assert all(Reason.ACCOUNT_OVERDUE not in s.reasons for s in status.upcoming(T0 + HOUR))


async def test_invalid_overrides_are_dead_lettered_with_the_field(
    reconciler: Reconciler, store: Store, events: Events
) -> None:
    bad = [
        override(events, "grace_extended", T0, until=T0 - 1),
        events("release_hold_set", T0, account_id=ACCT, reason="no actor"),
        events("release_hold_cleared", T0, account_id=ACCT, actor="bob", reason=""),
    ]
    await reconciler.ingest(deliveries([*events.app(ACCT, APP), *bad]))
    reasons = [d["reason"] for d in await dead_letters(store)]
    assert [r.split(":")[0] for r in reasons] == ["until", "actor", "reason"]


async def test_a_hold_stops_a_due_release_and_clearing_it_waits_the_notice(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    alert_at = now - 70 * DAY  # release due nine days ago
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(rec, src, overdue_history(events, ACCT, [APP], alert_at), recorded_at=alert_at)
    held_at = now - 20 * DAY
    await feed(rec, src, [override(events, "release_hold_set", held_at)], recorded_at=held_at)

    plan = await rec.try_release(ACCT, now)
    assert not plan.eligible and plan.why.startswith("release on hold")
    assert "alice@support" in plan.why and "ticket 4411" in plan.why
    assert await released_facts(store, ACCT) == []
    seg = (await status_of(store, APP)).at(now)
    assert seg.reasons == (Reason.ACCOUNT_OVERDUE,) and seg.release_at is None
    # Still listed by release-plan, as held, and looked at again a day later.
    assert await store.redis.zscore(DEADLINES, f"release:{ACCT}") == now + HELD_RECHECK_MS
    [listed] = await rec.plan_releases(now)
    assert listed.why.startswith("release on hold")

    # Cleared three days ago (as recorded): four more days to go, whatever
    # the clear's own occurred_at says.
    cleared_at = now - 3 * DAY
    clear = override(events, "release_hold_cleared", now - 10 * DAY)
    await feed(rec, src, [clear], recorded_at=cleared_at)
    plan = await rec.try_release(ACCT, now)
    assert plan.release_at == cleared_at + NOTICE
    assert not plan.eligible and "due at" in plan.why
    # The notice of the new date is made now (the clear is read today): the
    # release waits the notice period from it, not from the clear (R10).
    assert plan.ready_at == now + NOTICE
    assert await store.redis.zscore(DEADLINES, f"release:{ACCT}") == now + NOTICE
    await rec.run_deadlines(now)
    assert await released_facts(store, ACCT) == []
    # The customer is told the new date.
    notices = await guard_events(store, "release_scheduled")
    assert notices[-1]["release_at"] == format_time(cleared_at + NOTICE)


async def test_a_hold_cleared_long_enough_ago_lets_the_release_happen(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    now = clock.now = wall_clock()
    alert_at = now - 70 * DAY
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(rec, src, overdue_history(events, ACCT, [APP], alert_at), recorded_at=alert_at)
    await feed(
        rec, src, [override(events, "release_hold_set", now - 20 * DAY)], recorded_at=now - 20 * DAY
    )
    cleared_at = now - NOTICE - HOUR
    await feed(
        rec, src, [override(events, "release_hold_cleared", cleared_at)], recorded_at=cleared_at
    )
    await noticed(rec, ACCT, cleared_at)  # as a live reconciler would have, then
    plan = await rec.try_release(ACCT, now)
    assert plan.eligible, plan.why
    assert plan.release_at == cleared_at + NOTICE
    assert rec.releases_done == [ACCT]
    assert len(await released_facts(store, ACCT)) == 1
