"""docs/policy.md maps each rule of the SPEC (R1-R15) to the domain
functions that define it. The table must name only functions that exist,
in the domain, and miss no rule; R6's module must be in it whole, and R6's
durations must be read nowhere but the domain."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest
from lcic_guard.domain import rooms

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "policy.md"
SERVER = ROOT / "server" / "lcic_guard"
HEADING = "## Where each rule lives in the code"


def table() -> dict[str, list[str]]:
    """Rule id -> the names its row gives, in order."""
    text = DOC.read_text(encoding="utf-8")
    assert HEADING in text, f"docs/policy.md has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| R")]
    out: dict[str, list[str]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        rule = re.match(r"R(\d+)\b", cells[0])
        assert rule is not None, row
        assert rule.group(0) not in out, f"{rule.group(0)} has two rows"
        out[rule.group(0)] = re.findall(r"`(lcic_guard\.[\w.]+)`", cells[-1])
    return out


def resolve(name: str) -> object:
    """The object a dotted name denotes: the longest importable module
    prefix, then attributes (a class, then its method)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the name does not exist
        return obj
    raise ModuleNotFoundError(name)


def test_every_rule_has_a_row_with_functions() -> None:
    rows = table()
    assert sorted(rows, key=lambda r: int(r[1:])) == [f"R{n}" for n in range(1, 16)]
    for rule, names in rows.items():
        assert names, f"{rule} names no function"


@pytest.mark.parametrize("name", sorted({n for names in table().values() for n in names}), ids=str)
def test_every_named_function_exists_and_is_in_the_domain(name: str) -> None:
    assert name.startswith("lcic_guard.domain."), f"{name}: rules live in the domain"
    obj = resolve(name)
    assert callable(obj) and not isinstance(obj, ModuleType | type), f"{name} is not a function"


def test_the_r6_row_names_every_function_of_the_rooms_module() -> None:
    """R6 is in one place: each public function of the module of its room
    rules is in its row (so a new one is documented, or fails here)."""
    public = {
        f"{rooms.__name__}.{n}"
        for n, f in vars(rooms).items()
        if inspect.isfunction(f) and f.__module__ == rooms.__name__ and not n.startswith("_")
    }
    assert public, "lcic_guard.domain.rooms defines no function"
    assert public - set(table()["R6"]) == set()


@pytest.mark.parametrize("layer", ["sidecar", "reconciler", "store"])
def test_r6_durations_are_read_only_in_the_domain(layer: str) -> None:
    """The protection bound and the report bounds are computed by the
    domain; a layer that reads the overrun or the maximum class length is
    computing R6 a second time."""
    readers = [
        f"{path.relative_to(SERVER)}:{n}"
        for path in sorted((SERVER / layer).rglob("*"))
        if path.suffix in (".py", ".lua")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "max_class_ms" in line or "overrun_ms" in line
    ]
    assert readers == []
