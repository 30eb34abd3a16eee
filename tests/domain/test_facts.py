"""Billing event validation (SPEC §1, §2): every type, every field.

Pure: no Redis, no gRPC. A rejected event raises InvalidEvent whose reason
starts with the name of the field that is wrong, so that the dead-letter
entry tells the billing team what to fix.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.domain.facts import (
    MAX_AHEAD_MS,
    ApplicationRegistered,
    ArrearsSettled,
    ComplianceBan,
    Fact,
    InvalidEvent,
    OverdueAlert,
    PackagePurchased,
    PackageUsage,
    PaygChanged,
    ResourcesReleased,
    parse_event,
    parse_event_json,
    to_json,
    to_record,
    valid_id,
)
from lcic_guard.domain.time import MAX_TIME, InvalidTime, format_time, parse_time

T0 = 1_790_000_000_000  # 2026-09-21T14:13:20Z
T0_TEXT = "2026-09-21T14:13:20.000Z"

# One valid event of every type the billing feed may carry.
VALID: dict[str, dict[str, Any]] = {
    "application_registered": {"account_id": "acct-1", "app_id": "app-1"},
    "overdue_alert": {"account_id": "acct-1", "amount_due": "12.50"},
    "arrears_settled": {"account_id": "acct-1"},
    "package_purchased": {
        "app_id": "app-1",
        "package_id": "pkg-1",
        "starts_at": "2026-09-01T00:00:00Z",
        "expires_at": "2026-10-01T00:00:00Z",
        "quota_minutes": 6000,
    },
    "package_usage": {"app_id": "app-1", "package_id": "pkg-1", "used_minutes": 42},
    "payg_changed": {"app_id": "app-1", "enabled": True},
    "compliance_ban": {"account_id": "acct-1", "note": "terms violation"},
}
OPTIONAL = {"amount_due", "note"}
ID_FIELDS = {"account_id", "app_id", "package_id"}
TIME_FIELDS = {"starts_at", "expires_at"}
MINUTE_FIELDS = {"quota_minutes", "used_minutes"}


def event(kind: str, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"event_id": "ev-1", "type": kind, "occurred_at": T0_TEXT}
    raw.update(VALID.get(kind, {}))
    raw.update(overrides)
    return raw


def without(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != name}


def rejected(raw: object, **kwargs: Any) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, **kwargs)
    assert info.value.reason == str(info.value)
    return info.value.reason


def fields_of(pick: set[str] | None = None) -> list[Any]:
    """(kind, field) params for every field of every type, optionally filtered."""
    out = []
    for k, body in VALID.items():
        for name in ("event_id", "occurred_at", *body):
            if pick is None or name in pick:
                out.append(pytest.param(k, name, id=f"{k}.{name}"))
    return out


# ---------------------------------------------------------------------------
# Valid events


EXPECTED: list[Any] = [
    pytest.param(
        "application_registered",
        ApplicationRegistered("ev-1", T0, "acct-1", "app-1"),
        id="application_registered",
    ),
    pytest.param("overdue_alert", OverdueAlert("ev-1", T0, "acct-1", "12.50"), id="overdue_alert"),
    pytest.param("arrears_settled", ArrearsSettled("ev-1", T0, "acct-1"), id="arrears_settled"),
    pytest.param(
        "package_purchased",
        PackagePurchased(
            "ev-1",
            T0,
            "app-1",
            "pkg-1",
            parse_time("2026-09-01T00:00:00Z", "x"),
            parse_time("2026-10-01T00:00:00Z", "x"),
            6000,
        ),
        id="package_purchased",
    ),
    pytest.param(
        "package_usage", PackageUsage("ev-1", T0, "app-1", "pkg-1", 42), id="package_usage"
    ),
    pytest.param("payg_changed", PaygChanged("ev-1", T0, "app-1", True), id="payg_changed"),
    pytest.param(
        "compliance_ban",
        ComplianceBan("ev-1", T0, "acct-1", "terms violation"),
        id="compliance_ban",
    ),
]


@pytest.mark.parametrize(("kind", "expected"), EXPECTED)
def test_every_type_parses_to_its_fact(kind: str, expected: Fact) -> None:
    fact = parse_event(event(kind))
    assert fact == expected
    assert type(fact).type == kind
    # JSON text, str and bytes, gives the same fact.
    assert parse_event_json(json.dumps(event(kind))) == expected
    assert parse_event_json(json.dumps(event(kind)).encode()) == expected


@pytest.mark.parametrize("kind", list(VALID))
def test_round_trip_through_canonical_json(kind: str) -> None:
    fact = parse_event(event(kind))
    assert parse_event_json(to_json(fact)) == fact
    record = to_record(fact)
    assert record["type"] == kind
    assert record["occurred_at"] == T0_TEXT


def test_resources_released_round_trips_only_when_internal_allowed() -> None:
    fact = ResourcesReleased("lcic-guard:release:acct-1:1", T0, "acct-1")
    text = to_json(fact)
    assert parse_event_json(text, allow_internal=True) == fact
    with pytest.raises(InvalidEvent, match=r"^type: unknown event type 'resources_released'"):
        parse_event_json(text)


@pytest.mark.parametrize("kind", list(VALID))
def test_reserved_event_ids_rejected_from_the_billing_feed(kind: str) -> None:
    # Issue 9 (6): a billing event named like the reconciler's release fact
    # pre-empted the real one. The reconciler's own facts still load.
    reason = rejected(event(kind, event_id="lcic-guard:release:acct-1:1"))
    assert reason == "event_id: ids starting with 'lcic-guard:' are reserved for lcic-guard"
    parse_event(event(kind, event_id="lcic-guard:release:acct-1:1"), allow_internal=True)
    parse_event(event(kind, event_id="billing:lcic-guard:1"))  # only the prefix is reserved


def test_optional_fields_default() -> None:
    alert = parse_event(without(event("overdue_alert"), "amount_due"))
    assert isinstance(alert, OverdueAlert)
    assert alert.amount_due is None
    assert "amount_due" not in to_record(alert)
    alert = parse_event(event("overdue_alert", amount_due=None))
    assert isinstance(alert, OverdueAlert)
    assert alert.amount_due is None
    ban = parse_event(without(event("compliance_ban"), "note"))
    assert isinstance(ban, ComplianceBan)
    assert ban.note == ""
    ban = parse_event(event("compliance_ban", note=None))
    assert isinstance(ban, ComplianceBan)
    assert ban.note == ""


def test_unknown_extra_fields_are_ignored() -> None:
    fact = parse_event(event("arrears_settled", currency="CNY", extra={"nested": [1, 2]}))
    assert fact == ArrearsSettled("ev-1", T0, "acct-1")


def test_long_note_is_truncated() -> None:
    ban = parse_event(event("compliance_ban", note="x" * 5000))
    assert isinstance(ban, ComplianceBan)
    assert ban.note == "x" * 2000


@pytest.mark.parametrize(
    "value",
    ["a", "A" * 64, "app.v2_test:eu-1", "0", "-", "...", "a:b:c"],
    ids=["one-char", "64-chars", "all-classes", "digit", "dash", "dots", "colons"],
)
def test_valid_ids_accepted(value: str) -> None:
    assert valid_id(value)
    fact = parse_event(event("application_registered", account_id=value, app_id=value))
    assert isinstance(fact, ApplicationRegistered)
    assert fact.app_id == value


@pytest.mark.parametrize(
    "value",
    ["x", "ev 1 with spaces/ü", "e" * 200],
    ids=["short", "any-characters", "200-chars"],
)
def test_event_id_is_any_string_up_to_200(value: str) -> None:
    # event_id is the billing system's own key, not an entity id (SPEC §1 ids
    # are account/app/package ids): any non-empty string of up to 200 chars.
    assert parse_event(event("arrears_settled", event_id=value)).event_id == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(0, 0, id="zero"),
        pytest.param(2**53 - 1, 2**53 - 1, id="max-safe-integer"),
    ],
)
def test_minutes_edges_accepted(value: int, expected: int) -> None:
    usage = parse_event(event("package_usage", used_minutes=value))
    assert isinstance(usage, PackageUsage)
    assert usage.used_minutes == expected
    pkg = parse_event(event("package_purchased", quota_minutes=value))
    assert isinstance(pkg, PackagePurchased)
    assert pkg.quota_minutes == expected


@pytest.mark.parametrize(
    "value", ["0", "12", "12.50", "-3.1", "1E+3"], ids=["0", "int", "cents", "neg", "exp"]
)
def test_amount_due_decimal_strings_accepted(value: str) -> None:
    alert = parse_event(event("overdue_alert", amount_due=value))
    assert isinstance(alert, OverdueAlert)
    assert alert.amount_due == value


def test_payg_false_accepted() -> None:
    fact = parse_event(event("payg_changed", enabled=False))
    assert isinstance(fact, PaygChanged)
    assert fact.enabled is False


# ---------------------------------------------------------------------------
# Rejected events: every reason names the field


@pytest.mark.parametrize(("kind", "name"), fields_of())
def test_every_required_field_missing(kind: str, name: str) -> None:
    if name in OPTIONAL:
        return_value = parse_event(without(event(kind), name))
        assert type(return_value).type == kind
        return
    assert rejected(without(event(kind), name)) == f"{name}: missing"
    assert rejected(event(kind, **{name: None})) == f"{name}: missing"


BAD_IDS: list[Any] = [
    pytest.param("", id="empty"),
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("has space", id="space"),
    pytest.param("a/b", id="slash"),
    pytest.param("ünï", id="non-ascii"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param(5, id="int"),
    pytest.param(True, id="bool"),
    pytest.param(["app-1"], id="list"),
    pytest.param({"id": "x"}, id="object"),
]


@pytest.mark.parametrize("value", BAD_IDS)
@pytest.mark.parametrize(("kind", "name"), fields_of(ID_FIELDS))
def test_bad_ids_rejected(kind: str, name: str, value: object) -> None:
    reason = rejected(event(kind, **{name: value}))
    assert reason == f"{name}: expected 1-64 characters from [A-Za-z0-9._:-]"
    assert not valid_id(value)


@pytest.mark.parametrize(
    "value",
    ["", "e" * 201, 17, True, ["ev-1"]],
    ids=["empty", "201-chars", "int", "bool", "list"],
)
@pytest.mark.parametrize("kind", list(VALID))
def test_bad_event_id_rejected(kind: str, value: object) -> None:
    assert rejected(event(kind, event_id=value)).startswith("event_id: expected a string")


BAD_TIMES: list[Any] = [
    pytest.param("2026-09-21T14:13:20", "timestamp has no time zone", id="naive"),
    pytest.param("2026-09-21", "not an RFC 3339 timestamp", id="date-only"),
    pytest.param("2026-09-21T14:13Z", "not an RFC 3339 timestamp", id="no-seconds"),
    pytest.param("20260921T141320Z", "not an RFC 3339 timestamp", id="iso-basic"),
    pytest.param("2026-W39-1T14:13:20Z", "not an RFC 3339 timestamp", id="iso-week"),
    pytest.param("2026-09-21T14:13:20+0800", "not an RFC 3339 timestamp", id="offset-no-colon"),
    pytest.param("2026-09-21T14:13:20+08", "not an RFC 3339 timestamp", id="offset-hours"),
    pytest.param("2026-09-21T14:13:20+24:00", "not an RFC 3339 timestamp", id="offset-24h"),
    pytest.param("2026-09-21T24:00:00Z", "not an RFC 3339 timestamp", id="hour-24"),
    pytest.param("2026-09-21T14:13:20.Z", "not an RFC 3339 timestamp", id="empty-fraction"),
    pytest.param(
        "\uff12\uff10\uff12\uff16-09-21T14:13:20Z",
        "not an RFC 3339 timestamp",
        id="non-ascii-digits",
    ),
    pytest.param("9999-01-01T00:00:00Z", "timestamp out of range", id="year-9999"),
    pytest.param("10000-01-01T00:00:00Z", "not an RFC 3339 timestamp", id="year-10000"),
    pytest.param("1970-01-01T00:30:00+01:00", "timestamp out of range", id="1969-in-utc"),
    pytest.param("yesterday", "not an RFC 3339 timestamp", id="words"),
    pytest.param("", "not an RFC 3339 timestamp", id="empty"),
    pytest.param("2026-13-01T00:00:00Z", "not an RFC 3339 timestamp", id="month-13"),
    pytest.param("2026-02-30T00:00:00Z", "not an RFC 3339 timestamp", id="feb-30"),
    pytest.param("1969-12-31T23:59:59.999Z", "timestamp out of range", id="before-epoch"),
    pytest.param("9998-12-31T23:59:59-01:00", "timestamp out of range", id="after-9998"),
    pytest.param(T0, "expected an RFC 3339 timestamp string", id="epoch-millis-int"),
    pytest.param(1.5, "expected an RFC 3339 timestamp string", id="float"),
    pytest.param(True, "expected an RFC 3339 timestamp string", id="bool"),
    pytest.param(["2026-09-21T14:13:20Z"], "expected an RFC 3339 timestamp string", id="list"),
]


@pytest.mark.parametrize(("value", "why"), BAD_TIMES)
@pytest.mark.parametrize(("kind", "name"), fields_of({"occurred_at", *TIME_FIELDS}))
def test_bad_timestamps_rejected(kind: str, name: str, value: object, why: str) -> None:
    reason = rejected(event(kind, **{name: value}))
    assert reason.startswith(f"{name}: {why}")


BAD_MINUTES: list[Any] = [
    pytest.param(-1, id="negative"),
    pytest.param(2**53, id="too-large"),
    pytest.param(True, id="bool-true"),
    pytest.param(False, id="bool-false"),
    pytest.param(1.5, id="float"),
    pytest.param(10.0, id="integral-float"),
    pytest.param("10", id="string"),
    pytest.param([10], id="list"),
]


@pytest.mark.parametrize("value", BAD_MINUTES)
@pytest.mark.parametrize(("kind", "name"), fields_of(MINUTE_FIELDS))
def test_bad_minutes_rejected(kind: str, name: str, value: object) -> None:
    assert rejected(event(kind, **{name: value})) == f"{name}: expected a non-negative integer"


@pytest.mark.parametrize(
    "value",
    [1, 0, "true", "false", "yes", [True]],
    ids=["1", "0", "str-true", "str-false", "yes", "list"],
)
def test_enabled_must_be_a_bool(value: object) -> None:
    assert rejected(event("payg_changed", enabled=value)) == "enabled: expected true or false"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        pytest.param(12.5, "expected a decimal string", id="number"),
        pytest.param(12, "expected a decimal string", id="int"),
        pytest.param(True, "expected a decimal string", id="bool"),
        pytest.param("twelve", "not a decimal number", id="words"),
        pytest.param("", "not a decimal number", id="empty"),
        pytest.param("12,50", "not a decimal number", id="comma"),
        pytest.param("NaN", "not a finite decimal number", id="nan"),
        pytest.param("Infinity", "not a finite decimal number", id="infinity"),
        pytest.param("-inf", "not a finite decimal number", id="minus-inf"),
    ],
)
def test_bad_amount_due_rejected(value: object, why: str) -> None:
    assert rejected(event("overdue_alert", amount_due=value)) == f"amount_due: {why}"


@pytest.mark.parametrize("value", [5, True, ["x"]], ids=["int", "bool", "list"])
def test_bad_note_rejected(value: object) -> None:
    assert rejected(event("compliance_ban", note=value)) == "note: expected a string"


@pytest.mark.parametrize(
    ("starts", "expires"),
    [
        pytest.param("2026-09-01T00:00:00Z", "2026-09-01T00:00:00Z", id="equal"),
        pytest.param("2026-09-01T00:00:00.001Z", "2026-09-01T00:00:00Z", id="1ms-before"),
        pytest.param("2026-10-01T00:00:00Z", "2026-09-01T00:00:00Z", id="month-before"),
        pytest.param("2026-09-01T08:00:00+08:00", "2026-09-01T00:00:00Z", id="equal-via-offset"),
    ],
)
def test_expires_at_must_be_after_starts_at(starts: str, expires: str) -> None:
    raw = event("package_purchased", starts_at=starts, expires_at=expires)
    assert rejected(raw) == "expires_at: must be after starts_at"


def test_one_ms_package_accepted() -> None:
    fact = parse_event(
        event(
            "package_purchased",
            starts_at="2026-09-01T00:00:00Z",
            expires_at="2026-09-01T00:00:00.001Z",
        )
    )
    assert isinstance(fact, PackagePurchased)
    assert fact.expires_at - fact.starts_at == 1


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        pytest.param("no_such_type", "type: unknown event type 'no_such_type'", id="unknown"),
        pytest.param("Overdue_Alert", "type: unknown event type 'Overdue_Alert'", id="wrong-case"),
        pytest.param(
            "resources_released",
            "type: unknown event type 'resources_released'",
            id="internal-from-feed",
        ),
        pytest.param(None, "type: missing", id="null"),
        pytest.param(7, "type: missing", id="not-a-string"),
    ],
)
def test_bad_type_rejected(kind: object, why: str) -> None:
    raw = {"event_id": "ev-1", "type": kind, "occurred_at": T0_TEXT, "account_id": "acct-1"}
    assert rejected(raw) == why
    assert rejected(without(raw, "type")) == "type: missing"


def test_internal_type_refused_from_feed_but_accepted_internally() -> None:
    raw = {
        "event_id": "r-1",
        "type": "resources_released",
        "occurred_at": T0_TEXT,
        "account_id": "acct-1",
    }
    assert rejected(raw).startswith("type: unknown event type")
    assert parse_event(raw, allow_internal=True) == ResourcesReleased("r-1", T0, "acct-1")
    # Even with internal events allowed, the fields are still validated.
    assert rejected({**raw, "account_id": "bad id"}, allow_internal=True).startswith("account_id:")


@pytest.mark.parametrize(
    "raw",
    [[], "overdue_alert", 5, None, [event("arrears_settled")]],
    ids=["list", "string", "number", "null", "list-of-event"],
)
def test_non_object_rejected(raw: object) -> None:
    assert rejected(raw) == "event: expected a JSON object"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("{", id="truncated"),
        pytest.param("{'type': 'overdue_alert'}", id="single-quotes"),
        pytest.param('{"type": "overdue_alert"} trailing', id="trailing-garbage"),
        pytest.param(b"\xff\xfe\x00garbage", id="bad-bytes"),
        pytest.param(b'{"type": "\xc3\x28"}', id="invalid-utf8"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="deeply-nested"),
        pytest.param('{"a":' * 100_000 + "1" + "}" * 100_000, id="deeply-nested-objects"),
    ],
)
def test_bad_json_rejected(text: str | bytes) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event_json(text)
    assert info.value.reason.startswith("event: not valid JSON")


def test_json_that_is_not_an_object_rejected() -> None:
    with pytest.raises(InvalidEvent, match=r"^event: expected a JSON object$"):
        parse_event_json("[1, 2]")


def test_first_wrong_field_is_named() -> None:
    # Several wrong fields: the reason names one of them, never another one.
    raw = event("package_usage", app_id="bad id", used_minutes=-1)
    assert rejected(raw).startswith("app_id:")
    assert rejected(event("package_usage", used_minutes=-1)).startswith("used_minutes:")


# ---------------------------------------------------------------------------
# Timestamps


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        pytest.param("1970-01-01T00:00:00Z", 0, id="epoch"),
        pytest.param("1970-01-01T00:00:00.001Z", 1, id="epoch+1ms"),
        pytest.param("2026-09-21T14:13:20Z", T0, id="z-suffix"),
        pytest.param("2026-09-21T14:13:20.000Z", T0, id="z-with-millis"),
        pytest.param("2026-09-21T14:13:20+00:00", T0, id="utc-offset"),
        pytest.param("2026-09-21T22:13:20+08:00", T0, id="east-offset"),
        pytest.param("2026-09-21T09:13:20-05:00", T0, id="west-offset"),
        pytest.param("2026-09-21T14:13:20.123Z", T0 + 123, id="millis"),
        pytest.param("2026-09-21T14:13:20.123999Z", T0 + 123, id="micros-truncated"),
        pytest.param("9998-12-31T23:59:59.999Z", MAX_TIME, id="max"),
        # RFC 3339 §5.6: "T" and "Z" in any case; its note allows a space.
        pytest.param("2026-09-21t14:13:20z", T0, id="lower-case-t-z"),
        pytest.param("2026-09-21 14:13:20Z", T0, id="space"),
        pytest.param("2026-09-21T14:13:20.1Z", T0 + 100, id="one-digit-fraction"),
        pytest.param("2026-09-21T14:13:20.123456789Z", T0 + 123, id="nanos-truncated"),
        pytest.param("2026-09-21T14:13:20-00:00", T0, id="unknown-local-offset"),
        pytest.param("2026-09-22T00:13:20+10:00", T0, id="offset-crosses-midnight"),
        pytest.param("2026-06-30T23:59:60Z", 1782863999999, id="leap-second"),
    ],
)
def test_parse_time(text: str, ms: int) -> None:
    assert parse_time(text, "occurred_at") == ms


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        pytest.param(0, "1970-01-01T00:00:00.000Z", id="epoch"),
        pytest.param(1, "1970-01-01T00:00:00.001Z", id="1ms"),
        pytest.param(T0, T0_TEXT, id="t0"),
        pytest.param(T0 + 999, "2026-09-21T14:13:20.999Z", id="999ms"),
        pytest.param(MAX_TIME, "9998-12-31T23:59:59.999Z", id="max"),
    ],
)
def test_format_time(ms: int, text: str) -> None:
    assert format_time(ms) == text
    assert parse_time(text, "x") == ms


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=MAX_TIME))
def test_format_parse_round_trip(ms: int) -> None:
    text = format_time(ms)
    assert text.endswith("Z")
    assert len(text) == len("2026-09-21T14:13:20.000Z")
    assert parse_time(text, "occurred_at") == ms
    # Formatting preserves order (the text sorts like the time).
    if ms < MAX_TIME:
        assert format_time(ms) < format_time(ms + 1)


def test_parse_time_names_the_field() -> None:
    with pytest.raises(InvalidTime, match=r"^starts_at: "):
        parse_time("nope", "starts_at")


# -- no facts from the future (SPEC §2) -------------------------------------------

FUTURE_KINDS: dict[str, dict[str, Any]] = {
    **VALID,
    "grace_extended": {
        "account_id": "acct-1",
        "until": "9000-01-01T00:00:00Z",
        "actor": "alice@support",
        "reason": "ticket 1",
    },
    "release_hold_set": {"account_id": "acct-1", "actor": "alice@support", "reason": "dispute"},
    "release_hold_cleared": {"account_id": "acct-1", "actor": "bob", "reason": "settled"},
}


@pytest.mark.parametrize("kind", sorted(FUTURE_KINDS))
def test_a_fact_more_than_five_minutes_ahead_of_the_clock_is_refused_whatever_its_type(
    kind: str,
) -> None:
    ahead = {**event(kind), **FUTURE_KINDS[kind], "type": kind}
    ahead["occurred_at"] = format_time(T0 + MAX_AHEAD_MS + 1)
    with pytest.raises(InvalidEvent) as exc:
        parse_event(ahead, now=T0)
    assert exc.value.reason.startswith("occurred_at:"), exc.value.reason
    # Within the skew allowed, and with no clock (read back from the store): kept.
    ahead["occurred_at"] = format_time(T0 + MAX_AHEAD_MS)
    assert parse_event(ahead, now=T0).occurred_at == T0 + MAX_AHEAD_MS
    ahead["occurred_at"] = "2099-01-01T00:00:00Z"
    assert parse_event(ahead).occurred_at == parse_time("2099-01-01T00:00:00Z", "x")


@given(ahead=st.integers(-400 * 86_400_000, 400 * 86_400_000))
def test_the_future_bound_is_exactly_five_minutes(ahead: int) -> None:
    raw = event("arrears_settled", occurred_at=format_time(T0 + ahead))
    if ahead > MAX_AHEAD_MS:
        with pytest.raises(InvalidEvent, match=r"^occurred_at: "):
            parse_event_json(json.dumps(raw), now=T0)
    else:
        assert parse_event_json(json.dumps(raw), now=T0).occurred_at == T0 + ahead
