"""Everything the ``lcic-guard`` commands print about an answer, for a
person and for a program. Pure: no I/O.

Its inputs are the client's answers (``lcic_guard_client``'s frozen
dataclasses, named and ordered as their wire messages, with ``datetime``
fields and enums whose names are the short ones) and the reconciler's
release plans.

For a program: :func:`to_json`, the one JSON dialect of every ``--json``
output (documented by docs/cli-json.schema.json): the API's field names
(snake_case), every field always present, enum values by their short names
(``ACCOUNT_OVERDUE``, not ``DECISION_REASON_ACCOUNT_OVERDUE``), numbers as
JSON numbers, times as RFC 3339 UTC strings (``null`` when unset).

For a person: the text ``check``, ``status``, ``explain``, ``preview``,
``override``, ``audit`` and ``release-plan`` print.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from lcic_guard.domain.time import InvalidTime, Millis, format_time, parse_time
from lcic_guard.flags import parse_duration

if TYPE_CHECKING:
    # Types only: importing the client imports grpc, which the command must
    # not do before it has set GRPC_VERBOSITY (see lcic_guard.cli.main).
    from _typeshed import DataclassInstance
    from lcic_guard_client import (
        ApplicationStatus,
        Decision,
        Override,
        Preview,
        SuspensionWarning,
    )

    from lcic_guard.domain.notices import Notice
    from lcic_guard.reconciler.release import ReleasePlan

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def millis(at: datetime) -> Millis:
    """A time of the client (UTC ``datetime``) as epoch milliseconds."""
    return (at - _EPOCH) // _MS


# -- for a program ------------------------------------------------------------------


def _value_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name  # the client's names are the short ones
    if isinstance(value, datetime):
        return format_time(millis(value))
    if isinstance(value, tuple):
        return [_value_json(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    return value


def to_json(answer: DataclassInstance) -> dict[str, Any]:
    """Any answer of the client as the CLI's JSON (see the module
    docstring). Generic: a field the API (and so the client) gains appears
    without a change here."""
    return {f.name: _value_json(getattr(answer, f.name)) for f in dataclasses.fields(answer)}


def check_json(check: str, app_id: str, d: Decision) -> dict[str, Any]:
    """``check --json``: which check of which application, then the Decision."""
    return {"check": check, "app_id": app_id, **to_json(d)}


def audit_json(account_id: str, overrides: Sequence[Override]) -> dict[str, Any]:
    """``audit --json``: the account, then ListOverrides' answer."""
    return {"account_id": account_id, "overrides": [to_json(o) for o in overrides]}


def dumps(doc: dict[str, Any]) -> str:
    """The text of a ``--json`` output."""
    return json.dumps(doc, indent=2)


# -- times --------------------------------------------------------------------------


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
        except InvalidTime as exc:
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


def _time(at: datetime | None) -> str:
    """RFC 3339, or ``-`` when unset (a table cell)."""
    return "-" if at is None else format_time(millis(at))


def _at(at: datetime | None, now: Millis) -> str:
    if at is None:  # the sidecar always sets the times shown here
        return "-"
    ms = millis(at)
    return f"{format_time(ms)} ({relative(ms, now)})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


# -- checks -------------------------------------------------------------------------


def _verdict(d: Decision) -> str:
    if d.shadow:
        return "ALLOWED (shadow mode: enforcement would deny)"
    return "ALLOWED" if d.allowed else "DENIED"


def decision_line(d: Decision, now: Millis) -> str:
    """``check``: one line, like ``DENIED · ACCOUNT_OVERDUE · release in 58d 3h — Top up …``."""
    parts = [_verdict(d), str(d.reason)]
    if d.protected_until is not None:
        parts.append(f"protected until {_time(d.protected_until)}")
    elif d.grace_ends_at is not None and d.allowed:
        parts.append(f"grace ends {relative(millis(d.grace_ends_at), now)}")
    if d.release_at is not None:
        done = d.reason.name == "RESOURCES_RELEASED"
        parts.append(f"{'released' if done else 'release'} {relative(millis(d.release_at), now)}")
    if d.degraded:
        parts.append("degraded (no fresh status)")
    line = " · ".join(parts)
    return f"{line} — {d.message}" if d.message else line


def render_decision(check: str, app_id: str, d: Decision, now: Millis) -> str:
    lines = [f"Check {check} for {app_id}: {_verdict(d)}, reason {d.reason}"]
    if d.degraded:
        lines.append("  (degraded: answered without a fresh status)")
    if d.protected_until is not None:
        lines.append(
            "  the classroom started before the suspension and is protected until "
            f"{_at(d.protected_until, now)}"
        )
    if d.message:
        lines.append(f"  {d.message}")
    return "\n".join(lines)


def render_explain(
    check: str,
    app_id: str,
    d: Decision,
    st: ApplicationStatus | None,
    now: Millis,
    *,
    unreadable: str = "",
) -> str:
    """``explain``: the answer, then the status behind it; without the
    status (unknown application, or ``unreadable`` saying why it cannot be
    read now) the answer alone."""
    decision = render_decision(check, app_id, d, now)
    if st is not None:
        return decision + "\n\n" + render_status(st, now)
    if unreadable:
        # The check was still answered (R13): show that answer, and why
        # nothing more can be said now.
        return (
            f"{decision}\n\nThe status record cannot be read now ({unreadable}): the answer "
            "above is the sidecar's own without it."
        )
    return decision


# -- status -------------------------------------------------------------------------

_STATE_WORDS: Final = {
    "ACTIVE": "in good standing",
    "GRACE": "overdue, within the grace period: still served",
    "SUSPENDED": "suspended: new classrooms and recordings are refused",
    "RELEASED": "resources released for good",
    "BANNED": "banned for good",
}


def render_status(st: ApplicationStatus, now: Millis) -> str:
    """An application's status for a person: reasons, facts, deadlines, advice."""
    state = str(st.state)
    lines = [
        f"Application {st.app_id} (account {st.account_id})",
        f"  state:   {state} - {_STATE_WORDS.get(state, '')}".rstrip(" -"),
        *_suspension(st, now),
    ]
    if st.degraded:
        lines.append("  (not read fresh from the store)")
    lines += ["", *_reasons(st, now)]
    if st.rules:
        lines += ["", "Rules applied:"] + [f"  {rule}" for rule in st.rules]
    if st.deadlines:  # the sidecar lists those ahead of its own clock
        lines += ["", "Deadlines ahead:"]
        for d in st.deadlines:
            lines += [f"  {_at(d.at, now)}  {d.kind}", f"    {d.description}"]
    lines += _warnings(st.warnings, now)
    if st.overrides:
        lines += ["", "Support overrides of the account:"]
        for o in st.overrides:
            lines += [f"  {_at(o.occurred_at, now)}  {o.kind} by {o.actor}: {o.reason}"]
            lines += [f"    {o.effect}"]
    if st.upcoming and state not in ("RELEASED", "BANNED"):  # for good: nothing ahead matters
        lines += ["", "Changes ahead if no new billing event arrives:"]
        for t in st.upcoming:
            lines.append(f"  {_at(t.at, now)}  {t.state} ({_why(t.reasons)})")
    if st.message:
        lines += ["", "What the customer can do:", f"  {st.message}"]
    updated = f", updated {_at(st.updated_at, now)}" if st.updated_at is not None else ""
    lines += ["", f"Status version {st.version}{updated}"]
    return "\n".join(lines)


def _suspension(st: ApplicationStatus, now: Millis) -> list[str]:
    if st.suspended_at is None:
        return []
    lines = [f"  suspended since {_at(st.suspended_at, now)}"]
    effective = st.suspension_effective_at
    if effective is not None:
        late = millis(effective) > millis(st.suspended_at)
        why = "learned late: classes" if late else "classes"
        lines.append(
            f"  in effect since {_at(effective, now)} ({why} reported started before then "
            "continue, R6)"
        )
    return lines


def _reasons(st: ApplicationStatus, now: Millis) -> list[str]:
    if not st.reasons:
        return ["Reasons: none; no rule restricts the application."]
    lines = ["Reasons, with the billing events behind them:"]
    for r in st.reasons:
        lines.append(f"  {r}")
        for f in st.facts:
            if f.reason != r:
                continue
            if f.event_id:
                lines.append(f"    - {f.event_type} {f.event_id} at {_at(f.occurred_at, now)}")
                lines.append(f"      {f.detail}")
            else:
                lines.append(f"    - {f.detail}")
    return lines


def _why(reasons: Iterable[object]) -> str:
    return ", ".join(map(str, reasons)) or "OK"


def _warnings(warnings: Iterable[SuspensionWarning], now: Millis) -> list[str]:
    out = [
        f"  {_at(w.at, now)}  service stops: {w.reason}"
        + (" (every application of the account)" if w.scope == "account" else "")
        for w in warnings
    ]
    return ["", "Warnings ahead (announced as suspension_scheduled):", *out] if out else []


# -- preview ------------------------------------------------------------------------

_PREVIEW_CHECKS: Final = (
    ("create", "create_classroom"),
    ("enter", "enter_classroom"),
    ("recording", "access_recording"),
)


def render_preview(p: Preview, now: Millis) -> str:
    lines = [
        f"Preview of {p.app_id} at {_at(p.at, now)}, if no new billing event arrives:",
        f"  state: {p.state} ({_why(p.reasons)})",
        "",
    ]
    for word, name in _PREVIEW_CHECKS:
        d: Decision = getattr(p, name)
        verdict = "allowed" if d.allowed else "DENIED"
        if d.shadow:
            verdict = "allowed (shadow; would deny)"
        extra = ""
        if d.protected_until is not None:
            extra = f", protected until {_time(d.protected_until)}"
        lines.append(f"  {word:<10} {verdict:<10} {d.reason}{extra}")
    if p.rules:
        lines += ["", "Rules:"] + [f"  {r}" for r in p.rules]
    lines += _warnings(p.warnings, now)
    lines += ["", "What the customer can do:", f"  {p.create_classroom.message}"]
    return "\n".join(lines)


# -- support overrides --------------------------------------------------------------


def override_recorded(action: str, o: Override) -> str:
    """``override``: what was recorded, and when it takes effect."""
    till = f" until {_time(o.until)}" if o.until is not None else ""
    return (
        f"recorded {action} of account {o.account_id}{till} by {o.actor} "
        f"(event {o.event_id}); the reconciler applies it when it reads the billing feed"
    )


def audit_table(account_id: str, overrides: Sequence[Override]) -> str:
    """``audit``: one row an override, oldest first."""
    if not overrides:
        return f"no override recorded for account {account_id}"
    rows = [
        (
            _time(o.occurred_at),
            _time(o.recorded_at),
            str(o.kind),
            o.actor,
            _time(o.until),
            o.reason,
            o.effect,
        )
        for o in overrides
    ]
    return table(("MADE", "RECORDED", "KIND", "ACTOR", "UNTIL", "REASON", "EFFECT"), rows)


# -- release plan -------------------------------------------------------------------


def release_plan(plans: Sequence[ReleasePlan], now: Millis, continuity: str) -> str:
    """``release-plan``: every scheduled release (R10) and whether it would
    run if due now, the release notices of each and their state, the notice
    on record each release rests on (or what is missing), and whether a
    store discontinuity pauses every release."""
    if not plans:
        return f"no release scheduled\n{continuity}"
    rows = [
        (
            plan.account_id,
            ",".join(plan.app_ids),
            format_time(plan.release_at) if plan.release_at else "-",
            "WOULD RELEASE NOW" if plan.eligible else "not now",
            plan.why,
        )
        for plan in plans
    ]
    out = table(("ACCOUNT", "APPLICATIONS", "RELEASE AT", "IF DUE NOW", "WHY"), rows)
    notices = [
        (plan.account_id, notice.kind, format_time(notice.at), _notice_state(plan.notices, i, now))
        for plan in plans
        for i, notice in enumerate(plan.notices)
    ]
    if notices:
        out += "\n\nRelease notices (release_scheduled announcements, R10):\n"
        out += table(("ACCOUNT", "NOTICE", "AT", "STATE"), notices)
    evidence = [(plan.account_id, plan.evidence) for plan in plans if plan.evidence]
    if evidence:
        out += "\n\nEvidence a release rests on (R10):\n"
        out += table(("ACCOUNT", "EVIDENCE"), evidence)
    return f"{out}\n\n{continuity}"


def _notice_state(notices: Sequence[Notice], i: int, now: Millis) -> str:
    """sent; scheduled (in the future); due now (the latest one whose time
    has come: sent on the next tick); or skipped (a later one superseded it:
    only the latest notice due is announced)."""
    notice = notices[i]
    if notice.sent:
        return "sent"
    if notice.at > now:
        return f"scheduled ({relative(notice.at, now)})"
    later_due = any(n.at <= now for n in notices[i + 1 :])
    return "skipped (superseded by a later notice)" if later_due else "due now"
