"""The audit trail of support overrides says what each one does to the
folded outcome (SPEC R14; issue 19, finding 7). Pure: no Redis, no gRPC.

The folded outcome of an account is what the policy makes of all its facts:
the grace end of the open overdue episode, whether the release is held, and
the release date. An override's effect starts with "no effect" exactly when
that outcome would be the same without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.domain.evidence import NO_EFFECT, override_log
from lcic_guard.domain.facts import (
    ArrearsSettled,
    Fact,
    GraceExtended,
    OverdueAlert,
    ReleaseHoldCleared,
    ReleaseHoldSet,
)
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig, sweep_until
from lcic_guard.domain.time import MAX_TIME, Millis, format_time

T0 = 1_790_000_000_000
CFG = PolicyConfig()
ACCT = "acct-1"


def hold(event_id: str, at: Millis) -> ReleaseHoldSet:
    return ReleaseHoldSet(event_id, at, ACCT, "alice@support", "dispute")


def clear(event_id: str, at: Millis) -> ReleaseHoldCleared:
    return ReleaseHoldCleared(event_id, at, ACCT, "bob@support", "resolved")


def extend(event_id: str, at: Millis, until: Millis) -> GraceExtended:
    return GraceExtended(event_id, at, ACCT, until, "alice@support", "transfer in flight")


def effects(facts: Sequence[Fact], recorded: dict[str, Millis] | None = None) -> dict[str, str]:
    return {e.fact.event_id: e.effect for e in override_log(facts, CFG, recorded or {})}


def outcome(facts: Sequence[Fact], recorded: dict[str, Millis]) -> tuple[object, ...]:
    """The oracle: the policy's fold of every fact, read where the rules read it."""
    s = sweep_until(facts, "", MAX_TIME, CFG, recorded)
    return (s.grace_end, s.release_held, s.r10_release_at())


def test_a_clear_dated_before_a_later_hold_has_no_effect() -> None:
    # The case: hold at T-1h, a clear dated T-2h recorded after it.
    alert = OverdueAlert("a", T0 - 70 * DAY, ACCT)
    facts: list[Fact] = [alert, hold("h", T0 - HOUR), clear("c", T0 - 2 * HOUR)]
    got = effects(facts, {"a": T0 - 70 * DAY, "h": T0 - HOUR, "c": T0})
    assert got["c"] == f"{NO_EFFECT}: a later hold (h of {format_time(T0 - HOUR)}) is in force"
    assert got["h"] == "release of the account's resources held"


def test_a_clear_after_the_hold_lifts_it_with_the_notice_from_its_recording() -> None:
    alert = OverdueAlert("a", T0 - 70 * DAY, ACCT)
    got = effects(
        [alert, hold("h", T0 - 2 * HOUR), clear("c", T0 - HOUR)],
        {"a": T0 - 70 * DAY, "c": T0},
    )
    notice = format_time(T0 + CFG.release_notice_ms)
    assert got["c"].startswith(f"release hold lifted; no release before {notice}")
    assert got["h"] == f"{NO_EFFECT}: lifted by a later clear (c of {format_time(T0 - HOUR)})"


def test_a_second_hold_and_a_clear_with_nothing_to_lift() -> None:
    got = effects([hold("h1", T0 - 2 * HOUR), hold("h2", T0 - HOUR)])
    assert got["h1"] == f"{NO_EFFECT}: a later hold (h2 of {format_time(T0 - HOUR)}) is in force"
    assert got["h2"].startswith(f"{NO_EFFECT}: the release was already held by h1")
    # Not overdue and no hold: nothing to lift and no release date to move.
    got = effects([clear("c", T0)])
    assert got["c"] == f"{NO_EFFECT}: no release hold was in force when it was made"


def test_extensions_settled_superseded_and_cut() -> None:
    alert_at = T0 - HOUR
    limit = alert_at + CFG.grace_ms + CFG.max_grace_extension_ms
    facts: list[Fact] = [
        extend("early", alert_at - DAY, T0 + 5 * DAY),  # before the alert
        OverdueAlert("a", alert_at, ACCT),
        extend("short", T0, T0 + 2 * DAY),
        extend("long", T0 + 1, T0 + 400 * DAY),  # cut to the limit
        extend("inside", T0 + 2, alert_at + HOUR),  # within the plain grace
    ]
    got = effects(facts)
    assert got["early"] == f"{NO_EFFECT}: no overdue episode was open when it was made"
    assert got["short"].startswith(f"{NO_EFFECT}: extension long of ")
    assert got["long"] == (
        f"grace of the overdue episode that began {format_time(alert_at)} extended until "
        f"{format_time(limit)} (cut to the limit of {format_time(limit)})"
    )
    assert got["inside"].startswith(f"{NO_EFFECT}: extension long")
    settled = effects([*facts, ArrearsSettled("s", T0 + HOUR, ACCT)])
    assert settled["long"] == (
        f"{NO_EFFECT}: the overdue episode it extended (began {format_time(alert_at)}) was settled"
    )


# -- the property -------------------------------------------------------------------

hours = st.integers(-200, 200).map(lambda h: T0 + h * HOUR)


@st.composite
def account_histories(draw: st.DrawFn) -> tuple[list[Fact], dict[str, Millis]]:
    """Alerts, settlements and every kind of override, at colliding times,
    each recorded at its time or later (a late arrival)."""
    facts: list[Fact] = []
    kinds = st.sampled_from(["alert", "settle", "extend", "hold", "clear", "clear"])
    for n, kind in enumerate(draw(st.lists(kinds, min_size=1, max_size=12))):
        at, eid = draw(hours), f"f{n}"
        if kind == "alert":
            facts.append(OverdueAlert(eid, at - 60 * DAY * draw(st.integers(0, 1)), ACCT))
        elif kind == "settle":
            facts.append(ArrearsSettled(eid, at, ACCT))
        elif kind == "extend":
            facts.append(extend(eid, at, at + draw(st.integers(1, 40 * 24)) * HOUR))
        elif kind == "hold":
            facts.append(hold(eid, at))
        else:
            facts.append(clear(eid, at))
    recorded = {
        f.event_id: f.occurred_at + draw(st.sampled_from([0, HOUR, 3 * DAY, 90 * DAY]))
        for f in facts
    }
    return facts, recorded


@settings(max_examples=400, deadline=None)
@given(account_histories())
def test_the_effect_says_no_effect_exactly_when_the_outcome_is_the_same_without_it(
    history: tuple[list[Fact], dict[str, Millis]],
) -> None:
    facts, recorded = history
    whole = outcome(facts, recorded)
    for entry in override_log(facts, CFG, recorded):
        without = [f for f in facts if f.event_id != entry.fact.event_id]
        unchanged = outcome(without, recorded) == whole
        assert entry.effect.startswith(NO_EFFECT) == unchanged, (entry, whole)
        if "a later hold" in entry.effect:
            assert whole[1], "said a hold is in force, but the release is not held"
