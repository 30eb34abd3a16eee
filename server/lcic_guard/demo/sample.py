"""Sample billing data for the embedded default: one account in each
situation the policy knows, dated relative to a given time so that it is
always current.
"""

from __future__ import annotations

import json
from typing import Any

from lcic_guard.domain.policy import DAY, HOUR, MINUTE
from lcic_guard.domain.time import Millis, format_time, parse_time

# app id -> what the sample makes of it (printed by the embedded default).
SAMPLE_APPS: dict[str, str] = {
    "app-active": "ACTIVE: package in force, quota left",
    "app-payg": "ACTIVE: quota used up but pay-as-you-go on (R7)",
    "app-renewing": "ACTIVE: package ends in 2 h, the next one is already bought",
    "app-expiring": "ACTIVE now, PACKAGE_EXPIRED in 30 min (R8 deadline)",
    "app-grace": "GRACE: overdue alert 2 h ago, suspension in 22 h (R1)",
    "app-overdue": "SUSPENDED ACCOUNT_OVERDUE since 2 days ago (R2)",
    "app-quota": "SUSPENDED PACKAGE_QUOTA_EXHAUSTED 1 h ago (R7); room-live started before "
    "it and is protected (R6)",
    "app-expired": "SUSPENDED PACKAGE_EXPIRED since yesterday (R8)",
    "app-settled": "ACTIVE: was overdue, settled during grace (R3)",
    "app-banned": "BANNED (R11)",
    "app-released": "RELEASED by the reconciler: overdue for 63 days (R10)",
}


def sample_events(now: Millis) -> list[dict[str, Any]]:
    """The sample events, as the billing system would send them."""
    t0 = now - now % MINUTE
    out: list[dict[str, Any]] = []

    def ev(kind: str, at: Millis, **fields: Any) -> None:
        out.append(
            {
                "event_id": f"sample-{len(out) + 1:03d}",
                "type": kind,
                "occurred_at": format_time(at),
                **fields,
            }
        )

    def app(
        account: str,
        app_id: str,
        *,
        registered: Millis,
        starts: Millis,
        expires: Millis,
        quota: int = 6000,
        used: int | None = None,
        package: str = "",
    ) -> None:
        ev("application_registered", registered, account_id=account, app_id=app_id)
        pkg = package or f"pkg-{app_id}"
        ev(
            "package_purchased",
            registered,
            app_id=app_id,
            package_id=pkg,
            starts_at=format_time(starts),
            expires_at=format_time(expires),
            quota_minutes=quota,
        )
        if used is not None:
            ev("package_usage", t0 - HOUR, app_id=app_id, package_id=pkg, used_minutes=used)

    month_ago, in_a_month = t0 - 10 * DAY, t0 + 20 * DAY
    app(
        "acct-good",
        "app-active",
        registered=month_ago,
        starts=month_ago,
        expires=in_a_month,
        used=1200,
    )
    app(
        "acct-good",
        "app-payg",
        registered=month_ago,
        starts=month_ago,
        expires=in_a_month,
        quota=600,
        used=600,
    )
    ev("payg_changed", t0 - 2 * HOUR, app_id="app-payg", enabled=True)
    app(
        "acct-good",
        "app-renewing",
        registered=month_ago,
        starts=t0 - 28 * DAY,
        expires=t0 + 2 * HOUR,
    )
    ev(
        "package_purchased",
        t0 - DAY,
        app_id="app-renewing",
        package_id="pkg-app-renewing-2",
        starts_at=format_time(t0 + 2 * HOUR),
        expires_at=format_time(t0 + 32 * DAY),
        quota_minutes=6000,
    )
    app(
        "acct-good",
        "app-expiring",
        registered=month_ago,
        starts=t0 - 28 * DAY,
        expires=t0 + 30 * MINUTE,
    )
    app(
        "acct-good",
        "app-quota",
        registered=month_ago,
        starts=month_ago,
        expires=in_a_month,
        quota=600,
        used=640,
    )
    app(
        "acct-good", "app-expired", registered=t0 - 40 * DAY, starts=t0 - 40 * DAY, expires=t0 - DAY
    )

    app("acct-grace", "app-grace", registered=month_ago, starts=month_ago, expires=in_a_month)
    ev("overdue_alert", t0 - 2 * HOUR, account_id="acct-grace", amount_due="120.50")

    app("acct-overdue", "app-overdue", registered=month_ago, starts=month_ago, expires=in_a_month)
    ev("overdue_alert", t0 - 3 * DAY, account_id="acct-overdue", amount_due="980.00")
    ev("overdue_alert", t0 - 2 * DAY - HOUR, account_id="acct-overdue", amount_due="980.00")

    app("acct-settled", "app-settled", registered=month_ago, starts=month_ago, expires=in_a_month)
    ev("overdue_alert", t0 - 5 * DAY, account_id="acct-settled", amount_due="42.00")
    ev("arrears_settled", t0 - 5 * DAY + 3 * HOUR, account_id="acct-settled")

    app("acct-banned", "app-banned", registered=month_ago, starts=month_ago, expires=in_a_month)
    ev("compliance_ban", t0 - 6 * HOUR, account_id="acct-banned", note="terms violation")

    app(
        "acct-gone",
        "app-released",
        registered=t0 - 90 * DAY,
        starts=t0 - 90 * DAY,
        expires=in_a_month,
    )
    ev("overdue_alert", t0 - 63 * DAY, account_id="acct-gone", amount_due="15.00")
    return out


# (app, room, started, scheduled end) relative to now: reported at start.
SAMPLE_ROOMS: list[tuple[str, str, Millis, Millis]] = [
    ("app-quota", "room-live", -90 * MINUTE, 30 * MINUTE),
]


def sample_recorded_at(now: Millis) -> Millis:
    """When the sample counts as recorded: no later than its oldest fact, as
    if the reconciler had followed the billing feed all along (so the
    63-day-old alert is not a backfill, and R10 needs no notice period)."""
    return min(parse_time(e["occurred_at"], "occurred_at") for e in sample_events(now))


def sample_jsonl(now: Millis) -> str:
    return "".join(json.dumps(e, sort_keys=True) + "\n" for e in sample_events(now))
