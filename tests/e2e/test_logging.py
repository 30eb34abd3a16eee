"""Structured logs and request ids (issue 6, item 2): JSON lines captured
from the real sidecar (over a socket) and the real reconciler."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard import logs
from lcic_guard.cli import build_parser
from lcic_guard.demo import free_port
from lcic_guard.domain.policy import DAY, HOUR, PolicyConfig
from lcic_guard.flags import settings_from
from lcic_guard.reconciler import Reconciler, ReconcilerConfig
from lcic_guard.reconciler.sources import FileSource
from lcic_guard.runner import build_sidecar
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store

from tests.support.clock import T0, FakeClock, recorded_clock
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest
from tests.support.settings import sidecar_settings


class Captured:
    """JSON lines written by the real formatter, parsed back."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]


@pytest.fixture
def captured() -> Iterator[Captured]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("lcic_guard")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield Captured(stream)
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def trailing(call_metadata: Any) -> dict[str, str]:
    return {k: v for k, v in call_metadata}


async def test_request_id_from_metadata_is_returned_and_in_every_line(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events, captured: Captured
) -> None:
    await reconciler.ingest(deliveries(events.app("acct-1", "app-1")))
    call = sidecar.stub.CanCreateClassroom(
        pb.CanCreateClassroomRequest(app_id="app-1"), metadata=(("x-request-id", "req-abc-1"),)
    )
    resp = await call
    assert resp.decision.allowed
    assert trailing(await call.trailing_metadata())["x-request-id"] == "req-abc-1"
    [line] = [x for x in captured.events("decision") if x.get("request_id") == "req-abc-1"]
    assert line["level"] == "DEBUG" and line["logger"] == "lcic_guard.decisions"
    assert line["app_id"] == "app-1" and line["check"] == "create"
    assert line["allowed"] is True and line["reason"] == "OK"


async def test_a_request_id_is_made_when_absent_and_calls_do_not_mix(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events, captured: Captured
) -> None:
    await reconciler.ingest(deliveries([*events.app("a1", "app-1"), *events.app("a2", "app-2")]))
    call = sidecar.stub.CanAccessRecording(
        pb.CanAccessRecordingRequest(app_id="app-2", recording_id="r")
    )
    await call
    made = trailing(await call.trailing_metadata())["x-request-id"]
    assert made and made != "req-abc-1"
    [line] = captured.events("decision")
    assert line["request_id"] == made and line["app_id"] == "app-2"

    # Concurrent calls: each line carries its own call's id.
    async def one(n: int) -> None:
        await sidecar.stub.CanCreateClassroom(
            pb.CanCreateClassroomRequest(app_id=f"app-{1 + n % 2}"),
            metadata=(("x-request-id", f"rid-{n}"),),
        )

    await asyncio.gather(*(one(n) for n in range(20)))
    seen = {x["request_id"]: x["app_id"] for x in captured.events("decision")[1:]}
    assert seen == {f"rid-{n}": f"app-{1 + n % 2}" for n in range(20)}


async def test_an_unusable_request_id_is_replaced(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events
) -> None:
    call = sidecar.stub.CanCreateClassroom(
        pb.CanCreateClassroomRequest(app_id="app-x"), metadata=(("x-request-id", "a b"),)
    )
    await call
    rid = trailing(await call.trailing_metadata())["x-request-id"]
    assert rid != "a b" and " " not in rid
    assert logs.pick_request_id([("x-request-id", "x" * 129)]) != "x" * 129
    assert logs.pick_request_id([("other", "v"), ("x-request-id", "ok-1")]) == "ok-1"


async def test_errors_are_logged_with_the_request_id_and_returned_on_aborts(
    policy: PolicyConfig, clock: FakeClock, captured: Captured
) -> None:
    dead = Store(connect(f"redis://127.0.0.1:{free_port()}", timeout=0.2))
    side = await build_sidecar(sidecar_settings(policy=policy), dead, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{side.port}")
    try:
        from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc

        stub = pb_grpc.EnforcementServiceStub(channel)
        await stub.CanCreateClassroom(
            pb.CanCreateClassroomRequest(app_id="app-1"), metadata=(("x-request-id", "rid-err"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetApplicationStatus(
                pb.GetApplicationStatusRequest(app_id="app-1"),
                metadata=(("x-request-id", "rid-status"),),
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert trailing(err.value.trailing_metadata())["x-request-id"] == "rid-status"
    finally:
        await channel.close()
        await side.stop(grace=0.2)
        await dead.close()
    errors = [x for x in captured.lines() if x["level"] == "WARNING" and "store" in x["msg"]]
    # The status read met the refused connection and says so under its
    # request id. (The check before it may not have read Redis at all: the
    # change feed, refused first, opens the breaker.)
    assert any(x.get("request_id") == "rid-status" for x in errors), errors
    assert all(x.get("request_id") in ("rid-err", "rid-status") for x in errors), errors


async def test_state_changes_and_releases_are_one_line_each(
    store: Store, policy: PolicyConfig, clock: FakeClock, events: Events, captured: Captured
) -> None:
    rec = Reconciler(
        store, policy, ReconcilerConfig(release_margin_ms=0, announce_settle_ms=0), clock=clock
    )
    await rec.ingest(deliveries(events.app("acct-1", "app-1")))
    await rec.ingest(deliveries([events("overdue_alert", T0 - HOUR, account_id="acct-1")]))
    await rec.ingest(deliveries([events("overdue_alert", T0 - 30 * 60_000, account_id="acct-1")]))
    changes = captured.events("status_changed")
    assert [(x["old_state"], x["new_state"]) for x in changes] == [
        (None, "ACTIVE"),
        ("ACTIVE", "GRACE"),
    ]  # the second alert changes nothing (R1): no line
    assert changes[1]["app_id"] == "app-1" and changes[1]["account_id"] == "acct-1"
    assert changes[1]["reasons"] == ["OVERDUE_GRACE"] and changes[1]["level"] == "INFO"
    assert "request_id" not in changes[1]  # not made while handling a call

    # The flip at A + 24 h is announced by the deadline run: one more line.
    clock.now = T0 + 23 * HOUR
    await rec.run_deadlines()
    last = captured.events("status_changed")[-1]
    assert (last["old_state"], last["new_state"]) == ("GRACE", "SUSPENDED")
    assert len(captured.events("status_changed")) == 3


async def _at(ms: int) -> int:
    return ms


async def test_a_release_is_one_warning_line(
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
    captured: Captured,
    tmp_path: Path,
) -> None:
    evs = [
        *events.app("acct-1", "app-1", at=T0 - 80 * DAY, expires=T0 + 400 * DAY),
        *events.app("acct-1", "app-2", at=T0 - 80 * DAY, expires=T0 + 400 * DAY),
        events("overdue_alert", T0 - 70 * DAY, account_id="acct-1"),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    source = FileSource(path, clock_ms=lambda: _at(clock.now))
    cfg = ReconcilerConfig(release_margin_ms=0, announce_settle_ms=0)
    # Loaded back when the alert was sent (a snapshot loaded today would give
    # R10's notice period first).
    rec = Reconciler(
        store, policy, cfg, [source], clock=clock, recorded_clock=recorded_clock(T0 - 70 * DAY)
    )
    rec.token = await rec.coord.hold_lease(rec.name, 60_000)  # releases: leader only
    await rec.drain(source)
    await rec.notices_of_history()  # read live: noticed when the suspension became known
    await rec.run_deadlines()
    [line] = captured.events("resources_released")
    assert line["level"] == "WARNING" and line["account_id"] == "acct-1"
    assert line["app_ids"] == ["app-1", "app-2"]
    released = [x for x in captured.events("status_changed") if x["new_state"] == "RELEASED"]
    assert sorted(x["app_id"] for x in released) == ["app-1", "app-2"]


def test_json_formatter_fields_and_exceptions() -> None:
    fmt = logs.JsonFormatter()
    record = logging.LogRecord(
        "lcic_guard.x", logging.ERROR, __file__, 1, "boom %s", ("now",), None
    )
    record.app_id = "app-1"
    token = logs.request_id.set("rid-9")
    try:
        out = json.loads(fmt.format(record))
    finally:
        logs.request_id.reset(token)
    assert out["msg"] == "boom now" and out["level"] == "ERROR" and out["logger"] == "lcic_guard.x"
    assert out["request_id"] == "rid-9" and out["app_id"] == "app-1"
    assert out["ts"].endswith("Z")
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = json.loads(fmt.format(record))
    assert "ValueError: bad" in out["exc"] and "request_id" not in out


def test_text_format_is_for_a_person() -> None:
    fmt = logs.TextFormatter()
    record = logging.LogRecord("lcic_guard", logging.INFO, __file__, 1, "hello", (), None)
    record.event = "status_changed"
    text = fmt.format(record)
    assert "INFO lcic_guard: hello [event=status_changed]" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_configure_chooses_json_off_a_terminal() -> None:
    stream = io.StringIO()  # not a terminal: auto means json
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    try:
        assert logs.configure("INFO", "auto", stream) == "json"
        logging.getLogger("lcic_guard.test").info("one", extra={"event": "x"})
        logging.getLogger("lcic_guard.test").debug("hidden")
        assert logs.configure("WARNING", "text", stream) == "text"  # replaces, not adds
        logging.getLogger("lcic_guard.test").warning("two")
    finally:
        for h in root.handlers:
            if h not in old_handlers:
                root.removeHandler(h)
        root.setLevel(old_level)
    first, second = stream.getvalue().splitlines()
    assert json.loads(first)["msg"] == "one" and json.loads(first)["event"] == "x"
    assert second.endswith("WARNING lcic_guard.test: two")
    with pytest.raises(ValueError, match="log format"):
        logs.configure("INFO", "xml", stream)


def test_log_format_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from(build_parser().parse_args(["serve"])).log_format == "auto"
    args = build_parser().parse_args(["reconcile", "--log-format", "json"])
    assert settings_from(args).log_format == "json"
    monkeypatch.setenv("LCIC_GUARD_LOG_FORMAT", "text")
    assert settings_from(build_parser().parse_args(["serve"])).log_format == "text"


async def test_an_unexpected_fault_is_one_error_line_with_its_traceback(
    sidecar: SidecarUnderTest, captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(req: object) -> None:
        raise RuntimeError("checker exploded")

    monkeypatch.setattr(sidecar.checker, "answer", broken)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.stub.CanCreateClassroom(
            pb.CanCreateClassroomRequest(app_id="app-1"), metadata=(("x-request-id", "rid-boom"),)
        )
    # INTERNAL, never grpc's UNKNOWN naming a Python class to the caller.
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "checker exploded" not in (err.value.details() or "")
    [line] = captured.events("rpc_error")
    assert line["level"] == "ERROR" and line["request_id"] == "rid-boom"
    assert "RuntimeError: checker exploded" in line["exc"]
