"""``override`` and ``audit``: support overrides of an account, recorded and
listed through a running sidecar."""

from __future__ import annotations

import argparse
from typing import Any, Final

from lcic_guard import render
from lcic_guard.cli._common import EXIT_CODES, client, client_command, on_sidecar, time_flag, utc
from lcic_guard.domain.time import wall_clock
from lcic_guard.errors import CommandError

OVERRIDE_ACTIONS: Final = ("extend-grace", "hold-release", "clear-hold")


def add_parsers(sub: Any) -> None:
    p = client_command(
        sub,
        "override",
        help="record a support override of an account (scope admin)",
        description="Record a support override on the billing feed through a running "
        "sidecar (ApplyOverride, scope admin): extend-grace gives the account's open overdue "
        "episode a grace until --until; hold-release stops any release of its resources; "
        "clear-hold lifts the hold (the release then waits the notice period). The actor is "
        "the identity the sidecar authenticated (the token or client certificate), never a "
        "flag. The reconciler applies it like any billing event; `lcic-guard audit` lists it.",
        epilog=EXIT_CODES,
    )
    p.add_argument("action", choices=OVERRIDE_ACTIONS)
    p.add_argument("account_id")
    p.add_argument(
        "--until",
        default=None,
        help="extend-grace only: RFC 3339 time, or a duration from now (+3d, 36h)",
    )
    p.add_argument("--reason", required=True, help="why, for the audit trail (one line)")
    p.add_argument("--json", action="store_true", help="print the recorded override as JSON")

    p = client_command(
        sub,
        "audit",
        help="list every support override of an account",
        description="List every support override recorded for ACCOUNT (ListOverrides, "
        "scope read), oldest first: what, who, why, when made and recorded, and its effect.",
    )
    p.add_argument("account_id")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


@on_sidecar
def override(args: argparse.Namespace) -> int:
    from lcic_guard_client import OverrideKind

    # The action's name is the kind's, spelled as a command.
    kind = OverrideKind[args.action.replace("-", "_").upper()]
    until = None
    if kind == OverrideKind.EXTEND_GRACE:
        if not args.until:
            raise CommandError("--until is required for extend-grace")
        until = utc(time_flag(args.until, "--until", wall_clock(), future=True))
    elif args.until:
        raise CommandError(f"--until is only for extend-grace, not {args.action}")
    with client(args) as guard:
        o = guard.apply_override(args.account_id, kind, args.reason, until=until)
    if args.json:
        print(render.dumps(render.to_json(o)))
    else:
        print(render.override_recorded(args.action, o))
    return 0


@on_sidecar
def audit(args: argparse.Namespace) -> int:
    with client(args) as guard:
        overrides = guard.list_overrides(args.account_id)
    if args.json:
        print(render.dumps(render.audit_json(args.account_id, overrides)))
    else:
        print(render.audit_table(args.account_id, overrides))
    return 0
