"""lua/settle_status_announcement.lua: a status change is announced exactly
once, and only once it has held for the settle time, exercised through the
reconciler's coordination API on a real Redis."""

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
