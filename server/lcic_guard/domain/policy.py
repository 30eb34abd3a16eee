"""The billing policy (SPEC §4, rules R1-R15) as pure functions.

Two steps, no I/O, nothing from gRPC or Redis:

* :func:`compute_account` folds an account's billing facts into one status
  per application. A status is a *timeline*: the segment in force now and
  every change already known to lie ahead (grace ending, a package expiring
  or starting). Deadlines are therefore part of the record, and a check
  compares them with its own clock (R2, R8): the flip happens on time even if
  no process runs at that moment.
* :func:`decide` answers one check from a status, the check's request and
  the time; :func:`decide_without_store` does so when the store cannot be
  read (R13).

The fold depends only on the *set* of facts, never on their arrival order:
facts are swept in time order with a fixed tie-break.

Each rule is implemented once, in the function named after it below;
R6's classroom reports and the bound of a protection are in
:mod:`lcic_guard.domain.rooms`. ``docs/policy.md`` maps every rule to its
functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from lcic_guard.domain.facts import (
    ApplicationRegistered,
    ArrearsSettled,
    ComplianceBan,
    Fact,
    GraceExtended,
    OverdueAlert,
    PackagePurchased,
    PackageUsage,
    PaygChanged,
    ReleaseHoldCleared,
    ReleaseHoldSet,
    ResourcesReleased,
)
from lcic_guard.domain.rooms import Room as Room
from lcic_guard.domain.rooms import live_room, protection_ends_at
from lcic_guard.domain.rooms import protected_until as protected_until
from lcic_guard.domain.time import Millis, describe_time, format_time

SECOND: Final = 1000
MINUTE: Final = 60 * SECOND
HOUR: Final = 60 * MINUTE
DAY: Final = 24 * HOUR
DURATION_UNITS: Final = {"ms": 1, "s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY}


def format_duration(ms: int, unit: str | None = None) -> str:
    """``ms`` as a flag takes it: in ``unit`` if given (the way the product
    states it, e.g. a grace of ``24h``), else in the largest unit that holds
    it exactly; ``0`` for off."""
    if not ms:
        return "0"
    if unit is not None:
        if ms % DURATION_UNITS[unit]:
            raise ValueError(f"{ms} ms is not a whole number of {unit}")
        return f"{ms // DURATION_UNITS[unit]}{unit}"
    for name in ("d", "h", "m", "s"):
        if ms % DURATION_UNITS[name] == 0:
            return f"{ms // DURATION_UNITS[name]}{name}"
    return f"{ms}ms"


FUTURE_SKEW_MS: Final = DAY
"""History kept before the newest fact (or before ``now``, when given), so a
fact dated a little ahead of a reader's clock cannot hide the present."""


class State(StrEnum):
    ACTIVE = "ACTIVE"
    GRACE = "GRACE"
    SUSPENDED = "SUSPENDED"
    RELEASED = "RELEASED"
    BANNED = "BANNED"


class Reason(StrEnum):
    OK = "OK"
    OVERDUE_GRACE = "OVERDUE_GRACE"
    ACCOUNT_OVERDUE = "ACCOUNT_OVERDUE"
    PACKAGE_QUOTA_EXHAUSTED = "PACKAGE_QUOTA_EXHAUSTED"
    PACKAGE_EXPIRED = "PACKAGE_EXPIRED"
    RESOURCES_RELEASED = "RESOURCES_RELEASED"
    ACCOUNT_BANNED = "ACCOUNT_BANNED"
    IN_PROGRESS_PROTECTED = "IN_PROGRESS_PROTECTED"
    UNKNOWN_APPLICATION = "UNKNOWN_APPLICATION"
    STATUS_UNAVAILABLE = "STATUS_UNAVAILABLE"


class Check(StrEnum):
    CREATE_CLASSROOM = "create"
    ENTER_CLASSROOM = "enter"
    ACCESS_RECORDING = "recording"


# R9: the order in which suspension reasons are listed and the first shown.
SUSPENSION_PRECEDENCE: Final[tuple[Reason, ...]] = (
    Reason.ACCOUNT_BANNED,
    Reason.RESOURCES_RELEASED,
    Reason.ACCOUNT_OVERDUE,
    Reason.PACKAGE_EXPIRED,
    Reason.PACKAGE_QUOTA_EXHAUSTED,
)
# R6: the suspensions a class in progress is protected against.
BILLING_SUSPENSIONS: Final = frozenset(
    {Reason.ACCOUNT_OVERDUE, Reason.PACKAGE_EXPIRED, Reason.PACKAGE_QUOTA_EXHAUSTED}
)
_STATE_OF_FIRST_REASON: Final = {
    Reason.ACCOUNT_BANNED: State.BANNED,
    Reason.RESOURCES_RELEASED: State.RELEASED,
    Reason.ACCOUNT_OVERDUE: State.SUSPENDED,
    Reason.PACKAGE_EXPIRED: State.SUSPENDED,
    Reason.PACKAGE_QUOTA_EXHAUSTED: State.SUSPENDED,
    Reason.OVERDUE_GRACE: State.GRACE,
}


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The policy's durations and failure modes (SPEC §4, last paragraph)."""

    grace_ms: int = 24 * HOUR
    """R1: how long an alerted account keeps service."""
    release_after_ms: int = 60 * DAY
    """R10: how long an overdue suspension lasts before resources are released."""
    release_notice_ms: int = 7 * DAY
    """R10: the least time between the overdue suspension becoming known and
    the release (a backfilled history releases nothing before this); also
    the least time between a release hold being cleared and the release."""
    max_grace_extension_ms: int = 30 * DAY
    """How far past A + grace a ``grace_extended`` override may move the
    grace end (a later ``until`` is cut to this)."""
    overrun_ms: int = 60 * MINUTE
    """R6: protection past a class's scheduled end."""
    max_class_ms: int = 12 * HOUR
    """R6: protection of a class with no scheduled end, from its start, and
    the longest any protection lasts from a class's start."""
    protect_when_banned: bool = False
    """R6: whether classes in progress survive a compliance ban."""
    stale_bound_ms: int = 5 * MINUTE
    """R13: how old a last-seen status may be and still be used."""
    fail_open: frozenset[Check] = frozenset(Check)
    """R13: the checks allowed when no usable status exists; the rest deny."""

    def __post_init__(self) -> None:
        for name in (
            "grace_ms",
            "release_after_ms",
            "release_notice_ms",
            "overrun_ms",
            "max_class_ms",
            "max_grace_extension_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.stale_bound_ms < 0:
            raise ValueError("stale_bound_ms must not be negative")


@dataclass(frozen=True, slots=True)
class Segment:
    """The status of an application from ``starts_at`` until the next segment."""

    starts_at: Millis
    reasons: tuple[Reason, ...] = ()
    grace_ends_at: Millis | None = None
    suspended_at: Millis | None = None
    release_at: Millis | None = None
    effective_at: Millis | None = None
    """R6: when the current suspension took effect on the clock the callers
    saw (see :func:`r6_effective_at`); set whenever ``suspended_at`` is, and
    never earlier."""

    @property
    def state(self) -> State:
        if not self.reasons:
            return State.ACTIVE
        return _STATE_OF_FIRST_REASON[self.reasons[0]]

    @property
    def suspended(self) -> bool:
        return self.state not in (State.ACTIVE, State.GRACE)

    def same_status(self, other: Segment) -> bool:
        return (
            self.reasons == other.reasons
            and self.grace_ends_at == other.grace_ends_at
            and self.suspended_at == other.suspended_at
            and self.release_at == other.release_at
            and self.effective_at == other.effective_at
        )


@dataclass(frozen=True, slots=True)
class AppStatus:
    """One application's status record: its timeline and bookkeeping."""

    app_id: str
    account_id: str
    segments: tuple[Segment, ...]
    version: int = 0
    updated_at: Millis = 0

    def at(self, now: Millis) -> Segment:
        """The segment in force at ``now`` (the first one for earlier times)."""
        segments = self.segments
        for seg in reversed(segments):
            if seg.starts_at <= now:
                return seg
        return segments[0]

    def upcoming(self, now: Millis) -> tuple[Segment, ...]:
        """The changes known to lie ahead of ``now``."""
        return tuple(seg for seg in self.segments if seg.starts_at > now)


# ---------------------------------------------------------------------------
# Facts -> status


@dataclass(slots=True)
class Sweep:
    """The state of one account and one app at an instant of the sweep, with
    the facts that made it (which :mod:`lcic_guard.domain.evidence` cites).

    ``recorded`` holds when each fact was first stored (by event id); a fact
    without one counts as recorded when it occurred (facts stored before the
    second clock existed)."""

    cfg: PolicyConfig
    recorded: Mapping[str, Millis] = field(default_factory=dict)
    last_settled: Millis | None = None
    overdue_alert: OverdueAlert | None = None  # the alert at A of R1
    ban: ComplianceBan | None = None
    released: ResourcesReleased | None = None
    registered: ApplicationRegistered | None = None
    payg_change: PaygChanged | None = None
    packages: dict[str, PackagePurchased] = field(default_factory=dict)
    used: dict[str, PackageUsage] = field(default_factory=dict)  # newest report per package
    usage_reports: dict[str, list[PackageUsage]] = field(default_factory=dict)
    purchases_known_at: Millis | None = None  # the latest-recorded purchase so far
    extension: GraceExtended | None = None  # the override that gives the open episode most time
    extended_until: Millis | None = None  # its ``until``, within the policy's bound
    hold: ReleaseHoldSet | ReleaseHoldCleared | None = None  # the latest release-hold override
    hold_cleared_known: Millis | None = None  # the latest recording of a hold's clearing

    @property
    def overdue_since(self) -> Millis | None:
        return self.overdue_alert.occurred_at if self.overdue_alert is not None else None

    @property
    def grace_end(self) -> Millis | None:
        """R1: when the open episode's grace ends: A + grace, or later when
        support extended it."""
        if self.overdue_alert is None:
            return None
        end = self.overdue_alert.occurred_at + self.cfg.grace_ms
        if self.extended_until is not None and self.extended_until > end:
            return self.extended_until
        return end

    @property
    def release_held(self) -> bool:
        return isinstance(self.hold, ReleaseHoldSet)

    @property
    def payg(self) -> bool:
        return self.payg_change is not None and self.payg_change.enabled

    def recorded_at(self, fact: Fact) -> Millis:
        """When the fact became known (its occurred_at if that is unknown)."""
        return self.recorded.get(fact.event_id, fact.occurred_at)

    def apply(self, fact: Fact) -> None:
        if isinstance(fact, ArrearsSettled):
            self.r3_settlement(fact.occurred_at)
        elif isinstance(fact, OverdueAlert):
            self.r1_alert(fact)
        elif isinstance(fact, ComplianceBan):
            self.ban = self.ban or fact
        elif isinstance(fact, ResourcesReleased):
            self.released = self.released or fact
        elif isinstance(fact, ApplicationRegistered):
            self.registered = self.registered or fact
        elif isinstance(fact, PackagePurchased):
            self.packages[fact.package_id] = fact
            known = self.recorded_at(fact)
            if self.purchases_known_at is None or known > self.purchases_known_at:
                self.purchases_known_at = known
        elif isinstance(fact, PackageUsage):
            self.usage_reports.setdefault(fact.package_id, []).append(fact)
            seen = self.used.get(fact.package_id)
            if seen is None or (fact.occurred_at, fact.used_minutes) > (
                seen.occurred_at,
                seen.used_minutes,
            ):
                self.used[fact.package_id] = fact
        elif isinstance(fact, PaygChanged):
            self.payg_change = fact
        elif isinstance(fact, GraceExtended):
            self.grace_extension(fact)
        elif isinstance(fact, ReleaseHoldSet | ReleaseHoldCleared):
            self.hold = fact
            if isinstance(fact, ReleaseHoldCleared):
                known = self.recorded_at(fact)
                if self.hold_cleared_known is None or known > self.hold_cleared_known:
                    self.hold_cleared_known = known

    def grace_extension(self, ext: GraceExtended) -> None:
        """An extension applies to the overdue episode open when it was made,
        never past A + grace + the bound; with no open episode (before the
        first alert, after a settlement) it has no effect. Extensions only
        lengthen: the one giving the most time counts."""
        alert = self.overdue_alert
        if alert is None:
            return
        until = min(ext.until, extension_limit(alert.occurred_at, self.cfg))
        if self.extended_until is None or until > self.extended_until:
            self.extension, self.extended_until = ext, until

    def r1_alert(self, alert: OverdueAlert) -> None:
        """R1: grace starts at the earliest alert after the last settlement;
        further alerts do not move it."""
        at = alert.occurred_at
        if self.overdue_alert is None and (self.last_settled is None or at > self.last_settled):
            self.overdue_alert = alert
            self.extension = self.extended_until = None  # a new episode

    def r3_settlement(self, at: Millis) -> None:
        """R3: a settlement pays everything overdue up to its own time."""
        self.last_settled = at if self.last_settled is None else max(self.last_settled, at)
        if self.overdue_alert is not None and self.overdue_alert.occurred_at <= at:
            self.overdue_alert = None
            self.extension = self.extended_until = None  # ends like any grace

    def package_in_force(self, t: Millis) -> PackagePurchased | None:
        """R8: the package in force at t; with overlaps, the newest one."""
        best: PackagePurchased | None = None
        for pkg in self.packages.values():
            if pkg.starts_at <= t < pkg.expires_at and (
                best is None
                or (pkg.starts_at, pkg.occurred_at, pkg.package_id)
                > (best.starts_at, best.occurred_at, best.package_id)
            ):
                best = pkg
        return best

    def used_minutes(self, pkg: PackagePurchased) -> int:
        """R7: the newest usage report of the package; no report means 0 used."""
        report = self.used.get(pkg.package_id)
        return 0 if report is None else report.used_minutes

    def r7_quota_exhausted(self, pkg: PackagePurchased) -> bool:
        """R7: the package's complimentary quota is used up and pay-as-you-go is
        off. With no usage report nothing is used, so a 0-minute package is
        exhausted from its start."""
        return not self.payg and self.used_minutes(pkg) >= pkg.quota_minutes

    def r10_known_at(self) -> Millis | None:
        """R10: when the overdue suspension became known: the recording of the
        alert at A, or the grace end (A + grace, or later when extended) if
        that is later (None: not overdue)."""
        alert, end = self.overdue_alert, self.grace_end
        if alert is None or end is None:
            return None
        return max(self.recorded_at(alert), end)

    def r10_release_at(self) -> Millis | None:
        """R10: A + grace + release_after, but never sooner than the notice
        period after the suspension became known (a backfilled alert read
        today releases nothing for ``release_notice_ms``). A grace extension
        moves it by the time it adds; while a release hold is set there is
        none, and once cleared it is never sooner than the notice period
        after the clear was recorded."""
        known, end = self.r10_known_at(), self.grace_end
        if known is None or end is None or self.release_held:
            return None
        cfg = self.cfg
        due = max(end + cfg.release_after_ms, known + cfg.release_notice_ms)
        if self.hold_cleared_known is not None:
            due = max(due, self.hold_cleared_known + cfg.release_notice_ms)
        return due

    def known_at(self, reason: Reason, t: Millis) -> Millis:
        """R6: when ``reason``, holding at ``t``, became known: the latest
        recording among the facts that make it hold."""
        facts: list[Fact | None] = []
        extra: list[Millis] = []
        if reason is Reason.ACCOUNT_BANNED:
            facts.append(self.ban)
        elif reason is Reason.RESOURCES_RELEASED:
            facts.append(self.released)
        elif reason is Reason.ACCOUNT_OVERDUE:
            facts.append(self.overdue_alert)
        elif reason is Reason.PACKAGE_EXPIRED:
            facts.append(self.registered)
            if self.purchases_known_at is not None:
                extra.append(self.purchases_known_at)
        elif reason is Reason.PACKAGE_QUOTA_EXHAUSTED:
            pkg = self.package_in_force(t)
            facts.append(pkg)
            if pkg is not None:
                facts.append(self.used.get(pkg.package_id))
            facts.append(self.payg_change)
        times = [self.recorded_at(f) for f in facts if f is not None] + extra
        return max(times, default=t)

    def evaluate(self, t: Millis, previous: Segment | None) -> tuple[Segment, Millis | None]:
        """The segment starting at ``t`` (without ``effective_at``) and, when
        it is a suspension, the earliest time any of its reasons was known."""
        holding: set[Reason] = set()
        in_grace = False
        grace_ends_at = release_at = None
        if self.ban is not None:  # R11
            holding.add(Reason.ACCOUNT_BANNED)
        if self.overdue_since is not None:
            grace_ends_at = self.grace_end
            assert grace_ends_at is not None
            if t >= grace_ends_at:  # R2
                holding.add(Reason.ACCOUNT_OVERDUE)
                release_at = self.r10_release_at()
            else:  # R1
                in_grace = True
        if self.released is not None:  # R10: the time R10 set, kept by the release
            holding.add(Reason.RESOURCES_RELEASED)
            release_at = self.released.release_at
            if release_at is None:  # released before R10's time was kept on the fact
                release_at = self.released.occurred_at
        pkg = self.package_in_force(t)
        if pkg is None:  # R8
            holding.add(Reason.PACKAGE_EXPIRED)
        elif self.r7_quota_exhausted(pkg):
            holding.add(Reason.PACKAGE_QUOTA_EXHAUSTED)
        reasons = r9_order(holding)
        if in_grace:
            reasons += (Reason.OVERDUE_GRACE,)
        seg = Segment(t, reasons, grace_ends_at, None, release_at)
        if not seg.suspended:
            return seg, None
        # R9: the start of the current unbroken suspension.
        keep = previous is not None and previous.suspended
        seg = replace(seg, suspended_at=previous.suspended_at if keep and previous else t)
        known = min(self.known_at(r, t) for r in holding)
        return seg, known


def r9_order(holding: Iterable[Reason]) -> tuple[Reason, ...]:
    """R9: every suspension reason that holds, in order of precedence."""
    held = set(holding)
    return tuple(r for r in SUSPENSION_PRECEDENCE if r in held)


def r6_effective_at(
    suspended_at: Millis,
    effective_so_far: Millis | None,
    starts_at: Millis,
    ends_at: Millis | None,
    known: Millis,
) -> Millis:
    """R6: when the current unbroken suspension took effect on the clock the
    callers saw, after one more stretch ``[starts_at, ends_at)`` of it whose
    reasons were first known at ``known``.

    A suspension takes effect at the later of ``suspended_at`` and the latest
    instant in it at which none of the reasons holding at that instant was
    known yet. Before that instant every answer given allowed the class (the
    facts recorded by then did not imply a suspension); a fact learned later
    (a backdated alert, a late usage report) cannot turn a class that started
    then into one that started during the suspension. Within one stretch that
    instant is ``min(ends_at, known)`` when it lies after ``starts_at``.

    Why this never cuts off a class that started while the answers allowed
    it: if some reason r holding at a start time s had all its causes
    recorded by s, the facts recorded by s already implied r at s (facts are
    only ever added, and an added fact can remove r only by being one of r's
    causes or a remover that is itself present in the full set), so the
    start was denied. Otherwise every reason was unknown at s, so this
    instant is later than s and the class is protected. A class started in a
    stretch whose reasons were all already known gains nothing: stretches
    before it end by its start.
    """
    effective = suspended_at if effective_so_far is None else effective_so_far
    instant = known if ends_at is None else min(ends_at, known)
    return max(effective, instant) if instant > starts_at else effective


# Within one millisecond: settlements before alerts (R3 pays what is due "up
# to" its time), then everything else; event ids break remaining ties.
_RANK: Final[dict[type, int]] = {ArrearsSettled: 0, OverdueAlert: 1}


def extension_limit(overdue_since: Millis, cfg: PolicyConfig) -> Millis:
    """The latest grace end a ``grace_extended`` override can set for the
    overdue episode that began at ``overdue_since`` (A + grace + the bound)."""
    return overdue_since + cfg.grace_ms + cfg.max_grace_extension_ms


def _order(fact: Fact) -> tuple[Millis, int, str]:
    return (fact.occurred_at, _RANK.get(type(fact), 2), fact.event_id)


fact_order: Final = _order
"""The order in which the policy sweeps facts (time, settlements first, id)."""


def sweep_until(
    facts: Iterable[Fact],
    app_id: str,
    now: Millis,
    cfg: PolicyConfig,
    recorded_at: Mapping[str, Millis] | None = None,
) -> Sweep:
    """What the facts that occurred up to ``now`` say about one app and its
    account: the fold of :func:`compute_account`, stopped at one instant."""
    sweep = Sweep(cfg, recorded_at or {})
    for fact in sorted({f.event_id: f for f in facts}.values(), key=_order):
        if fact.occurred_at > now:
            break
        if getattr(fact, "app_id", app_id) == app_id:
            sweep.apply(fact)
    return sweep


def _timeline(
    facts: Sequence[Fact],
    cfg: PolicyConfig,
    now: Millis | None,
    recorded_at: Mapping[str, Millis],
    registered_at: Millis,
) -> tuple[Segment, ...]:
    ordered = sorted(facts, key=_order)
    points: set[Millis] = {f.occurred_at for f in ordered}
    for f in ordered:
        if isinstance(f, OverdueAlert):
            points.add(f.occurred_at + cfg.grace_ms)
            points.add(f.occurred_at + cfg.grace_ms + cfg.max_grace_extension_ms)
        elif isinstance(f, GraceExtended):
            points.add(f.until)
        elif isinstance(f, PackagePurchased):
            points.update((f.starts_at, f.expires_at))
    # The app's status begins with its registration: nothing about it, a
    # suspension least of all, can have started before it existed.
    instants = sorted(p for p in points if p >= registered_at)
    sweep = Sweep(cfg, recorded_at)
    evaluated: list[tuple[Segment, Millis | None]] = []
    i = 0
    for t in instants:
        while i < len(ordered) and ordered[i].occurred_at <= t:
            sweep.apply(ordered[i])
            i += 1
        evaluated.append(sweep.evaluate(t, evaluated[-1][0] if evaluated else None))
    # History before the newest fact cannot be in force again, except that
    # a fact dated ahead of the reader's clock (skew) must not hide the
    # present: keep FUTURE_SKEW_MS of history before the newest fact, or
    # before now if that is earlier.
    newest = ordered[-1].occurred_at
    keep_after = (newest if now is None else min(newest, now)) - FUTURE_SKEW_MS
    keep_from = 0
    segments: list[Segment] = []
    effective: Millis | None = None
    for n, (seg, known) in enumerate(evaluated):
        if seg.suspended_at is not None and known is not None:
            if seg.suspended_at == seg.starts_at:
                effective = None  # a new suspension
            ends_at = evaluated[n + 1][0].starts_at if n + 1 < len(evaluated) else None
            effective = r6_effective_at(seg.suspended_at, effective, seg.starts_at, ends_at, known)
            seg = replace(seg, effective_at=effective)
        if not segments or not seg.same_status(segments[-1]):
            segments.append(seg)
        if seg.starts_at <= keep_after:
            keep_from = len(segments) - 1
    return tuple(segments[keep_from:])


def compute_account(
    facts: Iterable[Fact],
    cfg: PolicyConfig,
    *,
    now: Millis | None = None,
    recorded_at: Mapping[str, Millis] | None = None,
) -> dict[str, AppStatus]:
    """Fold one account's facts into the status of each of its applications.

    ``facts`` are the account's facts and the facts of its applications, each
    event id once. Applications are those registered to the account; facts
    of other applications are ignored. ``now`` (the reader's clock) only
    bounds how much history is dropped: a fact dated ahead of it must not
    hide the segment in force now. ``recorded_at`` says when each fact (by
    event id) was first stored; only R6 and R10 read it, and a fact missing
    from it counts as recorded when it occurred.
    """
    unique = {f.event_id: f for f in facts}
    account_id: str | None = None
    registered: dict[str, Millis] = {}
    shared: list[Fact] = []
    per_app: dict[str, list[Fact]] = {}
    for f in unique.values():
        if isinstance(f, ApplicationRegistered):
            account_id = f.account_id
            registered[f.app_id] = min(registered.get(f.app_id, f.occurred_at), f.occurred_at)
            per_app.setdefault(f.app_id, []).append(f)
        elif isinstance(f, PackagePurchased | PackageUsage | PaygChanged):
            per_app.setdefault(f.app_id, []).append(f)
        else:
            shared.append(f)
    if account_id is None:
        return {}
    recorded = recorded_at or {}
    return {
        app_id: AppStatus(
            app_id,
            account_id,
            _timeline(shared + per_app[app_id], cfg, now, recorded, registered[app_id]),
        )
        for app_id in sorted(registered)
    }


def overdue_notice(
    facts: Iterable[Fact],
    cfg: PolicyConfig,
    now: Millis,
    recorded_at: Mapping[str, Millis] | None = None,
) -> tuple[OverdueAlert, Millis, Millis] | None:
    """R10: the account's overdue episode at ``now``, if it leads to a
    release: the alert at A, when the suspension became (or becomes) known,
    and ``release_at``. None when the account is not overdue, its
    resources are already released, or a release hold is set."""
    sweep = _r10_sweep(facts, cfg, now, recorded_at)
    known, release_at = sweep.r10_known_at(), sweep.r10_release_at()
    if sweep.released is not None or sweep.overdue_alert is None or release_at is None:
        return None  # not overdue, released, or the release is held
    assert known is not None
    return sweep.overdue_alert, known, release_at


def open_overdue_alert(
    facts: Iterable[Fact],
    cfg: PolicyConfig,
    now: Millis,
    recorded_at: Mapping[str, Millis] | None = None,
) -> OverdueAlert | None:
    """R10: the alert at A of the account's overdue episode open at ``now``,
    held, released or not: the only episode whose notices a release can
    still read or a planner make (:func:`overdue_notice` finds no other)."""
    return _r10_sweep(facts, cfg, now, recorded_at).overdue_alert


def _r10_sweep(
    facts: Iterable[Fact],
    cfg: PolicyConfig,
    now: Millis,
    recorded_at: Mapping[str, Millis] | None,
) -> Sweep:
    sweep = Sweep(cfg, recorded_at or {})
    for fact in sorted({f.event_id: f for f in facts}.values(), key=_order):
        if fact.occurred_at > now:
            break
        if isinstance(
            fact,
            ArrearsSettled
            | OverdueAlert
            | ResourcesReleased
            | GraceExtended
            | ReleaseHoldSet
            | ReleaseHoldCleared,
        ):
            sweep.apply(fact)
    return sweep


def notice_episode(
    alert: OverdueAlert,
    release_at: Millis,
    cfg: PolicyConfig,
    recorded_at: Mapping[str, Millis] | None = None,
) -> str:
    """R10: what the release notices of an overdue episode are counted by:
    the alert at A while ``release_at`` is the one R10 gives it, so that the
    customer hears each notice once; once an override moves it (a grace
    extension, a cleared hold), the alert and the new time, so that the
    customer hears of the new date."""
    sweep = Sweep(cfg, recorded_at or {})
    sweep.apply(alert)
    if sweep.r10_release_at() == release_at:
        return alert.event_id
    return f"{alert.event_id}@{release_at}"


# ---------------------------------------------------------------------------
# Status + request + now -> decision


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check."""

    allowed: bool
    reason: Reason
    reasons: tuple[Reason, ...]
    message: str
    state: State | None = None
    grace_ends_at: Millis | None = None
    suspended_at: Millis | None = None
    release_at: Millis | None = None
    protected_until: Millis | None = None
    status_version: int = 0
    degraded: bool = False
    valid_until: Millis | None = None
    """The first instant after the decision's time at which the same check,
    on the same status and room, is answered differently (see
    :func:`valid_until`); None when no change is known ahead."""


def r6_protection(seg: Segment, room: Room | None, now: Millis, cfg: PolicyConfig) -> Millis | None:
    """R6: the end of the protection of ``room`` against the suspension in
    ``seg`` if it is protected now, else None.

    Protected: reported started before the suspension took effect
    (``effective_at``: the later of ``suspended_at`` and when the facts that
    make it hold were learned, see :func:`r6_effective_at`), not reported
    ended, before ``protected_until``, and every reason a billing suspension
    (a ban only when so configured; never a release).
    """
    if room is None or seg.suspended_at is None:
        return None
    allowed_reasons = BILLING_SUSPENSIONS | (
        {Reason.ACCOUNT_BANNED} if cfg.protect_when_banned else set()
    )
    if not set(seg.reasons) - {Reason.OVERDUE_GRACE} <= allowed_reasons:
        return None
    took_effect = seg.suspended_at if seg.effective_at is None else seg.effective_at
    room = live_room(room, now)
    if room is None or room.started_at >= took_effect:
        return None
    until = protected_until(room, cfg)
    return until if now < until else None


def r6_may_protect(status: AppStatus, now: Millis, cfg: PolicyConfig) -> bool:
    """R6: whether some class, had it been reported started, would be let in
    at ``now`` although the status denies, so that a room report not read
    yet decides the answer (and an unread one must not be denied)."""
    seg = status.at(now)
    if r4_r5_allowed(seg) or seg.suspended_at is None:
        return False
    took_effect = seg.suspended_at if seg.effective_at is None else seg.effective_at
    # The latest start that is protected, and the longest protection it can have.
    return r6_protection(seg, Room(took_effect - 1), now, cfg) is not None


_ADVICE: Final[dict[Reason, str]] = {
    Reason.ACCOUNT_BANNED: (
        "The account was suspended for content or conduct that violates the service "
        "agreement; it cannot be restored. Contact support for details."
    ),
    Reason.RESOURCES_RELEASED: (
        "The account stayed suspended for an overdue payment for too long and its "
        "resources (application, recordings, configuration) were released; they "
        "cannot be recovered."
    ),
    Reason.ACCOUNT_OVERDUE: "Top up the account to pay the overdue balance.",
    Reason.PACKAGE_EXPIRED: "Buy a monthly package for the application.",
    Reason.PACKAGE_QUOTA_EXHAUSTED: (
        "Enable pay-as-you-go for the application (Application Management > "
        "Application Configuration > Pay-as-You-Go) or buy a new monthly package."
    ),
}
_CAUSE: Final[dict[Reason, str]] = {
    Reason.ACCOUNT_BANNED: "the account is banned",
    Reason.RESOURCES_RELEASED: "the account's resources were released",
    Reason.ACCOUNT_OVERDUE: "the account has an overdue payment",
    Reason.PACKAGE_EXPIRED: "the application has no monthly package in force",
    Reason.PACKAGE_QUOTA_EXHAUSTED: (
        "the monthly package's complimentary minutes are used up and pay-as-you-go is off"
    ),
}


def message_for(seg: Segment, protected: Millis | None = None) -> str:
    """What the customer can do, for the status in ``seg``."""
    suspensions = [r for r in seg.reasons if r in _ADVICE]
    if not suspensions:
        if Reason.OVERDUE_GRACE in seg.reasons:
            return (
                "The account has an overdue payment. Top up before "
                f"{describe_time(seg.grace_ends_at)} or every application of the account "
                "will be suspended."
            )
        return "The application is in good standing."
    causes = " and ".join(_CAUSE[r] for r in suspensions)
    text = f"Service is suspended because {causes}."
    if protected is not None:
        text = (
            f"{text} This classroom started before the suspension and may continue "
            f"until {describe_time(protected)}; no new classroom can start."
        )
    if suspensions[0] in (Reason.ACCOUNT_BANNED, Reason.RESOURCES_RELEASED):
        return f"{text} {_ADVICE[suspensions[0]]}"
    advice = " ".join(_ADVICE[r] for r in suspensions)
    text = f"{text} To restore it: {advice}"
    if Reason.ACCOUNT_OVERDUE in suspensions and seg.release_at is not None:
        text += (
            f" Unpaid, the account's resources will be released for good at "
            f"{describe_time(seg.release_at)}."
        )
    return text


def status_message(seg: Segment, now: Millis) -> str:
    """What the customer can do, for the status record in ``seg`` as
    ``GetApplicationStatus`` shows it at ``now``: :func:`message_for`, and
    when an overdue grace runs alongside a suspension (R1 with R7 or R8), the
    grace too, which the suspension's advice does not mention (R9)."""
    text = message_for(seg)
    if seg.suspended and Reason.OVERDUE_GRACE in seg.reasons:
        text += (
            " The account also has an overdue payment: top up before "
            f"{format_time(seg.grace_ends_at or now)} or every application of the account "
            "will be suspended for it too."
        )
    return text


def r4_r5_allowed(seg: Segment) -> bool:
    """R4, R5: creating classrooms and reading recordings need ACTIVE or GRACE."""
    return seg.state in (State.ACTIVE, State.GRACE)


def decide(
    check: Check,
    status: AppStatus | None,
    now: Millis,
    cfg: PolicyConfig,
    room: Room | None = None,
    *,
    degraded: bool = False,
) -> Decision:
    """Answer one check from the application's status at time ``now``.

    ``room`` is what was reported about the classroom named by an
    enter-classroom check (None when nothing was).
    """
    if status is None:  # R12
        return Decision(
            False,
            Reason.UNKNOWN_APPLICATION,
            (Reason.UNKNOWN_APPLICATION,),
            "The application is not known to the billing system. Check the application "
            "id, or wait a moment if it was created just now.",
            degraded=degraded,
        )
    seg = status.at(now)
    reasons = seg.reasons
    allowed = r4_r5_allowed(seg)
    protected: Millis | None = None
    if not allowed and check is Check.ENTER_CLASSROOM:
        protected = r6_protection(seg, room, now, cfg)
        allowed = protected is not None
    if protected is not None:
        reason = Reason.IN_PROGRESS_PROTECTED
    elif reasons:
        reason = reasons[0]
    else:
        reason = Reason.OK
    return Decision(
        allowed=allowed,
        reason=reason,
        reasons=reasons,
        message=message_for(seg, protected),
        state=seg.state,
        grace_ends_at=seg.grace_ends_at,
        suspended_at=seg.suspended_at,
        release_at=seg.release_at,
        protected_until=protected,
        status_version=status.version,
        degraded=degraded,
        valid_until=valid_until(check, status, now, cfg, room, seg, protected),
    )


def _answer_key(seg: Segment, protected: Millis | None) -> tuple[object, ...]:
    # Everything a Decision is made of, besides the check and the version:
    # the state follows the reasons, the message the segment and protection.
    return (seg.reasons, seg.grace_ends_at, seg.suspended_at, seg.release_at, protected)


def _protection(
    check: Check, seg: Segment, room: Room | None, t: Millis, cfg: PolicyConfig
) -> Millis | None:
    if check is not Check.ENTER_CLASSROOM or r4_r5_allowed(seg):
        return None
    return r6_protection(seg, room, t, cfg)


def valid_until(
    check: Check,
    status: AppStatus,
    now: Millis,
    cfg: PolicyConfig,
    room: Room | None = None,
    seg: Segment | None = None,
    protected: Millis | None = None,
) -> Millis | None:
    """How long the answer to ``check`` at ``now`` holds without a new fact:
    the first instant after ``now`` at which :func:`decide` on the same
    status and room answers otherwise, or None when nothing ahead changes it.

    The answer is piecewise constant: it changes only where a segment of the
    timeline starts (grace end, package expiry or start, a release or an
    extension ending, ...) or where the protection of a class in progress
    ends (its ``protected_until``, or a reported end dated ahead). A segment
    that differs only in what the answer does not show (R6's effective time,
    for a check it does not protect) is passed over. ``seg`` and
    ``protected`` are the segment in force and its protection at ``now``,
    when the caller has them.

    A cache of answers may keep one until then (or until the status
    changes, which a Watch reports); a memo of answers must therefore be
    keyed by everything this reads: the whole timeline ahead (not only the
    segment in force), the room, and, for a protected class, ``now`` (kept
    out of such memos)."""
    if seg is None:
        seg = status.at(now)
        protected = _protection(check, seg, room, now, cfg)
    key = _answer_key(seg, protected)
    ends: Millis | None = None
    if protected is not None and room is not None:
        # Protection, once lost, never comes back within a segment.
        ends = protection_ends_at(room, cfg)
    for nxt in status.segments:
        if nxt.starts_at <= now:
            continue
        if ends is not None and ends <= nxt.starts_at:
            return ends
        if _answer_key(nxt, _protection(check, nxt, room, nxt.starts_at, cfg)) != key:
            return nxt.starts_at
    return ends


def decide_without_store(
    check: Check,
    last_seen: AppStatus | None,
    seen_at: Millis | None,
    now: Millis,
    cfg: PolicyConfig,
    room: Room | None = None,
) -> Decision:
    """R13: answer when the store cannot be read.

    A status seen within ``stale_bound_ms`` is still used (a known suspension
    is denied, a known good app allowed), marked degraded. Otherwise the
    check's failure mode decides, with reason STATUS_UNAVAILABLE.
    """
    if last_seen is not None and seen_at is not None and now - seen_at <= cfg.stale_bound_ms:
        decision = decide(check, last_seen, now, cfg, room, degraded=True)
        # Past the stale bound the failure mode answers instead.
        expires = seen_at + cfg.stale_bound_ms + 1
        if decision.valid_until is None or expires < decision.valid_until:
            decision = replace(decision, valid_until=expires)
        return decision
    allowed = check in cfg.fail_open
    outcome = "allowed" if allowed else "denied"
    return Decision(
        allowed,
        Reason.STATUS_UNAVAILABLE,
        (Reason.STATUS_UNAVAILABLE,),
        f"The billing status could not be read in time; the request was {outcome} by "
        "the configured failure mode. Try again shortly.",
        degraded=True,
        status_version=last_seen.version if last_seen is not None else 0,
    )


def explain(seg: Segment) -> tuple[str, ...]:
    """The rules behind a segment, in words, for operators."""
    out: list[str] = []
    for r in seg.reasons:
        if r is Reason.ACCOUNT_BANNED:
            out.append("R11 ban: the account received a compliance ban; nothing restores it")
        elif r is Reason.RESOURCES_RELEASED:
            out.append(f"R10 release: resources were released at {describe_time(seg.release_at)}")
        elif r is Reason.ACCOUNT_OVERDUE:
            release = (
                f"release due at {describe_time(seg.release_at)} (R10)"
                if seg.release_at is not None
                else "release on hold by a support override (R10)"
            )
            out.append(
                f"R2 overdue suspension: grace ended at {describe_time(seg.grace_ends_at)} without "
                f"a settlement; {release}"
            )
        elif r is Reason.PACKAGE_EXPIRED:
            out.append("R8 expiry: no monthly package is in force")
        elif r is Reason.PACKAGE_QUOTA_EXHAUSTED:
            out.append("R7 quota: the package's quota is used up and pay-as-you-go is off")
        elif r is Reason.OVERDUE_GRACE:
            out.append(f"R1 grace: overdue alert; grace ends at {describe_time(seg.grace_ends_at)}")
    if len([r for r in seg.reasons if r is not Reason.OVERDUE_GRACE]) > 1:
        out.append("R9 several reasons: service returns only when all are cleared")
    if seg.suspended_at is not None:
        out.append(f"suspended since {describe_time(seg.suspended_at)}")
        if seg.effective_at is not None and seg.effective_at > seg.suspended_at:
            out.append(
                f"R6 in effect since {describe_time(seg.effective_at)}, when the facts behind it "
                "were learned: a class reported started before then is protected"
            )
    if not out:
        out.append("no rule restricts the application")
    return tuple(out)
