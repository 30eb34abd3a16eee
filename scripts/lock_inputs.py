"""The lock's inputs, derived from the two pyproject.toml files.

``write`` writes requirements/runtime.in and requirements/dev.in (what
scripts/lock compiles); ``check`` exits 1, saying what differs, when the
committed inputs or the pins in the lock no longer match pyproject.toml.
The in-project distributions (lcic-guard, lcic-guard-client) are installed
from their folders, never from the lock, so they are left out here.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OURS = {"lcic-guard", "lcic-guard-client"}
HEADER = "# Generated from pyproject.toml by scripts/lock: do not edit.\n"
# Locked on every Python 3.11, though pip-compile only sees its own: redis-py
# needs async-timeout below 3.11.3 (Debian bookworm ships 3.11.2), and a
# dependency whose marker is false where the lock is made would be left out.
PORTABLE = ["async-timeout>=4.0.3"]


def _project(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)["project"]


def _external(reqs: list[str]) -> list[str]:
    return [r for r in reqs if canonicalize_name(Requirement(r).name) not in OURS]


def inputs() -> dict[str, str]:
    """File name -> content of each lock input."""
    server = _project(ROOT / "pyproject.toml")
    client = _project(ROOT / "client" / "pyproject.toml")
    extras = server.get("optional-dependencies", {})
    build = ROOT / "pyproject.toml"
    with build.open("rb") as f:
        build_requires = tomllib.load(f)["build-system"]["requires"]
    runtime = _external(client["dependencies"] + server["dependencies"] + extras["otel"])
    # The build backend is locked too: our two distributions are built
    # without build isolation, so that nothing is resolved at install time.
    runtime += PORTABLE + build_requires
    dev = runtime + _external(extras["dev"])
    return {
        "runtime.in": HEADER + "-c dev.txt\n" + "".join(f"{r}\n" for r in runtime),
        "dev.in": HEADER + "".join(f"{r}\n" for r in dev),
    }


def pins(lock: Path) -> dict[str, str]:
    """Name -> version of every ``name==version`` line of a pip-compile lock."""
    out: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith(("#", "-")) and "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.split()[0].rstrip("\\").strip()
    return out


def problems() -> list[str]:
    found: list[str] = []
    folder = ROOT / "requirements"
    for name, content in inputs().items():
        path = folder / name
        if not path.exists() or path.read_text() != content:
            found.append(f"requirements/{name} is not what pyproject.toml says: run scripts/lock")
    for lock_name, in_name in (("dev.txt", "dev.in"), ("runtime.txt", "runtime.in")):
        lock = folder / lock_name
        if not lock.exists():
            found.append(f"requirements/{lock_name} is missing: run scripts/lock")
            continue
        pinned = pins(lock)
        for line in inputs()[in_name].splitlines():
            if not line or line.startswith(("#", "-")):
                continue
            req = Requirement(line)
            version = pinned.get(canonicalize_name(req.name))
            if version is None:
                found.append(f"requirements/{lock_name} pins no {req.name}: run scripts/lock")
            elif not req.specifier.contains(version, prereleases=True):
                found.append(
                    f"requirements/{lock_name} pins {req.name}=={version}, "
                    f"outside {req.specifier}: run scripts/lock"
                )
    dev, runtime = pins(folder / "dev.txt"), pins(folder / "runtime.txt")
    for name, version in runtime.items():
        if dev.get(name) != version:
            found.append(f"{name} is {version} at runtime but {dev.get(name)} in development")
    return found


def main(argv: list[str]) -> int:
    if argv == ["write"]:
        folder = ROOT / "requirements"
        folder.mkdir(exist_ok=True)
        for name, content in inputs().items():
            (folder / name).write_text(content)
        return 0
    if argv == ["check"]:
        found = problems()
        for p in found:
            print(p, file=sys.stderr)
        return 1 if found else 0
    print("usage: lock_inputs.py write|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
