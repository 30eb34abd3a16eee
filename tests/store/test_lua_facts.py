"""lua/add_facts.lua (with lua/now_or_arg.lua), lua/load_account.lua and
lua/remove_facts.lua: an account's facts, its fact sequence and when each
fact was first recorded, exercised through the store's API on a real Redis."""

from __future__ import annotations

from lcic_guard.domain.facts import OverdueAlert, PackagePurchased
from lcic_guard.domain.policy import DAY, HOUR
from lcic_guard.store.keys import facts_key, meta_key, recorded_key
from lcic_guard.store.scripts import script
from lcic_guard.store.status import Store

from tests.support.clock import T0

ACCT = "acct-1"


def alert(event_id: str, at: int = T0 - HOUR, amount: str | None = None) -> OverdueAlert:
    return OverdueAlert(event_id=event_id, occurred_at=at, account_id=ACCT, amount_due=amount)


def package(event_id: str, quota: int = 600) -> PackagePurchased:
    return PackagePurchased(
        event_id=event_id,
        occurred_at=T0 - DAY,
        app_id="app-1",
        package_id="pkg-1",
        starts_at=T0 - DAY,
        expires_at=T0 + DAY,
        quota_minutes=quota,
    )


# -- add_facts --------------------------------------------------------------------


async def test_new_facts_are_stored_with_their_recording_time_and_bump_seq_once(
    store: Store,
) -> None:
    res = await store.add_facts(ACCT, [alert("ev-1"), package("ev-2")], recorded_at=T0)
    assert (res.seq, res.added, res.conflicts) == (1, 2, ())
    loaded = await store.load_account_facts(ACCT)
    assert loaded.seq == 1
    assert set(loaded.facts) == {alert("ev-1"), package("ev-2")}
    assert loaded.recorded_at == {"ev-1": T0, "ev-2": T0}


async def test_a_known_fact_again_changes_nothing_not_even_its_recording_time(
    store: Store,
) -> None:
    await store.add_facts(ACCT, [alert("ev-1")], recorded_at=T0)
    res = await store.add_facts(ACCT, [alert("ev-1")], recorded_at=T0 + DAY)
    # No new fact: the sequence (the version of every status) stays.
    assert (res.seq, res.added, res.conflicts) == (1, 0, ())
    assert (await store.load_account_facts(ACCT)).recorded_at == {"ev-1": T0}


async def test_a_known_id_with_other_content_is_a_conflict_and_the_first_stays(
    store: Store,
) -> None:
    await store.add_facts(ACCT, [alert("ev-1", amount="10.00")], recorded_at=T0)
    res = await store.add_facts(
        ACCT, [alert("ev-1", amount="99.00"), alert("ev-2")], recorded_at=T0 + HOUR
    )
    assert (res.seq, res.added, res.conflicts) == (2, 1, ("ev-1",))
    loaded = await store.load_account_facts(ACCT)
    assert alert("ev-1", amount="10.00") in loaded.facts
    assert loaded.recorded_at == {"ev-1": T0, "ev-2": T0 + HOUR}


async def test_without_a_recording_time_the_fact_is_recorded_at_redis_clock(
    store: Store,
) -> None:
    # now_or_arg.lua: an empty argument is Redis's TIME in ms, read inside
    # the script (the clock every replica shares), not the caller's.
    before = await store.server_time()
    await store.add_facts(ACCT, [alert("ev-1")])
    after = await store.server_time()
    recorded = (await store.load_account_facts(ACCT)).recorded_at["ev-1"]
    assert before <= recorded <= after


async def test_now_or_arg_returns_the_argument_when_one_is_given(store: Store) -> None:
    probe = script("now_or_arg") + "return now_or(ARGV[1])"
    assert await store.redis.eval(probe, 0, "12345") == b"12345"
    before = await store.server_time()
    got = int(await store.redis.eval(probe, 0, ""))
    assert before <= got <= await store.server_time()


# -- load_account ---------------------------------------------------------------


async def test_an_unknown_account_loads_as_seq_zero_and_no_facts(store: Store) -> None:
    loaded = await store.load_account_facts("nobody")
    assert (loaded.seq, loaded.facts, loaded.recorded_at) == (0, [], {})


async def test_facts_stored_before_recording_times_existed_load_without_one(
    store: Store,
) -> None:
    await store.add_facts(ACCT, [alert("ev-1"), alert("ev-2", at=T0 - 2 * HOUR)], recorded_at=T0)
    await store.redis.hdel(recorded_key(ACCT), "ev-2")
    loaded = await store.load_account_facts(ACCT)
    assert len(loaded.facts) == 2 and loaded.recorded_at == {"ev-1": T0}


async def test_load_reads_seq_facts_and_times_of_the_same_instant(store: Store) -> None:
    # The three keys are read by one script: a seq from one moment with the
    # facts of another would let a status claim a version it does not match.
    await store.add_facts(ACCT, [alert("ev-1")], recorded_at=T0)
    await store.add_facts(ACCT, [alert("ev-2")], recorded_at=T0 + 1)
    loaded = await store.load_account_facts(ACCT)
    assert loaded.seq == 2 == len(loaded.facts) == len(loaded.recorded_at)


# -- remove_facts -----------------------------------------------------------------


async def test_removing_facts_bumps_seq_once_and_leaves_the_others(store: Store) -> None:
    await store.add_facts(ACCT, [alert("ev-1"), alert("ev-2"), alert("ev-3")], recorded_at=T0)
    assert await store.remove_facts(ACCT, ["ev-1", "ev-3"]) == 2
    loaded = await store.load_account_facts(ACCT)
    assert loaded.seq == 2 and [f.event_id for f in loaded.facts] == ["ev-2"]
    assert await store.redis.hkeys(facts_key(ACCT)) == [b"ev-2"]


async def test_removing_facts_not_there_keeps_the_seq(store: Store) -> None:
    await store.add_facts(ACCT, [alert("ev-1")], recorded_at=T0)
    assert await store.remove_facts(ACCT, ["ev-9"]) == 1
    assert await store.remove_facts(ACCT, []) == 1
    assert await store.redis.hget(meta_key(ACCT), "seq") == b"1"
    assert await store.remove_facts("nobody", ["ev-1"]) == 0
    assert await store.redis.exists(meta_key("nobody")) == 0
