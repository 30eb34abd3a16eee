"""lua/ledger_claim.lua, lua/ledger_trim.lua and lua/note_discontinuity.lua:
an account's announcement is claimed in its ledger once (a claim left by a
writer presumed dead is taken over once, a committed one never again), an
expired record is forgotten only while it is still the one read, and a store
discontinuity starts one release pause across replicas (SPEC R10, ADR 0021,
0022, 0031), exercised through the reconciler's coordination API on a real
Redis."""

from __future__ import annotations

import asyncio
import json

from lcic_guard.domain.notices import LedgerRecord
from lcic_guard.store.codec import text
from lcic_guard.store.coordination import Coordination
from lcic_guard.store.keys import CONTINUITY, RELEASE_PAUSE, ledger_key
from lcic_guard.store.status import Store

from tests.support.clock import T0

ACCT = "acct-1"
AID = f"notice:{ACCT}:{T0}:first"
# The takeover period the reconciler passes (STALE_OUTBOX_MS).
STALE = 10_000


def claim(now: int, writer: str = "r1", aid: str = AID) -> str:
    """A claim as the announcer writes it (the writer named in the event,
    so that whose claim is stored can be told)."""
    event = {"type": "release_scheduled", "announcement_id": aid, "writer": writer}
    return json.dumps({"claimed_at": now, "payload": event}, sort_keys=True)


def committed(at: int, aid: str = AID) -> str:
    return LedgerRecord(
        aid, "release_scheduled", ACCT, str(T0), {"release_at": at}, at, ("run-a",)
    ).to_json()


async def claim_as(
    coord: Coordination, writer: str, now: int, aid: str = AID, account: str = ACCT
) -> int:
    return await coord.ledger_claim(account, aid, claim(now, writer, aid), now, STALE)


# -- ledger_claim -------------------------------------------------------------------


async def test_the_first_claim_wins_and_a_live_writers_claim_is_left_to_it(
    store: Store,
) -> None:
    coord = Coordination(store)
    assert await claim_as(coord, "r1", T0) == 1
    assert await coord.ledger(ACCT) == {AID: claim(T0, "r1")}
    assert await claim_as(coord, "r2", T0 + 1) == -1
    assert await claim_as(coord, "r2", T0 + STALE - 1) == -1, "not yet presumed dead"
    assert await coord.ledger(ACCT) == {AID: claim(T0, "r1")}, "the first claim stays"


async def test_of_eight_racing_claimers_exactly_one_wins(store: Store) -> None:
    coord = Coordination(store)
    got = await asyncio.gather(*(claim_as(coord, f"r{i}", T0) for i in range(8)))
    assert sorted(got) == [-1] * 7 + [1]
    winner = got.index(1)
    assert await coord.ledger(ACCT) == {AID: claim(T0, f"r{winner}")}


async def test_a_claim_left_by_a_crashed_writer_is_taken_over_after_the_period_once(
    store: Store,
) -> None:
    coord = Coordination(store)
    assert await claim_as(coord, "crashed", T0) == 1
    assert await claim_as(coord, "r2", T0 + STALE) == 2
    assert await coord.ledger(ACCT) == {AID: claim(T0 + STALE, "r2")}
    # The takeover is a fresh claim: nobody else takes it over from r2 now.
    assert await claim_as(coord, "r3", T0 + STALE) == -1
    assert await claim_as(coord, "r3", T0 + 2 * STALE - 1) == -1
    # Unless r2 dies too.
    assert await claim_as(coord, "r3", T0 + 2 * STALE) == 2
    assert await coord.ledger(ACCT) == {AID: claim(T0 + 2 * STALE, "r3")}


async def test_of_racing_takers_of_an_abandoned_claim_exactly_one_takes_it(
    store: Store,
) -> None:
    coord = Coordination(store)
    await claim_as(coord, "crashed", T0)
    later = T0 + 3 * STALE
    got = await asyncio.gather(*(claim_as(coord, f"r{i}", later) for i in range(8)))
    assert sorted(got) == [-1] * 7 + [2]
    assert await coord.ledger(ACCT) == {AID: claim(later, f"r{got.index(2)}")}


async def test_a_writer_with_a_lagging_clock_does_not_take_a_claim_over(store: Store) -> None:
    coord = Coordination(store)
    await claim_as(coord, "r1", T0)
    assert await claim_as(coord, "r2", T0 - 5 * STALE) == -1
    assert await coord.ledger(ACCT) == {AID: claim(T0, "r1")}


async def test_a_committed_announcement_is_never_claimed_again(store: Store) -> None:
    coord = Coordination(store)
    assert await claim_as(coord, "r1", T0) == 1
    await coord.ledger_commit(ACCT, AID, committed(T0 + 5))
    much_later = T0 + 1_000 * STALE
    got = await asyncio.gather(*(claim_as(coord, f"r{i}", much_later) for i in range(8)))
    assert got == [0] * 8
    assert await coord.ledger(ACCT) == {AID: committed(T0 + 5)}, "the record stays"
    assert LedgerRecord.from_json((await coord.ledger(ACCT))[AID]) is not None


async def test_a_record_it_cannot_read_counts_as_committed(store: Store) -> None:
    # Conservative: an announcement is never made again over a record that
    # may say it was made.
    coord = Coordination(store)
    for raw in ("not json", "42", "[1, 2]", '{"type": "release_scheduled"}'):
        await store.redis.hset(ledger_key(ACCT), AID, raw)
        assert await claim_as(coord, "r1", T0 + 1_000 * STALE) == 0
        assert await coord.ledger(ACCT) == {AID: raw}


async def test_claims_are_per_announcement_and_per_account(store: Store) -> None:
    coord = Coordination(store)
    assert await claim_as(coord, "r1", T0) == 1
    other = f"notice:{ACCT}:{T0}:reminder-1"
    assert await claim_as(coord, "r2", T0, aid=other) == 1
    assert await claim_as(coord, "r2", T0, account="acct-2") == 1
    assert await coord.ledger(ACCT) == {AID: claim(T0, "r1"), other: claim(T0, "r2", other)}
    assert await coord.ledger("acct-2") == {AID: claim(T0, "r2")}


# -- note_discontinuity -----------------------------------------------------------


async def raw(store: Store, key: str) -> dict[str, str]:
    got = await store.redis.hgetall(key)
    return {text(k) or "": text(v) or "" for k, v in got.items()}


async def test_a_check_without_a_cause_stores_what_was_seen_and_starts_no_pause(
    store: Store,
) -> None:
    coord = Coordination(store)
    assert (
        await coord.note_continuity("", "run-a", "gen-1", T0, "", "r1", expected_pause="") is False
    )
    assert await coord.continuity() == {
        "run_ids": "run-a",
        "generation": "gen-1",
        "checked_at": str(T0),
        "checked_by": "r1",
    }
    assert (
        await coord.note_continuity("run-a", "run-a", "gen-1", T0 + 1, "", "r2", expected_pause="")
        is False
    )
    assert (await coord.continuity())["checked_at"] == str(T0 + 1)
    assert (await coord.continuity())["checked_by"] == "r2"
    assert await coord.release_pause() == {}


async def test_a_discontinuity_starts_a_pause_once_across_replicas(store: Store) -> None:
    coord = Coordination(store)
    await coord.note_continuity("", "run-a", "gen-1", T0, "", "r1", expected_pause="")
    # Redis restarted: every replica read "run-a" stored and sees "run-b".
    started = await asyncio.gather(
        *(
            coord.note_continuity(
                "run-a", "run-b", "gen-1", T0 + 10 + i, "run_id", f"r{i}", expected_pause=""
            )
            for i in range(8)
        )
    )
    assert sorted(started) == [False] * 7 + [True], "one replica reports it"
    first = started.index(True)
    assert await coord.release_pause() == {"since": str(T0 + 10 + first), "cause": "run_id"}
    cont = await coord.continuity()
    assert (cont["run_ids"], cont["checked_by"]) == ("run-b", f"r{first}")


async def test_a_later_report_of_the_same_discontinuity_keeps_the_first_detection(
    store: Store,
) -> None:
    coord = Coordination(store)
    await coord.note_continuity("", "run-a", "gen-1", T0, "", "r1", expected_pause="")
    assert await coord.note_continuity(
        "run-a", "run-b", "gen-1", T0 + 5, "run_id", "r1", expected_pause=""
    )
    # A replica that read the store before r1 stored what it saw.
    assert not await coord.note_continuity(
        "run-a", "run-b", "gen-2", T0 + 60_000, "gen", "r2", expected_pause=""
    )
    assert await coord.release_pause() == {"since": str(T0 + 5), "cause": "run_id"}
    assert await coord.continuity() == {
        "run_ids": "run-b",
        "generation": "gen-1",
        "checked_at": str(T0 + 5),
        "checked_by": "r1",
    }, "nor does its stale view overwrite the newer one"


async def test_a_stale_view_without_a_cause_does_not_overwrite_a_newer_one(
    store: Store,
) -> None:
    coord = Coordination(store)
    await coord.note_continuity("", "run-a", "gen-1", T0, "", "r1", expected_pause="")
    await coord.note_continuity(
        "run-a", "run-b", "gen-1", T0 + 5, "run_id", "r1", expected_pause=""
    )
    assert not await coord.note_continuity(
        "run-a", "run-a", "gen-1", T0 + 9, "", "r2", expected_pause=""
    )
    assert (await coord.continuity())["run_ids"] == "run-b"
    assert (await coord.continuity())["checked_by"] == "r1"


async def test_a_check_without_a_cause_leaves_the_pause_alone(store: Store) -> None:
    coord = Coordination(store)
    await coord.note_continuity("", "run-a", "gen-1", T0, "", "r1", expected_pause="")
    await coord.note_continuity(
        "run-a", "run-b", "gen-1", T0 + 5, "run_id", "r1", expected_pause=""
    )
    await coord.lift_pause(T0 + 5, T0 + 100)
    await coord.note_continuity(
        "run-b", "run-b", "gen-1", T0 + 200, "", "r2", expected_pause=str(T0 + 5)
    )
    assert await coord.release_pause() == {
        "since": str(T0 + 5),
        "cause": "run_id",
        "snapshot_at": str(T0 + 100),
    }


async def test_a_new_discontinuity_starts_a_new_pause_that_the_old_snapshot_does_not_lift(
    store: Store,
) -> None:
    coord = Coordination(store)
    await coord.note_continuity("", "run-a", "gen-1", T0, "", "r1", expected_pause="")
    await coord.note_continuity(
        "run-a", "run-b", "gen-1", T0 + 5, "run_id", "r1", expected_pause=""
    )
    await coord.lift_pause(T0 + 5, T0 + 100)
    # Redis goes back again: the snapshot loaded before confirms nothing now.
    assert await coord.note_continuity(
        "run-b", "run-c", "gen-1", T0 + 500, "run_id", "r2", expected_pause=str(T0 + 5)
    )
    assert await raw(store, RELEASE_PAUSE) == {"since": str(T0 + 500), "cause": "run_id"}
    assert (await raw(store, CONTINUITY))["run_ids"] == "run-c"


async def test_a_discontinuity_that_leaves_the_run_ids_is_reported_once_too(
    store: Store,
) -> None:
    # A stream's last id gone back (or a new generation) with the same
    # Redis servers: the run ids every replica read are still stored.
    coord = Coordination(store)
    await coord.note_continuity("", "run-a", "gen-1", T0, "", "r1", expected_pause="")
    started = await asyncio.gather(
        *(
            coord.note_continuity(
                "run-a", "run-a", "gen-1", T0 + 10 + i, "stream_id", f"r{i}", expected_pause=""
            )
            for i in range(8)
        )
    )
    assert sorted(started) == [False] * 7 + [True], "one replica reports it"
    first = started.index(True)
    assert await coord.release_pause() == {"since": str(T0 + 10 + first), "cause": "stream_id"}


# -- ledger_trim --------------------------------------------------------------------


async def test_trim_forgets_exactly_the_records_given(store: Store) -> None:
    coord = Coordination(store)
    old, kept = f"notice:{ACCT}:old:initial", f"notice:{ACCT}:new:initial"
    await coord.ledger_commit(ACCT, old, committed(T0, old))
    await coord.ledger_commit(ACCT, kept, committed(T0, kept))
    assert await coord.ledger_trim(ACCT, {old: committed(T0, old)}) == 1
    assert await coord.ledger(ACCT) == {kept: committed(T0, kept)}
    # Gone already, or never there: nothing more is forgotten.
    assert await coord.ledger_trim(ACCT, {old: committed(T0, old), "x": "y"}) == 0
    assert await coord.ledger(ACCT) == {kept: committed(T0, kept)}


async def test_trim_leaves_a_record_replaced_since_it_was_read(store: Store) -> None:
    """A claimer that wrote its claim between the trimmer's read and its
    delete keeps the claim: only the exact record read is forgotten."""
    coord = Coordination(store)
    aid = f"notice:{ACCT}:old:initial"
    await coord.ledger_commit(ACCT, aid, committed(T0, aid))
    read = (await coord.ledger(ACCT))[aid]
    await store.redis.hset(ledger_key(ACCT), aid, claim(T0 + 5, "r2", aid))
    assert await coord.ledger_trim(ACCT, {aid: read}) == 0
    assert await coord.ledger(ACCT) == {aid: claim(T0 + 5, "r2", aid)}
    # And the claim is still the live writer's: nobody else takes it.
    assert await claim_as(coord, "r3", T0 + 6, aid) == -1


async def test_trim_of_many_records_is_one_step_for_other_clients(store: Store) -> None:
    coord = Coordination(store)
    aids = [f"warn:app:app-{i}:PACKAGE_EXPIRED:{T0}:initial" for i in range(50)]
    for aid in aids:
        await coord.ledger_commit(ACCT, aid, committed(T0, aid))
    results = await asyncio.gather(
        coord.ledger_trim(ACCT, {aid: committed(T0, aid) for aid in aids}),
        coord.ledger_trim(ACCT, {aid: committed(T0, aid) for aid in aids}),
    )
    assert sorted(results) == [0, 50]
    assert await coord.ledger(ACCT) == {}
