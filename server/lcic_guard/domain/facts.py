"""Billing facts: the validated form of the billing system's events (SPEC §2).

Pure: no I/O. Every event is parsed into one frozen dataclass per type, or
rejected with :class:`InvalidEvent` whose ``reason`` says what is wrong (the
reconciler dead-letters it with that reason). Times are integer milliseconds
since the Unix epoch, UTC (:data:`Millis`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Final

from lcic_guard.domain.text import unshowable_field
from lcic_guard.domain.time import InvalidTime, Millis, format_time, parse_time

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
RESERVED_PREFIX: Final = "lcic-guard:"
"""Event ids starting with this are the reconciler's own facts (SPEC §2)."""
RESERVED_REASON: Final = (
    f"event_id: ids starting with {RESERVED_PREFIX!r} are reserved for lcic-guard"
)


class InvalidEvent(ValueError):
    """A billing event that cannot be applied; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


MAX_AHEAD_MS: Final = 5 * 60_000
"""How far ahead of the recording clock a fact's ``occurred_at`` may be
(SPEC §2): clock skew between the billing system and the reconciler, not
more. A fact from further ahead would be folded as if it had already
happened once its date comes, and would outrank (by ``occurred_at``) every
fact made in the meantime, a support override included."""


def future_problem(occurred_at: Millis, now: Millis) -> str | None:
    """Why a fact dated ``occurred_at`` cannot be recorded at ``now`` (the
    reconciler's clock), or None when it can."""
    if occurred_at - now <= MAX_AHEAD_MS:
        return None
    return (
        f"occurred_at: {format_time(occurred_at)} is more than 5 minutes ahead of the "
        f"reconciler's clock ({format_time(now)}); a fact from the future is not recorded"
    )


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class _Base:
    type: ClassVar[str]
    internal: ClassVar[bool] = False
    event_id: str
    occurred_at: Millis


@dataclass(frozen=True, slots=True)
class ApplicationRegistered(_Base):
    """The app exists and belongs to the account."""

    type: ClassVar[str] = "application_registered"
    account_id: str
    app_id: str


@dataclass(frozen=True, slots=True)
class OverdueAlert(_Base):
    """The account has overdue payments and was alerted (R1)."""

    type: ClassVar[str] = "overdue_alert"
    account_id: str
    amount_due: str | None = None


@dataclass(frozen=True, slots=True)
class ArrearsSettled(_Base):
    """Everything overdue up to ``occurred_at`` is paid (R3)."""

    type: ClassVar[str] = "arrears_settled"
    account_id: str


@dataclass(frozen=True, slots=True)
class PackagePurchased(_Base):
    """A monthly package for the app, in force in [starts_at, expires_at)."""

    type: ClassVar[str] = "package_purchased"
    app_id: str
    package_id: str
    starts_at: Millis
    expires_at: Millis
    quota_minutes: int


@dataclass(frozen=True, slots=True)
class PackageUsage(_Base):
    """Cumulative usage of a package's complimentary quota (absolute)."""

    type: ClassVar[str] = "package_usage"
    app_id: str
    package_id: str
    used_minutes: int


@dataclass(frozen=True, slots=True)
class PaygChanged(_Base):
    """Pay-as-you-go switched on or off for the app (R7)."""

    type: ClassVar[str] = "payg_changed"
    app_id: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class ComplianceBan(_Base):
    """The account is banned for good (R11)."""

    type: ClassVar[str] = "compliance_ban"
    account_id: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class GraceExtended(_Base):
    """Support extends the grace of the account's overdue episode open at
    ``occurred_at``: no overdue suspension before ``until`` (bounded by the
    policy's ``max_grace_extension_ms`` past A + grace; no effect with no
    open episode). Recorded with who did it and why."""

    type: ClassVar[str] = "grace_extended"
    account_id: str
    until: Millis
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseHoldSet(_Base):
    """Support holds the account's release (R10): a dispute, a legal hold."""

    type: ClassVar[str] = "release_hold_set"
    account_id: str
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseHoldCleared(_Base):
    """Support lifts the release hold; the release waits the notice period
    from when the clear is recorded."""

    type: ClassVar[str] = "release_hold_cleared"
    account_id: str
    actor: str
    reason: str


Override = GraceExtended | ReleaseHoldSet | ReleaseHoldCleared
OVERRIDES: Final = (GraceExtended, ReleaseHoldSet, ReleaseHoldCleared)


@dataclass(frozen=True, slots=True)
class ResourcesReleased(_Base):
    """The reconciler released the account's resources (R10).

    Internal: only the reconciler records it, after its release checks; the
    billing feed cannot carry it.
    """

    type: ClassVar[str] = "resources_released"
    internal: ClassVar[bool] = True
    account_id: str
    release_at: Millis | None = None
    """The ``release_at`` R10 set, which the released status keeps showing
    (None on releases recorded before it was kept)."""


Fact = (
    ApplicationRegistered
    | OverdueAlert
    | ArrearsSettled
    | PackagePurchased
    | PackageUsage
    | PaygChanged
    | ComplianceBan
    | GraceExtended
    | ReleaseHoldSet
    | ReleaseHoldCleared
    | ResourcesReleased
)

FACT_TYPES: Final[dict[str, type[Fact]]] = {
    cls.type: cls
    for cls in (
        ApplicationRegistered,
        OverdueAlert,
        ArrearsSettled,
        PackagePurchased,
        PackageUsage,
        PaygChanged,
        ComplianceBan,
        GraceExtended,
        ReleaseHoldSet,
        ReleaseHoldCleared,
        ResourcesReleased,
    )
}

_TIME_FIELDS: Final = frozenset({"occurred_at", "starts_at", "expires_at", "release_at", "until"})
_ID_FIELDS: Final = frozenset({"event_id", "account_id", "app_id", "package_id"})
_MAX_EVENT_ID: Final = 200
_MAX_NOTE: Final = 2000
MAX_ACTOR: Final = 200
MAX_OVERRIDE_REASON: Final = 2000


def text_problem(value: object, limit: int) -> str | None:
    """Why ``value`` is not a one-line text of 1-``limit`` characters (an
    override's actor or reason), or None when it is."""
    if not isinstance(value, str):
        return "expected a string"
    if not value.strip():
        return "must not be empty"
    if len(value) > limit:
        return f"at most {limit} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must not contain control characters"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "not valid Unicode"
    return None


def _event_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_EVENT_ID:
        raise InvalidEvent(f"event_id: expected a string of 1-{_MAX_EVENT_ID} characters")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        raise InvalidEvent("event_id: not valid Unicode") from None
    return value


def _an_id(name: str, value: Any) -> str:
    if not valid_id(value):
        raise InvalidEvent(f"{name}: expected 1-64 characters from [A-Za-z0-9._:-]")
    return str(value)


def _a_time(name: str, value: Any) -> Millis:
    try:
        return parse_time(value, name)
    except InvalidTime as exc:
        raise InvalidEvent(exc.reason) from None


def _minutes(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise InvalidEvent(f"{name}: expected a non-negative integer")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidEvent(f"{name}: expected true or false")
    return value


def _amount(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(f"{name}: expected a decimal string")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise InvalidEvent(f"{name}: not a decimal number") from None
    if not amount.is_finite():
        raise InvalidEvent(f"{name}: not a finite decimal number")
    return value


def _note(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(f"{name}: expected a string")
    return value[:_MAX_NOTE]


def _text(name: str, value: Any) -> str:
    problem = text_problem(value, MAX_ACTOR if name == "actor" else MAX_OVERRIDE_REASON)
    if problem is not None:
        raise InvalidEvent(f"{name}: {problem}")
    return str(value)


# How each field of an event is checked, by name (ids and times by their sets).
_FIELD_CHECKS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "event_id": _event_id,
    **dict.fromkeys(_ID_FIELDS - {"event_id"}, _an_id),
    **dict.fromkeys(_TIME_FIELDS, _a_time),
    "quota_minutes": _minutes,
    "used_minutes": _minutes,
    "enabled": _flag,
    "amount_due": _amount,
    "note": _note,
    "actor": _text,
    "reason": _text,
}
# Optional fields and what an absent one reads as.
_ABSENT: Final[dict[str, Any]] = {"amount_due": None, "note": "", "release_at": None}


def _field_value(cls: type[Fact], name: str, raw: dict[str, Any]) -> Any:
    if name not in raw or raw[name] is None:
        if name in _ABSENT:
            return _ABSENT[name]
        raise InvalidEvent(f"{name}: missing")
    check = _FIELD_CHECKS.get(name)
    if check is None:  # pragma: no cover
        raise AssertionError(f"unhandled field {cls.__name__}.{name}")
    return check(name, raw[name])


def parse_event(raw: object, *, allow_internal: bool = False, now: Millis | None = None) -> Fact:
    """Validate one decoded event object and return its fact.

    ``now`` is the clock of whoever is about to record or publish it: a fact
    dated more than :data:`MAX_AHEAD_MS` after it is refused, whatever its
    type. None only for facts read back from the store (checked when first
    recorded).

    Raises :class:`InvalidEvent` naming the first field that is wrong.
    Unknown extra fields are ignored, so the billing system may add fields.
    """
    if not isinstance(raw, dict):
        raise InvalidEvent("event: expected a JSON object")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise InvalidEvent("type: missing")
    cls = FACT_TYPES.get(kind)
    if cls is None or (cls.internal and not allow_internal):
        raise InvalidEvent(f"type: unknown event type {kind[:40]!r}")
    event_id = raw.get("event_id")
    if not allow_internal and isinstance(event_id, str) and event_id.startswith(RESERVED_PREFIX):
        # The reconciler's own facts (a release) must not be forgeable: a
        # billing event holding such an id would pre-empt the real one.
        raise InvalidEvent(RESERVED_REASON)
    values = {f.name: _field_value(cls, f.name, raw) for f in fields(cls)}
    # Only on the way in: a fact stored before this rule must still load (a
    # release hold must not vanish for the characters of its reason).
    unshowable = None if allow_internal else unshowable_field(values)
    if unshowable is not None:
        raise InvalidEvent(unshowable)
    fact = cls(**values)
    if isinstance(fact, PackagePurchased) and fact.expires_at <= fact.starts_at:
        raise InvalidEvent("expires_at: must be after starts_at")
    if isinstance(fact, GraceExtended) and fact.until <= fact.occurred_at:
        raise InvalidEvent("until: must be after occurred_at")
    if now is not None and (problem := future_problem(fact.occurred_at, now)) is not None:
        raise InvalidEvent(problem)
    return fact


def parse_event_json(
    text: str | bytes, *, allow_internal: bool = False, now: Millis | None = None
) -> Fact:
    """Decode and validate one event from its JSON text (``now``: see
    :func:`parse_event`)."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: nesting too deep to decode; it must be dead-lettered
        # like any other bad event, not escape as a crash of the batch.
        raise InvalidEvent(f"event: not valid JSON ({exc.__class__.__name__})") from None
    return parse_event(raw, allow_internal=allow_internal, now=now)


def to_record(fact: Fact) -> dict[str, Any]:
    """The event as a JSON-ready object, in the billing system's own form."""
    out: dict[str, Any] = {"type": fact.type}
    for key, value in asdict(fact).items():
        if value is None:
            continue
        out[key] = format_time(value) if key in _TIME_FIELDS else value
    return out


def to_json(fact: Fact) -> str:
    """Canonical JSON text of a fact (sorted keys, no spaces)."""
    return json.dumps(to_record(fact), sort_keys=True, separators=(",", ":"))


def account_of(fact: Fact) -> str | None:
    """The account a fact names directly (app facts name only their app)."""
    return getattr(fact, "account_id", None)


def app_of(fact: Fact) -> str | None:
    """The application a fact names directly, if any."""
    return getattr(fact, "app_id", None)
