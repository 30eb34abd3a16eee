"""Docker for the image test: a daemon (started here when none runs), a base
image made locally, and the wheels the image installs.

The machines the tests run on reach the Python and Debian package
registries but no container registry, and TLS to the package index fails
from inside a container. So the base image is Debian bookworm with its own
python3, made with debootstrap and ``docker import`` (cached between runs),
and the locked wheels are downloaded on the host into the build context,
where the Dockerfile uses them instead of the index. The Dockerfile itself is the one
users build with ``python:3.11-slim``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Bump when the recipe below changes: the tag names the recipe.
BASE_PACKAGES = ("python3", "python3-venv")
BASE_RECIPE = f"bookworm minbase {','.join(BASE_PACKAGES)} v1"
BASE_TAG = "lcic-guard-test-base:" + hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:12]
CONTEXT_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "wheelhouse",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.egg-info",
    "build",
    "dist",
)


class NoDaemon(RuntimeError):
    """No Docker daemon runs here and none could be started."""


def cache_dir() -> Path:
    base = os.environ.get("LCIC_GUARD_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lcic-guard-tests"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def docker(*args: str, timeout: float = 120, check: bool = True, **kw: object) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return str(done.stdout)


def daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0 and bool(done.stdout.strip())


@contextlib.contextmanager
def docker_daemon() -> Iterator[str]:
    """A Docker daemon for the duration: the running one, else one started
    here (as root; only host networking is needed, so no bridge and no
    iptables) and stopped afterwards. Raises NoDaemon with the daemon's own
    error when none can run."""
    if daemon_answers():
        yield "running"
        return
    for tool in ("docker", "dockerd"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} is not installed: scripts/bootstrap installs Debian's docker.io"
            )
    if os.geteuid() != 0:
        raise RuntimeError("no Docker daemon runs and only root can start one")
    log_path = cache_dir() / "dockerd.log"
    errors = []
    # The default storage driver first; vfs where overlays cannot be mounted.
    for extra in ((), ("--storage-driver=vfs",)):
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                ["dockerd", "--iptables=false", "--bridge=none", *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while proc.poll() is None and not daemon_answers() and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is None and daemon_answers():
            try:
                yield "started"
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        errors.append(f"dockerd {' '.join(extra)}: " + " | ".join(tail))
    raise NoDaemon("; ".join(errors))


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", tag], capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    )


def base_image() -> str:
    """Debian bookworm with python3, from debootstrap: imported from the
    cached root filesystem archive, made first if there is none."""
    if image_exists(BASE_TAG):
        return BASE_TAG
    archive = cache_dir() / f"{BASE_TAG.split(':')[1]}-rootfs.tar"
    if not archive.exists():
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed: scripts/bootstrap installs it")
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    "bookworm",
                    str(rootfs),
                ],
                capture_output=True,
                text=True,
                timeout=900,
                check=True,
            )
            # What an image needs no more: package caches and documentation.
            for sub in (
                "var/cache/apt/archives",
                "var/lib/apt/lists",
                "usr/share/doc",
                "usr/share/man",
                "usr/share/locale",
            ):
                for child in (rootfs / sub).glob("*"):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            partial = archive.with_suffix(".partial")
            with tarfile.open(partial, "w") as tar:
                tar.add(rootfs, arcname=".")
            partial.rename(archive)
    with archive.open("rb") as fh:
        subprocess.run(
            ["docker", "import", "-", BASE_TAG],
            stdin=fh,
            capture_output=True,
            timeout=300,
            check=True,
        )
    return BASE_TAG


def build_context(dest: Path) -> Path:
    """The repository as a user would build it, plus a wheelhouse built here."""
    context = dest / "context"
    shutil.copytree(ROOT, context, ignore=CONTEXT_IGNORE, symlinks=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--require-hashes",
            "--requirement",
            str(context / "requirements" / "runtime.txt"),
            "--dest",
            str(context / "wheelhouse"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return context


def image_id(tag: str) -> str | None:
    done = subprocess.run(
        ["docker", "image", "inspect", tag, "--format", "{{.Id}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def build_image(context: Path, tag: str, base: str, version: str) -> float:
    """``docker build``; returns the seconds it took. The image this replaces
    and the build stages are removed, so that runs do not fill the disk."""
    previous = image_id(tag)
    start = time.monotonic()
    docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"VERSION={version}",
        "--tag",
        tag,
        str(context),
        timeout=900,
    )
    seconds = time.monotonic() - start
    if previous is not None and previous != image_id(tag):
        docker("rmi", previous, check=False)
    docker("image", "prune", "--force", "--filter", "label=org.lcic-guard.stage=build")
    return seconds


def run_detached(image: str, name: str, args: Sequence[str], env: dict[str, str]) -> str:
    """The container as production runs it: read-only root, a tmpfs for /tmp."""
    flags = [f"--env={k}={v}" for k, v in env.items()]
    docker("rm", "-f", name, check=False)
    return docker(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--health-interval=1s",
        "--health-start-period=1s",
        *flags,
        image,
        *args,
    ).strip()
