"""The client stands alone (issue 14): ``client/`` is its own distribution,
``lcic-guard-client``, that installs into a fresh virtual environment with
grpcio and protobuf and nothing of the server, and works there against a real
sidecar.

The sidecar is the embedded default (``lcic-guard serve``, its private Redis,
the reconciler and the sample data) from the project's environment; the
client's side runs in the fresh environment, where the server's package is
not even importable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lcic_guard_client import GuardClient, Reason

ROOT = Path(__file__).resolve().parents[2]
LCIC_GUARD = str(Path(sys.executable).with_name("lcic-guard"))
# What only the server needs: none of it may come with the client.
SERVER_ONLY = (
    "lcic-guard",
    "redis",
    "hiredis",
    "prometheus-client",
    "grpcio-health-checking",
    "grpcio-reflection",
)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    # -I in the commands below keeps the caller's environment and the working
    # tree out of the fresh interpreter's import path; so does this env.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with ``pip install client/`` (a copy, so
    that the build leaves nothing in the working tree)."""
    tmp = tmp_path_factory.mktemp("client-alone")
    source = tmp / "client"
    shutil.copytree(
        ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    _run(
        [
            str(_venv_python(venv)),
            "-I",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(source),
        ],
        cwd=tmp,
    )
    return venv


def _installed(venv: Path) -> dict[str, str]:
    out = _run(
        [
            str(_venv_python(venv)),
            "-I",
            "-m",
            "pip",
            "list",
            "--format",
            "json",
            "--disable-pip-version-check",
        ],
        cwd=venv,
    )
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(out)}


def test_the_client_installs_with_grpcio_and_protobuf_only(client_venv: Path) -> None:
    installed = _installed(client_venv)
    assert installed.get("lcic-guard-client") == "0.1.0", installed
    assert "grpcio" in installed and "protobuf" in installed, installed
    brought = sorted(name for name in SERVER_ONLY if name in installed)
    assert not brought, f"installing the client brought server packages: {brought}"
    # What it ships: the client, the generated code, their type stubs and
    # markers, from the environment's site-packages (not the working tree).
    out = _run(
        [
            str(_venv_python(client_venv)),
            "-I",
            "-c",
            "import json, sys, importlib.util, lcic_guard_client, lcic.guard.v1 as v1; "
            "print(json.dumps([sys.prefix, lcic_guard_client.__file__, v1.__file__, "
            "importlib.util.find_spec('lcic_guard') is None]))",
        ],
        cwd=client_venv,
    )
    prefix, client_init, generated_init, no_server = json.loads(out)
    assert no_server, "the server's package is importable next to the client"
    client_dir, generated_dir = Path(client_init).parent, Path(generated_init).parent
    for path in (client_dir, generated_dir):
        assert path.is_relative_to(prefix) and "site-packages" in path.parts, path
        assert (path / "py.typed").is_file(), path
    assert (generated_dir / "enforcement_pb2.pyi").is_file()
    assert (generated_dir / "enforcement_pb2_grpc.pyi").is_file()
    for parent in (generated_dir.parent, generated_dir.parent.parent):  # lcic.guard, lcic
        assert (parent / "__init__.py").is_file() and (parent / "py.typed").is_file(), parent


def _wait(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``lcic-guard serve`` on the embedded default; yields its target."""
    tmp = tmp_path_factory.mktemp("sidecar")
    out, err = tmp / "stdout", tmp / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCIC_GUARD_")}
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [LCIC_GUARD, "serve", "--listen", "127.0.0.1:0", "--shutdown-delay", "0"],
            stdout=o,
            stderr=e,
            env=env | {"LCIC_GUARD_LOG_FORMAT": "json"},
            start_new_session=True,  # its private redis-server goes with its group
        )
    try:
        _wait("the banner", lambda: "serving on" in out.read_text() or proc.poll() is not None)
        assert proc.poll() is None, err.read_text()
        match = re.search(r"serving on (\S+)", out.read_text())
        assert match, out.read_text()
        target = match.group(1)

        # The sample's release is performed by the reconciler after start.
        def sample_reconciled() -> bool:
            with GuardClient(target, timeout=2) as guard:
                d = guard.can_access_recording("app-released", "rec-1")
            return d.reason == Reason.RESOURCES_RELEASED

        _wait("the sample data reconciled", sample_reconciled)
        yield target
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# Runs in the fresh environment: every client class against the sidecar,
# importing nothing of the server. Prints each answer as [allowed, reason].
SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys

    from lcic_guard_client import (
        AsyncGuardClient, CachedGuardClient, GuardClient, SidecarUnavailable,
        create_classroom_check,
    )

    target = sys.argv[1]
    out = {}

    def note(name, decision):
        out[name] = [decision.allowed, str(decision.reason)]

    with GuardClient(target, timeout=5) as guard:
        note("create app-active", guard.can_create_classroom("app-active"))
        note("create app-overdue", guard.can_create_classroom("app-overdue"))
        note("enter app-quota room-live", guard.can_enter_classroom("app-quota", "room-live"))
        note("enter app-quota room-new", guard.can_enter_classroom("app-quota", "room-new"))
        note("recording app-released", guard.can_access_recording("app-released", "rec-1"))
        note("create app-invented", guard.can_create_classroom("app-invented"))
        batch = guard.check_batch(
            [create_classroom_check("app-banned"), create_classroom_check("app-payg")]
        )
        note("batch app-banned", batch[0])
        note("batch app-payg", batch[1])

    async def use_async():
        async with AsyncGuardClient(target, timeout=5) as guard:
            note("async create app-expired", await guard.can_create_classroom("app-expired"))
            note("async create app-settled", await guard.can_create_classroom("app-settled"))

    asyncio.run(use_async())

    with CachedGuardClient(target, ["app-active", "app-banned"], timeout=5) as cached:
        out["cached fresh"] = cached.wait_fresh(timeout=20)
        note("cached create app-active", cached.can_create_classroom("app-active"))
        note("cached create app-banned", cached.can_create_classroom("app-banned"))
        out["cached local answers"] = cached.local_answers

    # A sidecar that is not there: one exception of the client's own, no grpc
    # import needed to catch it.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    with GuardClient(nobody, timeout=0.3) as guard:
        try:
            guard.can_create_classroom("app-active")
            out["down"] = "answered"
        except SidecarUnavailable as exc:
            out["down"] = [type(exc).__name__, type(exc.__cause__).__module__.split(".")[0]]

    out["server importable"] = importlib.util.find_spec("lcic_guard") is not None
    out["server imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "lcic_guard")
    print(json.dumps(out))
    """
)


def test_the_client_alone_answers_from_a_real_sidecar(
    client_venv: Path, sidecar: str, tmp_path: Path
) -> None:
    script = tmp_path / "use_client.py"
    script.write_text(SCRIPT, encoding="utf-8")
    out = _run([str(_venv_python(client_venv)), "-I", str(script), sidecar], cwd=tmp_path)
    answers = json.loads(out.strip().splitlines()[-1])
    assert answers == {
        "create app-active": [True, "OK"],
        "create app-overdue": [False, "ACCOUNT_OVERDUE"],
        "enter app-quota room-live": [True, "IN_PROGRESS_PROTECTED"],
        "enter app-quota room-new": [False, "PACKAGE_QUOTA_EXHAUSTED"],
        "recording app-released": [False, "RESOURCES_RELEASED"],
        "create app-invented": [False, "UNKNOWN_APPLICATION"],
        "batch app-banned": [False, "ACCOUNT_BANNED"],
        "batch app-payg": [True, "OK"],
        "async create app-expired": [False, "PACKAGE_EXPIRED"],
        "async create app-settled": [True, "OK"],
        "cached fresh": True,
        "cached create app-active": [True, "OK"],
        "cached create app-banned": [False, "ACCOUNT_BANNED"],
        # Both answered from the pushed schedule, without a round trip.
        "cached local answers": 2,
        "down": ["SidecarUnavailable", "grpc"],
        "server importable": False,
        "server imported": [],
    }
