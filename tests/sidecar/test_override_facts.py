"""Issue 19, findings 1 and 7, end to end on a real redis-server, the real
reconciler and the real gRPC server over a socket.

1. No facts from the future: a forged override or billing event dated ahead
   of the reconciler's clock is dead-lettered naming ``occurred_at``, and an
   override made through ApplyOverride is dated now, never after a
   future-dated fact, so support's hold is in force at once.
7. The audit trail says what an override actually does: a clear dated before
   a hold that is in force has no effect, in ListOverrides,
   GetApplicationStatus and the ``override_applied`` announcement alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.domain.facts import GraceExtended, ReleaseHoldCleared
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, PolicyConfig
from lcic_guard.domain.time import format_time, wall_clock
from lcic_guard.reconciler import Reconciler
from lcic_guard.reconciler.sources import StreamSource
from lcic_guard.store.status import Store

from tests.reconciler.test_overrides import ACCT, APP, override
from tests.reconciler.test_reconciler import (
    dead_letters,
    feed,
    guard_events,
    leader,
    overdue_history,
    stream_source,
)
from tests.sidecar.test_overrides_rpc import (
    ADMIN,
    READER,
    Start,
    admin_sidecar,
    code_and_details,
    extend,
    published,
    start_sidecar,  # noqa: F401 (fixture)
)
from tests.sidecar.test_security import bearer
from tests.support.clock import FakeClock
from tests.support.events import Events


def hold_request() -> pb.ApplyOverrideRequest:
    return pb.ApplyOverrideRequest(
        kind=pb.OVERRIDE_KIND_HOLD_RELEASE, account_id=ACCT, reason="legal hold 7"
    )


def clear_request() -> pb.ApplyOverrideRequest:
    return pb.ApplyOverrideRequest(
        kind=pb.OVERRIDE_KIND_CLEAR_HOLD, account_id=ACCT, reason="hold lifted"
    )


async def made_through_the_rpc(store: Store) -> list[dict[str, Any]]:
    return [e for e in await published(store) if e["event_id"].startswith("override:")]


async def drain(rec: Reconciler, src: StreamSource) -> None:
    while (await rec.ingest_source(src)).received:
        pass


async def test_forged_future_facts_are_dead_lettered_and_a_hold_made_now_is_in_force_now(
    start_sidecar: Start,  # noqa: F811
    tmp_path: Path,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    now = clock.now = wall_clock()
    alert_at = now - 70 * DAY  # the release was due nine days ago
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(rec, src, overdue_history(events, ACCT, [APP], alert_at), recorded_at=alert_at)
    forged = [
        override(events, "release_hold_cleared", now + 10 * DAY),
        override(events, "grace_extended", now + 10 * DAY, until=now + 11 * DAY),
        override(events, "release_hold_set", now + 6 * MINUTE),
        events("arrears_settled", now + 2 * DAY, account_id=ACCT),
        {**events("overdue_alert", now, account_id=ACCT), "occurred_at": "2099-01-01T00:00:00Z"},
    ]
    await feed(rec, src, forged)
    dead = {d["event_id"]: d["reason"] for d in map(_event_and_reason, await dead_letters(store))}
    assert set(dead) == {e["event_id"] for e in forged}
    for reason in dead.values():
        assert reason.startswith("occurred_at: "), reason
    assert "2099-01-01T00:00:00.000Z" in dead[forged[-1]["event_id"]]
    stored = await store.load_account_facts(ACCT)
    assert not {e["event_id"] for e in forged} & {f.event_id for f in stored.facts}

    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    try:
        resp = await stub.ApplyOverride(hold_request(), metadata=bearer(ADMIN), timeout=5)
        # Made now, dated now: not after any fact, forged or not.
        assert resp.override.occurred_at.ToMilliseconds() == now
        assert "release of the account's resources held" in resp.override.effect
        await drain(rec, src)
        plan = await rec.try_release(ACCT, now + 1)
        assert not plan.eligible and plan.why.startswith("release on hold"), plan.why
        listed = await stub.ListOverrides(
            pb.ListOverridesRequest(account_id=ACCT), metadata=bearer(READER), timeout=5
        )
        [entry] = listed.overrides
        assert entry.effect == "release of the account's resources held"
    finally:
        await channel.close()


def _event_and_reason(entry: dict[str, str]) -> dict[str, str]:
    return {"event_id": json.loads(entry["event"])["event_id"], "reason": entry["reason"]}


async def test_an_override_is_never_dated_after_a_future_fact_already_stored(
    start_sidecar: Start,  # noqa: F811
    tmp_path: Path,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    """Facts dated ahead that are already in the store (recorded before the
    bound existed, or by a reconciler whose clock ran ahead): ApplyOverride
    still dates its override now, so an extension asking for three days is
    not refused as "not in the future", and a hold is in force now."""
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(rec, src, overdue_history(events, ACCT, [APP], now - HOUR), recorded_at=now - HOUR)
    ahead = now + 10 * DAY
    await store.add_facts(
        ACCT,
        [
            GraceExtended("legacy-ext", ahead, ACCT, ahead + DAY, "mallory", "skewed"),
            ReleaseHoldCleared("legacy-clear", ahead, ACCT, "mallory", "skewed"),
        ],
        recorded_at=now - MINUTE,
    )
    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    try:
        until = now + 3 * DAY
        resp = await stub.ApplyOverride(extend(until, account=ACCT), metadata=bearer(ADMIN))
        assert resp.override.occurred_at.ToMilliseconds() == now
        resp = await stub.ApplyOverride(hold_request(), metadata=bearer(ADMIN), timeout=5)
        assert resp.override.occurred_at.ToMilliseconds() == now
        # The hold precedes the clear dated ahead, and says so.
        assert "lifted by a later clear (legacy-clear" in resp.override.effect
        [ext, hold] = await made_through_the_rpc(store)
        assert ext["occurred_at"] == hold["occurred_at"] == format_time(now)
        await drain(rec, src)
        plan = await rec.try_release(ACCT, now + 1)
        assert not plan.eligible
        status = (await store.read_status(APP))[0]
        assert status is not None and status.at(now).grace_ends_at == until
    finally:
        await channel.close()


async def test_a_hold_and_its_clear_in_one_millisecond_keep_their_order_without_a_future_date(
    start_sidecar: Start,  # noqa: F811
    tmp_path: Path,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    """The clock does not move between the hold and the clear: the clear is
    not stamped a millisecond ahead (the old way), it is refused as ABORTED,
    and once the clock has moved it is dated then, after the hold."""
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(rec, src, overdue_history(events, ACCT, [APP], now - 70 * DAY))
    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    try:
        await stub.ApplyOverride(hold_request(), metadata=bearer(ADMIN), timeout=5)
        await drain(rec, src)
        code, details = await code_and_details(
            stub.ApplyOverride(clear_request(), metadata=bearer(ADMIN), timeout=5)
        )
        assert code == grpc.StatusCode.ABORTED, (code, details)
        assert [e["type"] for e in await made_through_the_rpc(store)] == ["release_hold_set"]
        clock.advance(1)
        resp = await stub.ApplyOverride(clear_request(), metadata=bearer(ADMIN), timeout=5)
        assert resp.override.occurred_at.ToMilliseconds() == now + 1
        assert resp.override.effect.startswith("published; once the reconciler records it: ")
        assert "release hold lifted" in resp.override.effect
    finally:
        await channel.close()


async def test_a_clear_dated_before_the_hold_in_force_is_audited_as_no_effect(
    start_sidecar: Start,  # noqa: F811
    tmp_path: Path,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
) -> None:
    now = clock.now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src])
    await feed(rec, src, overdue_history(events, ACCT, [APP], now - 70 * DAY))
    hold = override(events, "release_hold_set", now - HOUR)
    await feed(rec, src, [hold])
    clear = override(events, "release_hold_cleared", now - 2 * HOUR)
    await feed(rec, src, [clear])
    # The hold stays in force: no release.
    plan = await rec.try_release(ACCT, now)
    assert not plan.eligible and plan.why.startswith("release on hold"), plan.why

    said = f"no effect: a later hold ({hold['event_id']} of {format_time(now - HOUR)}) is in force"
    _, channel, stub = await admin_sidecar(start_sidecar, tmp_path)
    try:
        listed = await stub.ListOverrides(
            pb.ListOverridesRequest(account_id=ACCT), metadata=bearer(READER), timeout=5
        )
        effects = {o.event_id: o.effect for o in listed.overrides}
        assert effects == {
            clear["event_id"]: said,
            hold["event_id"]: "release of the account's resources held",
        }
        status = await stub.GetApplicationStatus(
            pb.GetApplicationStatusRequest(app_id=APP), metadata=bearer(READER), timeout=5
        )
        assert {o.event_id: o.effect for o in status.status.overrides} == effects
    finally:
        await channel.close()
    await rec.recompute(ACCT)
    await rec.run_deadlines(now + DAY)
    announced = {e["event_id"]: e["effect"] for e in await guard_events(store, "override_applied")}
    assert announced[clear["event_id"]] == said
