"""scripts/bootstrap installs by need: the demo gets redis-server and Python
only; docker.io and debootstrap come only with --tests; apt waits, bounded,
for a lock another process holds. apt-get itself is replaced by a script
that records its arguments (installing Debian packages is not what is
tested here, nor possible twice on one machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("bash", "cat", "dirname", "sha256sum", "cut", "rm", "touch", "id")


def bootstrap(
    tmp_path: Path, *args: str, apt_exit: int = 0, extra_env: dict[str, str] | None = None
) -> tuple[int, str, list[str]]:
    """Runs scripts/bootstrap on a PATH with no redis-server, Docker or
    debootstrap; returns its exit status, stderr and apt-get's calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        found = subprocess.run(["which", tool], capture_output=True, text=True, check=True)
        (bin_dir / tool).symlink_to(found.stdout.strip())
    (bin_dir / "python3.11").symlink_to(sys.executable)
    log = tmp_path / "apt.log"
    apt = bin_dir / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit {apt_exit}\n')
    apt.chmod(0o755)
    env = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        # The environment the suite runs in: complete, so nothing is pip-installed.
        "LCIC_GUARD_VENV": str(Path(sys.executable).parent.parent),
        **(extra_env or {}),
    }
    done = subprocess.run(
        [str(ROOT / "scripts" / "bootstrap"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return done.returncode, done.stderr, calls


@pytest.fixture(autouse=True)
def _complete_venv() -> None:
    venv = Path(sys.executable).parent.parent
    if not any(venv.glob(".installed-*")):
        pytest.fail(f"{venv} was not made by scripts/bootstrap")


def test_the_demo_installs_only_redis_server(tmp_path: Path) -> None:
    code, err, calls = bootstrap(tmp_path)
    assert code == 0, err
    installs = [c for c in calls if " install " in f" {c} "]
    assert len(installs) == 1
    assert installs[0].endswith("install -y -qq redis-server")
    assert all("DPkg::Lock::Timeout=120" in c for c in calls), calls


def test_the_test_command_adds_docker_and_debootstrap(tmp_path: Path) -> None:
    code, err, calls = bootstrap(tmp_path, "--tests")
    assert code == 0, err
    (install,) = [c for c in calls if " install " in f" {c} "]
    assert install.split()[-3:] == ["redis-server", "docker.io", "debootstrap"]


def test_a_held_apt_lock_fails_with_a_clear_message(tmp_path: Path) -> None:
    code, err, _ = bootstrap(tmp_path, apt_exit=100)
    assert code == 1
    assert "could not install redis-server with apt-get" in err
    assert "holds its lock" in err


def test_an_unknown_argument_is_refused(tmp_path: Path) -> None:
    code, err, calls = bootstrap(tmp_path, "--everything")
    assert code == 2 and "usage: scripts/bootstrap [--tests]" in err and calls == []


def test_the_wait_is_configurable(tmp_path: Path) -> None:
    code, err, calls = bootstrap(tmp_path, extra_env={"LCIC_GUARD_APT_WAIT": "7"})
    assert code == 0, err
    assert calls and all("DPkg::Lock::Timeout=7 " in c for c in calls)
    assert "waiting up to 7s if apt is busy" in err
