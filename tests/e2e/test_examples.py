"""The worked integrations in examples/, run for real.

Each example runs as its own process, as it would be deployed, against a real
sidecar (real Redis, the gRPC server with its change feed and watch) fed by
the real reconciler, which reads the billing events from the production
stream and performs releases itself. Requests are real HTTP (urllib).

The examples answer checks with CachedGuardClient, which decides with the
wall clock: here everything runs on the wall clock and the billing history
is dated relative to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest_asyncio
from lcic_guard.domain.facts import (
    ApplicationRegistered,
    ComplianceBan,
    Fact,
    OverdueAlert,
    PackagePurchased,
    PackageUsage,
    ResourcesReleased,
)
from lcic_guard.domain.policy import (
    DAY,
    HOUR,
    Check,
    PolicyConfig,
    Reason,
    Room,
    State,
    compute_account,
    decide,
    decide_without_store,
)
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.sources import StreamSource
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.keys import BILLING_STREAM, GUARD_STREAM
from lcic_guard.store.status import Store
from lcic_guard_client import GuardClient
from lcic_guard_client import Reason as Answer

from tests.support.events import Events
from tests.support.settings import sidecar_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
APPS = ("app-active", "app-grace", "app-quota", "app-overdue", "app-released", "app-banned")


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclass
class Guard:
    """A running sidecar and reconciler over one Redis, on the wall clock."""

    store: Store
    sidecar: RunningSidecar
    reconciler: Reconciler
    events: Events
    now: Millis

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.sidecar.port}"

    async def publish(self, *evs: dict[str, Any]) -> None:
        """Send billing events the way the billing system does: on the stream."""
        for e in evs:
            await self.store.redis.xadd(BILLING_STREAM, {"event": json.dumps(e)})

    async def state(self, app_id: str) -> State | None:
        status, _ = await self.store.read_status(app_id)
        return None if status is None else status.at(wall_clock()).state

    def ask(self) -> GuardClient:
        """A direct client, to compare the examples' answers with the sidecar's."""
        return GuardClient(self.target, timeout=2.0)


def billing_history(ev: Events, now: Millis) -> list[dict[str, Any]]:
    """One account in each situation the examples care about, dated from now."""
    month_ago, in_a_month = now - 10 * DAY, now + 20 * DAY
    return [
        *ev.app("acct-good", "app-active", month_ago, in_a_month),
        *ev.app("acct-good", "app-quota", month_ago, in_a_month, quota=600),
        *ev.app("acct-grace", "app-grace", month_ago, in_a_month),
        ev("overdue_alert", now - HOUR, account_id="acct-grace", amount_due="120.50"),
        *ev.app("acct-overdue", "app-overdue", month_ago, in_a_month),
        ev("overdue_alert", now - 2 * DAY, account_id="acct-overdue", amount_due="980.00"),
        *ev.app("acct-gone", "app-released", now - 90 * DAY, in_a_month),
        ev("overdue_alert", now - 63 * DAY, account_id="acct-gone", amount_due="15.00"),
        *ev.app("acct-banned", "app-banned", month_ago, in_a_month),
        ev("compliance_ban", now - HOUR, account_id="acct-banned", note="terms violation"),
    ]


@pytest_asyncio.fixture
async def guard(store: Store, events: Events) -> AsyncIterator[Guard]:
    settings = sidecar_settings(redis_timeout_ms=2000)
    sidecar = await build_sidecar(settings, store)  # the wall clock
    reconciler = Reconciler(
        store,
        # The history is published now but stands for one read as it
        # happened: no notice period before the overdue account's release.
        PolicyConfig(release_notice_ms=0),
        ReconcilerConfig(block_ms=50, tick_ms=50, release_margin_ms=0),
        [StreamSource(store.redis)],
    )
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop))
    g = Guard(store, sidecar, reconciler, events, wall_clock())
    try:
        await g.publish(*billing_history(events, g.now))

        async def ready() -> bool:
            states = [await g.state(app) for app in APPS]
            return (
                sidecar.checker.cache.feed_healthy
                and states[APPS.index("app-released")] is State.RELEASED
                and None not in states
            )

        # The reconciler ingests the stream, then its leader loop releases
        # acct-gone (overdue past release_at, feed confirmed read).
        await eventually(ready)
        yield g
    finally:
        stop.set()
        await task
        await sidecar.stop(grace=0.2)


@contextlib.asynccontextmanager
async def example(script: str, *args: str, log: Path) -> AsyncIterator[str]:
    """Run examples/SCRIPT as a process; yields its base URL."""
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / script),
            "--listen",
            "127.0.0.1:0",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        if "listening on http://" not in line:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"{script} did not start:\n{output}")
        yield line.split()[-1]
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: dict[str, Any] | None) -> tuple[int, Message, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _opener.open(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


async def http(
    method: str, url: str, body: dict[str, Any] | None = None
) -> tuple[int, Message, bytes]:
    # Blocking I/O off the loop: the sidecar under test runs on this loop.
    return await asyncio.to_thread(_http, method, url, body)


async def call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    status, _, data = await http(method, url, body)
    return status, json.loads(data)


def iso(ms: Millis) -> str:
    """How the examples write a decision's time."""
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).isoformat()


# -- classroom service ---------------------------------------------------------


async def test_classroom_service_creates_only_when_billing_allows(
    guard: Guard, tmp_path: Path
) -> None:
    apps = ",".join(APPS)
    async with example(
        "classroom_service.py", "--guard", guard.target, "--apps", apps, log=tmp_path / "svc.log"
    ) as url:
        status, body = await call("POST", f"{url}/apps/app-active/classrooms", {"room_id": "r-1"})
        assert status == 201, body
        assert body == {"app_id": "app-active", "room_id": "r-1", "state": "scheduled"}
        assert (await call("GET", f"{url}/apps/app-active/classrooms/r-1"))[0] == 200
        assert (await call("POST", f"{url}/apps/app-active/classrooms", {"room_id": "r-1"}))[
            0
        ] == 409

        # R1: in grace the room is created, with the warning for the customer.
        status, body = await call("POST", f"{url}/apps/app-grace/classrooms", {})
        assert status == 201, body
        assert body["room_id"].startswith("room-")
        assert "Top up before" in body["warning"]

        with guard.ask() as direct:
            truth = {
                app: await asyncio.to_thread(direct.can_create_classroom, app)
                for app in ("app-overdue", "app-banned", "app-released")
            }
        # R2: suspended for the overdue payment: 402, the customer can pay.
        status, body = await call("POST", f"{url}/apps/app-overdue/classrooms", {})
        assert status == 402, body
        assert body["reason"] == "ACCOUNT_OVERDUE"
        assert body["message"] == truth["app-overdue"].message
        assert "Top up the account" in body["message"]
        assert body["decision"]["state"] == "SUSPENDED"
        release_at = truth["app-overdue"].release_at
        assert release_at is not None and release_at.tzinfo is not None
        assert body["decision"]["release_at"] == release_at.isoformat()
        # R11, R10: nothing the customer pays restores these: 403.
        for app, reason in (
            ("app-banned", "ACCOUNT_BANNED"),
            ("app-released", "RESOURCES_RELEASED"),
        ):
            status, body = await call("POST", f"{url}/apps/{app}/classrooms", {})
            assert status == 403, body
            assert body["reason"] == reason
            assert body["message"] == truth[app].message
        # Not watched: asked of the sidecar, which does not know it (R12).
        status, body = await call("POST", f"{url}/apps/app-nobody/classrooms", {})
        assert (status, body["reason"]) == (403, "UNKNOWN_APPLICATION")
        # A bad id never reaches the guard.
        status, body = await call("POST", f"{url}/apps/app-active/classrooms", {"room_id": "a b"})
        assert status == 400 and body["message"].startswith("room_id")

        status, health = await call("GET", f"{url}/healthz")
        # The watched apps were answered locally; only app-nobody went out.
        assert health["guard_fresh"] is True
        assert health["local_answers"] == 5 and health["remote_answers"] == 1, health


async def test_a_class_started_before_a_suspension_stays_enterable(
    guard: Guard, tmp_path: Path
) -> None:
    ev = guard.events
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    async with example(
        "classroom_service.py",
        "--guard",
        guard.target,
        "--apps",
        "app-quota",
        log=tmp_path / "svc.log",
    ) as url:
        rooms = f"{url}/apps/app-quota/classrooms"
        status, _ = await call("POST", rooms, {"room_id": "live", "end_time": end.isoformat()})
        assert status == 201
        assert (await call("POST", rooms, {"room_id": "later"}))[0] == 201
        status, body = await call("POST", f"{rooms}/live/start")
        assert (status, body["state"]) == (200, "live")
        status, body = await call("POST", f"{rooms}/live/join", {"user_id": "s1"})
        assert (status, body["decision"]["reason"]) == (200, "OK")

        # R7: the package's minutes run out after the class started.
        await asyncio.sleep(0.01)
        await guard.publish(
            ev(
                "package_usage",
                wall_clock(),
                app_id="app-quota",
                package_id="pkg-app-quota",
                used_minutes=640,
            )
        )

        async def suspended() -> bool:
            status, _ = await call("POST", rooms, {})
            return status == 402

        await eventually(suspended)  # the change reached the service's cache
        status, body = await call("POST", rooms, {"room_id": "new"})
        assert (status, body["reason"]) == (402, "PACKAGE_QUOTA_EXHAUSTED")
        assert "pay-as-you-go" in body["message"]

        # R6: the class in progress goes on, protected until its scheduled
        # end plus the 60 min overrun allowance.
        status, body = await call(
            "POST", f"{rooms}/live/join", {"user_id": "s2", "role": "teacher"}
        )
        assert status == 200, body
        decision = body["decision"]
        assert decision["reason"] == "IN_PROGRESS_PROTECTED"
        assert decision["reasons"] == ["PACKAGE_QUOTA_EXHAUSTED"]
        assert decision["protected_until"] == (end + timedelta(minutes=60)).isoformat()
        assert "may continue" in decision["message"]
        # A class not started before the suspension cannot start during it.
        status, body = await call("POST", f"{rooms}/later/start")
        assert (status, body["reason"]) == (402, "PACKAGE_QUOTA_EXHAUSTED")
        assert (await call("GET", f"{rooms}/later"))[1]["state"] == "scheduled"

        # Ending the class is reported: the sidecar protects it no longer.
        status, body = await call("POST", f"{rooms}/live/end")
        assert (status, body["state"]) == (200, "ended")
        assert "guard_report" not in body
        with guard.ask() as direct:
            after = await asyncio.to_thread(direct.can_enter_classroom, "app-quota", "live")
        assert not after.allowed
        assert after.reason == Answer.PACKAGE_QUOTA_EXHAUSTED

        # R7: pay-as-you-go on restores service.
        await guard.publish(ev("payg_changed", wall_clock(), app_id="app-quota", enabled=True))

        async def restored() -> bool:
            status, _ = await call("POST", rooms, {})
            return status == 201

        await eventually(restored)
        status, body = await call("POST", f"{rooms}/later/start")
        assert (status, body["state"]) == (200, "live")


async def test_a_package_deadline_flips_in_the_service_on_time(
    guard: Guard, tmp_path: Path
) -> None:
    ev = guard.events
    async with example(
        "classroom_service.py",
        "--guard",
        guard.target,
        "--apps",
        "app-soon",
        "--wait-fresh",
        "0",
        log=tmp_path / "svc.log",
    ) as url:
        rooms = f"{url}/apps/app-soon/classrooms"
        # R8: the package runs out in three seconds; no event will say so.
        expires = wall_clock() + 3000
        await guard.publish(*ev.app("acct-soon", "app-soon", wall_clock() - DAY, expires))

        async def known() -> bool:
            return (await call("POST", rooms, {"room_id": "class"}))[0] == 201

        await eventually(known)
        status, _ = await call("POST", f"{rooms}/class/start")
        assert status == 200
        assert wall_clock() < expires, "the machine is too slow for this test"
        _, before = await call("GET", f"{url}/healthz")
        await asyncio.sleep((expires - wall_clock()) / 1000 + 0.05)

        status, body = await call("POST", rooms, {"room_id": "after"})
        assert (status, body["reason"]) == (402, "PACKAGE_EXPIRED")
        assert body["decision"]["suspended_at"] == iso(expires)
        _, after = await call("GET", f"{url}/healthz")
        # Decided by the service's own cache, from the schedule it was sent.
        assert after["local_answers"] == before["local_answers"] + 1
        # R6: the class started before the expiry goes on.
        status, body = await call("POST", f"{rooms}/class/join", {"user_id": "s1"})
        assert (status, body["decision"]["reason"]) == (200, "IN_PROGRESS_PROTECTED")


# -- recording gateway -----------------------------------------------------------


async def test_recording_gateway_serves_only_what_billing_allows(
    guard: Guard, tmp_path: Path
) -> None:
    root = tmp_path / "recordings"
    files = {
        ("app-active", "rec-1.mp4"): b"\x00\x00\x00\x18ftypmp42 lesson one",
        ("app-grace", "rec-2.mp4"): b"grace period recording",
        ("app-overdue", "rec-3.mp4"): b"overdue recording",
        ("app-released", "rec-4.mp4"): b"released recording",
        ("app-banned", "rec-5.mp4"): b"banned recording",
    }
    for (app, rec), data in files.items():
        (root / app).mkdir(parents=True, exist_ok=True)
        (root / app / rec).write_bytes(data)
    (tmp_path / "secret").write_bytes(b"outside the root")

    async with example(
        "recording_gateway.py",
        "--guard",
        guard.target,
        "--dir",
        str(root),
        "--apps",
        ",".join(APPS),
        log=tmp_path / "gw.log",
    ) as url:
        with guard.ask() as direct:
            truth = {
                app: await asyncio.to_thread(direct.can_access_recording, app, rec)
                for (app, rec) in files
            }

        status, headers, data = await http("GET", f"{url}/apps/app-active/recordings/rec-1.mp4")
        assert status == 200
        assert data == files[("app-active", "rec-1.mp4")]
        assert headers["Content-Type"] == "video/mp4"
        assert headers["Cache-Control"] == "private, no-store"
        assert headers["X-Lcic-Guard-Reason"] == "OK"

        # R1: served in grace, with the warning.
        status, headers, data = await http("GET", f"{url}/apps/app-grace/recordings/rec-2.mp4")
        assert status == 200 and data == files[("app-grace", "rec-2.mp4")]
        assert headers["X-Lcic-Guard-Reason"] == "OVERDUE_GRACE"
        assert headers["X-Lcic-Guard-Warning"] == truth["app-grace"].message

        # R5: suspended -> 403 with the decision's message, file not sent.
        for app, rec, reason in (
            ("app-overdue", "rec-3.mp4", "ACCOUNT_OVERDUE"),
            ("app-banned", "rec-5.mp4", "ACCOUNT_BANNED"),
        ):
            status, headers, data = await http("GET", f"{url}/apps/{app}/recordings/{rec}")
            assert status == 403
            assert headers["X-Lcic-Guard-Reason"] == reason
            assert data.decode() == truth[app].message + "\n"
            assert files[(app, rec)] not in data

        # R10: released by the reconciler -> 410 Gone.
        status, headers, data = await http("GET", f"{url}/apps/app-released/recordings/rec-4.mp4")
        assert status == 410
        assert headers["X-Lcic-Guard-Reason"] == "RESOURCES_RELEASED"
        assert data.decode() == truth["app-released"].message + "\n"
        assert "cannot be recovered" in data.decode()
        # HEAD answers the same, without a body.
        status, headers, data = await http("HEAD", f"{url}/apps/app-overdue/recordings/rec-3.mp4")
        assert (status, data) == (403, b"")

        # Allowed but absent -> 404; ids that could climb out of the root -> 400.
        assert (await http("GET", f"{url}/apps/app-active/recordings/nope.mp4"))[0] == 404
        assert (await http("GET", f"{url}/apps/app-active/recordings/.."))[0] == 400
        assert (await http("GET", f"{url}/apps/app-active/recordings/%2e%2e"))[0] == 400
        assert (await http("GET", f"{url}/apps/app-active/recordings/rec-1.mp4?room_id=a/b"))[
            0
        ] == 400
        # Unknown application (not watched: asked of the sidecar) -> 403.
        status, headers, _ = await http("GET", f"{url}/apps/app-nobody/recordings/rec-1.mp4")
        assert (status, headers["X-Lcic-Guard-Reason"]) == (403, "UNKNOWN_APPLICATION")

        _, _, raw = await http("GET", f"{url}/healthz")
        health = json.loads(raw)
        assert health["guard_fresh"] is True
        assert health["local_answers"] == 7 and health["remote_answers"] == 1, health

    # The release the gateway honoured was the reconciler's, announced once.
    rows: Any = await guard.store.redis.xrange(GUARD_STREAM)
    announced = [json.loads(fields[b"event"]) for _, fields in rows]
    released = [a for a in announced if a["type"] == "resources_released"]
    assert [(a["account_id"], a["app_ids"]) for a in released] == [("acct-gone", ["app-released"])]


async def test_examples_answer_503_when_the_sidecar_is_unreachable(tmp_path: Path) -> None:
    dead = ("--guard", "127.0.0.1:1", "--wait-fresh", "0", "--timeout", "0.2")  # nothing there
    (tmp_path / "rec" / "app-active").mkdir(parents=True)
    (tmp_path / "rec" / "app-active" / "r.mp4").write_bytes(b"never served")
    async with (
        example("classroom_service.py", *dead, log=tmp_path / "svc.log") as svc,
        example(
            "recording_gateway.py", *dead, "--dir", str(tmp_path / "rec"), log=tmp_path / "gw.log"
        ) as gw,
    ):
        (status, body), (code, _, data) = await asyncio.gather(
            call("POST", f"{svc}/apps/app-active/classrooms", {}),
            http("GET", f"{gw}/apps/app-active/recordings/r.mp4"),
        )
        assert (status, body["error"]) == (503, "guard_unavailable")
        assert code == 503 and b"unavailable" in data and b"never served" not in data
        status, body = await call("GET", f"{svc}/healthz")
        assert body["guard_fresh"] is False and body["rooms"] == 0


# -- docs/policy.md and its picture ------------------------------------------------


def _load_timeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("timeline", ROOT / "scripts" / "timeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_timeline_picture_is_what_the_policy_draws_today() -> None:
    timeline = _load_timeline()
    svg = (ROOT / "docs" / "img" / "account-timeline.svg").read_text(encoding="utf-8")
    assert svg == timeline.render(), "run: scripts/generate"
    # The picture shows both endings, from the policy's own answers.
    for text in ("ACCOUNT_OVERDUE", "OVERDUE_GRACE", "RESOURCES_RELEASED", "IN_PROGRESS_PROTECTED"):
        assert text in svg
    # The PNG is rendered from it: same size (PNG IHDR: width, height).
    png = (ROOT / "docs" / "img" / "account-timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (timeline.WIDTH, timeline.HEIGHT)


A_DOC: Millis = 1_772_442_000_000  # 2026-03-02T09:00:00Z, the A of docs/policy.md


def _history(*extra: Fact, expires: Millis = A_DOC + 365 * DAY) -> list[Fact]:
    return [
        ApplicationRegistered("d-1", A_DOC - 30 * DAY, account_id="acct", app_id="app"),
        PackagePurchased(
            "d-2",
            A_DOC - 30 * DAY,
            app_id="app",
            package_id="pkg",
            starts_at=A_DOC - 30 * DAY,
            expires_at=expires,
            quota_minutes=600,
        ),
        *extra,
    ]


def _message(
    facts: list[Fact], at: Millis, check: Check = Check.CREATE_CLASSROOM, room: Room | None = None
) -> str:
    cfg = PolicyConfig()
    return decide(check, compute_account(facts, cfg)["app"], at, cfg, room).message


def test_the_messages_quoted_in_the_policy_doc_are_the_codes() -> None:
    doc = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    quoted = {line[2:] for line in doc.splitlines() if line.startswith("> ")}
    alert = OverdueAlert("d-3", A_DOC, account_id="acct")
    cfg = PolicyConfig()
    expected = {
        # R1, R2, R6 (the class of the picture: scheduled end A + 25 h)
        _message(_history(alert), A_DOC + HOUR),
        _message(_history(alert), A_DOC + 25 * HOUR),
        _message(
            _history(alert),
            A_DOC + 25 * HOUR,
            Check.ENTER_CLASSROOM,
            Room(started_at=A_DOC + 22 * HOUR, scheduled_end=A_DOC + 25 * HOUR),
        ),
        # R7, R8, R9
        _message(
            _history(PackageUsage("d-4", A_DOC, app_id="app", package_id="pkg", used_minutes=600)),
            A_DOC + HOUR,
        ),
        _message(_history(expires=A_DOC), A_DOC + HOUR),
        _message(_history(alert, expires=A_DOC + 30 * HOUR), A_DOC + 31 * HOUR),
        # R10, R11, R12, R13
        _message(
            _history(alert, ResourcesReleased("d-5", A_DOC + 61 * DAY + HOUR, account_id="acct")),
            A_DOC + 62 * DAY,
        ),
        _message(_history(ComplianceBan("d-6", A_DOC, account_id="acct")), A_DOC + HOUR),
        decide(Check.CREATE_CLASSROOM, None, A_DOC, cfg).message,
        decide_without_store(Check.CREATE_CLASSROOM, None, None, A_DOC, cfg).message,
    }
    assert len(expected) == 10
    assert expected - quoted == set(), "docs/policy.md misses or misquotes these messages"
    assert quoted - expected == set(), "docs/policy.md quotes messages the code no longer writes"


def test_the_policy_doc_covers_every_rule_and_reason() -> None:
    doc = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    for n in range(1, 14):
        assert f"### R{n} " in doc, f"R{n} has no section"
    for name in [*Reason, *State]:
        assert f"`{name.value}`" in doc, name
    assert "img/account-timeline.png" in doc and "img/account-timeline.svg" in doc
