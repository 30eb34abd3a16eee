"""The lock (requirements/*.txt) and pyproject.toml must agree: installs come
from the lock, people who install the wheels get pyproject's ranges."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_lock_inputs(root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "lock_inputs", ROOT / "scripts" / "lock_inputs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__dict__["ROOT"] = root  # the copy under test, not this checkout
    return module


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "client/pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def test_the_committed_lock_matches_pyproject() -> None:
    assert load_lock_inputs(ROOT).problems() == []


def test_every_locked_package_is_pinned_with_hashes() -> None:
    for lock in ("dev.txt", "runtime.txt"):
        lines = (ROOT / "requirements" / lock).read_text().splitlines()
        pinned = [i for i, line in enumerate(lines) if "==" in line and line[0] not in "# "]
        assert len(pinned) > 10, lock
        for i in pinned:
            assert lines[i].endswith("\\") and "--hash=sha256:" in lines[i + 1], lines[i]


def test_a_dependency_added_to_pyproject_but_not_locked_is_found(copy: Path) -> None:
    path = copy / "pyproject.toml"
    path.write_text(
        path.read_text().replace('"prometheus-client', '"six>=1",\n    "prometheus-client')
    )
    module = load_lock_inputs(copy)
    assert any(
        "requirements/dev.in is not what pyproject.toml says" in p for p in module.problems()
    )
    module.main(["write"])  # the inputs follow, the lock does not
    assert any("requirements/dev.txt pins no six" in p for p in module.problems())


def test_a_range_the_lock_no_longer_meets_is_found(copy: Path) -> None:
    path = copy / "client" / "pyproject.toml"
    path.write_text(path.read_text().replace('"protobuf>=7.35.1,<8"', '"protobuf>=99"'))
    module = load_lock_inputs(copy)
    module.main(["write"])  # the inputs follow, the lock does not
    found = module.problems()
    assert any("pins protobuf==" in p and "outside >=99" in p for p in found), found


def test_runtime_and_development_pin_the_same_versions(copy: Path) -> None:
    lock = copy / "requirements" / "runtime.txt"
    module = load_lock_inputs(copy)
    version = module.pins(lock)["redis"]
    lock.write_text(lock.read_text().replace(f"redis=={version}", "redis==5.2.0"))
    assert any(p.startswith("redis is 5.2.0 at runtime") for p in module.problems())
