"""The ``lcic-guard`` command."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import difflib
import json
import os
import re
import secrets
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from lcic_guard import render
from lcic_guard.config import Settings
from lcic_guard.domain.facts import InvalidEvent, parse_event_json
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.embedded import RedisServerMissing
from lcic_guard.errors import CommandError, readable_text_file
from lcic_guard.flags import (
    add_client_flags,
    add_debug_flag,
    add_metrics_flags,
    add_policy_flags,
    add_reconcile_flags,
    add_serve_flags,
    add_store_flags,
    retired_tls_variable,
    settings_from,
)
from lcic_guard.redact import redact_url
from lcic_guard.sample import sample_jsonl
from lcic_guard.sidecar.identities import token_to_send
from lcic_guard.store.billing_stream import publish_events
from lcic_guard.store.connect import StoreError, connect
from lcic_guard.store.keys import BILLING_STREAM
from lcic_guard.store.status import Store

if TYPE_CHECKING:
    from lcic.guard.v1 import enforcement_pb2 as pb
    from lcic_guard_client import GuardClient, GuardError

DESCRIPTION = """\
lcic-guard enforces the classroom platform's billing policy.

  serve        the sidecar: answers CanCreateClassroom, CanEnterClassroom and
               CanAccessRecording over gRPC. Without --redis-url it is the
               embedded default: its own private Redis, the reconciler and
               sample billing data, ready to try.
  reconcile    the reconciler: turns billing events into statuses, runs the
               deadlines and releases resources when that is certain.
  events       publish a file of billing events onto the billing stream
               (the format: docs/events.md; an example: sample-events).
  release-plan list the releases (R10) scheduled and whether they could run now.
  check        ask a running sidecar one question, from the shell.
  status       show a running sidecar's status record for an application: its
               reasons, the billing events behind them, the deadlines ahead and
               what the customer can do (--json for the raw record).
  explain      one check's answer for an application, and why.
  preview      what an application's checks will answer at a later time.
  override     record a support override of an account (extend-grace,
               hold-release, clear-hold) through a sidecar, with an audit trail.
  audit        list every support override of an account: who, why, when.
  sample-events print the sample billing events (JSON lines).
  probe        exit 0 if a running sidecar (or process) is ready, 1 if not: for
               container health checks.

Every setting can also be given in the environment as LCIC_GUARD_<FLAG>
(--redis-url is LCIC_GUARD_REDIS_URL, --target LCIC_GUARD_TARGET); the
help of each command shows the variable next to each flag that has one.
"""

EXIT_CODES = """\
exit status:
  0  done; for check and explain: the check is allowed
  1  check, explain: the check is denied (a normal answer);
     events publish: some lines are invalid
  2  a usage error, or a failure the one-line message explains (an address,
     a file, Redis or the sidecar that cannot be reached); --debug adds the
     traceback
  3  an unexpected error (rerun with --debug for the traceback)
"""

CHECKS = ("create", "enter", "recording")


class _Parser(argparse.ArgumentParser):
    """A command's parser: a usage error is one line naming the command (a
    flag it does not know included), not the top-level usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}{_did_you_mean(message)} (see `{self.prog} --help`)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns, extra


def _did_you_mean(message: str) -> str:
    """``; did you mean 'check'?`` for argparse's "invalid choice" of a
    mistyped command (or check kind, or action)."""
    wrong = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if wrong is None:
        return ""
    choices = re.findall(r"'([^']*)'", wrong.group(2))
    close = difflib.get_close_matches(wrong.group(1), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _version() -> str:
    try:
        return metadata.version("lcic-guard")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def _client_command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    if "description" in kwargs:  # kept as written (for the exit codes): wrap it here
        kwargs["description"] = textwrap.fill(kwargs["description"], 79)
    p: argparse.ArgumentParser = sub.add_parser(
        name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    add_client_flags(p)
    add_debug_flag(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lcic-guard",
        description=DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lcic-guard {_version()}")
    # Its own dest: a command's parser would reset "debug" to its default.
    add_debug_flag(parser, dest="debug_first")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the sidecar (embedded default without --redis-url)",
        description="Run the gRPC sidecar. Without --redis-url: a private "
        "redis-server, the reconciler and sample billing data.",
    )
    add_store_flags(p, embedded=True)
    add_serve_flags(p)
    add_policy_flags(p)
    add_reconcile_flags(p, embedded=True)
    add_metrics_flags(p)
    add_debug_flag(p)

    p = sub.add_parser(
        "reconcile",
        help="run the reconciler",
        description="Run the reconciler: consume the billing stream, keep "
        "statuses, run deadlines and releases. Needs --redis-url: it works on "
        "the Redis the sidecars read.",
    )
    add_store_flags(p)
    add_policy_flags(p, sidecar=False)
    add_reconcile_flags(p, embedded=False)
    add_metrics_flags(p)
    add_debug_flag(p)

    p = sub.add_parser("events", help="publish billing events onto the billing stream")
    ev = p.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    pub = ev.add_parser(
        "publish",
        help="XADD each line of FILE onto the billing stream",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate every line of FILE (one JSON event a line; blank lines "
        f"and lines starting with # are skipped), then add them to the Redis Stream "
        f"{BILLING_STREAM}. If any line is invalid, nothing is published "
        "(--skip-invalid publishes the valid ones) and the exit status is 1. An event "
        "dated more than 5 minutes ahead of now is invalid: the reconciler would "
        "dead-letter it. "
        "The event format: docs/events.md; `lcic-guard sample-events` prints examples.",
    )
    pub.add_argument("file", type=Path, help="events file, or - for standard input")
    pub.add_argument(
        "--skip-invalid",
        action="store_true",
        help="publish the valid lines even if some are invalid (still exit status 1)",
    )
    add_store_flags(pub)
    add_debug_flag(pub)
    new = ev.add_parser(
        "new",
        help="print one billing event, dated now, ready to publish",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print one billing event of TYPE as a JSON line, validated, with a new "
        "event_id and occurred_at now (or --at), for trying things by hand: pipe it to "
        "`lcic-guard events publish -`. The fields of each type: docs/events.md.",
        epilog="example:\n  lcic-guard events new arrears_settled account_id=acct-overdue \\\n"
        "    | lcic-guard events publish - --redis-url redis://127.0.0.1:6379/0",
    )
    new.add_argument("type", help="the event type, e.g. arrears_settled")
    new.add_argument(
        "fields",
        nargs="*",
        metavar="FIELD=VALUE",
        help="a field as a string (account_id=acct-42), or FIELD:=JSON for a number or a "
        "boolean (quota_minutes:=6000, enabled:=true)",
    )
    new.add_argument(
        "--at",
        default=None,
        help="when it occurred: RFC 3339, or a duration from now (-2h); default now",
    )
    add_debug_flag(new)

    p = sub.add_parser(
        "release-plan",
        help="list scheduled releases (a dry run)",
        description="List every release of resources (R10) the reconciler has "
        "scheduled: the account, its applications, release_at, and whether it "
        "would be performed if it fell due now, with the reason. Changes nothing.",
    )
    add_store_flags(p)
    add_policy_flags(p, sidecar=False)
    add_reconcile_flags(p, embedded=False)
    add_debug_flag(p)

    p = _client_command(
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

    p = _client_command(sub, "status", help="show an application's status record")
    p.add_argument("app_id")
    p.add_argument("--json", action="store_true", help="print the raw record as JSON")

    p = _client_command(
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

    p = _client_command(
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

    p = _client_command(
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

    p = _client_command(
        sub,
        "audit",
        help="list every support override of an account",
        description="List every support override recorded for ACCOUNT (ListOverrides, "
        "scope read), oldest first: what, who, why, when made and recorded, and its effect.",
    )
    p.add_argument("account_id")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    p = sub.add_parser("sample-events", help="print the sample billing events")
    add_debug_flag(p)
    _add_probe_parser(sub)
    return parser


def _add_probe_parser(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="exit 0 if a running sidecar is ready (1 if not): for health checks",
        description="Ask a running sidecar's gRPC health service whether it is SERVING "
        "(ready: its statuses are fresh), or with --live only whether it runs. With --http, "
        "ask the process's metrics listener instead (/readyz, or /healthz with --live): the "
        "reconciler has no gRPC port, and a sidecar with TLS is probed there too. Exit 0: "
        "yes; 1: no or no answer.",
    )
    p.add_argument(
        "--target",
        default=None,
        help="sidecar address (default: LCIC_GUARD_LISTEN, with a wildcard host as "
        "127.0.0.1, else 127.0.0.1:50051)",
    )
    p.add_argument("--http", default=None, metavar="HOST:PORT", help="metrics listener to ask")
    p.add_argument("--live", action="store_true", help="alive rather than ready")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    add_debug_flag(p)


def _local(listen: str) -> str:
    """A listen address as a client on the same host reaches it."""
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _probe(args: argparse.Namespace) -> int:
    """Container health: gRPC health (or HTTP /readyz, /healthz); exit 0 or 1."""
    if args.http:
        import urllib.error
        import urllib.request

        url = f"http://{_local(args.http)}/{'healthz' if args.live else 'readyz'}"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as resp:
                print(f"{url}: {resp.status}")
                return 0
        except urllib.error.HTTPError as exc:
            print(f"{url}: {exc.code}", file=sys.stderr)
        except OSError as exc:
            print(f"{url}: no answer ({exc})", file=sys.stderr)
        return 1

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lcic_guard.sidecar.server import LIVENESS_SERVICE

    target = args.target or _local(os.environ.get("LCIC_GUARD_LISTEN", "127.0.0.1:50051"))
    service = LIVENESS_SERVICE if args.live else ""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# -- commands on Redis --------------------------------------------------------


def _needs_redis(settings: Settings, command: str) -> str:
    if settings.redis_url is None:
        raise CommandError(
            f"--redis-url (or LCIC_GUARD_REDIS_URL) is required: {command} works on the "
            "Redis the sidecars read; only `serve` starts a private one"
        )
    return settings.redis_url


def _read_events(path: Path) -> str:
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("standard input: not UTF-8 text; give JSON lines") from None
    return readable_text_file(path, "")


def _events_new(args: argparse.Namespace) -> int:
    now = wall_clock()
    try:
        at = render.parse_at(args.at, now) if args.at else now
    except argparse.ArgumentTypeError as exc:
        raise CommandError(str(exc)) from None
    event: dict[str, Any] = {
        "event_id": f"cli-{now}-{secrets.token_hex(3)}",
        "type": args.type,
        "occurred_at": format_time(at),
    }
    for item in args.fields:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CommandError(f"{item!r}: give FIELD=VALUE (or FIELD:=JSON)")
        if name.endswith(":"):
            try:
                event[name[:-1]] = json.loads(value)
            except ValueError:
                raise CommandError(f"{item!r}: {value!r} is not JSON") from None
        else:
            event[name] = value
    line = json.dumps(event)
    try:
        parse_event_json(line)
    except InvalidEvent as exc:
        raise CommandError(f"invalid {args.type} event: {exc.reason} (docs/events.md)") from None
    print(line)
    return 0


async def _publish(settings: Settings, path: Path, skip_invalid: bool) -> int:
    from lcic_guard import runner

    url = _needs_redis(settings, "events publish")
    text = _read_events(path)
    valid: list[str] = []
    invalid = 0
    now = wall_clock()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            parse_event_json(line, now=now)
        except InvalidEvent as exc:
            name = "<stdin>" if str(path) == "-" else path
            print(f"{name}:{n}: invalid: {exc.reason}", file=sys.stderr)
            invalid += 1
            continue
        valid.append(line.strip())
    if invalid and not skip_invalid:
        print(
            f"{invalid} invalid line(s): nothing published; fix them, or pass "
            f"--skip-invalid to publish the {len(valid)} valid one(s)",
            file=sys.stderr,
        )
        return 1
    store = Store(connect(url))
    try:
        await runner.require_redis(store, url)
        await publish_events(store.redis, valid)
    finally:
        await store.close()
    skipped = ", not published" if invalid else ""
    print(f"published {len(valid)} events to {BILLING_STREAM} ({invalid} invalid{skipped})")
    # The reconciler applies them later, so this command cannot tell their
    # effect; what can make one change nothing is said here, not discovered.
    print(
        "The reconciler applies them within seconds. One changes nothing if it is dated "
        "before the fact it answers (a settlement older than the alert), and one that "
        "contradicts the feed is dead-lettered: see docs/events.md"
    )
    return 1 if invalid else 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


async def _release_plan(settings: Settings) -> int:
    from lcic_guard import runner

    url = _needs_redis(settings, "release-plan")
    store = Store(connect(url))
    try:
        await runner.require_redis(store, url)
        rec = runner.build_reconciler(settings, store, None, clock=wall_clock)
        plans = await rec.plan_releases()
        continuity = await rec.check_continuity()
    finally:
        await store.close()
    if not plans:
        print("no release scheduled")
        print(continuity)  # R10: a store discontinuity pauses every release
        return 0
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
    print(_table(("ACCOUNT", "APPLICATIONS", "RELEASE AT", "IF DUE NOW", "WHY"), rows))
    now = wall_clock()
    notices = [
        (plan.account_id, notice.kind, format_time(notice.at), _notice_state(plan.notices, i, now))
        for plan in plans
        for i, notice in enumerate(plan.notices)
    ]
    if notices:
        print()
        print("Release notices (release_scheduled announcements, R10):")
        print(_table(("ACCOUNT", "NOTICE", "AT", "STATE"), notices))
    evidence = [(plan.account_id, plan.evidence) for plan in plans if plan.evidence]
    if evidence:  # R10: the notice on record a release rests on, or what is missing
        print()
        print(_table(("ACCOUNT", "EVIDENCE"), evidence))
    print()
    print(continuity)  # R10: a store discontinuity pauses every release
    return 0


def _notice_state(notices: Sequence[Any], i: int, now: Millis) -> str:
    """sent; scheduled (in the future); due now (the latest one whose time
    has come: sent on the next tick); or skipped (a later one superseded it:
    only the latest notice due is announced)."""
    notice = notices[i]
    if notice.sent:
        return "sent"
    if notice.at > now:
        return f"scheduled ({render.relative(notice.at, now)})"
    later_due = any(n.at <= now for n in notices[i + 1 :])
    return "skipped (superseded by a later notice)" if later_due else "due now"


# -- commands on a sidecar ----------------------------------------------------


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    # The token alone, or a line of the sidecar's own token file.
    token = token_to_send(readable_text_file(Path(path), "--token-file"))
    if token is None:
        raise CommandError(f"--token-file {path}: holds no token")
    return token


def _client(args: argparse.Namespace) -> GuardClient:
    from lcic_guard_client import GuardClient, TlsConfig

    if bool(args.tls_cert) != bool(args.tls_key):
        raise CommandError("--tls-cert and --tls-key go together (mutual TLS)")
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = TlsConfig(
            root_certificates=_read_pem(args.tls_ca, "--tls-ca"),
            certificate_chain=_read_pem(args.tls_cert, "--tls-cert"),
            private_key=_read_pem(args.tls_key, "--tls-key"),
        )
    # No retries: without them a call does not wait for a sidecar that cannot
    # be reached, so a person hears at once that nothing is listening.
    return GuardClient(
        args.target, timeout=5.0, retries=0, tls=tls, bearer_token=_read_token(args.token_file)
    )


def _ask(guard: GuardClient, kind: str, args: argparse.Namespace) -> pb.Decision:
    if kind == "enter" and not args.room:
        raise CommandError("--room is required for an enter check")
    if kind == "create":
        d = guard.can_create_classroom(args.app_id, room_id=args.room)
    elif kind == "enter":
        d = guard.can_enter_classroom(args.app_id, args.room)
    else:
        d = guard.can_access_recording(args.app_id, args.recording, room_id=args.room)
    return d.to_proto()  # type: ignore[no-any-return]


def _rpc_error(exc: GuardError, target: str, token_file: str | None = None) -> CommandError:
    code = exc.code
    details = exc.details
    low = details.lower()
    if code == "UNAVAILABLE" and (
        "failed to connect" in low or "dns resolution" in low or "connection refused" in low
    ):
        if "handshake" in low or "ssl" in low or "tls" in low:
            return CommandError(
                f"cannot reach the sidecar at {target} over TLS (the handshake failed); "
                "check --tls-ca, --tls-cert and --tls-key, or leave them out for a sidecar "
                "without TLS"
            )
        return CommandError(
            f"cannot reach the sidecar at {target} — is `lcic-guard serve` running? "
            "(--target or LCIC_GUARD_TARGET names it)"
        )
    if code == "UNAUTHENTICATED":
        if token_file:
            return CommandError(
                f"the sidecar at {target} refused the token in {token_file} ({details}); "
                "is it one of the sidecar's --auth-token-file tokens?"
            )
        return CommandError(
            f"the sidecar at {target} wants a bearer token ({details}); pass --token-file "
            "(or LCIC_GUARD_TOKEN_FILE)"
        )
    if code == "PERMISSION_DENIED":
        return CommandError(f"the sidecar at {target} refused the call: {details}")
    if code == "DEADLINE_EXCEEDED":
        return CommandError(
            f"the sidecar at {target} did not answer in time; is the address right, and is "
            "it running and not overloaded?"
        )
    if code in ("INVALID_ARGUMENT", "NOT_FOUND"):
        return CommandError(details)
    return CommandError(f"the sidecar at {target} answered {code}: {details}")


def decision_line(d: pb.Decision, now: Millis) -> str:
    """One line, like ``DENIED · ACCOUNT_OVERDUE · release in 58d 3h — Top up …``."""
    from lcic.guard.v1 import enforcement_pb2 as pb

    verdict = "ALLOWED" if d.allowed else "DENIED"
    if d.shadow:
        verdict = "ALLOWED (shadow mode: enforcement would deny)"
    parts = [verdict, render.reason_name(d.reason)]
    if d.HasField("protected_until"):
        parts.append(f"protected until {format_time(d.protected_until.ToMilliseconds())}")
    elif d.HasField("grace_ends_at") and d.allowed:
        parts.append(f"grace ends {render.relative(d.grace_ends_at.ToMilliseconds(), now)}")
    if d.HasField("release_at"):
        at = d.release_at.ToMilliseconds()
        done = d.reason == pb.DECISION_REASON_RESOURCES_RELEASED
        parts.append(f"{'released' if done else 'release'} {render.relative(at, now)}")
    if d.degraded:
        parts.append("degraded (no fresh status)")
    line = " · ".join(parts)
    return f"{line} — {d.message}" if d.message else line


def _check(args: argparse.Namespace) -> int:
    with _client(args) as guard:
        d = _ask(guard, args.kind, args)
    if args.json:
        print(json.dumps(render.check_json(args.kind, args.app_id, d), indent=2))
    else:
        print(decision_line(d, wall_clock()))
    return 0 if d.allowed else 1


def _status(args: argparse.Namespace) -> int:
    with _client(args) as guard:
        st = guard.get_application_status(args.app_id).to_proto()
    if args.json:
        print(json.dumps(render.to_json(st), indent=2))
    else:
        print(render.render_status(st, wall_clock()))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from lcic_guard_client import NotFound, SidecarUnavailable

    with _client(args) as guard:
        d = _ask(guard, args.check, args)
        try:
            st = guard.get_application_status(args.app_id).to_proto()
        except (NotFound, SidecarUnavailable) as exc:
            print(render.render_decision(args.check, args.app_id, d, wall_clock()))
            if isinstance(exc, SidecarUnavailable):
                # The check was still answered (R13): show that answer, and why
                # nothing more can be said now.
                print(
                    f"\nThe status record cannot be read now ({exc.details}): the answer "
                    "above is the sidecar's own without it."
                )
            return 0 if d.allowed else 1
    print(render.render_explain(args.check, d, st, wall_clock()))
    return 0 if d.allowed else 1


def _datetime(ms: Millis) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


def _preview(args: argparse.Namespace) -> int:

    now = wall_clock()
    try:
        at = render.parse_at(args.at, now, "--at", future=True)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(str(exc)) from None
    with _client(args) as guard:
        preview = guard.preview_application(args.app_id, _datetime(at), room_id=args.room)
    resp: pb.PreviewApplicationResponse = preview.to_proto()
    if resp.at.ToMilliseconds() > at:
        # The sidecar answers a time before its own now as of now: say so.
        print(
            f"note: --at {args.at} is before the sidecar's current time: these are the answers now",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(render.to_json(resp), indent=2))
    else:
        print(render.render_preview(resp, now))
    return 0


OVERRIDE_ACTIONS: Final = ("extend-grace", "hold-release", "clear-hold")


def _override(args: argparse.Namespace) -> int:
    from lcic_guard_client import OverrideKind

    kind = {
        "extend-grace": OverrideKind.EXTEND_GRACE,
        "hold-release": OverrideKind.HOLD_RELEASE,
        "clear-hold": OverrideKind.CLEAR_HOLD,
    }[args.action]
    until: datetime.datetime | None = None
    if args.action == "extend-grace":
        if not args.until:
            raise CommandError("--until is required for extend-grace")
        try:
            until = _datetime(render.parse_at(args.until, wall_clock(), "--until", future=True))
        except argparse.ArgumentTypeError as exc:
            raise CommandError(str(exc)) from None
    elif args.until:
        raise CommandError(f"--until is only for extend-grace, not {args.action}")
    with _client(args) as guard:
        applied = guard.apply_override(args.account_id, kind, args.reason, until=until)
    o: pb.Override = applied.to_proto()
    if args.json:
        print(json.dumps(render.to_json(o), indent=2))
    else:
        till = f" until {format_time(o.until.ToMilliseconds())}" if o.HasField("until") else ""
        print(
            f"recorded {args.action} of account {o.account_id}{till} by {o.actor} "
            f"(event {o.event_id}); the reconciler applies it when it reads the billing feed"
        )
    return 0


def _audit(args: argparse.Namespace) -> int:
    from lcic.guard.v1 import enforcement_pb2 as pb

    with _client(args) as guard:
        overrides = guard.list_overrides(args.account_id)
    resp = pb.ListOverridesResponse(overrides=[o.to_proto() for o in overrides])
    if args.json:
        print(json.dumps(render.audit_json(args.account_id, resp), indent=2))
        return 0
    if not resp.overrides:
        print(f"no override recorded for account {args.account_id}")
        return 0

    def when(o: pb.Override, name: str) -> str:
        has = o.HasField(name)  # type: ignore[arg-type]
        return format_time(getattr(o, name).ToMilliseconds()) if has else "-"

    rows = [
        (
            when(o, "occurred_at"),
            when(o, "recorded_at"),
            pb.OverrideKind.Name(o.kind).removeprefix("OVERRIDE_KIND_"),
            o.actor,
            when(o, "until"),
            o.reason,
            o.effect,
        )
        for o in resp.overrides
    ]
    print(_table(("MADE", "RECORDED", "KIND", "ACTOR", "UNTIL", "REASON", "EFFECT"), rows))
    return 0


# -- the command ----------------------------------------------------------------


def _attach_dash_values(argv: list[str]) -> list[str]:
    """``--at -1h`` as ``--at=-1h`` (and ``--until``): argparse takes a value
    starting with a dash for a flag."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in ("--at", "--until") and value[:1] == "-" and value[1:2].isdigit():
            out.append(f"{argv[i]}={value}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _name(args: argparse.Namespace) -> str:
    sub = getattr(args, "events_command", None)
    return f"{args.command} {sub}" if sub else str(args.command)


def _run(args: argparse.Namespace) -> int:
    if args.command == "probe":
        return _probe(args)
    if args.command == "sample-events":
        sys.stdout.write(sample_jsonl(wall_clock()))
        return 0
    if args.command == "events" and args.events_command == "new":
        return _events_new(args)
    if args.command in ("check", "status", "explain", "preview", "override", "audit"):
        if retired := retired_tls_variable(serving=False):
            raise CommandError(retired)
        from lcic_guard_client import GuardError

        run: dict[str, Callable[[argparse.Namespace], int]] = {
            "check": _check,
            "status": _status,
            "explain": _explain,
            "preview": _preview,
            "override": _override,
            "audit": _audit,
        }
        try:
            return run[args.command](args)
        except GuardError as exc:
            raise _rpc_error(exc, args.target, args.token_file) from exc
    from lcic_guard import runner  # imports grpc: see main()

    try:
        settings = settings_from(args)
    except SystemExit as exc:  # a combination of flags that does not go together
        if isinstance(exc.code, str):
            raise CommandError(exc.code) from None
        raise
    runner.configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        return asyncio.run(_until_signal(lambda stop: runner.serve(settings, stop=stop)))
    if args.command == "reconcile":
        _needs_redis(settings, "the reconciler")
        return asyncio.run(_until_signal(lambda stop: runner.reconcile(settings, stop=stop)))
    if args.command == "events":
        return asyncio.run(_publish(settings, args.file, args.skip_invalid))
    return asyncio.run(_release_plan(settings))


async def _until_signal(run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    """Run a server until SIGINT or SIGTERM: exit status 130 after Ctrl-C (as
    a shell reports an interrupted command), 0 after SIGTERM (a normal stop
    by a service manager or an orchestrator)."""
    stop = asyncio.Event()
    got: list[int] = []

    def on(sig: int) -> None:
        got.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on, sig)
    await run(stop)
    return 130 if signal.SIGINT in got else 0


def _fail(name: str, message: str, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exc()
    print(f"lcic-guard {name}: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's own log lines (a failed TLS handshake at INFO) would come before
    # the one line that explains the failure; its errors still show. Read
    # when grpc is first imported: this module imports it only lazily.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    argv = _attach_dash_values(list(sys.argv[1:] if argv is None else argv))
    try:
        parser = build_parser()
    except SystemExit as exc:  # a bad LCIC_GUARD_* value
        print(f"lcic-guard: {exc.code}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    name, debug = _name(args), bool(args.debug or args.debug_first)
    try:
        return _run(args)
    except CommandError as exc:
        return _fail(name, str(exc), debug, 2)
    except RedisServerMissing as exc:
        return _fail(name, str(exc), debug, 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lcic-guard status … | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if isinstance(exc, StoreError):
            url = redact_url(getattr(args, "redis_url", None) or "")
            return _fail(name, f"Redis {url} failed: {type(exc).__name__}: {exc}", debug, 2)
        text = (
            f"unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
        )
        return _fail(name, text, debug, 3)


if __name__ == "__main__":
    raise SystemExit(main())
