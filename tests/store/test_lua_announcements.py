"""lua/settle_status_announcement.lua, lua/finish_announcement.lua and
lua/take_outbox.lua: a status change is announced exactly once, and only
once it has held for the settle time; its outbox is cleared by its writer,
or taken over by exactly one replica once the writer is presumed dead,
exercised through the reconciler's coordination API on a real Redis."""

from __future__ import annotations

import asyncio

from lcic_guard.domain.policy import AppStatus, Segment
from lcic_guard.store.codec import text
from lcic_guard.store.coordination import Coordination, Outbox
from lcic_guard.store.keys import status_key
from lcic_guard.store.status import Store

from tests.support.clock import T0

APP = "app-1"
KEY = status_key(APP)
F = "announced"
# The takeover period the reconciler passes (STALE_OUTBOX_MS).
STALE = 10_000
SETTLE = 60_000


async def fields(store: Store, key: str = KEY) -> dict[str, str]:
    raw = await store.redis.hgetall(key)
    return {text(k) or "": text(v) or "" for k, v in raw.items()}


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


# -- finish_announcement / take_outbox ---------------------------------------------


async def claimed(coord: Coordination, new: str = "GRACE", now: int = T0) -> str:
    """Claim ``new`` as the announcer does (settled at once); the payload
    left in the outbox."""
    announced = (await coord.status_cursor(APP, F))[0]
    assert await settle(coord, announced, new, now, await coord.status_version(APP), 0) == (1, now)
    outbox = (await coord.status_cursor(APP, F))[1]
    assert outbox == Outbox(f"{new}@{now}", now)
    return outbox.payload


async def test_finishing_clears_the_outbox_and_keeps_the_cursor(store: Store) -> None:
    coord = Coordination(store)
    await versioned(store, 1)
    payload = await claimed(coord)
    assert await coord.take_outbox(KEY, F, payload, T0 + STALE, STALE)
    await coord.finish(KEY, F, payload)
    assert await coord.status_cursor(APP, F) == ("GRACE", None, None)
    assert not {f"{F}:outbox", f"{F}:outbox_at", f"{F}:outbox_taken"} & set(await fields(store))
    # The next change can be claimed.
    await claimed(coord, "SUSPENDED", T0 + 1)


async def test_a_stale_finisher_leaves_the_outbox_that_replaced_its_own(store: Store) -> None:
    coord = Coordination(store)
    await versioned(store, 1)
    first = await claimed(coord)
    await coord.finish(KEY, F, first)
    second = await claimed(coord, "SUSPENDED", T0 + 1)
    await coord.finish(KEY, F, first)  # a writer that took the first over, late
    assert (await coord.status_cursor(APP, F))[1] == Outbox(second, T0 + 1)


async def test_an_outbox_is_taken_over_once_its_writer_is_presumed_dead(store: Store) -> None:
    coord = Coordination(store)
    await versioned(store, 1)
    payload = await claimed(coord)
    assert not await coord.take_outbox(KEY, F, payload, T0 + STALE - 1, STALE), "writer alive"
    assert await coord.take_outbox(KEY, F, payload, T0 + STALE, STALE)
    # Taken: nobody else takes it from the taker while it is alive.
    assert not await coord.take_outbox(KEY, F, payload, T0 + STALE, STALE)
    assert not await coord.take_outbox(KEY, F, payload, T0 + 2 * STALE - 1, STALE)
    # Unless the taker dies too; the outbox is the same one throughout.
    assert await coord.take_outbox(KEY, F, payload, T0 + 2 * STALE, STALE)
    assert (await coord.status_cursor(APP, F))[1] == Outbox(payload, T0)


async def test_of_racing_takers_exactly_one_takes_an_abandoned_outbox(store: Store) -> None:
    coord = Coordination(store)
    await versioned(store, 1)
    payload = await claimed(coord)
    got = await asyncio.gather(
        *(coord.take_outbox(KEY, F, payload, T0 + 5 * STALE, STALE) for _ in range(8))
    )
    assert sorted(got) == [False] * 7 + [True]


async def test_a_finished_or_replaced_outbox_is_not_taken(store: Store) -> None:
    coord = Coordination(store)
    await versioned(store, 1)
    first = await claimed(coord)
    await coord.finish(KEY, F, first)
    assert not await coord.take_outbox(KEY, F, first, T0 + 5 * STALE, STALE), "finished"
    second = await claimed(coord, "SUSPENDED", T0 + 5 * STALE)
    # A replica that read the first outbox before it was finished.
    assert not await coord.take_outbox(KEY, F, first, T0 + 10 * STALE, STALE), "replaced"
    assert f"{F}:outbox_taken" not in await fields(store)
    # The new one is its writer's until it is presumed dead.
    assert not await coord.take_outbox(KEY, F, second, T0 + 6 * STALE - 1, STALE)
    assert await coord.take_outbox(KEY, F, second, T0 + 6 * STALE, STALE)
