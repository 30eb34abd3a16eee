"""Free text that people read back (an override's actor and reason) holds no
character that could make ``audit`` show something else than what is
recorded: no control (C0 or C1), no line or paragraph separator, no
bidirectional control. Checked where it enters the facts, whichever way it
comes (ApplyOverride or the billing feed)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lcic_guard.domain.facts import (
    MAX_OVERRIDE_REASON,
    InvalidEvent,
    ReleaseHoldSet,
    parse_event,
    text_problem,
)

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


@pytest.mark.parametrize("name", list(REFUSED))
def test_each_refused_character_is_named_with_the_field(events: Events, name: str) -> None:
    c = REFUSED[name]
    text = f"ticket 4411{c}approved by finance"
    problem = text_problem(text, MAX_OVERRIDE_REASON)
    assert problem is not None and f"U+{ord(c):04X} at character 12" in problem
    for field in ("reason", "actor"):
        raw = {"actor": "alice", "reason": "ticket 4411", field: text}
        with pytest.raises(InvalidEvent) as err:
            parse_event(hold(events, **raw))
        assert err.value.reason.startswith(f"{field}: must not contain"), err.value.reason


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
    assert text_problem(text, MAX_OVERRIDE_REASON) is None
    fact = parse_event(hold(events, actor="alice", reason=text))
    assert isinstance(fact, ReleaseHoldSet) and fact.reason == text


@given(st.text(min_size=1, max_size=80))
def test_accepted_text_holds_no_refused_character(text: str) -> None:
    problem = text_problem(text, MAX_OVERRIDE_REASON)
    if any(refused(c) for c in text):
        assert problem is not None and "must not contain" in problem
    elif text.strip() and not any(unicodedata.category(c) == "Cs" for c in text):
        assert problem is None


@given(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    st.sampled_from(sorted(set(REFUSED.values()) | {"\x00", "\x9f", "\x80"})),
    st.data(),
)
def test_one_refused_character_anywhere_is_enough(text: str, c: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(text)))
    problem = text_problem("x" + text[:at] + c + text[at:], MAX_OVERRIDE_REASON)
    assert problem is not None and "must not contain" in problem
