"""Settings from flags and environment; documents that must not drift."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from lcic_guard.cli import build_parser
from lcic_guard.domain.policy import DAY, HOUR, MINUTE, Check
from lcic_guard.flags import parse_duration, settings_from

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
