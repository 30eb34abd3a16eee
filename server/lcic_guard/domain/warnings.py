"""Warnings before every cut: the suspensions already known to lie ahead.

Pure: read from the status timelines the reconciler computes. A suspension
is *scheduled* where an application that is served (ACTIVE or GRACE) is,
further along its timeline, no longer served: the grace of an overdue alert
running out (ACCOUNT_OVERDUE, for the whole account), a package expiring
with no successor (PACKAGE_EXPIRED, for the application). Releases have
their own notices (R10, ``release_scheduled``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lcic_guard.domain.policy import AppStatus, Reason, r4_r5_allowed
from lcic_guard.domain.time import Millis


@dataclass(frozen=True, slots=True)
class ScheduledSuspension:
    """Service stops at ``at`` for ``reason`` unless something changes first."""

    scope: str  # "account" (every application of it) or "app"
    account_id: str
    app_ids: tuple[str, ...]
    reason: Reason
    at: Millis

    @property
    def key(self) -> str:
        """Names this suspension among the account's, stably across recomputes."""
        who = self.account_id if self.scope == "account" else self.app_ids[0]
        return f"{self.scope}:{who}:{self.reason.value}:{self.at}"


def scheduled_suspensions(
    statuses: Mapping[str, AppStatus], now: Millis
) -> tuple[ScheduledSuspension, ...]:
    """Every stop of service known to lie ahead of ``now``, in time order."""
    found: dict[tuple[str, str, Reason, Millis], list[str]] = {}
    for app_id, status in sorted(statuses.items()):
        previous = status.at(now)
        for seg in status.upcoming(now):
            if r4_r5_allowed(previous) and not r4_r5_allowed(seg):
                reason = seg.reasons[0]
                scope = "account" if reason is Reason.ACCOUNT_OVERDUE else "app"
                who = status.account_id if scope == "account" else app_id
                found.setdefault((scope, who, reason, seg.starts_at), []).append(app_id)
            previous = seg
    out = [
        ScheduledSuspension(scope, statuses[apps[0]].account_id, tuple(apps), reason, at)
        for (scope, _who, reason, at), apps in found.items()
    ]
    return tuple(sorted(out, key=lambda w: (w.at, w.key)))
