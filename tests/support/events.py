"""Billing events as the billing system sends them, and as deliveries of a
source."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lcic_guard.domain.policy import DAY
from lcic_guard.domain.time import Millis, format_time
from lcic_guard.reconciler.sources import Delivery

from tests.support.clock import T0


@dataclass
class Events:
    """Builds billing events with unique ids, in the billing system's form."""

    n: int = 0
    made: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, kind: str, at: Millis, **fields: Any) -> dict[str, Any]:
        self.n += 1
        for key in ("starts_at", "expires_at"):
            if isinstance(fields.get(key), int):
                fields[key] = format_time(fields[key])
        event = {"event_id": f"ev-{self.n}", "type": kind, "occurred_at": format_time(at), **fields}
        self.made.append(event)
        return event

    def app(
        self,
        account: str,
        app_id: str,
        at: Millis = T0 - 10 * DAY,
        expires: Millis = T0 + 20 * DAY,
        quota: int = 6000,
    ) -> list[dict[str, Any]]:
        """An app registered with a package in force around T0."""
        return [
            self("application_registered", at, account_id=account, app_id=app_id),
            self(
                "package_purchased",
                at,
                app_id=app_id,
                package_id=f"pkg-{app_id}",
                starts_at=at,
                expires_at=expires,
                quota_minutes=quota,
            ),
        ]


def deliveries(evs: list[dict[str, Any]] | list[str], source: str = "test") -> list[Delivery]:
    return [
        Delivery(e if isinstance(e, str) else json.dumps(e), f"t-{i}", source)
        for i, e in enumerate(evs)
    ]
