"""render.py prints the client's answers (frozen dataclasses), not wire
messages. Its ``--json`` dialect is still the wire message's: every field
of the message, in the message's order, enums by their short names, times
as RFC 3339 (docs/cli-json.schema.json). The oracle here reads the wire
message itself, so a field the client's dataclass lacks, misorders or
converts differently shows up."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard import render
from lcic_guard.domain.time import format_time
from lcic_guard_client import (
    ApplicationStatus,
    Decision,
    Override,
    OverrideKind,
    Preview,
    Reason,
    State,
)

from tests.support.clock import T0


def _enum_prefix(full_name: str) -> str:
    name = full_name.rpartition(".")[2]
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper() + "_"


def _wire_value(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name.removeprefix(
            _enum_prefix(field.enum_type.full_name)
        )
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return format_time(value.ToMilliseconds())
        return wire_json(value)
    return value


def wire_json(msg: Message) -> dict[str, Any]:
    """The dialect, read off the wire message's descriptor."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = [_wire_value(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _wire_value(field, value)
    return out


def _same(answer: Any) -> None:
    """The same JSON, key order included (json.dumps keeps it)."""
    mine, wire = render.to_json(answer), wire_json(answer.to_proto())
    assert list(mine.items()) == list(wire.items())


# Microseconds included: the wire keeps them, the dialect floors to the
# millisecond as Timestamp.ToMilliseconds does.
moments = st.none() | st.datetimes(
    min_value=dt.datetime(1971, 1, 1),
    max_value=dt.datetime(9000, 1, 1),
    timezones=st.just(dt.UTC),
)
reasons = st.sampled_from(list(Reason))
states = st.sampled_from(list(State))
text = st.text(max_size=20)
decisions = st.builds(
    Decision,
    allowed=st.booleans(),
    reason=reasons,
    reasons=st.lists(reasons, max_size=3).map(tuple),
    message=text,
    grace_ends_at=moments,
    suspended_at=moments,
    release_at=moments,
    protected_until=moments,
    status_version=st.integers(0, 2**64 - 1),
    degraded=st.booleans(),
    state=states,
    shadow=st.booleans(),
    valid_until=moments,
)
overrides = st.builds(
    Override,
    event_id=text,
    kind=st.sampled_from(list(OverrideKind)),
    account_id=text,
    actor=text,
    reason=text,
    occurred_at=moments,
    recorded_at=moments,
    until=moments,
    effect=text,
)


@given(decisions)
def test_a_decision_prints_as_its_wire_message(d: Decision) -> None:
    _same(d)
    doc = render.check_json("create", "app-1", d)
    assert list(doc)[:2] == ["check", "app_id"] and doc["reason"] == d.reason.name


@given(overrides)
def test_an_override_prints_as_its_wire_message(o: Override) -> None:
    _same(o)


@given(st.lists(overrides, max_size=3))
def test_the_audit_prints_as_list_overrides_answer(found: list[Override]) -> None:
    answer = pb.ListOverridesResponse(overrides=[o.to_proto() for o in found])
    assert render.audit_json("acct-1", found) == {"account_id": "acct-1", **wire_json(answer)}


previews = st.builds(
    Preview,
    app_id=text,
    at=moments,
    state=states,
    reasons=st.lists(reasons, max_size=3).map(tuple),
    create_classroom=decisions,
    enter_classroom=decisions,
    access_recording=decisions,
    rules=st.lists(text, max_size=2).map(tuple),
)


@given(previews)
def test_a_preview_prints_as_its_wire_message(p: Preview) -> None:
    _same(p)


def test_a_status_with_every_part_prints_as_its_wire_message() -> None:
    msg = pb.ApplicationStatus(
        app_id="app-1",
        account_id="acct-1",
        state=pb.APPLICATION_STATE_SUSPENDED,
        reasons=[pb.DECISION_REASON_ACCOUNT_OVERDUE],
        version=7,
        rules=["R2"],
        message="Top up",
    )
    msg.suspended_at.FromMilliseconds(T0)
    msg.upcoming.add(state=pb.APPLICATION_STATE_RELEASED).at.FromMilliseconds(T0 + 1)
    msg.facts.add(reason=pb.DECISION_REASON_ACCOUNT_OVERDUE, event_id="e-1", detail="alert")
    msg.deadlines.add(kind=pb.DEADLINE_KIND_RELEASE, description="release").at.FromMilliseconds(
        T0 + 2
    )
    msg.overrides.add(event_id="o-1", kind=pb.OVERRIDE_KIND_HOLD_RELEASE, actor="ops")
    msg.warnings.add(reason=pb.DECISION_REASON_ACCOUNT_OVERDUE, scope="account")
    status = ApplicationStatus.from_proto(msg)
    assert list(render.to_json(status).items()) == list(wire_json(msg).items())
    # Every field, in the message's order: a field the API gains and the
    # client's dataclass misses fails here before the schema test does.
    assert list(render.to_json(status)) == [f.name for f in msg.DESCRIPTOR.fields]
