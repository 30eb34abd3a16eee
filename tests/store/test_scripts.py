"""The Lua scripts are files of the package: every one ships in the wheel
(the package-data rule matches it), compiles in a real Redis, and has
behaviour tests of its own in tests/store/test_lua_*.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from lcic_guard.store.scripts import script
from lcic_guard.store.status import Store

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "server" / "lcic_guard" / "store"
LUA = sorted(p.relative_to(STORE).as_posix() for p in STORE.rglob("*.lua"))


def test_every_lua_file_matches_the_package_data_rule() -> None:
    rules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    # setuptools globs each pattern in the package's directory: "*.lua" there
    # does not reach lua/*.lua.
    patterns = [*rules.get("*", []), *rules.get("lcic_guard.store", [])]
    shipped = {p.relative_to(STORE).as_posix() for pat in patterns for p in STORE.glob(pat)}
    assert LUA, "the store's Lua scripts are files under server/lcic_guard/store/lua"
    assert [f for f in LUA if f not in shipped] == []


@pytest.mark.parametrize("name", [Path(f).stem for f in LUA])
async def test_each_script_compiles_in_redis(store: Store, name: str) -> None:
    sha = await store.redis.script_load(script(name))
    assert (await store.redis.script_exists(sha)) == [True]


def test_each_script_has_behaviour_tests_of_its_own() -> None:
    """Compiling proves little: each script's contract is exercised by a
    test_lua_*.py file that names it (as lua/NAME.lua in its docstring)."""
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_lua_*.py"))
    untested = [f for f in LUA if f not in tests]
    assert untested == [], "no behaviour tests in tests/store/test_lua_*.py"
