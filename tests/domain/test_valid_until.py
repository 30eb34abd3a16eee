"""``Decision.valid_until`` against the policy itself (hypothesis): the
answer to a check is the same at every instant of ``[now, valid_until)`` and
differs at ``valid_until``; with no ``valid_until`` it never changes again.

The policy's answers change only at a segment start or where a class's
protection ends, so probing those instants (and one millisecond either side
of them) covers every place a change could hide.
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.domain.facts import OVERRIDES
from lcic_guard.domain.policy import (
    DAY,
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Room,
    compute_account,
    decide,
    decide_without_store,
)
from lcic_guard.domain.time import Millis

from tests.domain.test_policy_properties import ALL_CHECKS, History, histories, rooms, times

CFG = PolicyConfig()
PROPS = settings(max_examples=300, deadline=None)


def answer(check: Check, status: AppStatus, t: Millis, room: Room | None) -> Decision:
    return replace(decide(check, status, t, CFG, room), valid_until=None)


def probes(status: AppStatus, room: Room | None, now: Millis) -> list[Millis]:
    points = {now + 1}
    for seg in status.segments:
        points.update((seg.starts_at - 1, seg.starts_at, seg.starts_at + 1))
    if room is not None:
        for t in (room.started_at, room.scheduled_end, room.ended_at):
            if t is not None:
                points.update((t - 1, t, t + 1))
        for limit in (CFG.overrun_ms, CFG.max_class_ms):
            base = room.started_at if limit == CFG.max_class_ms else room.scheduled_end
            if base is not None:
                points.update((base + limit - 1, base + limit, base + limit + 1))
    points.add(now + 400 * DAY)
    return sorted(p for p in points if p > now)


def check_valid_until(status: AppStatus, check: Check, now: Millis, room: Room | None) -> None:
    decision = decide(check, status, now, CFG, room)
    first = replace(decision, valid_until=None)
    until = decision.valid_until
    if until is not None:
        assert until > now
        assert answer(check, status, until, room) != first, (check, now, until)
        assert answer(check, status, until - 1, room) == first
    for t in probes(status, room, now):
        if until is not None and t >= until:
            break
        assert answer(check, status, t, room) == first, (check, now, t, until)


@PROPS
@given(histories(overrides=True), st.data())
def test_answer_holds_exactly_until_valid_until(h: History, data: st.DataObject) -> None:
    statuses = compute_account(h.facts, CFG)
    for status in statuses.values():
        starts = [s.starts_at for s in status.segments]
        now = data.draw(st.one_of(times, st.sampled_from(starts)))
        room = data.draw(st.one_of(st.none(), rooms(starts)))
        for check in ALL_CHECKS:
            check_valid_until(status, check, now, room if check is Check.ENTER_CLASSROOM else None)


@PROPS
@given(histories(), st.data())
def test_a_degraded_answer_holds_no_longer_than_the_stale_bound(
    h: History, data: st.DataObject
) -> None:
    statuses = compute_account(h.facts, CFG)
    for status in statuses.values():
        now = data.draw(times)
        seen_at = now - data.draw(st.integers(0, CFG.stale_bound_ms))
        d = decide_without_store(Check.CREATE_CLASSROOM, status, seen_at, now, CFG)
        assert d.valid_until is not None
        assert d.valid_until <= seen_at + CFG.stale_bound_ms + 1
        later = decide_without_store(Check.CREATE_CLASSROOM, status, seen_at, d.valid_until, CFG)
        assert replace(later, valid_until=None) != replace(d, valid_until=None)


@PROPS
@given(histories(overrides=True), st.randoms(use_true_random=False))
def test_overrides_do_not_depend_on_arrival_order(h: History, rnd: random.Random) -> None:
    shuffled = list(h.facts)
    rnd.shuffle(shuffled)
    assert compute_account(shuffled, CFG) == compute_account(h.facts, CFG)


@PROPS
@given(histories(overrides=True), st.data())
def test_an_extension_only_ever_gives_more_time(h: History, data: st.DataObject) -> None:
    """Taking every override away never makes an answer more lenient, and the
    release is never sooner with them (nor at all while a hold is set)."""
    t = data.draw(times)
    # What was known at t (a status keeps only the history near its newest fact).
    known = [f for f in h.facts if f.occurred_at <= t]
    plain = [f for f in known if not isinstance(f, OVERRIDES)]
    with_overrides, without = compute_account(known, CFG), compute_account(plain, CFG)
    for app, status in with_overrides.items():
        seg, base = status.at(t), without[app].at(t)
        for check in ALL_CHECKS:
            if decide(check, without[app], t, CFG).allowed:
                assert decide(check, status, t, CFG).allowed, (check, t)
        if seg.release_at is not None and base.release_at is not None:
            assert seg.release_at >= base.release_at
