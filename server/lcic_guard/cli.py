"""The ``lcic-guard`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lcic_guard import runner
from lcic_guard.checker import wall_clock
from lcic_guard.facts import InvalidEvent, format_time, parse_event
from lcic_guard.sample import sample_jsonl
from lcic_guard.settings import (
    Settings,
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
  status       show a running sidecar's status record for an application.
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

    p = sub.add_parser(
        "reconcile",
        help="run the reconciler",
        description="Run the reconciler: consume the billing stream, keep "
        "statuses, run deadlines and releases.",
    )
    add_store_flags(p)
    add_policy_flags(p)
    add_reconcile_flags(p, embedded=False)

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
    print(json_format.MessageToJson(st, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sample-events":
        sys.stdout.write(sample_jsonl(wall_clock()))
        return 0
    if args.command in ("check", "status"):
        import grpc

        try:
            return _check(args) if args.command == "check" else _status(args)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    settings = settings_from(args)
    runner.configure_logging(settings.log_level)
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
