"""``events publish``, ``events new`` and ``sample-events``: billing events,
made by hand or read from a file, validated before anything reaches the
billing stream."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from lcic_guard.cli._common import needs_redis, settings, time_flag
from lcic_guard.config import Settings
from lcic_guard.demo import sample_jsonl
from lcic_guard.domain.facts import InvalidEvent, parse_event_json
from lcic_guard.domain.time import format_time, wall_clock
from lcic_guard.errors import CommandError, readable_text_file
from lcic_guard.flags import add_debug_flag, add_store_flags
from lcic_guard.store.billing_stream import publish_events
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import BILLING_STREAM
from lcic_guard.store.status import Store


def add_events_parser(sub: Any) -> None:
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


def add_sample_events_parser(sub: Any) -> None:
    p = sub.add_parser("sample-events", help="print the sample billing events")
    add_debug_flag(p)


def sample_events(args: argparse.Namespace) -> int:
    sys.stdout.write(sample_jsonl(wall_clock()))
    return 0


def events(args: argparse.Namespace) -> int:
    if args.events_command == "new":
        return _new(args)
    return asyncio.run(_publish(settings(args), args.file, args.skip_invalid))


def _new(args: argparse.Namespace) -> int:
    now = wall_clock()
    at = time_flag(args.at, "--at", now, future=False) if args.at else now
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


def _read_events(path: Path) -> str:
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("standard input: not UTF-8 text; give JSON lines") from None
    return readable_text_file(path, "")


def _valid_lines(path: Path, text: str) -> tuple[list[str], int]:
    """The valid events of ``text``, and how many lines were invalid (each
    named on standard error)."""
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
    return valid, invalid


async def _publish(settings: Settings, path: Path, skip_invalid: bool) -> int:
    from lcic_guard import runner

    url = needs_redis(settings, "events publish")
    valid, invalid = _valid_lines(path, _read_events(path))
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
