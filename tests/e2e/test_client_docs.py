"""docs/client.md's example is examples/client_quickstart.py, and it runs:
as a process, against the real sidecar and reconciler over real Redis, with
the sample situations, and says what the sidecar says."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from lcic_guard_client import GuardClient

from tests.e2e import test_examples
from tests.e2e.test_examples import Guard

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "client_quickstart.py"
guard = test_examples.guard  # the fixture: sidecar + reconciler with the sample situations


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_the_documented_example_is_the_example_file() -> None:
    blocks = python_blocks((ROOT / "docs" / "client.md").read_text(encoding="utf-8"))
    assert blocks[0] == QUICKSTART.read_text(encoding="utf-8")


async def run_quickstart(target: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(QUICKSTART),
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_quickstart_runs_against_a_real_sidecar(guard: Guard) -> None:
    code, out, err = await run_quickstart(guard.target)
    assert code == 0, err
    with GuardClient(guard.target, timeout=2.0) as direct:
        truth = {
            app: await asyncio.to_thread(direct.can_create_classroom, app)
            for app in ("app-active", "app-grace", "app-overdue", "app-banned")
        }
    lines = out.splitlines()
    for app, d in truth.items():
        verdict = "ALLOWED" if d.allowed else "DENIED"
        assert f"{app}: {verdict} {d.reason} - {d.message}" in lines
    assert "app-grace: ALLOWED OVERDUE_GRACE" in out and "  grace ends " in out
    assert "batch: OK, ACCOUNT_BANNED" in lines
    assert "app-grace is GRACE; reasons: OVERDUE_GRACE" in lines
    assert "  GRACE_END at " in out
    assert "app-grace in 2 days: SUSPENDED, create -> ACCOUNT_OVERDUE" in lines
    assert "app-invented: not known to the sidecar" in lines


async def test_the_quickstart_fails_closed_without_a_sidecar(guard: Guard) -> None:
    await guard.sidecar.stop(grace=0)
    code, out, err = await run_quickstart(guard.target)
    assert code == 2, out + err
    assert "the sidecar is unavailable" in err and "Traceback" not in err
