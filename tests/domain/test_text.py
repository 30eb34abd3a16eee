"""Free text that people read back (an override's actor and reason) holds no
character that could make ``audit`` show something else than what is
recorded: no control (C0 or C1), no line or paragraph separator, no
bidirectional control. Checked where it enters the facts, whichever way it
comes (ApplyOverride or the billing feed); a fact stored before the rule
still loads."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lcic_guard.domain.facts import InvalidEvent, ReleaseHoldSet, parse_event
from lcic_guard.domain.text import unsafe_character, unsafe_text_problem

from tests.support.clock import T0
from tests.support.events import Events

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
REFUSED = {
    "tab": "\t",
    "line feed": "\n",
    "escape": "\x1b",
    "delete": "\x7f",
    "C1 next line": "\x85",
    "C1 CSI": "\x9b",
    "line separator": "\u2028",
    "paragraph separator": "\u2029",
    **{f"bidi U+{ord(c):04X}": c for c in BIDI},
}


def refused(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI


def hold(events: Events, **fields: str) -> dict[str, object]:
    return events("release_hold_set", T0, account_id="acct", **fields)


C0 = {"\t", "\n", "\x1b", "\x7f"}  # refused since overrides existed, in other words


@pytest.mark.parametrize("name", list(REFUSED))
def test_each_refused_character_is_named_with_the_field(events: Events, name: str) -> None:
    c = REFUSED[name]
    text = f"ticket 4411{c}approved by finance"
    for field in ("reason", "actor"):
        raw = {"actor": "alice", "reason": "ticket 4411", field: text}
        with pytest.raises(InvalidEvent) as err:
            parse_event(hold(events, **raw))
        assert err.value.reason.startswith(f"{field}: must not contain"), err.value.reason
        if c not in C0:
            assert f"(U+{ord(c):04X} at character 12)" in err.value.reason


@pytest.mark.parametrize("name", [n for n, c in REFUSED.items() if c not in C0])
def test_a_fact_already_stored_keeps_loading(events: Events, name: str) -> None:
    """The rule is for what enters: a hold stored before it must not vanish
    from the account (the store loads facts with allow_internal)."""
    raw = hold(events, actor="alice", reason=f"legal hold{REFUSED[name]}")
    fact = parse_event(raw, allow_internal=True)
    assert isinstance(fact, ReleaseHoldSet) and fact.reason == raw["reason"]


@pytest.mark.parametrize(
    "text",
    [
        "bank transfer in flight (ticket 4411)",
        "café, 日本語, עברית and العربية as they are written",
        "👩\u200d💻 zero-width joiners are not controls",
        "non\u00a0breaking space",
    ],
)
def test_ordinary_text_in_any_script_is_accepted(events: Events, text: str) -> None:
    assert unsafe_text_problem(text) is None
    fact = parse_event(hold(events, actor="alice", reason=text))
    assert isinstance(fact, ReleaseHoldSet) and fact.reason == text


def entry_problem(reason: str) -> str | None:
    """What a new event with this reason is refused for (None: accepted)."""
    try:
        parse_event(hold(Events(), actor="alice", reason=reason))
    except InvalidEvent as exc:
        return exc.reason
    return None


@given(st.text(st.characters(codec="utf-8"), min_size=1, max_size=80))
def test_a_new_reason_is_accepted_exactly_when_it_holds_no_refused_character(text: str) -> None:
    problem = entry_problem(text)
    if not text.strip():
        assert problem == "reason: must not be empty"
    elif any(refused(c) for c in text):
        assert problem is not None and problem.startswith("reason: must not contain")
    else:
        assert problem is None


@given(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    st.sampled_from(sorted(set(REFUSED.values()) | {"\x00", "\x9f", "\x80"})),
    st.data(),
)
def test_one_refused_character_anywhere_is_enough(text: str, c: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(text)))
    problem = entry_problem("x" + text[:at] + c + text[at:])
    assert problem is not None and problem.startswith("reason: must not contain")


def test_the_refused_set_is_exactly_cc_zl_zp_and_the_bidi_controls() -> None:
    """Every code point, against unicodedata: the fast character class and
    the rule as Unicode states it agree."""
    for cp in range(0x110000):
        c = chr(cp)
        if unicodedata.category(c) == "Cs":
            continue
        assert (unsafe_character(c) is not None) == refused(c), hex(cp)
