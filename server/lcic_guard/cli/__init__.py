"""The ``lcic-guard`` command: the top-level parser, the table of commands
and the one place a failure becomes a line and an exit status.

One module per group of commands: :mod:`.serve` (serve, reconcile, probe),
:mod:`.events` (events publish/new, sample-events), :mod:`.releases`
(release-plan), :mod:`.checks` (check, status, explain, preview) and
:mod:`.support` (override, audit). Those that ask a sidecar use only the
client's public API; everything printed about an answer is
:mod:`lcic_guard.render`'s.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata
from typing import Final, NoReturn

from lcic_guard.cli import checks, events, releases, serve, support
from lcic_guard.cli._common import BROKEN_PIPE, EXIT_CODES, INTERRUPTED, USAGE, Command, failure
from lcic_guard.flags import add_debug_flag

__all__ = ["build_parser", "main"]

DESCRIPTION: Final = """\
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

COMMANDS: Final[dict[str, Command]] = {
    "serve": serve.serve,
    "reconcile": serve.reconcile,
    "events": events.events,
    "release-plan": releases.release_plan,
    "check": checks.check,
    "status": checks.status,
    "explain": checks.explain,
    "preview": checks.preview,
    "override": support.override,
    "audit": support.audit,
    "sample-events": events.sample_events,
    "probe": serve.probe,
}


class _Parser(argparse.ArgumentParser):
    """A command's parser: a usage error is one line naming the command (a
    flag it does not know included), not the top-level usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            USAGE, f"{self.prog}: {message}{_did_you_mean(message)} (see `{self.prog} --help`)\n"
        )

    # Justified: argparse's stubs overload parse_known_args by namespace
    # type; this override keeps the one form the command calls.
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
    # In the order of DESCRIPTION (and of COMMANDS).
    serve.add_serve_parser(sub)
    serve.add_reconcile_parser(sub)
    events.add_events_parser(sub)
    releases.add_parser(sub)
    checks.add_parsers(sub)
    support.add_parsers(sub)
    events.add_sample_events_parser(sub)
    serve.add_probe_parser(sub)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere, building the parser too: quiet, 130
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    # gRPC's own log lines (a failed TLS handshake at INFO) would come before
    # the one line that explains the failure; its errors still show. Read
    # when grpc is first imported: this package imports it only lazily.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    argv = _attach_dash_values(list(sys.argv[1:] if argv is None else argv))
    try:
        parser = build_parser()
    except SystemExit as exc:  # a bad LCIC_GUARD_* value
        print(f"lcic-guard: {exc.code}", file=sys.stderr)
        return USAGE
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:  # `lcic-guard status … | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except Exception as exc:
        message, code = failure(exc, args)
        if args.debug or args.debug_first:
            traceback.print_exc()
        print(f"lcic-guard {_name(args)}: {message}", file=sys.stderr)
        return code
