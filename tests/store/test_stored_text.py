"""A fact stored before a validation rule was tightened still loads: the
rule on an override's reason (no line separators, C1 or bidirectional
controls) applies to what enters, never to what the store already holds,
where dropping a release hold would make a release possible."""

from __future__ import annotations

from lcic_guard.domain.facts import ReleaseHoldSet
from lcic_guard.store.status import Store

from tests.support.clock import T0


async def test_a_stored_hold_with_a_reason_now_refused_still_loads(store: Store) -> None:
    hold = ReleaseHoldSet("support-0001", T0, "acct-1", "alice", "legal hold\u2028case \u202e77")
    await store.add_facts("acct-1", [hold], recorded_at=T0)
    loaded = await store.load_account_facts("acct-1")
    assert loaded.facts == [hold]
