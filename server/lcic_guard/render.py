"""Explanations on the wire and for a person.

For a person: the text ``lcic-guard status``, ``explain``, ``check`` and
``preview`` print. For a program: :func:`to_json`, the one JSON dialect of
every ``--json`` output (documented by docs/cli-json.schema.json): the API's
field names (snake_case), every field always present, enum values by their
short names (``ACCOUNT_OVERDUE``, not ``DECISION_REASON_ACCOUNT_OVERDUE``),
numbers as JSON numbers, times as RFC 3339 UTC strings (``null`` when
unset). Pure: no I/O.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.domain.facts import InvalidEvent
from lcic_guard.domain.policy import (
    Check,
)
from lcic_guard.domain.time import Millis, format_time, parse_time
from lcic_guard.flags import parse_duration

PREVIEW_FIELDS: Final = (
    ("create_classroom", Check.CREATE_CLASSROOM),
    ("enter_classroom", Check.ENTER_CLASSROOM),
    ("access_recording", Check.ACCESS_RECORDING),
)

# -- for a program ------------------------------------------------------------------


def _enum_prefix(full_name: str) -> str:
    """``DecisionReason`` -> ``DECISION_REASON_``: the prefix every value of
    the enum carries on the wire (the style guide's rule)."""
    name = full_name.rpartition(".")[2]
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper() + "_"


def _value_json(field: Any, value: Any) -> Any:
    # ``field`` is a FieldDescriptor (the C implementation's type differs
    # from the stubs' one, hence Any).
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        named = enum.values_by_number.get(value)
        return named.name.removeprefix(_enum_prefix(enum.full_name)) if named else value
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return format_time(value.ToMilliseconds())
        return to_json(value)
    return value


def to_json(msg: Message) -> dict[str, Any]:
    """Any message of the API as the CLI's JSON (see the module docstring)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = [_value_json(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value_json(field, value)
    return out


def check_json(check: str, app_id: str, d: pb.Decision) -> dict[str, Any]:
    """``check --json``: which check of which application, then the Decision."""
    return {"check": check, "app_id": app_id, **to_json(d)}


def audit_json(account_id: str, resp: pb.ListOverridesResponse) -> dict[str, Any]:
    return {"account_id": account_id, **to_json(resp)}


# -- for a person -----------------------------------------------------------------


def parse_at(text: str, now: Millis, flag: str = "--at", *, future: bool = False) -> Millis:
    """An RFC 3339 time (``2026-10-01T12:00:00Z``) or a duration from now:
    ``+25h``, ``25h``, ``+1h30m``, ``-1h``. With ``future``, a time before
    before now is refused (a negative duration): said, not quietly answered
    as now."""
    text = text.strip()
    example = "2026-10-01T12:00:00Z or +25h"
    if text[:1] in ("+", "-") or (text[:1].isdigit() and text[-1:].isalpha() and "T" not in text):
        sign = text[0] if text[0] in "+-" else "+"
        try:
            ms = parse_duration(text.lstrip("+-"))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None
        at = now + ms if sign == "+" else now - ms
    else:
        try:
            at = parse_time(text, flag)
        except InvalidEvent as exc:
            raise argparse.ArgumentTypeError(
                f"{exc.reason}; use an RFC 3339 time such as {example}"
            ) from None
    if future and text.startswith("-"):
        # Only what is in the past by construction: an absolute time is
        # judged by the sidecar's clock, not this machine's.
        raise argparse.ArgumentTypeError(
            f"{flag} {text} is in the past ({format_time(at)}); give a later time, "
            f"such as {example}"
        )
    return at


def reason_name(value: int) -> str:
    return pb.DecisionReason.Name(value).removeprefix("DECISION_REASON_")  # type: ignore[arg-type]


def state_name(value: int) -> str:
    return pb.ApplicationState.Name(value).removeprefix("APPLICATION_STATE_")  # type: ignore[arg-type]


def relative(ms: Millis, now: Millis) -> str:
    """``in 22h 5m``, ``3d 2h ago``, ``now``."""
    delta = ms - now
    if abs(delta) < 60_000:
        return "now"
    minutes = abs(delta) // 60_000
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours or (days and mins):
        parts.append(f"{hours}h")
    if mins and not days:
        parts.append(f"{mins}m")
    text = " ".join(parts)
    return f"in {text}" if delta > 0 else f"{text} ago"


def _at(ts_ms: Millis, now: Millis) -> str:
    return f"{format_time(ts_ms)} ({relative(ts_ms, now)})"


def _has(msg: object, name: str) -> bool:
    return bool(msg.HasField(name))  # type: ignore[attr-defined]


_STATE_WORDS: Final = {
    "ACTIVE": "in good standing",
    "GRACE": "overdue, within the grace period: still served",
    "SUSPENDED": "suspended: new classrooms and recordings are refused",
    "RELEASED": "resources released for good",
    "BANNED": "banned for good",
}


def render_status(st: pb.ApplicationStatus, now: Millis) -> str:
    """An application's status for a person: reasons, facts, deadlines, advice."""
    state = state_name(st.state)
    lines = [
        f"Application {st.app_id} (account {st.account_id})",
        f"  state:   {state} - {_STATE_WORDS.get(state, '')}".rstrip(" -"),
    ]
    if _has(st, "suspended_at"):
        since = st.suspended_at.ToMilliseconds()
        lines.append(f"  suspended since {_at(since, now)}")
        if _has(st, "suspension_effective_at"):
            effective = st.suspension_effective_at.ToMilliseconds()
            lines.append(
                f"  in effect since {_at(effective, now)}"
                + (
                    " (learned late: classes reported started before then continue, R6)"
                    if effective > since
                    else " (classes reported started before then continue, R6)"
                )
            )
    if st.degraded:
        lines.append("  (not read fresh from the store)")
    lines.append("")
    if st.reasons:
        lines.append("Reasons, with the billing events behind them:")
        for r in st.reasons:
            lines.append(f"  {reason_name(r)}")
            for f in st.facts:
                if f.reason != r:
                    continue
                if f.event_id:
                    when = _at(f.occurred_at.ToMilliseconds(), now)
                    lines.append(f"    - {f.event_type} {f.event_id} at {when}")
                    lines.append(f"      {f.detail}")
                else:
                    lines.append(f"    - {f.detail}")
    else:
        lines.append("Reasons: none; no rule restricts the application.")
    if st.rules:
        lines += ["", "Rules applied:"] + [f"  {rule}" for rule in st.rules]
    if st.deadlines:  # the sidecar lists those ahead of its own clock
        lines += ["", "Deadlines ahead:"]
        for d in st.deadlines:
            kind = pb.DeadlineKind.Name(d.kind).removeprefix("DEADLINE_KIND_")
            lines.append(f"  {_at(d.at.ToMilliseconds(), now)}  {kind}")
            lines.append(f"    {d.description}")
    lines += _warnings(st.warnings, now)
    if st.overrides:
        lines += ["", "Support overrides of the account:"]
        for o in st.overrides:
            kind = pb.OverrideKind.Name(o.kind).removeprefix("OVERRIDE_KIND_")
            lines.append(
                f"  {_at(o.occurred_at.ToMilliseconds(), now)}  {kind} by {o.actor}: {o.reason}"
            )
            lines.append(f"    {o.effect}")
    if st.upcoming and state not in ("RELEASED", "BANNED"):  # for good: nothing ahead matters
        lines += ["", "Changes ahead if no new billing event arrives:"]
        for t in st.upcoming:
            why = ", ".join(reason_name(r) for r in t.reasons) or "OK"
            lines.append(f"  {_at(t.at.ToMilliseconds(), now)}  {state_name(t.state)} ({why})")
    if st.message:
        lines += ["", "What the customer can do:", f"  {st.message}"]
    updated = (
        f", updated {_at(st.updated_at.ToMilliseconds(), now)}" if _has(st, "updated_at") else ""
    )
    lines += ["", f"Status version {st.version}{updated}"]
    return "\n".join(lines)


def _warnings(warnings: Iterable[pb.SuspensionWarning], now: Millis) -> list[str]:
    out = [
        f"  {_at(w.at.ToMilliseconds(), now)}  service stops: {reason_name(w.reason)}"
        + (" (every application of the account)" if w.scope == "account" else "")
        for w in warnings
    ]
    return ["", "Warnings ahead (announced as suspension_scheduled):", *out] if out else []


def render_decision(check: str, app_id: str, d: pb.Decision, now: Millis) -> str:
    verdict = "ALLOWED" if d.allowed else "DENIED"
    if d.shadow:
        verdict = "ALLOWED (shadow mode: enforcement would deny)"
    lines = [f"Check {check} for {app_id}: {verdict}, reason {reason_name(d.reason)}"]
    if d.degraded:
        lines.append("  (degraded: answered without a fresh status)")
    if _has(d, "protected_until"):
        lines.append(
            "  the classroom started before the suspension and is protected until "
            f"{_at(d.protected_until.ToMilliseconds(), now)}"
        )
    if d.message:
        lines.append(f"  {d.message}")
    return "\n".join(lines)


def render_explain(check: str, d: pb.Decision, st: pb.ApplicationStatus, now: Millis) -> str:
    return render_decision(check, st.app_id, d, now) + "\n\n" + render_status(st, now)


_CHECK_WORDS: Final = {
    Check.CREATE_CLASSROOM: "create",
    Check.ENTER_CLASSROOM: "enter",
    Check.ACCESS_RECORDING: "recording",
}


def render_preview(resp: pb.PreviewApplicationResponse, now: Millis) -> str:
    at = resp.at.ToMilliseconds()
    why = ", ".join(reason_name(r) for r in resp.reasons) or "OK"
    lines = [
        f"Preview of {resp.app_id} at {_at(at, now)}, if no new billing event arrives:",
        f"  state: {state_name(resp.state)} ({why})",
        "",
    ]
    for name, check in PREVIEW_FIELDS:
        d: pb.Decision = getattr(resp, name)
        verdict = "allowed" if d.allowed else "DENIED"
        if d.shadow:
            verdict = "allowed (shadow; would deny)"
        extra = ""
        if _has(d, "protected_until"):
            extra = f", protected until {format_time(d.protected_until.ToMilliseconds())}"
        lines.append(f"  {_CHECK_WORDS[check]:<10} {verdict:<10} {reason_name(d.reason)}{extra}")
    if resp.rules:
        lines += ["", "Rules:"] + [f"  {r}" for r in resp.rules]
    lines += _warnings(resp.warnings, now)
    lines += ["", "What the customer can do:", f"  {resp.create_classroom.message}"]
    return "\n".join(lines)
