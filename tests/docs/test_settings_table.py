"""The table of settings: each row's flag, environment variable, field and
documented line agree, for every command that has it.

The document is the starting point: each line of docs/configuration.md (as
rendered now) names a flag, a variable and a default for the commands of its
section, and each is checked against what those commands' parsers do.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.cli import build_parser
from lcic_guard.config import Settings
from lcic_guard.domain.policy import DAY
from lcic_guard.flags import (
    INTERNAL,
    SETTINGS,
    Setting,
    documented,
    field_value,
    settings_from,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENS = "svc-a:report:tok-example-1\n"

# What each command needs besides settings flags to parse at all.
ARGUMENTS = {
    "check": ["create", "app-1"],
    "status": ["app-1"],
    "explain": ["app-1", "--check", "create"],
    "preview": ["app-1", "--at", "+1h"],
    "override": ["hold-release", "acct-1", "--reason", "test"],
    "audit": ["acct-1"],
    "events publish": ["-"],
}


def _gen_config_doc() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_doc", ROOT / "scripts/gen_config_doc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Line:
    command: str
    flag: str
    env: str
    default: str | None


def _document_lines() -> list[Line]:
    """Every settings line of the rendered document, once per command its
    section is for."""
    out: list[Line] = []
    commands: list[str] = []
    for text in _gen_config_doc().render().splitlines():
        heading = re.fullmatch(r"## `lcic-guard (.*)`", text)
        if heading:
            commands = heading.group(1).split("`, `")
            continue
        row = re.match(r"\| `(--[a-z0-9-]+)` \| `(LCIC_GUARD_[A-Z0-9_]+)` \| (—|`[^`]*`) \|", text)
        if row:
            default = None if row.group(3) == "—" else row.group(3).strip("`")
            out += [Line(c, row.group(1), row.group(2), default) for c in commands]
    return out


LINES = _document_lines()


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's own parser, by name (``events publish`` included)."""

    def subs(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield name, sub
                    yield from ((f"{name} {n}", s) for n, s in subs(sub))

    return dict(subs(build_parser()))


def _row(line: Line) -> Setting:
    rows = [r for r in SETTINGS if r.flag == line.flag and r.env == line.env]
    assert len(rows) == 1, f"{line}: no row of the table has this flag and variable"
    return rows[0]


def _example(row: Setting, tmp: Path) -> str:
    """A valid value for the row that is not its default."""
    default = row.default_text
    name = row.kind.name
    if row.choices:
        return next(c for c in row.choices if c != default)
    examples = {
        "duration": "17m",
        "durations": "2d,3h",
        "int": "7",
        "bool": "false" if default == "True" else "true",
        "switch": "true",
        "path": "events-example.jsonl",
        "address": "127.0.0.1:7777",
        "address or empty": "127.0.0.1:9999",
        "Redis URL": "redis://example:6390/3",
        "checks": "enter",
        "names": "svc-a,svc-b=admin",
        "failure mode": "closed" if default == "open" else "open",
    }
    if name == "text":  # a token file that reads: it may be --auth-token-file's
        path = tmp / "example-tokens"
        path.write_text(TOKENS, encoding="utf-8")
        return str(path)
    assert name in examples, f"give the test an example value of the kind {name!r}"
    return examples[name]


def _base(command: str, row: Setting, tmp: Path) -> list[str]:
    """Flags under which every other row's value is accepted (serve checks
    some together), without the row under test."""
    argv = ARGUMENTS.get(command, [])
    if command != "serve":
        return argv
    tokens = tmp / "tokens"
    tokens.write_text(TOKENS, encoding="utf-8")
    given = {"--tls-cert": "c.pem", "--tls-key": "k.pem", "--tls-client-ca": "ca.pem"}
    given["--auth-token-file"] = str(tokens)
    return argv + [x for flag, value in given.items() if flag != row.flag for x in (flag, value)]


def _parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        for name in os.environ:
            if name.startswith("LCIC_GUARD_"):
                m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return build_parser().parse_args(argv)


def test_the_document_has_a_line_for_every_row() -> None:
    documented_rows = {_row(line) for line in LINES}
    missing = [row.flag for row in SETTINGS if row not in documented_rows]
    assert not missing, f"rows not in docs/configuration.md: {missing}"


def test_each_command_documents_exactly_its_own_flags() -> None:
    parsers = _parsers()
    by_command: dict[str, list[tuple[str, str]]] = {}
    for line in LINES:
        by_command.setdefault(line.command, []).append((line.flag, line.env))
    for command, lines in by_command.items():
        has = [(row.flag, row.env) for row, _ in documented(parsers[command])]
        assert lines == has, command
    # Every command with settings flags of its own (not --debug only) is documented.
    for command, parser in parsers.items():
        if any(row.group != "debug" for row, _ in documented(parser)):
            assert command in by_command, command


@pytest.mark.parametrize(
    "line", [x for x in LINES if x.default is not None], ids=lambda x: f"{x.command} {x.flag}"
)
def test_the_documented_default_is_the_default_parsed(
    line: Line, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default shown is what the command takes when given nothing, and
    what it takes when given the shown text (no unit misread on the way)."""
    row = _row(line)
    argv = [*line.command.split(), *ARGUMENTS.get(line.command, [])]
    untold = _parse(argv, {}, monkeypatch)
    told = _parse(argv, {line.env: line.default} if line.default else {}, monkeypatch)
    assert getattr(untold, row.dest) == getattr(told, row.dest)
    if row.field is not None:
        assert settings_from(untold) == settings_from(told) == Settings()
        before = field_value(Settings(), row.field)
        assert row.kind.land(before, getattr(told, row.dest)) == before


@pytest.mark.parametrize("line", LINES, ids=lambda x: f"{x.command} {x.flag}")
def test_the_flag_and_the_variable_of_a_line_set_the_same_thing(
    line: Line, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a value not the default, the documented flag, each alias and the
    documented variable all give the same settings, and the value lands in
    the row's field (or, with none, the attribute the command reads)."""
    row = _row(line)
    text = _example(row, tmp_path)
    argv = [*line.command.split(), *_base(line.command, row, tmp_path)]
    as_flag = [line.flag] if row.kind.switch else [line.flag, text]
    by_flag = _parse(argv + as_flag, {}, monkeypatch)
    by_env = _parse(argv, {line.env: text}, monkeypatch)
    assert getattr(by_flag, row.dest) == getattr(by_env, row.dest)
    for alias in row.aliases:
        by_alias = _parse([*argv, alias, text], {}, monkeypatch)
        assert getattr(by_alias, row.dest) == getattr(by_flag, row.dest)
    default = _parse(argv, {}, monkeypatch)
    assert getattr(by_flag, row.dest) != getattr(default, row.dest), "the example is the default"
    if row.field is None:
        return
    s = settings_from(by_flag)
    assert s == settings_from(by_env)
    assert field_value(s, row.field) != field_value(Settings(), row.field)
    assert field_value(s, row.field) == row.kind.land(
        field_value(Settings(), row.field), row.kind.parse(text)
    )


_DURATION_ROWS = [r for r in SETTINGS if r.kind.name == "duration" and r.field is not None]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(_DURATION_ROWS), st.integers(min_value=1, max_value=400 * DAY))
def test_any_duration_reads_the_same_from_flag_and_variable(row: Setting, ms: int) -> None:
    from lcic_guard.domain.policy import format_duration

    command = "serve"  # has every duration row
    text = format_duration(ms)
    saved = {k: v for k, v in os.environ.items() if k.startswith("LCIC_GUARD_")}
    try:
        for k in saved:
            del os.environ[k]
        by_flag = settings_from(build_parser().parse_args([command, row.flag, text]))
        os.environ[row.env] = text
        by_env = settings_from(build_parser().parse_args([command]))
    finally:
        os.environ.pop(row.env, None)
        os.environ.update(saved)
    assert row.field is not None
    assert by_flag == by_env
    assert field_value(by_flag, row.field) == ms


def _leaves(obj: Any, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_field_of_the_settings_tree_is_a_rows_or_internal() -> None:
    """A field added without a row (or a row naming no field) fails here:
    no flag would reach it, and its default would be nobody's."""
    leaves = set(_leaves(Settings()))
    fields = {row.field for row in SETTINGS if row.field is not None}
    assert fields <= leaves, fields - leaves
    assert not fields & INTERNAL
    assert leaves == fields | INTERNAL, leaves - fields - INTERNAL


def test_each_variable_is_one_rows() -> None:
    envs = [row.env for row in SETTINGS]
    assert len(envs) == len(set(envs))
    for row in SETTINGS:
        assert row.env == "LCIC_GUARD_" + row.flag[2:].upper().replace("-", "_")
