"""docs/design.md's table of Redis keys names every key the store uses, and
every kind of member of the deadlines set: an operator reading Redis, or a
newcomer adding a key, finds each one there."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

from lcic_guard.store import keys

ROOT = Path(__file__).resolve().parents[2]


def key_table() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    start = text.index("| key | type | slot | what |")
    end = text.index("\n\n", start)
    return text[start:end]


def table_keys() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)`", key_table(), flags=re.M))


def test_every_constant_key_is_in_the_table() -> None:
    constants = {
        value
        for name, value in vars(keys).items()
        if name.isupper() and isinstance(value, str) and value.startswith("lcic:")
    }
    assert constants, "no key constants found"
    documented = table_keys()
    for key in sorted(constants):
        if "*" in key:  # a SCAN pattern of status_key, not a key
            continue
        assert any(row == key or row.startswith(key) for row in documented), key


def shape(key: str) -> str:
    """A key with each hash tag (``{APP}``, ``{NNNN}``, ``{acct-1}``) as ``{X}``."""
    return re.sub(r"\{[^}]*\}", "{X}", key)


def sample_args(fn: Callable[..., str]) -> list[object]:
    """Arguments for a key function: a number for each int, a kind of key
    for ``kind``, an id for any other text."""
    params = inspect.signature(fn).parameters.values()
    return [
        3 if p.annotation in (int, "int") else "status" if p.name == "kind" else "some-id"
        for p in params
    ]


def as_pattern(row: str) -> re.Pattern[str]:
    """A documented key as a pattern: its hash tag and its placeholders
    (``APP``, ``CC``, ``ACCOUNT``) stand for any value."""
    parts = re.split(r"(\{[^}]*\}|\b[A-Z]{2,}\b)", row)
    return re.compile(
        "".join(
            "[^:]+" if (p.startswith("{") or (p.isupper() and len(p) > 1)) else re.escape(p)
            for p in parts
        )
        + "$"
    )


def test_every_key_function_is_in_the_table() -> None:
    makers = [
        fn
        for name, fn in vars(keys).items()
        if name.endswith("_key") and inspect.isfunction(fn) and fn.__module__ == keys.__name__
    ]
    assert len(makers) >= 6
    documented = [as_pattern(row) for row in table_keys()]
    for fn in makers:
        key = fn(*sample_args(fn))
        assert any(p.match(key) for p in documented), (fn.__name__, key)


def test_every_kind_of_deadline_is_in_the_table() -> None:
    """Each kind is listed in the row of the set that holds it: releases in
    the leader's set, the others in the shards."""
    rows = {
        shape(key): line
        for line in key_table().splitlines()
        if (key := next(iter(re.findall(r"^\| `([^`]+)`", line)), None)) is not None
    }
    kinds = [
        fn("X")
        for name, fn in vars(keys).items()
        if name.endswith("_deadline") and inspect.isfunction(fn)
    ]
    assert len(kinds) >= 4
    for member in kinds:
        row = rows[shape(keys.deadline_key(member))]
        assert f"`{member.split(':')[0]}:" in row, member
    assert "release:" in rows[keys.DEADLINES]
    assert "release:" not in rows[shape(keys.shard_deadlines(0))]


def test_the_number_of_deadline_shards_is_the_one_documented() -> None:
    row = next(line for line in key_table().splitlines() if "`lcic:guard:deadlines:{dNN}`" in line)
    assert f"{keys.DEADLINE_SHARDS} deadline shards" in row
    assert f"`{keys.DEADLINE_SHARDS - 1:02d}`" in row
