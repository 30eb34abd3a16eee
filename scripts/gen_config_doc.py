"""Write docs/configuration.md from the command's own flag definitions.

Usage: python scripts/gen_config_doc.py [OUT]

One part of scripts/generate, which regenerates everything generated.

A test compares the committed file with a fresh rendering, so the document
cannot drift from the flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lcic_guard.cli import build_parser
from lcic_guard.flags import ENV_PREFIX

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("serve", "reconcile", "events", "release-plan", "check")
# The client commands share their flags: one table for the four.
TITLES = {"check": "check`, `status`, `explain`, `preview"}

HEADER = """# Configuration

Every flag can also be given as an environment variable: `--some-flag` is
`LCIC_GUARD_SOME_FLAG`. A flag on the command line wins over the environment,
which wins over the default. Durations take a unit: `500ms`, `30s`, `5m`,
`24h`, `60d`; values shown in milliseconds are the defaults so expressed.

This file is generated from the flag definitions by `scripts/generate`
(do not edit it by hand).
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if not action.option_strings or "[env " not in (action.help or ""):
            continue  # a request's own arguments (--room, --json) are not settings
        flag = action.option_strings[-1]
        env = ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")
        default = action.default
        shown = "—" if default is None else f"`{default}`"
        text = (action.help or "").split(" [env ")[0].replace("|", "\\|")
        rows.append(f"| `{flag}` | `{env}` | {shown} | {text} |")
    return rows


def render() -> str:
    parser = build_parser()
    subs = _subparsers(parser)
    out = [HEADER]
    for name in COMMANDS:
        sub = subs[name]
        if name == "events":
            sub = _subparsers(sub)["publish"]
            name = "events publish"
        out.append(f"\n## `lcic-guard {TITLES.get(name, name)}`\n")
        if name == "check":
            out.append("How the client commands reach a sidecar.\n")
        elif sub.description:
            out.append(sub.description.strip() + "\n")
        out.append("| flag | environment | default | meaning |")
        out.append("|---|---|---|---|")
        out.extend(_rows(sub))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "configuration.md"
    target.write_text(render(), encoding="utf-8")
