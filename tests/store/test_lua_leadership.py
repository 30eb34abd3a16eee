"""lua/lease.lua, lua/resign.lua, lua/fence_account.lua and lua/release.lua:
the leader lease and its fencing tokens, and the release fact that only the
holder of the newest token may record, once (SPEC R10), exercised through
the reconciler's coordination API on a real Redis."""

from __future__ import annotations

import asyncio

from lcic_guard.domain.facts import OverdueAlert, ResourcesReleased
from lcic_guard.domain.policy import DAY
from lcic_guard.store.coordination import Coordination
from lcic_guard.store.keys import FENCE, LEADER, meta_key
from lcic_guard.store.status import Store

from tests.support.clock import T0

ACCT = "acct-1"


def release(at: int = T0) -> ResourcesReleased:
    return ResourcesReleased(
        event_id=f"lcic-guard:release:{ACCT}:{at}",
        occurred_at=at,
        account_id=ACCT,
        release_at=at,
    )


async def facts(store: Store) -> int:
    """Give the account one fact; its seq (1)."""
    alert = OverdueAlert(event_id="ev-1", occurred_at=T0 - 70 * DAY, account_id=ACCT)
    return (await store.add_facts(ACCT, [alert], recorded_at=T0 - 70 * DAY)).seq


# -- lease / resign ---------------------------------------------------------------


async def test_the_first_holder_gets_a_token_and_keeps_it_while_renewing(store: Store) -> None:
    coord = Coordination(store)
    token = await coord.hold_lease("r1", 10_000)
    assert token == 1
    await store.redis.pexpire(LEADER, 50)
    assert await coord.hold_lease("r1", 10_000) == token, "renewal keeps the token"
    assert await store.redis.pttl(LEADER) > 5_000, "and extends the lease"
    assert await coord.lease_token("r1") == token


async def test_another_holder_gets_nothing_while_the_lease_is_held(store: Store) -> None:
    coord = Coordination(store)
    await coord.hold_lease("r1", 10_000)
    assert await coord.hold_lease("r2", 10_000) == 0
    assert await coord.lease_token("r2") == 0
    assert await coord.lease_token("r1") == 1


async def test_a_new_holder_after_expiry_gets_a_newer_token(store: Store) -> None:
    coord = Coordination(store)
    first = await coord.hold_lease("r1", 30)
    await asyncio.sleep(0.1)
    second = await coord.hold_lease("r2", 10_000)
    assert second > first
    # The old holder cannot renew into the new holder's lease.
    assert await coord.hold_lease("r1", 10_000) == 0
    assert await coord.lease_token("r2") == second


async def test_holder_names_that_look_like_the_separator_do_not_confuse_the_lease(
    store: Store,
) -> None:
    coord = Coordination(store)
    token = await coord.hold_lease("host|7", 10_000)
    assert await store.redis.get(LEADER) == f"host|7|{token}".encode()
    assert await coord.hold_lease("host|7", 10_000) == token
    assert await coord.hold_lease("host", 10_000) == 0
    await coord.resign("host")
    assert await coord.lease_token("host|7") == token, "another's resign does nothing"


async def test_resign_gives_the_lease_up_only_for_its_holder(store: Store) -> None:
    coord = Coordination(store)
    await coord.hold_lease("r1", 10_000)
    await coord.resign("r2")
    assert await coord.lease_token("r1") == 1
    await coord.resign("r1")
    assert await store.redis.exists(LEADER) == 0
    # The next holder does not reuse the token: the fence counter is kept.
    assert await coord.hold_lease("r2", 10_000) == 2
    assert await store.redis.get(FENCE) == b"2"


# -- fence_account ------------------------------------------------------------------


async def test_the_fence_rises_and_refuses_older_tokens(store: Store) -> None:
    coord = Coordination(store)
    assert await coord.fence_account(ACCT, 3)
    assert await coord.fence_account(ACCT, 3), "the same token again is allowed"
    assert not await coord.fence_account(ACCT, 2)
    assert await store.redis.hget(meta_key(ACCT), "fence") == b"3"
    assert await coord.fence_account(ACCT, 5)
    assert await store.redis.hget(meta_key(ACCT), "fence") == b"5"
    assert not await coord.fence_account(ACCT, 4)


async def test_the_fence_leaves_the_accounts_seq_alone(store: Store) -> None:
    seq = await facts(store)
    await Coordination(store).fence_account(ACCT, 9)
    assert await store.account_seq(ACCT) == seq


# -- release ------------------------------------------------------------------------


async def test_a_release_is_recorded_once_with_its_recording_time(store: Store) -> None:
    coord = Coordination(store)
    seq = await facts(store)
    assert await coord.record_release(ACCT, 1, seq, release(), recorded_at=T0 + 5) == seq + 1
    loaded = await store.load_account_facts(ACCT)
    assert release() in loaded.facts
    assert loaded.recorded_at[release().event_id] == T0 + 5
    # Again from the new seq (a retry that did not see its own answer): no
    # second fact, no new seq, the first recording time stays.
    assert await coord.record_release(ACCT, 1, seq + 1, release(), recorded_at=T0 + 9) == seq + 1
    loaded = await store.load_account_facts(ACCT)
    assert loaded.seq == seq + 1 and loaded.recorded_at[release().event_id] == T0 + 5


async def test_a_release_decided_on_other_facts_is_refused(store: Store) -> None:
    coord = Coordination(store)
    seq = await facts(store)
    assert await coord.record_release(ACCT, 1, seq - 1, release()) == -2
    assert await coord.record_release(ACCT, 1, seq + 1, release()) == -2
    assert release() not in (await store.load_account_facts(ACCT)).facts
    assert await store.redis.hget(meta_key(ACCT), "fence") is None, "nothing was fenced"


async def test_a_release_with_an_older_token_than_the_fence_is_refused(store: Store) -> None:
    coord = Coordination(store)
    seq = await facts(store)
    assert await coord.fence_account(ACCT, 4)
    assert await coord.record_release(ACCT, 3, seq, release()) == -1
    assert (await store.load_account_facts(ACCT)).seq == seq
    assert await coord.record_release(ACCT, 4, seq, release()) == seq + 1


async def test_a_release_fences_the_account_to_its_token(store: Store) -> None:
    # An older leader that decided before the new one recorded cannot
    # release after it, even with the seq it read then.
    coord = Coordination(store)
    seq = await facts(store)
    assert await coord.record_release(ACCT, 7, seq, release(T0)) == seq + 1
    assert await store.redis.hget(meta_key(ACCT), "fence") == b"7"
    assert await coord.record_release(ACCT, 6, seq + 1, release(T0 + DAY)) == -1
    assert [f.event_id for f in (await store.load_account_facts(ACCT)).facts].count(
        release(T0 + DAY).event_id
    ) == 0


async def test_a_release_without_a_recording_time_is_recorded_at_redis_clock(
    store: Store,
) -> None:
    coord = Coordination(store)
    seq = await facts(store)
    before = await store.server_time()
    await coord.record_release(ACCT, 1, seq, release())
    after = await store.server_time()
    recorded = (await store.load_account_facts(ACCT)).recorded_at[release().event_id]
    assert before <= recorded <= after
