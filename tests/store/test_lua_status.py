"""lua/write_status.lua and lua/report_room.lua, the two scripts that write
the status hash a check reads, exercised through the store's API against a
real Redis (how the reconciler and the sidecar call them)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic_guard.domain.facts import ApplicationRegistered
from lcic_guard.domain.policy import HOUR, MINUTE, AppStatus, Reason, Room, Segment
from lcic_guard.store.codec import text
from lcic_guard.store.keys import status_key
from lcic_guard.store.status import ROOM_PRUNE_THRESHOLD, Store

from tests.support.clock import T0

APP = "app-1"


def status(account: str, seq: int, *reasons: Reason, at: int = T0) -> AppStatus:
    return AppStatus(APP, account, (Segment(at, tuple(reasons)),), seq, updated_at=at + seq)


def registration(account: str, at: int, event_id: str) -> ApplicationRegistered:
    return ApplicationRegistered(event_id=event_id, occurred_at=at, account_id=account, app_id=APP)


async def stored(store: Store) -> AppStatus:
    st_, _ = await store.read_status(APP)
    assert st_ is not None
    return st_


# -- write_status ---------------------------------------------------------------


async def test_a_first_write_stores_the_status_at_its_seq(store: Store) -> None:
    res = await store.write_status(status("acct-1", 4, Reason.OVERDUE_GRACE))
    assert res.written and res.previous is None and res.version == 4
    got = await stored(store)
    assert (got.account_id, got.version, got.updated_at) == ("acct-1", 4, T0 + 4)
    assert got.segments == (Segment(T0, (Reason.OVERDUE_GRACE,)),)


async def test_a_newer_write_replaces_the_status_and_returns_the_previous_one(
    store: Store,
) -> None:
    await store.write_status(status("acct-1", 4))
    res = await store.write_status(status("acct-1", 7, Reason.ACCOUNT_OVERDUE))
    assert res.written and res.version == 7
    assert res.previous is not None
    assert (res.previous.version, res.previous.segments) == (4, (Segment(T0),))
    assert (await stored(store)).segments[0].reasons == (Reason.ACCOUNT_OVERDUE,)


async def test_a_write_from_older_facts_is_refused_and_changes_nothing(store: Store) -> None:
    await store.write_status(status("acct-1", 7, Reason.ACCOUNT_OVERDUE))
    res = await store.write_status(status("acct-1", 6))
    assert not res.written and res.version == 0
    got = await stored(store)
    assert got.version == 7 and got.segments[0].reasons == (Reason.ACCOUNT_OVERDUE,)


async def test_the_same_seq_again_is_not_a_write_but_reports_the_stored_version(
    store: Store,
) -> None:
    # A replica that recomputed from the same facts learns its status is the
    # one stored (it may announce it) without bumping the version.
    await store.write_status(status("acct-1", 5))
    await store.write_status(status("acct-1", 9))
    again = await store.write_status(status("acct-1", 9, Reason.ACCOUNT_BANNED))
    assert not again.written and again.version == 9
    assert (await stored(store)).segments == (Segment(T0),)


async def test_a_write_from_an_account_that_does_not_own_the_app_is_refused(
    store: Store,
) -> None:
    await store.register_owner(registration("acct-1", T0 - HOUR, "ev-1"))
    res = await store.write_status(status("acct-2", 50, Reason.ACCOUNT_BANNED))
    assert not res.written and res.version == 0
    assert await store.read_status(APP) == (None, None)
    assert await store.app_owner(APP) == "acct-1"
    ok = await store.write_status(status("acct-1", 1))
    assert ok.written and ok.version == 1


async def test_the_version_keeps_rising_when_the_app_moves_to_an_account_with_a_lower_seq(
    store: Store,
) -> None:
    await store.register_owner(registration("acct-1", T0 - HOUR, "ev-1"))
    await store.write_status(status("acct-1", 10))
    owner = await store.register_owner(registration("acct-2", T0 - 2 * HOUR, "ev-2"))
    assert owner.verdict == "moved"
    res = await store.write_status(status("acct-2", 3, Reason.PACKAGE_EXPIRED))
    # max(stored + 1, seq): a cache holding version 10 must see a newer one.
    assert res.written and res.version == 11
    got = await stored(store)
    assert (got.account_id, got.version) == ("acct-2", 11)
    # The old owner, whatever its seq, writes no more.
    assert not (await store.write_status(status("acct-1", 99))).written
    # The new owner's next seq is compared with its own last one, not the version.
    assert (await store.write_status(status("acct-2", 4))).version == 12


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seqs=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=12))
async def test_whatever_the_order_the_stored_status_is_the_newest_seq_written(
    store: Store, seqs: list[int]
) -> None:
    await store.redis.delete(status_key(APP))
    versions = []
    for seq in seqs:
        res = await store.write_status(status("acct-1", seq, at=T0 + seq))
        if res.written:
            versions.append(res.version)
    got = await stored(store)
    assert got.segments == (Segment(T0 + max(seqs)),)
    assert got.version == max(seqs)
    assert versions == sorted(set(versions)), "accepted versions strictly increase"


# -- report_room (R6, ADR 0014) ---------------------------------------------------


async def registered(store: Store) -> None:
    await store.register_owner(registration("acct-1", T0 - HOUR, "ev-1"))


async def room_fields(store: Store) -> set[str]:
    return {
        n
        for f in await store.redis.hkeys(status_key(APP))
        if (n := text(f) or "").startswith("room:")
    }


async def room(store: Store, room_id: str = "room-1") -> Room | None:
    await store.write_status(status("acct-1", 1))
    return (await store.read_status(APP, room_id))[1]


async def test_a_report_for_an_unknown_application_is_refused_and_stores_nothing(
    store: Store,
) -> None:
    assert not await store.report_room(APP, "room-1", now=T0, until=T0 + HOUR, started_at=T0)
    assert await store.redis.exists(status_key(APP)) == 0


async def test_the_earliest_start_wins_in_either_order(store: Store) -> None:
    await registered(store)
    r = dict(now=T0, until=T0 + 12 * HOUR)
    assert await store.report_room(APP, "room-1", started_at=T0 - 10 * MINUTE, **r)
    assert await store.report_room(APP, "room-1", started_at=T0 - 30 * MINUTE, **r)
    assert await store.report_room(APP, "room-1", started_at=T0 - 5 * MINUTE, **r)
    assert await room(store) == Room(started_at=T0 - 30 * MINUTE)


async def test_the_earliest_end_wins_and_the_first_scheduled_end_is_kept(store: Store) -> None:
    await registered(store)
    r = dict(now=T0, until=T0 + 2 * HOUR)
    await store.report_room(APP, "room-1", started_at=T0 - HOUR, scheduled_end=T0 + HOUR, **r)
    # A repeat cannot push the scheduled end out (or in).
    await store.report_room(APP, "room-1", started_at=T0 - HOUR, scheduled_end=T0 + 5 * HOUR, **r)
    await store.report_room(APP, "room-1", ended_at=T0 + 10 * MINUTE, **r)
    await store.report_room(APP, "room-1", ended_at=T0 + 30 * MINUTE, **r)
    await store.report_room(APP, "room-1", ended_at=T0 + 5 * MINUTE, **r)
    assert await room(store) == Room(T0 - HOUR, T0 + HOUR, T0 + 5 * MINUTE)


async def test_an_end_alone_is_kept_but_protects_nothing_until_its_start_comes(
    store: Store,
) -> None:
    await registered(store)
    await store.report_room(APP, "room-1", now=T0, until=T0 + HOUR, ended_at=T0)
    assert await room(store) is None
    await store.report_room(APP, "room-1", now=T0, until=T0 + HOUR, started_at=T0 - HOUR)
    assert await room(store) == Room(started_at=T0 - HOUR, ended_at=T0)


async def test_the_prune_time_only_moves_later(store: Store) -> None:
    await registered(store)
    await store.report_room(APP, "room-1", now=T0, until=T0 + 2 * HOUR, started_at=T0)
    await store.report_room(APP, "room-1", now=T0, until=T0 + HOUR, started_at=T0)
    raw = await store.redis.hget(status_key(APP), "room:room-1")
    assert raw is not None and json.loads(raw)["u"] == T0 + 2 * HOUR


async def test_many_rooms_prune_those_past_their_window_but_not_live_ones(
    store: Store,
) -> None:
    await registered(store)
    now = T0 + 10 * HOUR
    for i in range(ROOM_PRUNE_THRESHOLD):
        # Half of them protected until before now, half until after.
        until = now - MINUTE if i % 2 else now + HOUR
        await store.report_room(APP, f"r{i}", now=T0, until=until, started_at=T0)
    fields = await room_fields(store)
    assert len(fields) == ROOM_PRUNE_THRESHOLD, "none was past its window then"
    # Reported later (the hash is over the threshold): the report prunes.
    await store.report_room(APP, "late", now=now, until=now - MINUTE, started_at=T0)
    rooms = await room_fields(store)
    live = {f"room:r{i}" for i in range(0, ROOM_PRUNE_THRESHOLD, 2)}
    # The room being reported stays even past its window (it was just told).
    assert rooms == live | {"room:late"}
    assert await store.app_owner(APP) == "acct-1"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    reports=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=11 * 60)),
        min_size=1,
        max_size=10,
    )
)
async def test_any_order_of_reports_stores_the_earliest_start_and_end(
    store: Store, reports: list[tuple[bool, int]]
) -> None:
    await store.redis.flushall()
    await registered(store)
    for is_start, minute in reports:
        at = T0 - 12 * HOUR + minute * MINUTE
        times = {"started_at": at} if is_start else {"ended_at": at}
        assert await store.report_room(APP, "room-1", now=T0, until=T0 + HOUR, **times)
    starts = [m for s, m in reports if s]
    ends = [m for s, m in reports if not s]
    raw = await store.redis.hget(status_key(APP), "room:room-1")
    assert raw is not None
    got = json.loads(raw)
    base = T0 - 12 * HOUR

    def expect(ms: list[int]) -> int | None:
        return base + min(ms) * MINUTE if ms else None

    assert got.get("s") == expect(starts)
    assert got.get("x") == expect(ends)
