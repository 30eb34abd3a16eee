"""docs/events.md and docs/billing-event.schema.json say what the validator
does: the same events are accepted and rejected by both."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from lcic_guard.domain.facts import FACT_TYPES, InvalidEvent, parse_event

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs/billing-event.schema.json").read_text(encoding="utf-8"))
DOC = (ROOT / "docs/events.md").read_text(encoding="utf-8")
VALIDATOR = Draft202012Validator(SCHEMA)
OPTIONAL = {"amount_due", "note"}
PUBLIC = {name: cls for name, cls in FACT_TYPES.items() if not cls.internal}


def schema_accepts(event: object) -> bool:
    return VALIDATOR.is_valid(event)


def validator_accepts(event: object) -> bool:
    try:
        parse_event(event)
    except InvalidEvent:
        return False
    return True


def examples() -> list[dict[str, Any]]:
    out = []
    for kind in PUBLIC:
        out += SCHEMA["$defs"][kind]["examples"]
    return out


def doc_examples() -> list[dict[str, Any]]:
    billing = DOC.split("## Announcements")[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", billing, re.S)]


def test_the_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)


def test_the_schema_and_the_doc_cover_every_type_and_field() -> None:
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in SCHEMA["oneOf"]} == set(PUBLIC)
    for kind, cls in PUBLIC.items():
        d = SCHEMA["$defs"][kind]
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(d["properties"]) == names | {"type"}, kind
        assert set(d["required"]) == (names - OPTIONAL) | {"type"}, kind
        assert f"**`{kind}`**" in DOC
        for name in names:
            assert f"`{name}`" in DOC, (kind, name)
    assert {e["type"] for e in doc_examples()} == set(PUBLIC)


@pytest.mark.parametrize("event", examples() + doc_examples(), ids=lambda e: e["type"])
def test_every_documented_example_is_valid_for_both(event: dict[str, Any]) -> None:
    assert schema_accepts(event), list(VALIDATOR.iter_errors(event))
    assert validator_accepts(event)


def _example(kind: str) -> dict[str, Any]:
    return copy.deepcopy(SCHEMA["$defs"][kind]["examples"][0])


def _with(kind: str, **changes: Any) -> dict[str, Any]:
    event = _example(kind)
    for key, value in changes.items():
        if value is _DROP:
            event.pop(key)
        else:
            event[key] = value
    return event


_DROP = object()

VALID_VARIANTS = [
    _with("overdue_alert", amount_due=_DROP),
    _with("overdue_alert", amount_due=None),
    _with("compliance_ban", note=_DROP),
    _with("arrears_settled", occurred_at="2026-10-02T17:05:00.123456+08:00"),
    _with("arrears_settled", occurred_at="2026-10-02T17:05:00-05:30"),
    _with("arrears_settled", invoice="INV-77"),  # fields not listed are ignored
    _with("package_purchased", quota_minutes=0),
    _with("payg_changed", enabled=False),
    _with("application_registered", app_id="a" * 64, account_id="acct.1:x_y-z"),
    _with("arrears_settled", event_id="x" * 200),
    _with("grace_extended", reason="r" * 2000, actor="a" * 200),
    _with("release_hold_set", reason="  legal hold  "),
    _with("release_hold_set", reason="litige — 係争中 — נזק 👩\u200d💻"),
]

INVALID = [
    [],
    "an event",
    {"event_id": "e1", "occurred_at": "2026-10-01T00:00:00Z", "account_id": "a"},
    _with("arrears_settled", type="refund"),
    _with("arrears_settled", type="resources_released"),  # only the reconciler records it
    _with("application_registered", account_id=_DROP),
    _with("application_registered", app_id="app 42"),
    _with("application_registered", app_id=""),
    _with("application_registered", app_id="a" * 65),
    _with("application_registered", app_id=42),
    _with("arrears_settled", event_id=""),
    _with("arrears_settled", event_id="x" * 201),
    _with("arrears_settled", event_id=7),
    _with("arrears_settled", occurred_at="yesterday"),
    _with("arrears_settled", occurred_at="2026-10-02T17:05:00"),  # no time zone
    _with("arrears_settled", occurred_at=1790000000),
    _with("arrears_settled", occurred_at=_DROP),
    _with("package_purchased", quota_minutes="6000"),
    _with("package_purchased", quota_minutes=-1),
    _with("package_purchased", quota_minutes=1.5),
    _with("package_purchased", quota_minutes=True),
    _with("package_purchased", quota_minutes=2**53),
    _with("package_purchased", starts_at="soon"),
    _with("package_usage", used_minutes=None),
    _with("payg_changed", enabled="true"),
    _with("payg_changed", enabled=1),
    _with("overdue_alert", amount_due=120.5),
    _with("overdue_alert", amount_due="abc"),
    _with("compliance_ban", note=42),
    _with("grace_extended", until=_DROP),
    _with("grace_extended", until="next week"),
    _with("grace_extended", actor=_DROP),
    _with("grace_extended", actor=""),
    _with("grace_extended", actor="   "),
    _with("grace_extended", actor="a" * 201),
    _with("release_hold_set", reason=_DROP),
    _with("release_hold_set", reason="r" * 2001),
    _with("release_hold_set", reason="line one\nline two"),
    _with("release_hold_set", reason="line one\u2028line two"),
    _with("release_hold_set", reason="escape \x9b2J"),
    _with("grace_extended", reason="refund \u202e0001 USD"),
    _with("release_hold_cleared", actor="alice\u2066"),
    _with("release_hold_cleared", actor=7),
    _with("release_hold_cleared", event_id="lcic-guard:override:1"),
]


@pytest.mark.parametrize("event", VALID_VARIANTS, ids=range(len(VALID_VARIANTS)))
def test_valid_variants_are_accepted_by_both(event: dict[str, Any]) -> None:
    assert schema_accepts(event), list(VALIDATOR.iter_errors(event))
    assert validator_accepts(event)


@pytest.mark.parametrize("event", INVALID, ids=range(len(INVALID)))
def test_invalid_events_are_rejected_by_both(event: object) -> None:
    assert not schema_accepts(event)
    assert not validator_accepts(event)


def test_what_only_the_validator_checks_is_documented() -> None:
    # A JSON Schema cannot compare two fields: the doc says expires_at must be
    # later than starts_at, and the validator enforces it.
    event = _with("package_purchased", expires_at="2026-08-01T00:00:00Z")
    assert schema_accepts(event) and not validator_accepts(event)
    assert "later than `starts_at`" in DOC
    event = _with("grace_extended", until="2026-10-01T00:00:00Z")
    assert schema_accepts(event) and not validator_accepts(event)
    assert "later than `occurred_at`" in DOC


@pytest.mark.parametrize(
    ("time", "ok"),
    [
        ("2026-10-01t12:00:00z", True),  # any case (SPEC section 2)
        ("1970-01-01T00:00:00Z", True),
        ("9998-12-31T23:59:59Z", True),
        ("1969-12-31T23:59:59Z", False),  # years 1970-9998
        ("9999-01-01T00:00:00Z", False),
        ("20261001T120000Z", False),  # ISO 8601 basic form is not RFC 3339
        ("2026-10-01T12:00Z", False),  # seconds are required
        ("2026-13-01T12:00:00Z", False),
    ],
)
def test_the_schema_times_follow_the_spec(time: str, ok: bool) -> None:
    assert schema_accepts(_with("arrears_settled", occurred_at=time)) is ok
