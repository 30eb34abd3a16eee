"""The ``lcic-guard`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lcic_guard import report, runner
from lcic_guard.checker import wall_clock
from lcic_guard.facts import InvalidEvent, format_time, parse_event
from lcic_guard.sample import sample_jsonl
from lcic_guard.settings import (
    Settings,
    add_metrics_flags,
    add_policy_flags,
    add_reconcile_flags,
    add_serve_flags,
    add_store_flags,
    settings_from,
)
from lcic_guard.store import BILLING_STREAM, Store, connect

DESCRIPTION = """\
lcic-guard enforces the classroom platform's billing policy.

  serve        the sidecar: answers CanCreateClassroom, CanEnterClassroom and
               CanAccessRecording over gRPC. Without --redis-url it is the
               embedded default: its own private Redis, the reconciler and
               sample billing data, ready to try.
  reconcile    the reconciler: turns billing events into statuses, runs the
               deadlines and releases resources when that is certain.
  events       publish a file of billing events onto the billing stream.
  release-plan list the releases (R10) scheduled and whether they could run now.
  check        ask a running sidecar one question, from the shell.
  status       show a running sidecar's status record for an application: its
               reasons, the billing events behind them, the deadlines ahead and
               what the customer can do (--json for the raw record).
  explain      one check's answer for an application, and why.
  preview      what an application's checks will answer at a later time.
  sample-events print the sample billing events (JSON lines).

Every flag can also be set as LCIC_GUARD_<FLAG> in the environment.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcic-guard",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the sidecar (embedded default without --redis-url)",
        description="Run the gRPC sidecar. Without --redis-url: a private "
        "redis-server, the reconciler and sample billing data.",
    )
    add_store_flags(p)
    add_serve_flags(p)
    add_policy_flags(p)
    add_reconcile_flags(p, embedded=True)
    add_metrics_flags(p)

    p = sub.add_parser(
        "reconcile",
        help="run the reconciler",
        description="Run the reconciler: consume the billing stream, keep "
        "statuses, run deadlines and releases.",
    )
    add_store_flags(p)
    add_policy_flags(p)
    add_reconcile_flags(p, embedded=False)
    add_metrics_flags(p)

    p = sub.add_parser("events", help="publish billing events onto the billing stream")
    ev = p.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    pub = ev.add_parser(
        "publish",
        help="XADD each line of FILE onto the billing stream",
        description="Validate each line of FILE (one JSON event a line) and "
        f"add it to the Redis Stream {BILLING_STREAM}.",
    )
    pub.add_argument("file", type=Path, help="events file, or - for standard input")
    add_store_flags(pub)

    p = sub.add_parser("release-plan", help="list scheduled releases (a dry run)")
    add_store_flags(p)
    add_policy_flags(p)
    add_reconcile_flags(p, embedded=False)

    p = sub.add_parser("check", help="ask a running sidecar one check")
    p.add_argument("kind", choices=["create", "enter", "recording"])
    p.add_argument("app_id")
    p.add_argument("--room", default="", help="room id (required for enter)")
    p.add_argument("--recording", default="rec-1", help="recording id (for recording)")
    p.add_argument("--target", default="127.0.0.1:50051", help="sidecar address")

    p = sub.add_parser("status", help="show an application's status record")
    p.add_argument("app_id")
    p.add_argument("--target", default="127.0.0.1:50051", help="sidecar address")
    p.add_argument("--json", action="store_true", help="print the raw record as JSON")

    p = sub.add_parser(
        "explain",
        help="answer one check for an application and explain why",
        description="Ask a running sidecar one check and print its answer with "
        "the status behind it: every reason, the billing events behind each, the "
        "deadlines ahead and what the customer must do.",
    )
    p.add_argument("app_id")
    p.add_argument("--check", required=True, choices=["create", "enter", "recording"])
    p.add_argument("--room", default="", help="room id (required for --check enter)")
    p.add_argument("--recording", default="rec-1", help="recording id (for recording)")
    p.add_argument("--target", default="127.0.0.1:50051", help="sidecar address")

    p = sub.add_parser(
        "preview",
        help="what an application's checks will answer at a later time",
        description="Ask a running sidecar what the three checks will answer at "
        "TIME if no new billing event arrives (grace ending, a package expiring, "
        "release falling due).",
    )
    p.add_argument("app_id")
    p.add_argument(
        "--at", required=True, help="RFC 3339 time (2026-10-01T12:00:00Z) or +DURATION (+25h)"
    )
    p.add_argument("--room", default="", help="a classroom reported started, for enter")
    p.add_argument("--target", default="127.0.0.1:50051", help="sidecar address")
    p.add_argument("--json", action="store_true", help="print the raw answer as JSON")

    sub.add_parser("sample-events", help="print the sample billing events")
    return parser


async def _publish(settings: Settings, path: Path) -> int:
    text = sys.stdin.read() if str(path) == "-" else await asyncio.to_thread(path.read_text)
    if settings.redis_url is None:
        print("events publish: --redis-url is required", file=sys.stderr)
        return 2
    store = Store(connect(settings.redis_url))
    sent = bad = 0
    try:
        async with store.redis.pipeline(transaction=False) as pipe:
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    parse_event(json.loads(line))
                except (ValueError, InvalidEvent) as exc:
                    # Still published: the reconciler dead-letters it with
                    # the reason, as it would for the billing system.
                    print(f"line {n}: invalid ({exc}); published anyway", file=sys.stderr)
                    bad += 1
                pipe.xadd(BILLING_STREAM, {"event": line.strip()})
                sent += 1
            await pipe.execute()
    finally:
        await store.close()
    print(f"published {sent} events to {BILLING_STREAM} ({bad} invalid)")
    return 0


async def _release_plan(settings: Settings) -> int:
    async with runner.redis_for(settings) as (url, _):
        store = Store(connect(url))
        try:
            rec = runner.build_reconciler(settings, store, None, clock=wall_clock)
            plans = await rec.plan_releases()
        finally:
            await store.close()
    if not plans:
        print("no release scheduled")
    for plan in plans:
        when = format_time(plan.release_at) if plan.release_at else "-"
        verdict = "WOULD RELEASE NOW" if plan.eligible else "not now"
        print(
            f"{plan.account_id}\tapps={','.join(plan.app_ids)}\trelease_at={when}\t"
            f"{verdict}: {plan.why}"
        )
        for notice in plan.notices:  # R10: release_scheduled, sent and due
            state = "sent" if notice.sent else ("due" if notice.at > wall_clock() else "skipped")
            print(f"\tnotice {notice.kind}\t{format_time(notice.at)}\t{state}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from lcic_guard_client import GuardClient

    with GuardClient(args.target, timeout=2.0) as guard:
        if args.kind == "create":
            d = guard.can_create_classroom(args.app_id, room_id=args.room)
        elif args.kind == "enter":
            d = guard.can_enter_classroom(args.app_id, args.room)
        else:
            d = guard.can_access_recording(args.app_id, args.recording, room_id=args.room)
    print(json_format.MessageToJson(d, indent=2))
    return 0 if d.allowed else 1


def _status(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from lcic_guard_client import GuardClient

    with GuardClient(args.target, timeout=2.0) as guard:
        st = guard.get_application_status(args.app_id)
    if args.json:
        print(json_format.MessageToJson(st, indent=2))
    else:
        print(report.render_status(st, wall_clock()))
    return 0


def _explain(args: argparse.Namespace) -> int:
    import grpc
    from lcic_guard_client import GuardClient

    if args.check == "enter" and not args.room:
        print("explain --check enter: --room is required", file=sys.stderr)
        return 2
    with GuardClient(args.target, timeout=2.0) as guard:
        if args.check == "create":
            d = guard.can_create_classroom(args.app_id, room_id=args.room)
        elif args.check == "enter":
            d = guard.can_enter_classroom(args.app_id, args.room)
        else:
            d = guard.can_access_recording(args.app_id, args.recording, room_id=args.room)
        try:
            st = guard.get_application_status(args.app_id)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            print(report.render_decision(args.check, args.app_id, d, wall_clock()))
            return 0 if d.allowed else 1
    print(report.render_explain(args.check, d, st, wall_clock()))
    return 0 if d.allowed else 1


def _preview(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from lcic.guard.v1 import enforcement_pb2 as pb
    from lcic_guard_client import GuardClient

    now = wall_clock()
    try:
        at = report.parse_at(args.at, now)
    except argparse.ArgumentTypeError as exc:
        print(f"preview: --at: {exc}", file=sys.stderr)
        return 2
    req = pb.PreviewApplicationRequest(app_id=args.app_id, room_id=args.room)
    req.at.FromMilliseconds(at)
    with GuardClient(args.target, timeout=2.0) as guard:
        resp: pb.PreviewApplicationResponse = guard.stub.PreviewApplication(req, timeout=2.0)
    if args.json:
        print(json_format.MessageToJson(resp, indent=2))
    else:
        print(report.render_preview(resp, now))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sample-events":
        sys.stdout.write(sample_jsonl(wall_clock()))
        return 0
    if args.command in ("check", "status", "explain", "preview"):
        import grpc

        run = {"check": _check, "status": _status, "explain": _explain, "preview": _preview}
        try:
            return run[args.command](args)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    settings = settings_from(args)
    runner.configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            asyncio.run(runner.serve(settings))
        elif args.command == "reconcile":
            asyncio.run(runner.reconcile(settings))
        elif args.command == "events":
            return asyncio.run(_publish(settings, args.file))
        elif args.command == "release-plan":
            return asyncio.run(_release_plan(settings))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
