"""``check``, ``status``, ``explain`` and ``preview``: questions to a running
sidecar, through the client."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Final

from lcic_guard import render
from lcic_guard.cli._common import EXIT_CODES, client, client_command, on_sidecar, time_flag, utc
from lcic_guard.domain.time import wall_clock
from lcic_guard.errors import CommandError

if TYPE_CHECKING:
    from lcic_guard_client import Decision, GuardClient

CHECKS: Final = ("create", "enter", "recording")


def add_parsers(sub: Any) -> None:
    p = client_command(
        sub,
        "check",
        help="ask a running sidecar one check",
        description="Ask a running sidecar one check and print its answer on one "
        "line: ALLOWED or DENIED, the reason, the time that matters and what the "
        "customer can do (--json for a stable JSON object).",
        epilog=EXIT_CODES,
    )
    p.add_argument("kind", choices=CHECKS)
    p.add_argument("app_id")
    p.add_argument("--room", default="", help="room id (required for enter)")
    p.add_argument("--recording", default="rec-1", help="recording id (for recording)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")

    p = client_command(sub, "status", help="show an application's status record")
    p.add_argument("app_id")
    p.add_argument("--json", action="store_true", help="print the raw record as JSON")

    p = client_command(
        sub,
        "explain",
        help="answer one check for an application and explain why",
        description="Ask a running sidecar one check and print its answer with "
        "the status behind it: every reason, the billing events behind each, the "
        "deadlines ahead and what the customer must do.",
        epilog=EXIT_CODES,
    )
    p.add_argument("app_id")
    p.add_argument("--check", required=True, choices=CHECKS)
    p.add_argument("--room", default="", help="room id (required for --check enter)")
    p.add_argument("--recording", default="rec-1", help="recording id (for recording)")

    p = client_command(
        sub,
        "preview",
        help="what an application's checks will answer at a later time",
        description="Ask a running sidecar what the three checks will answer at "
        "TIME if no new billing event arrives (grace ending, a package expiring, "
        "release falling due).",
    )
    p.add_argument("app_id")
    p.add_argument(
        "--at",
        required=True,
        help="RFC 3339 time (2026-10-01T12:00:00Z), or a duration from now: +25h, +1h30m; "
        "not in the past (the answers now: check, status)",
    )
    p.add_argument("--room", default="", help="a classroom reported started, for enter")
    p.add_argument("--json", action="store_true", help="print the raw answer as JSON")


def _ask(guard: GuardClient, kind: str, args: argparse.Namespace) -> Decision:
    if kind == "enter" and not args.room:
        raise CommandError("--room is required for an enter check")
    if kind == "create":
        return guard.can_create_classroom(args.app_id, room_id=args.room)
    if kind == "enter":
        return guard.can_enter_classroom(args.app_id, args.room)
    return guard.can_access_recording(args.app_id, args.recording, room_id=args.room)


@on_sidecar
def check(args: argparse.Namespace) -> int:
    with client(args) as guard:
        d = _ask(guard, args.kind, args)
    if args.json:
        print(render.dumps(render.check_json(args.kind, args.app_id, d)))
    else:
        print(render.decision_line(d, wall_clock()))
    return 0 if d.allowed else 1


@on_sidecar
def status(args: argparse.Namespace) -> int:
    with client(args) as guard:
        st = guard.get_application_status(args.app_id)
    if args.json:
        print(render.dumps(render.to_json(st)))
    else:
        print(render.render_status(st, wall_clock()))
    return 0


@on_sidecar
def explain(args: argparse.Namespace) -> int:
    from lcic_guard_client import NotFound, SidecarUnavailable

    st, unreadable = None, ""
    with client(args) as guard:
        d = _ask(guard, args.check, args)
        try:
            st = guard.get_application_status(args.app_id)
        except NotFound:
            pass
        except SidecarUnavailable as exc:
            unreadable = exc.details
    print(
        render.render_explain(args.check, args.app_id, d, st, wall_clock(), unreadable=unreadable)
    )
    return 0 if d.allowed else 1


@on_sidecar
def preview(args: argparse.Namespace) -> int:
    now = wall_clock()
    at = utc(time_flag(args.at, "--at", now, future=True))
    with client(args) as guard:
        p = guard.preview_application(args.app_id, at, room_id=args.room)
    if p.at is not None and p.at > at:
        # The sidecar answers a time before its own now as of now: say so.
        print(
            f"note: --at {args.at} is before the sidecar's current time: these are the answers now",
            file=sys.stderr,
        )
    if args.json:
        print(render.dumps(render.to_json(p)))
    else:
        print(render.render_preview(p, now))
    return 0
