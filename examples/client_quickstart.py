"""The lcic-guard Python client in one page (docs/client.md shows this file).

    python examples/client_quickstart.py [HOST:PORT]

against a sidecar with the sample data (`scripts/run`).
"""

import sys
from datetime import UTC, datetime, timedelta

from lcic_guard_client import (
    GuardClient,
    GuardError,
    NotFound,
    Reason,
    SidecarUnavailable,
    access_recording_check,
    create_classroom_check,
)

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"

# One client per process: it holds one channel. Every call has a deadline
# (here 2 s unless a call passes its own timeout=).
with GuardClient(target, timeout=2.0) as guard:
    try:
        for app in ("app-active", "app-grace", "app-overdue", "app-banned"):
            d = guard.can_create_classroom(app)
            verdict = "ALLOWED" if d.allowed else "DENIED"
            print(f"{app}: {verdict} {d.reason} - {d.message}")
            if d.reason == Reason.OVERDUE_GRACE and d.grace_ends_at is not None:
                print(f"  grace ends {d.grace_ends_at:%Y-%m-%d %H:%M} UTC")
            if d.valid_until is not None:
                print(f"  this answer holds until {d.valid_until:%Y-%m-%d %H:%M} UTC")

        # Many checks in one call: one decision per check, in order.
        batch = guard.check_batch(
            [create_classroom_check("app-active"), access_recording_check("app-banned", "rec-1")],
            timeout=1.0,
        )
        print("batch:", ", ".join(str(d.reason) for d in batch))

        status = guard.get_application_status("app-grace")
        print(f"app-grace is {status.state}; reasons: {', '.join(map(str, status.reasons))}")
        for deadline in status.deadlines:
            print(f"  {deadline.kind} at {deadline.at:%Y-%m-%d %H:%M} UTC: {deadline.description}")

        later = guard.preview_application("app-grace", datetime.now(UTC) + timedelta(days=2))
        print(f"app-grace in 2 days: {later.state}, create -> {later.create_classroom.reason}")

        try:
            guard.get_application_status("app-invented")
        except NotFound:
            print("app-invented: not known to the sidecar")
    except SidecarUnavailable as exc:
        # Down, restarting or too slow: the caller's own failure mode applies.
        print(f"the sidecar is unavailable ({exc.code}); failing closed", file=sys.stderr)
        sys.exit(2)
    except GuardError as exc:
        print(f"the call failed: {exc}", file=sys.stderr)
        sys.exit(1)
