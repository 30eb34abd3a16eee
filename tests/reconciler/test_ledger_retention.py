"""The announcement ledger is bounded (issue 22 finding 8, ADR 0031), on a
real redis-server: the release notices of overdue episodes that are over and
the suspension warnings of the past are forgotten once every date they named
lies a retention period back; the open episode's notices stay however old
(its release still rests on them), as do overrides, releases and claims in
flight; and nothing forgotten is ever announced again.

The history is replayed as a live reconciler would have lived it: the clock
set back to each step, the facts stored as recorded then, the real planners
run at that time."""

from __future__ import annotations

import json
from typing import Any

from lcic_guard.domain.policy import DAY, HOUR, MINUTE, PolicyConfig
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.reconciler import Reconciler
from lcic_guard.store.keys import GUARD_STREAM, ledger_key
from lcic_guard.store.status import Store

from tests.reconciler.test_reconciler import GRACE, feed, leader, stream_source
from tests.support.clock import FakeClock
from tests.support.events import Events

ACCT = "acct-1"
APP = "app-1"
OLD_ACCT = "acct-2"
RETAIN = 400 * DAY
QUIET: dict[str, Any] = {"release_reminders_ms": (), "suspension_reminders_ms": ()}


async def ledger_ids(store: Store, account: str = ACCT) -> set[str]:
    raw: Any = await store.redis.hkeys(ledger_key(account))
    return {k.decode() for k in raw}


async def announced(store: Store) -> list[dict[str, Any]]:
    rows: Any = await store.redis.xrange(GUARD_STREAM)
    return [json.loads(fields[b"event"]) for _id, fields in rows]


async def live(rec: Reconciler, clock: FakeClock, at: Millis) -> None:
    """The reconciler at work at ``at``: the account recomputed and its
    deadlines run, as a live one would have then."""
    clock.now = at
    await rec.recompute(ACCT)
    await rec.run_deadlines(at)


async def history(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, **cfg: Any
) -> tuple[Reconciler, Millis, dict[str, str]]:
    """An account lived through for almost three years by a reconciler that
    kept every record (as before this version): a package that expired
    (warned of), an overdue episode settled after its notice, and the open
    one: overdue for 500 days, held for a while by support and cleared long
    ago, its release never made (no reconciler released it). Returns the
    leader of now (configured with ``cfg``), now, and the announcement ids
    the history made, by name."""
    now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src], **QUIET, ledger_retention_ms=0)

    def at(t: Millis, *evs: dict[str, Any]) -> Any:
        clock.now = t
        return feed(rec, src, list(evs), recorded_at=t)

    start, expiry = now - 1000 * DAY, now - 800 * DAY
    await at(start, *events.app(ACCT, APP, at=start, expires=expiry))
    alert1 = events("overdue_alert", now - 900 * DAY, account_id=ACCT)
    await at(now - 900 * DAY, alert1)
    await live(rec, clock, now - 900 * DAY + GRACE + MINUTE)  # episode 1's notice
    renewal = events(
        "package_purchased",
        now - 880 * DAY,
        app_id=APP,
        package_id="pkg-2",
        starts_at=expiry,
        expires_at=now + 400 * DAY,
        quota_minutes=6000,
    )
    await at(now - 880 * DAY, events("arrears_settled", now - 880 * DAY, account_id=ACCT), renewal)
    alert2 = events("overdue_alert", now - 500 * DAY, account_id=ACCT)
    await at(now - 500 * DAY, alert2)
    await live(rec, clock, now - 500 * DAY + GRACE + MINUTE)  # episode 2's notice
    who = {"account_id": ACCT, "actor": "alice@support", "reason": "ticket 4411"}
    hold_at = now - 500 * DAY + GRACE + HOUR
    await at(hold_at, events("release_hold_set", hold_at, **who))
    await at(hold_at + HOUR, events("release_hold_cleared", hold_at + HOUR, **who))
    await live(rec, clock, hold_at + 2 * HOUR)
    clock.now = now
    made = {
        "expiry warning": f"warn:app:{APP}:PACKAGE_EXPIRED:{expiry}:initial",
        "episode 1 warning": (
            f"warn:account:{ACCT}:ACCOUNT_OVERDUE:{now - 900 * DAY + GRACE}:initial"
        ),
        "episode 1 notice": f"notice:{ACCT}:{alert1['event_id']}:initial",
        "episode 2 warning": (
            f"warn:account:{ACCT}:ACCOUNT_OVERDUE:{now - 500 * DAY + GRACE}:initial"
        ),
        "episode 2 notice": f"notice:{ACCT}:{alert2['event_id']}:initial",
        "renewal warning": f"warn:app:{APP}:PACKAGE_EXPIRED:{now + 400 * DAY}:initial",
    }
    ids = await ledger_ids(store)
    assert set(made.values()) <= ids, "\n".join(sorted(ids))
    overrides = {i for i in ids if i.startswith("override:")}
    assert len(overrides) == 2
    assert ids == set(made.values()) | overrides, sorted(ids)
    made |= {f"override {n}": i for n, i in enumerate(sorted(overrides))}
    # The same replica, upgraded.
    return await leader(store, policy, clock, "r1", [src], **(QUIET | cfg)), now, made


async def test_records_of_the_past_are_forgotten_after_the_retention_the_open_episodes_stay(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec, _now, made = await history(store, policy, clock, events)
    await rec.recompute(ACCT)
    assert await ledger_ids(store) == {
        made["episode 2 notice"],  # 500 days old, but its episode is open
        made["renewal warning"],  # still ahead
        made["override 0"],
        made["override 1"],
    }


async def test_a_retention_of_zero_keeps_every_record(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec, _now, made = await history(store, policy, clock, events, ledger_retention_ms=0)
    await rec.recompute(ACCT)
    assert await ledger_ids(store) == set(made.values())


async def test_the_release_of_the_open_episode_still_rests_on_its_old_notice(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    """500 days overdue, the hold long cleared: the release finds the notice
    made when the suspension became known, trimmed around it or not, and
    needs no new one (which would delay it by a notice period)."""
    rec, now, made = await history(store, policy, clock, events)
    await rec.recompute(ACCT)  # the trim
    plan = await rec.try_release(ACCT, now)
    assert plan.released, plan.why
    assert made["episode 2 notice"] in plan.evidence
    notices = [e for e in await announced(store) if e["type"] == "release_scheduled"]
    assert [e["announcement_id"] for e in notices] == [
        made["episode 1 notice"],
        made["episode 2 notice"],
    ]


async def test_nothing_forgotten_is_announced_again(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    rec, now, _made = await history(store, policy, clock, events, release_dry_run=True)
    # An account released long ago: its release announcement stays made.
    src = stream_source(store, "c2")
    clock.now = now - 600 * DAY
    await feed(rec, src, events.app(OLD_ACCT, "app-9", at=clock.now), recorded_at=clock.now)
    assert await rec.announcer.release(OLD_ACCT, ["app-9"], clock.now)
    await live(rec, clock, now)
    clock.now = now
    await rec.recompute(OLD_ACCT)
    before = await announced(store)
    trimmed = await ledger_ids(store)
    # Replayed from now on, as often as anything could ask: recomputes,
    # deadlines, the release's own announcement.
    for t in (now, now + MINUTE, now + HOUR, now + DAY, now + 30 * DAY):
        await live(rec, clock, t)
        await rec.recompute(OLD_ACCT)
        assert await rec.announcer.release(OLD_ACCT, ["app-9"], t)
    assert await announced(store) == before
    assert await ledger_ids(store) == trimmed


async def test_a_claim_in_flight_is_not_forgotten(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    """A claim names no commit time: never forgotten, however old what it
    announces, and left to its writer."""
    rec, now, made = await history(store, policy, clock, events)
    aid = made["episode 1 warning"]
    raw: Any = await store.redis.hget(ledger_key(ACCT), aid)
    payload = {"announcement_id": aid, "type": "suspension_scheduled", "account_id": ACCT}
    claim = json.dumps({"claimed_at": now, "payload": payload}, sort_keys=True)
    assert raw is not None
    await store.redis.hset(ledger_key(ACCT), aid, claim)
    await live(rec, clock, now)
    got: Any = await store.redis.hget(ledger_key(ACCT), aid)
    assert got.decode() == claim


async def test_the_announcement_stream_keeps_about_the_retention(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events
) -> None:
    sec, usec = await store.redis.time()
    long_ago = int(sec) * 1000 + int(usec) // 1000 - RETAIN - DAY
    for i in range(250):
        await store.redis.xadd(GUARD_STREAM, {"event": "{}"}, id=f"{long_ago}-{i}")
    clock.now = wall_clock()
    src = stream_source(store, "c1")
    rec = await leader(store, policy, clock, "r1", [src], **QUIET)
    await feed(rec, src, events.app(ACCT, APP, at=clock.now - DAY), recorded_at=clock.now)
    left = await announced(store)
    assert len(left) - sum(1 for e in left if e == {}) >= 1  # what was announced now
    assert sum(1 for e in left if e == {}) < 100, "whole nodes of old entries went"
