"""lua/register_owner.lua (the earliest registration owns an application, ADR
0006), lua/move_done.lua (the end of a move) and lua/route_app_fact.lua
(facts about an unknown application are parked, ADR 0007), exercised through
the store's API on a real Redis."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic_guard.domain.facts import ApplicationRegistered, PackagePurchased, PaygChanged
from lcic_guard.domain.policy import DAY, HOUR
from lcic_guard.store.keys import parked_key, status_key
from lcic_guard.store.status import Store

from tests.support.clock import T0

APP = "app-1"


def reg(account: str, at: int, event_id: str, app: str = APP) -> ApplicationRegistered:
    return ApplicationRegistered(event_id=event_id, occurred_at=at, account_id=account, app_id=app)


def payg(event_id: str, enabled: bool = True) -> PaygChanged:
    return PaygChanged(event_id=event_id, occurred_at=T0 - HOUR, app_id=APP, enabled=enabled)


def package(event_id: str) -> PackagePurchased:
    return PackagePurchased(
        event_id=event_id,
        occurred_at=T0 - DAY,
        app_id=APP,
        package_id="pkg-1",
        starts_at=T0 - DAY,
        expires_at=T0 + DAY,
        quota_minutes=60,
    )


# -- register_owner -----------------------------------------------------------------


async def test_the_first_registration_owns_the_app(store: Store) -> None:
    got = await store.register_owner(reg("acct-1", T0, "ev-1"))
    assert (got.verdict, got.owner, got.moved_from, got.parked) == (
        "own",
        "acct-1",
        (),
        [],
    )
    assert await store.app_owner(APP) == "acct-1"


async def test_a_later_registration_of_another_account_changes_nothing(store: Store) -> None:
    await store.register_owner(reg("acct-1", T0, "ev-1"))
    await store.route_app_fact(APP, payg("ev-9"))  # an owner exists: not parked
    await store.redis.hset(parked_key(APP), "ev-8", "{}")  # must not be handed out
    got = await store.register_owner(reg("acct-2", T0 + 1, "ev-2"))
    assert (got.verdict, got.owner, got.moved_from, got.parked) == (
        "later",
        "acct-1",
        (),
        [],
    )
    assert await store.app_owner(APP) == "acct-1"


async def test_an_earlier_registration_moves_the_app_and_names_the_account_left(
    store: Store,
) -> None:
    await store.register_owner(reg("acct-1", T0, "ev-1"))
    got = await store.register_owner(reg("acct-2", T0 - HOUR, "ev-2"))
    assert (got.verdict, got.owner, got.moved_from) == ("moved", "acct-2", ("acct-1",))
    assert await store.app_owner(APP) == "acct-2"
    # The first owner, arriving again, is now the later one.
    again = await store.register_owner(reg("acct-1", T0, "ev-1"))
    assert (again.verdict, again.owner) == ("later", "acct-2")


async def test_at_the_same_instant_the_smaller_event_id_by_bytes_wins(store: Store) -> None:
    # By bytes "ev-B" < "ev-a" (a locale's collation would say otherwise),
    # and "ev-z" < "ev-é" (é is 0xC3 0xA9 in UTF-8).
    await store.register_owner(reg("acct-1", T0, "ev-a"))
    assert (await store.register_owner(reg("acct-2", T0, "ev-B"))).verdict == "moved"
    assert (await store.register_owner(reg("acct-1", T0, "ev-a"))).verdict == "later"

    await store.register_owner(reg("acct-3", T0, "ev-é", app="app-2"))
    got = await store.register_owner(reg("acct-4", T0, "ev-z", app="app-2"))
    assert (got.verdict, got.owner) == ("moved", "acct-4")


async def test_the_owners_own_earlier_registration_becomes_the_one_to_beat(
    store: Store,
) -> None:
    await store.register_owner(reg("acct-1", T0, "ev-1"))
    assert (await store.register_owner(reg("acct-1", T0 - 2 * HOUR, "ev-2"))).verdict == "own"
    got = await store.register_owner(reg("acct-2", T0 - HOUR, "ev-3"))
    assert (got.verdict, got.owner) == ("later", "acct-1")


async def test_parked_facts_go_to_the_owner_on_every_registration_but_a_lost_one(
    store: Store,
) -> None:
    assert await store.route_app_fact(APP, payg("ev-p1")) is None
    assert await store.route_app_fact(APP, package("ev-p2")) is None
    got = await store.register_owner(reg("acct-1", T0, "ev-1"))
    assert got.verdict == "own"
    assert sorted(got.parked, key=lambda f: f.event_id) == [payg("ev-p1"), package("ev-p2")]
    # A redelivered registration gets them again (the caller drops them only
    # once they are stored), a losing one never.
    assert len((await store.register_owner(reg("acct-1", T0, "ev-1"))).parked) == 2
    assert (await store.register_owner(reg("acct-2", T0 + 1, "ev-2"))).parked == []
    moved = await store.register_owner(reg("acct-3", T0 - 1, "ev-3"))
    assert moved.verdict == "moved" and len(moved.parked) == 2


async def test_a_move_is_remembered_until_each_account_left_is_cleaned_up(
    store: Store,
) -> None:
    await store.register_owner(reg("acct-1", T0, "ev-1"))
    await store.register_owner(reg("acct-2", T0 - HOUR, "ev-2"))
    got = await store.register_owner(reg("acct-3", T0 - 2 * HOUR, "ev-3"))
    assert (got.verdict, got.moved_from) == ("moved", ("acct-1", "acct-2"))
    # Redelivered after a crash before the cleanup: the move is still to finish.
    again = await store.register_owner(reg("acct-3", T0 - 2 * HOUR, "ev-3"))
    assert (again.verdict, again.moved_from) == ("own", ("acct-1", "acct-2"))

    await store.move_done(APP, "acct-1")
    assert (await store.register_owner(reg("acct-3", T0 - 2 * HOUR, "ev-3"))).moved_from == (
        "acct-2",
    )
    await store.move_done(APP, "acct-9")  # not in the list: nothing changes
    await store.move_done(APP, "acct-2")
    assert await store.redis.hexists(status_key(APP), "moved_from") == 0
    assert (await store.register_owner(reg("acct-3", T0 - 2 * HOUR, "ev-3"))).moved_from == ()
    await store.move_done(APP, "acct-2")  # done twice: still nothing to do
    assert await store.app_owner(APP) == "acct-3"


async def test_an_account_left_twice_is_listed_once(store: Store) -> None:
    # acct-1 loses the app, wins it back, loses it again before any cleanup
    # finished: one cleanup of each is enough (the owner's is a no-op).
    await store.register_owner(reg("acct-1", T0, "ev-1"))
    await store.register_owner(reg("acct-2", T0 - HOUR, "ev-2"))
    await store.register_owner(reg("acct-1", T0 - 2 * HOUR, "ev-3"))
    got = await store.register_owner(reg("acct-2", T0 - 3 * HOUR, "ev-4"))
    assert (got.verdict, got.owner, got.moved_from) == (
        "moved",
        "acct-2",
        ("acct-1", "acct-2"),
    )


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    regs=st.lists(
        st.tuples(
            st.sampled_from(["acct-1", "acct-2", "acct-3"]),
            st.integers(min_value=0, max_value=3),
            st.sampled_from(["ev-a", "ev-B", "ev-é", "ev-z", "ev-1"]),
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda r: r[2],
    ),
    order=st.randoms(use_true_random=False),
)
async def test_in_any_arrival_order_the_earliest_registration_owns_the_app(
    store: Store, regs: list[tuple[str, int, str]], order: random.Random
) -> None:
    shuffled = list(regs)
    order.shuffle(shuffled)
    await store.redis.delete(status_key(APP))
    for account, hours, event_id in shuffled:
        await store.register_owner(reg(account, T0 + hours * HOUR, event_id))
    first = min(regs, key=lambda r: (r[1], r[2].encode()))
    assert await store.app_owner(APP) == first[0]


# -- route_app_fact -----------------------------------------------------------------


async def test_a_fact_of_a_known_app_is_routed_to_its_owner_and_not_parked(
    store: Store,
) -> None:
    await store.register_owner(reg("acct-1", T0, "ev-1"))
    assert await store.route_app_fact(APP, payg("ev-2"), parked_ttl_ms=DAY) == "acct-1"
    assert await store.redis.exists(parked_key(APP)) == 0


async def test_a_fact_of_an_unknown_app_is_parked_and_the_first_content_stays(
    store: Store,
) -> None:
    assert await store.route_app_fact(APP, payg("ev-2", enabled=True)) is None
    assert await store.route_app_fact(APP, payg("ev-2", enabled=False)) is None
    assert await store.redis.exists(status_key(APP)) == 0, "parking gives the app no owner"
    got = await store.register_owner(reg("acct-1", T0, "ev-1"))
    assert got.parked == [payg("ev-2", enabled=True)]


async def test_parked_facts_expire_the_ttl_after_the_last_one_parked(store: Store) -> None:
    await store.route_app_fact(APP, payg("ev-2"), parked_ttl_ms=10 * DAY)
    await store.redis.pexpire(parked_key(APP), 1000)  # as if time had passed
    await store.route_app_fact(APP, package("ev-3"), parked_ttl_ms=10 * DAY)
    ttl = await store.redis.pttl(parked_key(APP))
    assert 10 * DAY - 60_000 < ttl <= 10 * DAY


async def test_a_ttl_of_zero_parks_for_ever(store: Store) -> None:
    await store.route_app_fact(APP, payg("ev-2"), parked_ttl_ms=0)
    assert await store.redis.pttl(parked_key(APP)) == -1
