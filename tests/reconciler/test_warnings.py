"""Warnings before every cut and announcements of overrides, on a real
redis-server (issue 15): ``suspension_scheduled`` once when a suspension
ahead becomes known and once at the reminder, ``override_applied`` once per
override, however many replicas run and however often the work is redone."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lcic_guard.domain.policy import DAY, HOUR, MINUTE, PolicyConfig
from lcic_guard.domain.time import format_time
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.store.status import Store

from tests.reconciler.test_reconciler import GRACE, guard_events
from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries

ACCT = "acct-1"


def replica(store: Store, policy: PolicyConfig, clock: FakeClock, **cfg: Any) -> Reconciler:
    base: dict[str, Any] = {"release_margin_ms": 0, "announce_settle_ms": 0} | cfg
    return Reconciler(store, policy, ReconcilerConfig(**base), clock=clock)


def ids(announced: list[dict[str, Any]]) -> list[str]:
    return [e["announcement_id"] for e in announced]


async def test_a_coming_overdue_suspension_is_warned_of_once_then_reminded_once(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    a, b = replica(store, policy, clock), replica(store, policy, clock)
    alert = events("overdue_alert", T0 - HOUR, account_id=ACCT)
    evs = [*events.app(ACCT, "app-1"), *events.app(ACCT, "app-2"), alert]
    await a.ingest(deliveries(evs))
    await b.ingest(deliveries(evs))  # redelivered to another replica
    grace_end = T0 - HOUR + GRACE
    [first] = await guard_events(store, "suspension_scheduled")
    assert first["scope"] == "account" and first["account_id"] == ACCT
    assert first["app_ids"] == ["app-1", "app-2"] and first["app_id"] is None
    assert first["reason"] == "ACCOUNT_OVERDUE" and first["at"] == format_time(grace_end)
    assert first["notice"] == "initial"

    for rec in (a, b, a):
        await rec.run_deadlines(grace_end - HOUR - 1)
    assert len(await guard_events(store, "suspension_scheduled")) == 1
    for rec in (a, b, a):
        await rec.run_deadlines(grace_end - HOUR)
    announced = await guard_events(store, "suspension_scheduled")
    assert [e["notice"] for e in announced] == ["initial", "1h"]
    for rec in (b, a):
        await rec.run_deadlines(grace_end + MINUTE)
        await rec.recompute(ACCT)
    assert len(await guard_events(store, "suspension_scheduled")) == 2


async def test_a_package_expiring_with_no_successor_is_warned_of_for_its_app(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec = replica(store, policy, clock)
    expires = T0 + 3 * DAY
    await rec.ingest(deliveries(events.app(ACCT, "app-1", expires=expires)))
    [warning] = await guard_events(store, "suspension_scheduled")
    assert (warning["scope"], warning["app_id"], warning["reason"]) == (
        "app",
        "app-1",
        "PACKAGE_EXPIRED",
    )
    assert warning["at"] == format_time(expires)
    # A successor bought in time: no reminder of that expiry; the successor's
    # own expiry is the suspension ahead now.
    renewal = events(
        "package_purchased",
        T0,
        app_id="app-1",
        package_id="pkg-next",
        starts_at=expires,
        expires_at=expires + 30 * DAY,
        quota_minutes=600,
    )
    await rec.ingest(deliveries([renewal]))
    await rec.run_deadlines(expires - HOUR)
    announced = await guard_events(store, "suspension_scheduled")
    assert [(e["at"], e["notice"]) for e in announced] == [
        (format_time(expires), "initial"),
        (format_time(expires + 30 * DAY), "initial"),
    ]


async def test_a_suspension_passed_through_within_the_settle_time_is_never_warned_of(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec = replica(store, policy, clock, announce_settle_ms=10_000)
    far = T0 + 400 * DAY
    await rec.ingest(deliveries(events.app(ACCT, "app-1", expires=far)))
    await rec.ingest(deliveries([events("overdue_alert", T0 - HOUR, account_id=ACCT)]))
    clock.advance(5_000)
    await rec.ingest(deliveries([events("arrears_settled", T0, account_id=ACCT)]))
    clock.advance(60_000)
    await rec.run_deadlines(clock.now)
    await rec.recompute(ACCT)
    announced = await guard_events(store, "suspension_scheduled")
    # Only the package's far expiry, once it has settled; never the grace.
    assert [e["reason"] for e in announced] == ["PACKAGE_EXPIRED"]


async def test_each_override_is_announced_once(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    a, b = replica(store, policy, clock), replica(store, policy, clock)
    overrides = [
        events(
            "grace_extended",
            T0 - 30 * MINUTE,
            account_id=ACCT,
            until=format_time(T0 + 2 * DAY),
            actor="alice@support",
            reason="transfer in flight",
        ),
        events("release_hold_set", T0, account_id=ACCT, actor="bob@legal", reason="dispute"),
    ]
    setup = [*events.app(ACCT, "app-1"), events("overdue_alert", T0 - HOUR, account_id=ACCT)]
    await a.ingest(deliveries(setup + overrides))
    await b.ingest(deliveries(overrides))
    for rec in (a, b):
        await rec.recompute(ACCT)
        await rec.run_deadlines(T0 + DAY)
    announced = await guard_events(store, "override_applied")
    assert Counter(ids(announced)) == Counter(f"override:{o['event_id']}" for o in overrides)
    extension = next(e for e in announced if e["override"] == "grace_extended")
    assert extension["actor"] == "alice@support" and extension["reason"] == "transfer in flight"
    assert extension["until"] == format_time(T0 + 2 * DAY)
    assert "extended until" in extension["effect"] and extension["recorded_at"] is not None
