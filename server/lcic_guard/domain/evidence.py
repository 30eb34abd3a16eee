"""Why an application is in its state: the billing facts behind each reason,
and the deadlines ahead. Pure, like :mod:`lcic_guard.domain.policy`: no I/O.

:func:`reason_facts` maps every reason of the status in force at ``now`` to
the billing events that make it hold (the overdue alert that started grace,
the usage report that exhausted the quota, the package that expired, the
ban...). :func:`deadlines` lists the known future moments that matter (grace
end, release date, package expiry or start). Both read the account's stored
facts (``Store.load_account_facts``) as the policy does: only facts that occurred
at or before ``now``, swept in time order with settlements first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from lcic_guard.domain.facts import (
    Fact,
    GraceExtended,
    OverdueAlert,
    Override,
    PackageUsage,
    ReleaseHoldCleared,
    ReleaseHoldSet,
)
from lcic_guard.domain.policy import (
    AppStatus,
    PolicyConfig,
    Reason,
    State,
    Sweep,
    extension_limit,
    fact_order,
    sweep_until,
)
from lcic_guard.domain.time import Millis, describe_time, format_time


@dataclass(frozen=True, slots=True)
class ReasonFact:
    """One billing event supporting one reason (``event_id`` empty: none)."""

    reason: Reason
    event_id: str
    event_type: str
    occurred_at: Millis
    detail: str


class DeadlineKind(StrEnum):
    GRACE_END = "GRACE_END"
    RELEASE = "RELEASE"
    PACKAGE_EXPIRY = "PACKAGE_EXPIRY"
    PACKAGE_START = "PACKAGE_START"


@dataclass(frozen=True, slots=True)
class Deadline:
    """A known future moment that matters to the application."""

    kind: DeadlineKind
    at: Millis
    description: str
    event_id: str = ""


def _fold(app_id: str, facts: Iterable[Fact], now: Millis, cfg: PolicyConfig) -> Sweep:
    # The policy's own fold, stopped at ``now`` and with the configured
    # durations: the facts cited are the ones the rules used, not a second
    # reading of them under other limits.
    return sweep_until(facts, app_id, now, cfg)


def _exhausting(usage: list[PackageUsage], quota: int) -> PackageUsage | None:
    """The report from which on the package's usage stayed at or over quota."""
    reports = sorted(usage, key=lambda u: (u.occurred_at, u.used_minutes))
    found: PackageUsage | None = None
    for u in reports:
        # Reset by any report under quota; kept from the first one over it.
        found = (found or u) if u.used_minutes >= quota else None
    return found


def _fact(reason: Reason, f: Fact, detail: str) -> ReasonFact:
    return ReasonFact(reason, f.event_id, f.type, f.occurred_at, detail)


def _amount(alert: OverdueAlert) -> str:
    return f" (amount due {alert.amount_due})" if alert.amount_due else ""


def reason_facts(
    status: AppStatus, facts: Iterable[Fact], now: Millis, cfg: PolicyConfig
) -> tuple[ReasonFact, ...]:
    """The billing events behind each reason of the status in force at ``now``,
    read with the policy ``cfg`` that computed the status."""
    seg = status.at(now)
    k = _fold(status.app_id, facts, now, cfg)
    out: list[ReasonFact] = []
    for reason in seg.reasons:
        if reason is Reason.ACCOUNT_BANNED and k.ban is not None:
            note = f": {k.ban.note}" if k.ban.note else ""
            out.append(_fact(reason, k.ban, f"compliance ban of account {k.ban.account_id}{note}"))
        elif reason is Reason.RESOURCES_RELEASED and k.released is not None:
            out.append(
                _fact(
                    reason,
                    k.released,
                    f"resources of account {k.released.account_id} released after the "
                    "overdue suspension ran its full length unpaid",
                )
            )
        elif reason is Reason.ACCOUNT_OVERDUE and k.overdue_alert is not None:
            detail = (
                f"overdue alert{_amount(k.overdue_alert)} started the grace period; no settlement "
                f"before it ended at {describe_time(seg.grace_ends_at)}"
            )
            if Reason.RESOURCES_RELEASED in seg.reasons:
                detail += "; the suspension ran its full length and resources were released"
            elif seg.release_at is not None:
                detail += f"; resources are released at {format_time(seg.release_at)} if unpaid"
            out.append(_fact(reason, k.overdue_alert, detail))
        elif reason is Reason.OVERDUE_GRACE and k.overdue_alert is not None:
            out.append(
                _fact(
                    reason,
                    k.overdue_alert,
                    f"overdue alert{_amount(k.overdue_alert)} started the grace period, which ends "
                    f"at {describe_time(seg.grace_ends_at)}",
                )
            )
        if reason in (Reason.ACCOUNT_OVERDUE, Reason.OVERDUE_GRACE) and k.extension is not None:
            ext = k.extension
            out.append(
                _fact(
                    reason,
                    ext,
                    f"grace extended by {ext.actor} until {describe_time(k.extended_until)}: "
                    f"{ext.reason}",
                )
            )
        if reason is Reason.PACKAGE_EXPIRED:
            out += _expired_facts(k, now)
        elif reason is Reason.PACKAGE_QUOTA_EXHAUSTED:
            out += _quota_facts(k, now)
    return tuple(out)


def _expired_facts(k: Sweep, now: Millis) -> list[ReasonFact]:
    reason = Reason.PACKAGE_EXPIRED
    out: list[ReasonFact] = []
    expired = [p for p in k.packages.values() if p.expires_at <= now]
    if expired:
        last = max(expired, key=lambda p: (p.expires_at, p.occurred_at, p.package_id))
        out.append(
            _fact(
                reason,
                last,
                f"package {last.package_id} expired at {format_time(last.expires_at)}",
            )
        )
    for p in sorted(k.packages.values(), key=lambda p: p.starts_at):
        if p.starts_at > now:
            out.append(
                _fact(
                    reason,
                    p,
                    f"package {p.package_id} is bought but in force only from "
                    f"{format_time(p.starts_at)}",
                )
            )
    if not out:
        if k.registered is not None:
            out.append(
                _fact(reason, k.registered, "application registered; no package was ever bought")
            )
        else:
            out.append(ReasonFact(reason, "", "", 0, "no package was ever bought"))
    return out


def _quota_facts(k: Sweep, now: Millis) -> list[ReasonFact]:
    reason = Reason.PACKAGE_QUOTA_EXHAUSTED
    pkg = k.package_in_force(now)
    if pkg is None:
        return []
    out = [
        _fact(
            reason,
            pkg,
            f"package {pkg.package_id} in force with a quota of {pkg.quota_minutes} minutes, "
            f"until {format_time(pkg.expires_at)}",
        )
    ]
    used = _exhausting(k.usage_reports.get(pkg.package_id, []), pkg.quota_minutes)
    if used is not None:
        out.append(
            _fact(
                reason,
                used,
                f"usage report: {used.used_minutes} of {pkg.quota_minutes} minutes of "
                f"package {pkg.package_id} used; the quota is exhausted",
            )
        )
    if k.payg_change is not None and not k.payg_change.enabled:
        out.append(_fact(reason, k.payg_change, "pay-as-you-go switched off"))
    return out


def deadlines(
    status: AppStatus, facts: Iterable[Fact], now: Millis, cfg: PolicyConfig
) -> tuple[Deadline, ...]:
    """The known future moments that matter, in time order."""
    seg = status.at(now)
    if seg.state in (State.RELEASED, State.BANNED):
        return ()  # for good: no payment, package or date changes anything now
    k = _fold(status.app_id, facts, now, cfg)
    alert_id = k.overdue_alert.event_id if k.overdue_alert is not None else ""
    out: list[Deadline] = []
    grace_end = seg.grace_ends_at
    if Reason.OVERDUE_GRACE in seg.reasons and grace_end is not None and grace_end > now:
        out.append(
            Deadline(
                DeadlineKind.GRACE_END,
                grace_end,
                "the grace period ends: every application of the account is suspended "
                "(ACCOUNT_OVERDUE) unless the account is topped up before",
                alert_id,
            )
        )
    if Reason.RESOURCES_RELEASED not in seg.reasons:
        for s in (seg, *status.upcoming(now)):
            if Reason.ACCOUNT_OVERDUE in s.reasons and s.release_at is not None:
                if s.release_at > now:
                    out.append(
                        Deadline(
                            DeadlineKind.RELEASE,
                            s.release_at,
                            "the account's resources (applications, recordings, "
                            "configurations) are released for good unless it is topped up "
                            "before",
                            alert_id,
                        )
                    )
                break
    pkg = k.package_in_force(now)
    if pkg is not None:
        after = k.package_in_force(pkg.expires_at)
        then = (
            f"package {after.package_id} takes over"
            if after is not None
            else "the application is suspended (PACKAGE_EXPIRED) unless a package is bought"
        )
        out.append(
            Deadline(
                DeadlineKind.PACKAGE_EXPIRY,
                pkg.expires_at,
                f"package {pkg.package_id} expires: {then}",
                pkg.event_id,
            )
        )
    for p in k.packages.values():
        if p.starts_at > now:
            out.append(
                Deadline(
                    DeadlineKind.PACKAGE_START,
                    p.starts_at,
                    f"package {p.package_id} ({p.quota_minutes} minutes) comes into force",
                    p.event_id,
                )
            )
    return tuple(sorted(out, key=lambda d: (d.at, d.kind.value)))


@dataclass(frozen=True, slots=True)
class OverrideEntry:
    """One support override of the account, for the audit trail."""

    fact: Override
    recorded_at: Millis | None
    effect: str
    """What the override does to the account's folded outcome (its grace
    end, whether its release is held, its release date): starts with
    ``no effect`` exactly when the outcome would be the same without it."""


NO_EFFECT: Final = "no effect"


def override_log(
    facts: Iterable[Fact], cfg: PolicyConfig, recorded_at: Mapping[str, Millis]
) -> tuple[OverrideEntry, ...]:
    """Every override among the account's facts, oldest first, with what it
    does: read from the fold of all the facts, the way the policy folds them,
    so that an override a later one supersedes (a clear dated before a hold)
    is shown as having no effect, not as what it would have done alone.

    The one audit of overrides: ListOverrides, GetApplicationStatus and the
    ``override_applied`` announcement all show this text."""
    ordered = sorted({f.event_id: f for f in facts}.values(), key=fact_order)
    final = Sweep(cfg, recorded_at)
    episode_of: dict[str, OverdueAlert | None] = {}  # extension -> the episode it applies to
    for fact in ordered:
        if isinstance(fact, GraceExtended):
            episode_of[fact.event_id] = final.overdue_alert
        final.apply(fact)
    clears = [f for f in ordered if isinstance(f, ReleaseHoldCleared)]
    before = Sweep(cfg, recorded_at)  # the account just before each override
    out: list[OverrideEntry] = []
    for fact in ordered:
        effect: str | None = None
        if isinstance(fact, GraceExtended):
            same_episode = [
                e
                for e in ordered
                if isinstance(e, GraceExtended)
                and e is not fact
                and episode_of[e.event_id] is not None
                and episode_of[e.event_id] is episode_of[fact.event_id]
            ]
            effect = _extension_effect(fact, before, final, same_episode)
        elif isinstance(fact, ReleaseHoldSet):
            effect = _hold_effect(fact, before, final)
        elif isinstance(fact, ReleaseHoldCleared):
            effect = _clear_effect(fact, before, final, clears)
        if effect is not None:
            assert isinstance(fact, GraceExtended | ReleaseHoldSet | ReleaseHoldCleared)
            out.append(OverrideEntry(fact, recorded_at.get(fact.event_id), effect))
        before.apply(fact)
    return tuple(out)


def _named(fact: Fact) -> str:
    return f"{fact.event_id} of {format_time(fact.occurred_at)}"


def _extension_effect(
    ext: GraceExtended, before: Sweep, final: Sweep, same_episode: list[GraceExtended]
) -> str:
    cfg = final.cfg
    alert = before.overdue_alert
    if alert is None:
        return f"{NO_EFFECT}: no overdue episode was open when it was made"
    began = format_time(alert.occurred_at)
    if final.overdue_alert is not alert:
        return f"{NO_EFFECT}: the overdue episode it extended (began {began}) was settled"
    bound = extension_limit(alert.occurred_at, cfg)
    until = min(ext.until, bound)
    cut = f" (cut to the limit of {format_time(bound)})" if until < ext.until else ""
    # The grace end is the longest extension of the episode (the policy keeps
    # the first of equals): this one decides it only if no other reaches it.
    rivals = [e for e in same_episode if min(e.until, bound) >= until]
    if rivals:
        best = max(rivals, key=lambda e: min(e.until, bound))
        return (
            f"{NO_EFFECT}: extension {_named(best)} already gives the grace until "
            f"{format_time(min(best.until, bound))}"
        )
    plain_end = alert.occurred_at + cfg.grace_ms
    if until <= plain_end:
        return f"{NO_EFFECT}: the grace already runs until {format_time(plain_end)}"
    return (
        f"grace of the overdue episode that began {began} extended until {format_time(until)}" + cut
    )


def _hold_effect(hold: ReleaseHoldSet, before: Sweep, final: Sweep) -> str:
    # The latest hold or clear by occurred_at decides (R14).
    decisive = final.hold
    if decisive is hold:
        if before.release_held and before.hold is not None:
            return f"{NO_EFFECT}: the release was already held by {_named(before.hold)}"
        return "release of the account's resources held"
    assert decisive is not None
    if isinstance(decisive, ReleaseHoldCleared):
        return f"{NO_EFFECT}: lifted by a later clear ({_named(decisive)})"
    return f"{NO_EFFECT}: a later hold ({_named(decisive)}) is in force"


def _clear_effect(
    clear: ReleaseHoldCleared, before: Sweep, final: Sweep, clears: list[ReleaseHoldCleared]
) -> str:
    decisive = final.hold
    if isinstance(decisive, ReleaseHoldSet):
        return f"{NO_EFFECT}: a later hold ({_named(decisive)}) is in force"
    known = final.recorded_at(clear)
    no_release = (
        f"no release before {format_time(known + final.cfg.release_notice_ms)} "
        "(the notice period after it was recorded)"
    )
    if decisive is clear and before.release_held:
        return f"release hold lifted; {no_release}"
    # Not held either way: what it may still change is the release date, by
    # the notice period counted from the latest recorded clear (R10).
    others = [final.recorded_at(c) for c in clears if c is not clear]
    without = replace(final, hold_cleared_known=max(others, default=None))
    if final.r10_release_at() != without.r10_release_at():
        return f"release postponed: {no_release}"
    if not before.release_held:
        return f"{NO_EFFECT}: no release hold was in force when it was made"
    assert decisive is not None
    return f"{NO_EFFECT}: a later clear ({_named(decisive)}) lifts the hold too"
