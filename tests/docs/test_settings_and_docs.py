"""Settings from flags and environment; documents that must not drift."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lcic_guard.cli import build_parser
from lcic_guard.config import Settings
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, Check, format_duration
from lcic_guard.flags import (
    METRICS,
    POLICY,
    POLICY_R13,
    RECONCILE,
    SERVE,
    STORE,
    groups_of,
    parse_duration,
    settings_from,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("5ms", 5),
        ("30s", 30_000),
        ("5m", 5 * MINUTE),
        ("24h", 24 * HOUR),
        ("60d", 60 * DAY),
        ("1.5h", 90 * MINUTE),
    ],
)
def test_durations_take_a_unit(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "1 week", "1e3s"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="use a number and a unit"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=400 * DAY))
def test_a_formatted_duration_parses_back(ms: int) -> None:
    assert parse_duration(format_duration(ms)) == ms


def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("LCIC_GUARD_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["reconcile"], ["release-plan"], ["events", "publish", "-"]],
)
def test_the_flags_defaults_are_the_settings_defaults(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each default is written once: a command given no flags builds exactly
    the default settings (the heartbeat bound once differed: 0 against 30 s)."""
    _no_environment(monkeypatch)
    assert settings_from(build_parser().parse_args(argv)) == Settings()
    assert Settings().max_heartbeat_age_ms == 30_000


def test_settings_are_frozen() -> None:
    s = settings_from(build_parser().parse_args(["serve", "--grace", "2h"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.listen = "0.0.0.0:1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.policy.grace_ms = 0  # type: ignore[misc]
    assert s.policy.grace_ms == 2 * HOUR


def test_each_command_says_which_settings_it_has() -> None:
    """No probing of flags: the parser records the groups it was given."""
    parse = build_parser().parse_args
    assert groups_of(parse(["serve"])) == {STORE, SERVE, POLICY, POLICY_R13, RECONCILE, METRICS}
    assert groups_of(parse(["reconcile"])) == {STORE, POLICY, RECONCILE, METRICS}
    assert groups_of(parse(["release-plan"])) == {STORE, POLICY, RECONCILE}
    assert groups_of(parse(["events", "publish", "-"])) == {STORE}
    assert groups_of(parse(["status", "app-1"])) == frozenset()


def test_a_value_given_is_used_even_when_falsy() -> None:
    """Once ``0`` read as "not given" and became the default; now it is the
    value, checked like any other."""
    with pytest.raises(SystemExit, match="--max-watch-streams must be at least 1"):
        settings_from(build_parser().parse_args(["serve", "--max-watch-streams", "0"]))
    s = settings_from(build_parser().parse_args(["serve", "--store-down-after", "0ms"]))
    assert s.store_down_ms == 0  # the checker never waits less than --redis-timeout


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LCIC_GUARD_GRACE", "2h")
    monkeypatch.setenv("LCIC_GUARD_FAILURE_MODE_CREATE", "closed")
    monkeypatch.setenv("LCIC_GUARD_LISTEN", "0.0.0.0:7000")
    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:7001", "--overrun", "15m"])
    s = settings_from(args)
    assert s.policy.grace_ms == 2 * HOUR  # from the environment
    assert s.policy.overrun_ms == 15 * MINUTE  # from the flag
    assert s.listen == "127.0.0.1:7001"  # the flag wins over the environment
    assert Check.CREATE_CLASSROOM not in s.policy.fail_open
    assert Check.ACCESS_RECORDING in s.policy.fail_open


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LCIC_GUARD_STALE_BOUND", "soon")
    with pytest.raises(SystemExit, match="LCIC_GUARD_STALE_BOUND"):
        build_parser()


def test_configuration_doc_lists_every_flag() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_config_doc", ROOT / "scripts/gen_config_doc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
    assert committed == module.render(), (
        "docs/configuration.md is out of date: run scripts/generate"
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert "scripts/run" in readme and "scripts/test" in readme
    assert "exec scripts/test" in ci
