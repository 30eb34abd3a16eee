"""lua/claim_announcement.lua, lua/finish_announcement.lua,
lua/take_outbox.lua and lua/settle_status_announcement.lua: announcements
made exactly once (a cursor advanced with the payload left in an outbox,
atomically; the outbox cleared once the payload is on the stream; an
abandoned outbox taken over by exactly one replica), exercised through the
reconciler's coordination API on a real Redis.

Kept apart from the other script tests: the announcement scripts are being
rebuilt around a ledger of notices, and this file goes with them."""

from __future__ import annotations

import asyncio

from lcic_guard.domain.policy import AppStatus, Segment
from lcic_guard.store.codec import text
from lcic_guard.store.coordination import Coordination, Outbox
from lcic_guard.store.keys import meta_key, status_key
from lcic_guard.store.status import Store

from tests.support.clock import T0

KEY = meta_key("acct-1")
F = "notice"
STALE = 30_000
APP = "app-1"
SETTLE = 60_000


async def fields(store: Store, key: str = KEY) -> dict[str, str]:
    raw = await store.redis.hgetall(key)
    return {text(k) or "": text(v) or "" for k, v in raw.items()}


# -- claim_announcement / finish_announcement ---------------------------------------


async def test_a_claim_advances_the_cursor_and_leaves_the_payload_in_the_outbox(
    store: Store,
) -> None:
    coord = Coordination(store)
    assert await coord.claim(KEY, F, "", "s|0", "P1", T0)
    assert await coord.cursor(KEY, F) == ("s|0", Outbox("P1", T0))
    await coord.finish(KEY, F, "P1")
    assert await coord.cursor(KEY, F) == ("s|0", None)
    assert await fields(store) == {F: "s|0"}, "finish clears every outbox field"


async def test_a_claim_on_a_stale_cursor_is_refused_and_leaves_the_outbox_alone(
    store: Store,
) -> None:
    coord = Coordination(store)
    await coord.claim(KEY, F, "", "s|0", "P1", T0)
    assert not await coord.claim(KEY, F, "", "s|0,1", "P2", T0 + 1)
    assert not await coord.claim(KEY, F, "other", "s|0,1", "P2", T0 + 1)
    assert await coord.cursor(KEY, F) == ("s|0", Outbox("P1", T0))


async def test_of_racing_claims_from_the_same_cursor_exactly_one_wins(store: Store) -> None:
    coord = Coordination(store)
    won = await asyncio.gather(*(coord.claim(KEY, F, "", "s|0", f"P{i}", T0 + i) for i in range(8)))
    assert won.count(True) == 1
    cursor, outbox = await coord.cursor(KEY, F)
    assert cursor == "s|0" and outbox is not None
    assert outbox.payload == f"P{won.index(True)}"


async def test_finishing_another_payload_leaves_the_outbox(store: Store) -> None:
    # A replica that took over and finished an older outbox must not clear
    # the newer announcement claimed meanwhile.
    coord = Coordination(store)
    await coord.claim(KEY, F, "", "s|0", "P1", T0)
    await coord.finish(KEY, F, "P1")
    await coord.claim(KEY, F, "s|0", "s|0,1", "P2", T0 + 1)
    await coord.finish(KEY, F, "P1")
    assert await coord.cursor(KEY, F) == ("s|0,1", Outbox("P2", T0 + 1))


# -- take_outbox ----------------------------------------------------------------


async def test_a_recent_outbox_is_left_to_its_writer(store: Store) -> None:
    coord = Coordination(store)
    await coord.claim(KEY, F, "", "s|0", "P1", T0)
    assert not await coord.take_outbox(KEY, F, "P1", T0 + STALE - 1, STALE)
    assert "notice:outbox_taken" not in await fields(store)


async def test_an_abandoned_outbox_is_taken_over_once_per_stale_period(store: Store) -> None:
    coord = Coordination(store)
    await coord.claim(KEY, F, "", "s|0", "P1", T0)
    assert await coord.take_outbox(KEY, F, "P1", T0 + STALE, STALE)
    # The taker is now the writer: others wait a stale period from the take.
    assert not await coord.take_outbox(KEY, F, "P1", T0 + STALE + 1, STALE)
    assert not await coord.take_outbox(KEY, F, "P1", T0 + 2 * STALE - 1, STALE)
    assert await coord.take_outbox(KEY, F, "P1", T0 + 2 * STALE, STALE)
    await coord.finish(KEY, F, "P1")
    assert await fields(store) == {F: "s|0"}


async def test_of_racing_takers_exactly_one_finishes_the_outbox(store: Store) -> None:
    coord = Coordination(store)
    await coord.claim(KEY, F, "", "s|0", "P1", T0)
    taken = await asyncio.gather(
        *(coord.take_outbox(KEY, F, "P1", T0 + STALE + i, STALE) for i in range(8))
    )
    assert taken.count(True) == 1


async def test_an_outbox_finished_or_replaced_is_not_taken(store: Store) -> None:
    coord = Coordination(store)
    assert not await coord.take_outbox(KEY, F, "P1", T0 + STALE, STALE)
    await coord.claim(KEY, F, "", "s|0", "P1", T0)
    assert not await coord.take_outbox(KEY, F, "P0", T0 + STALE, STALE)
    await coord.finish(KEY, F, "P1")
    assert not await coord.take_outbox(KEY, F, "P1", T0 + STALE, STALE)


# -- settle_status_announcement -----------------------------------------------------


async def versioned(store: Store, seq: int) -> int:
    res = await store.write_status(AppStatus(APP, "acct-1", (Segment(T0),), seq))
    assert res.version == seq
    return seq


async def settle(
    coord: Coordination, announced: str, new: str, now: int, version: int, settle: int = SETTLE
) -> tuple[int, int]:
    return await coord.settle_status(
        APP, "announced", announced, new, f"{new}@{now}", now, version, settle
    )


async def test_a_new_state_is_announced_only_once_it_has_held_for_the_settle_time(
    store: Store,
) -> None:
    coord = Coordination(store)
    v = await versioned(store, 3)
    assert await settle(coord, "", "GRACE", T0, v) == (2, T0)
    assert await coord.status_cursor(APP, "announced") == ("", None, "GRACE")
    assert await settle(coord, "", "GRACE", T0 + SETTLE - 1, v) == (2, T0), "since stays"
    assert await settle(coord, "", "GRACE", T0 + SETTLE, v) == (1, T0)
    cursor, outbox, cand = await coord.status_cursor(APP, "announced")
    assert (cursor, outbox, cand) == ("GRACE", Outbox(f"GRACE@{T0 + SETTLE}", T0 + SETTLE), None)


async def test_without_a_settle_time_the_first_evaluation_claims(store: Store) -> None:
    coord = Coordination(store)
    v = await versioned(store, 1)
    assert await settle(coord, "", "GRACE", T0, v, settle=0) == (1, T0)
    assert (await coord.status_cursor(APP, "announced"))[0] == "GRACE"


async def test_a_state_that_reverts_before_settling_is_never_announced(store: Store) -> None:
    coord = Coordination(store)
    v = await versioned(store, 1)
    await settle(coord, "", "GRACE", T0, v)
    assert await settle(coord, "", "", T0 + 1, v) == (0, 0)
    assert await coord.status_cursor(APP, "announced") == ("", None, None)
    # Seen again: it starts settling afresh.
    assert await settle(coord, "", "GRACE", T0 + SETTLE, v) == (2, T0 + SETTLE)


async def test_a_different_candidate_restarts_the_settle_time(store: Store) -> None:
    coord = Coordination(store)
    v = await versioned(store, 1)
    await settle(coord, "", "GRACE", T0, v)
    assert await settle(coord, "", "SUSPENDED", T0 + SETTLE, v) == (2, T0 + SETTLE)
    assert (await coord.status_cursor(APP, "announced"))[2] == "SUSPENDED"


async def test_nothing_is_noted_from_another_version_than_the_stored_one(store: Store) -> None:
    coord = Coordination(store)
    await versioned(store, 5)
    assert await settle(coord, "", "GRACE", T0, 4, settle=0) == (3, 0)
    assert await settle(coord, "", "GRACE", T0, 6, settle=0) == (3, 0)
    assert await coord.status_cursor(APP, "announced") == ("", None, None)


async def test_nothing_is_claimed_from_a_stale_cursor_or_over_an_outbox(store: Store) -> None:
    coord = Coordination(store)
    v = await versioned(store, 1)
    assert await settle(coord, "", "GRACE", T0, v, settle=0) == (1, T0)
    # The announcement is still in the outbox: a newer one would overwrite it.
    assert await settle(coord, "GRACE", "SUSPENDED", T0 + 1, v, settle=0) == (3, 0)
    await coord.finish(status_key(APP), "announced", f"GRACE@{T0}")
    # A replica that read the cursor before the claim.
    assert await settle(coord, "", "SUSPENDED", T0 + 2, v, settle=0) == (3, 0)
    assert await settle(coord, "GRACE", "SUSPENDED", T0 + 2, v, settle=0) == (1, T0 + 2)


async def test_an_evaluation_older_than_the_last_claim_at_that_version_is_refused(
    store: Store,
) -> None:
    # A replica with a lagging clock cannot announce backwards.
    coord = Coordination(store)
    v = await versioned(store, 1)
    await settle(coord, "", "GRACE", T0, v, settle=0)
    await coord.finish(status_key(APP), "announced", f"GRACE@{T0}")
    assert await settle(coord, "GRACE", "ACTIVE", T0 - 1, v, settle=0) == (3, 0)
    assert await settle(coord, "GRACE", "ACTIVE", T0, v, settle=0) == (1, T0)


async def test_of_racing_evaluations_exactly_one_claims(store: Store) -> None:
    coord = Coordination(store)
    v = await versioned(store, 1)
    codes = await asyncio.gather(
        *(settle(coord, "", "GRACE", T0 + i, v, settle=0) for i in range(8))
    )
    assert sorted(c for c, _ in codes) == [1] + [3] * 7
