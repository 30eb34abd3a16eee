"""The Python client (sync and asyncio) against the real server: typed methods,
deadlines, retries, TLS and mutual TLS, and its small dependency footprint.

The server runs on the test's event loop, so the blocking client runs in a
worker thread (``asyncio.to_thread``)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard.demo import free_port
from lcic_guard.domain.policy import HOUR, MINUTE, PolicyConfig
from lcic_guard.reconciler import Reconciler
from lcic_guard.sidecar.checker import Checker
from lcic_guard.sidecar.errors import Refused
from lcic_guard.sidecar.server import TlsFiles, start_server
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store
from lcic_guard_client import (
    DEFAULT_TIMEOUT,
    ApplicationStatus,
    AsyncGuardClient,
    Decision,
    GuardClient,
    GuardError,
    Reason,
    Role,
    State,
    TlsConfig,
    access_recording_check,
    create_classroom_check,
    enter_classroom_check,
)

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.fixtures import RENDER, SidecarUnderTest, servicer
from tests.support.pki import Pki

T = TypeVar("T")
APP = "app-1"
ACCT = "acct-1"
REPO = Path(__file__).resolve().parents[2]


def at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def ms(value: dt.datetime | None) -> int:
    assert value is not None
    return round(value.timestamp() * 1000)


async def blocking(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


async def suspended_app(reconciler: Reconciler, events: Events) -> None:
    """APP suspended for overdue since T0 - 1 h; "good" is active."""
    await reconciler.ingest(
        deliveries(
            [
                *events.app(ACCT, APP),
                events("overdue_alert", T0 - 25 * HOUR, account_id=ACCT),
                *events.app("acct-2", "good"),
            ]
        )
    )


# -- every typed method, sync ----------------------------------------------------------


async def test_sync_client_every_method(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await suspended_app(reconciler, events)

    def run() -> None:
        with GuardClient(sidecar.target) as guard:
            d = guard.can_create_classroom(
                "good", room_id="room-9", start_time=at(T0), end_time=at(T0 + HOUR)
            )
            assert isinstance(d, Decision)
            assert d.allowed and d.reason == Reason.OK
            assert d.state == State.ACTIVE

            d = guard.can_create_classroom(APP)
            assert not d.allowed
            assert d.reason == Reason.ACCOUNT_OVERDUE
            assert "Top up" in d.message

            d = guard.can_access_recording(APP, "rec-1", room_id="room-1")
            assert not d.allowed and d.reason == Reason.ACCOUNT_OVERDUE
            assert guard.can_access_recording("good", "rec-1").allowed

            # R6 through the client: started before the suspension.
            guard.report_classroom_started(
                APP, "room-1", at(T0 - 2 * HOUR), scheduled_end_time=at(T0 + HOUR)
            )
            d = guard.can_enter_classroom(APP, "room-1", user_id="t-1", role=Role.TEACHER)
            assert d.allowed and d.reason == Reason.IN_PROGRESS_PROTECTED
            assert ms(d.protected_until) == T0 + 2 * HOUR
            guard.report_classroom_ended(APP, "room-1", at(T0 - MINUTE))
            d = guard.can_enter_classroom(APP, "room-1")
            assert not d.allowed and d.reason == Reason.ACCOUNT_OVERDUE

            st = guard.get_application_status(APP)
            assert isinstance(st, ApplicationStatus)
            assert st.app_id == APP and st.account_id == ACCT
            assert st.state == State.SUSPENDED
            assert list(st.reasons) == [Reason.ACCOUNT_OVERDUE]

            with pytest.raises(GuardError) as info:
                guard.get_application_status("nobody")
            assert info.value.code == "NOT_FOUND"

            with pytest.raises(GuardError) as info:
                guard.can_create_classroom("bad id")
            assert info.value.code == "INVALID_ARGUMENT"
            assert info.value.details.startswith("app_id:")

            with pytest.raises(GuardError) as info:
                guard.report_classroom_started("nobody", "room-1", at(T0))
            assert info.value.code == "NOT_FOUND"

    await blocking(run)


async def test_sync_check_batch_with_helpers(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events
) -> None:
    await suspended_app(reconciler, events)

    def run() -> list[Decision]:
        with GuardClient(sidecar.target) as guard:
            return guard.check_batch(
                [
                    create_classroom_check("good", "room-1", at(T0), at(T0 + HOUR)),
                    enter_classroom_check(APP, "room-1", "u-1", Role.STUDENT),
                    access_recording_check("good", "rec-1", "room-1"),
                    create_classroom_check("nobody"),
                    access_recording_check(APP, "rec-2"),
                ]
            )

    decisions = await blocking(run)
    assert [(d.allowed, d.reason) for d in decisions] == [
        (True, Reason.OK),
        (False, Reason.ACCOUNT_OVERDUE),
        (True, Reason.OK),
        (False, Reason.UNKNOWN_APPLICATION),
        (False, Reason.ACCOUNT_OVERDUE),
    ]


def test_check_helpers_build_the_requests() -> None:
    create = create_classroom_check("a", "r", at(T0), at(T0 + HOUR)).to_proto()
    assert create.WhichOneof("kind") == "create_classroom"
    assert create.create_classroom.app_id == "a"
    assert create.create_classroom.room_id == "r"
    assert create.create_classroom.start_time.ToMilliseconds() == T0
    assert create.create_classroom.end_time.ToMilliseconds() == T0 + HOUR
    bare = create_classroom_check("a").to_proto()
    assert not bare.create_classroom.HasField("start_time")
    assert not bare.create_classroom.HasField("end_time")

    enter_ = enter_classroom_check("a", "r", "u", Role.ASSISTANT).to_proto()
    assert enter_.WhichOneof("kind") == "enter_classroom"
    assert (enter_.enter_classroom.user_id, enter_.enter_classroom.role) == (
        "u",
        pb.CLASSROOM_ROLE_ASSISTANT,
    )
    rec = access_recording_check("a", "rec", "r").to_proto()
    assert rec.WhichOneof("kind") == "access_recording"
    assert (rec.access_recording.recording_id, rec.access_recording.room_id) == ("rec", "r")


def test_naive_datetimes_are_refused_before_any_call() -> None:
    naive = dt.datetime(2026, 9, 21, 12, 0)
    with pytest.raises(ValueError, match="timezone"):
        create_classroom_check("a", start_time=naive)
    # Nothing listens on this target: the error must come before the network.
    with GuardClient(f"127.0.0.1:{free_port()}", retries=0) as guard:
        with pytest.raises(ValueError, match="timezone"):
            guard.report_classroom_started("a", "r", naive)
        with pytest.raises(ValueError, match="timezone"):
            guard.can_create_classroom("a", end_time=naive)


async def test_sync_client_is_closed_by_its_context_manager(sidecar: SidecarUnderTest) -> None:
    def run() -> None:
        with GuardClient(sidecar.target) as guard:
            assert guard.can_create_classroom("nobody").reason == (Reason.UNKNOWN_APPLICATION)
        with pytest.raises(ValueError, match="closed"):
            guard.can_create_classroom("nobody")
        other = GuardClient(sidecar.target)
        other.close()
        with pytest.raises(ValueError, match="closed"):
            other.can_access_recording("nobody", "rec-1")

    await blocking(run)


# -- every typed method, asyncio ----------------------------------------------------------


async def test_async_client_every_method(
    reconciler: Reconciler, sidecar: SidecarUnderTest, events: Events, clock: FakeClock
) -> None:
    await suspended_app(reconciler, events)
    async with AsyncGuardClient(sidecar.target) as guard:
        d = await guard.can_create_classroom(
            "good", room_id="room-9", start_time=at(T0), end_time=at(T0 + HOUR)
        )
        assert d.allowed and d.reason == Reason.OK
        d = await guard.can_create_classroom(APP)
        assert not d.allowed and d.reason == Reason.ACCOUNT_OVERDUE
        assert ms(d.release_at) > T0
        d = await guard.can_access_recording(APP, "rec-1", room_id="room-1")
        assert not d.allowed
        assert (await guard.can_access_recording("good", "rec-1")).allowed

        await guard.report_classroom_started(
            APP, "room-1", at(T0 - 2 * HOUR), scheduled_end_time=at(T0 + HOUR)
        )
        d = await guard.can_enter_classroom(APP, "room-1", user_id="s-1", role=Role.STUDENT)
        assert d.allowed and d.reason == Reason.IN_PROGRESS_PROTECTED
        await guard.report_classroom_ended(APP, "room-1", at(T0 + MINUTE))
        clock.now = T0 + MINUTE
        assert not (await guard.can_enter_classroom(APP, "room-1")).allowed

        decisions = await guard.check_batch(
            [
                enter_classroom_check("good", "room-1"),
                create_classroom_check(APP),
                access_recording_check("nobody", "rec-1"),
            ]
        )
        assert [d.reason for d in decisions] == [
            Reason.OK,
            Reason.ACCOUNT_OVERDUE,
            Reason.UNKNOWN_APPLICATION,
        ]

        st = await guard.get_application_status("good")
        assert st.state == State.ACTIVE and st.account_id == "acct-2"

        with pytest.raises(GuardError) as info:
            await guard.get_application_status("nobody")
        assert info.value.code == "NOT_FOUND"
        with pytest.raises(GuardError) as info:
            await guard.check_batch([])
        assert info.value.code == "INVALID_ARGUMENT"
        assert info.value.details.startswith("checks:")
        with pytest.raises(GuardError) as info:
            await guard.report_classroom_ended(APP, "room/1", at(T0))
        assert info.value.code == "INVALID_ARGUMENT"
        assert info.value.details.startswith("room_id:")

    with pytest.raises(grpc.aio.UsageError):
        await guard.can_create_classroom("good")


# -- deadlines ------------------------------------------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: a hung Redis."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture
async def slow_target(
    black_hole: int, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[str]:
    """A sidecar whose every store call hangs for a minute."""
    store = Store(connect(f"redis://127.0.0.1:{black_hole}/0", timeout=60.0))
    checker = Checker(store, policy, render=RENDER, read_timeout=60.0, clock=clock)
    running = await start_server(servicer(checker, store, store_timeout=60.0), "127.0.0.1:0")
    yield f"127.0.0.1:{running.port}"
    await running.stop(grace=0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(store.close(), 2)


def _timed(fn: Callable[[], Any]) -> tuple[float, str | None]:
    started = time.monotonic()
    try:
        fn()
    except GuardError as exc:
        return time.monotonic() - started, exc.code
    return time.monotonic() - started, None


async def test_sync_default_and_explicit_deadlines(slow_target: str) -> None:
    assert DEFAULT_TIMEOUT == 0.5

    def run() -> None:
        with GuardClient(slow_target) as guard:
            took, code = _timed(lambda: guard.can_create_classroom(APP))
            assert code == "DEADLINE_EXCEEDED"
            assert DEFAULT_TIMEOUT * 0.9 <= took < DEFAULT_TIMEOUT + 1.0
            took, code = _timed(lambda: guard.get_application_status(APP, timeout=0.15))
            assert code == "DEADLINE_EXCEEDED"
            assert took < 0.15 + 1.0
        with GuardClient(slow_target, timeout=0.1) as guard:
            took, code = _timed(lambda: guard.check_batch([create_classroom_check(APP)]))
            assert code == "DEADLINE_EXCEEDED"
            assert 0.09 <= took < 0.1 + 1.0
            took, code = _timed(
                lambda: guard.report_classroom_started(APP, "room-1", at(T0), timeout=1.0)
            )
            assert code == "DEADLINE_EXCEEDED"
            assert 0.9 <= took < 2.0

    await blocking(run)


async def test_async_default_and_explicit_deadlines(slow_target: str) -> None:
    async with AsyncGuardClient(slow_target) as guard:
        started = time.monotonic()
        with pytest.raises(GuardError) as info:
            await guard.can_access_recording(APP, "rec-1")
        took = time.monotonic() - started
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert DEFAULT_TIMEOUT * 0.9 <= took < DEFAULT_TIMEOUT + 1.0
    async with AsyncGuardClient(slow_target, timeout=0.1) as guard:
        started = time.monotonic()
        with pytest.raises(GuardError) as info:
            await guard.can_enter_classroom(APP, "room-1")
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 1.1


# -- retries: only on UNAVAILABLE -----------------------------------------------------------


@dataclass
class Recorder:
    """A hook of the sidecar's serving core that counts calls by method,
    keeps their metadata, and refuses the first ``unavailable_first`` of
    each method with UNAVAILABLE."""

    unavailable_first: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    metadata: list[dict[str, str]] = field(default_factory=list)

    def wants(self, method: str) -> bool:
        return True

    def enter(self, method: str, raw: bytes, context: Any) -> None:
        name = method.rsplit("/", 1)[-1]
        self.calls[name] += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls[name] <= self.unavailable_first:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "starting up")

    def leave(self, state: Any, response: bytes | None, code: grpc.StatusCode) -> None:
        pass


@dataclass
class CountedServer:
    target: str
    recorder: Recorder


@pytest.fixture
async def counted(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> AsyncIterator[CountedServer]:
    recorder = Recorder()
    checker = Checker(store, policy, render=RENDER, read_timeout=2.0, clock=clock)
    # The sidecar's own server, with the recorder as its outermost hook.
    running = await start_server(servicer(checker, store), "127.0.0.1:0", hooks=[recorder])
    yield CountedServer(f"127.0.0.1:{running.port}", recorder)
    await running.stop(grace=0)


@pytest.mark.parametrize(("failures", "retries"), [(1, 2), (2, 2), (4, 4)])
async def test_unavailable_is_retried_within_the_budget(
    counted: CountedServer, failures: int, retries: int
) -> None:
    counted.recorder.unavailable_first = failures
    async with AsyncGuardClient(counted.target, retries=retries, timeout=5) as guard:
        d = await guard.can_create_classroom("nobody")
    assert d.reason == Reason.UNKNOWN_APPLICATION
    assert counted.recorder.calls["CanCreateClassroom"] == failures + 1


async def test_retries_are_bounded(counted: CountedServer) -> None:
    counted.recorder.unavailable_first = 100
    async with AsyncGuardClient(counted.target, retries=2, timeout=5) as guard:
        with pytest.raises(GuardError) as info:
            await guard.can_access_recording("nobody", "rec-1")
    assert info.value.code == "UNAVAILABLE"
    assert counted.recorder.calls["CanAccessRecording"] == 3


async def test_no_retries_when_told(counted: CountedServer) -> None:
    counted.recorder.unavailable_first = 1

    def run() -> str | None:
        with GuardClient(counted.target, retries=0, timeout=5) as guard:
            return _timed(lambda: guard.can_create_classroom("nobody"))[1]

    assert await blocking(run) == "UNAVAILABLE"
    assert counted.recorder.calls["CanCreateClassroom"] == 1


async def test_sync_client_retries_unavailable(counted: CountedServer) -> None:
    counted.recorder.unavailable_first = 2

    def run() -> Decision:
        with GuardClient(counted.target, timeout=5) as guard:
            return guard.can_enter_classroom("nobody", "room-1")

    assert (await blocking(run)).reason == Reason.UNKNOWN_APPLICATION
    assert counted.recorder.calls["CanEnterClassroom"] == 3


async def test_invalid_argument_and_not_found_and_denials_are_not_retried(
    counted: CountedServer,
) -> None:
    async with AsyncGuardClient(counted.target, retries=4, timeout=5) as guard:
        with pytest.raises(GuardError) as info:
            await guard.can_create_classroom("no such id!")
        assert info.value.code == "INVALID_ARGUMENT"
        with pytest.raises(GuardError) as info:
            await guard.get_application_status("nobody")
        assert info.value.code == "NOT_FOUND"
        denied = await guard.can_access_recording("nobody", "rec-1")
        assert not denied.allowed

    def run() -> None:
        with GuardClient(counted.target, retries=4, timeout=5) as guard:
            with pytest.raises(GuardError) as info:
                guard.check_batch([create_classroom_check("no such id!")])
            assert info.value.code == "INVALID_ARGUMENT"

    await blocking(run)
    assert counted.recorder.calls == Counter(
        {
            "CanCreateClassroom": 1,
            "GetApplicationStatus": 1,
            "CanAccessRecording": 1,
            "CheckBatch": 1,
        }
    )


async def test_bearer_token_is_sent(counted: CountedServer) -> None:
    async with AsyncGuardClient(counted.target, bearer_token="s3cret") as guard:
        await guard.can_create_classroom("nobody")
    assert counted.recorder.metadata[-1].get("authorization") == "Bearer s3cret"
    async with AsyncGuardClient(counted.target) as guard:
        await guard.can_create_classroom("nobody")
    assert "authorization" not in counted.recorder.metadata[-1]


@pytest.mark.parametrize("delay", [0.05, 0.25])
async def test_a_sidecar_started_just_after_the_call_answers_it(
    store: Store, policy: PolicyConfig, clock: FakeClock, delay: float
) -> None:
    port = free_port()
    checker = Checker(store, policy, render=RENDER, read_timeout=2.0, clock=clock)
    servers = []

    async def start_later() -> None:
        await asyncio.sleep(delay)
        servers.append(await start_server(servicer(checker, store), f"127.0.0.1:{port}"))

    starter = asyncio.create_task(start_later())
    try:
        async with AsyncGuardClient(f"127.0.0.1:{port}", timeout=2.0) as guard:
            started = time.monotonic()
            d = await guard.can_create_classroom("nobody")
            took = time.monotonic() - started
        assert d.reason == Reason.UNKNOWN_APPLICATION
        assert delay <= took < 2.0
    finally:
        await starter
        for s in servers:
            await s.stop(grace=0)


async def test_sync_client_rides_out_a_restart(
    store: Store, policy: PolicyConfig, clock: FakeClock
) -> None:
    port = free_port()
    checker = Checker(store, policy, render=RENDER, read_timeout=2.0, clock=clock)
    first = await start_server(servicer(checker, store), f"127.0.0.1:{port}")
    guard = GuardClient(f"127.0.0.1:{port}", timeout=2.0)
    try:
        assert not (await blocking(lambda: guard.can_create_classroom("nobody"))).allowed
        await first.stop(grace=0)
        call = asyncio.create_task(blocking(lambda: guard.can_create_classroom("nobody")))
        await asyncio.sleep(0.1)
        second = await start_server(servicer(checker, store), f"127.0.0.1:{port}")
        try:
            d = await call
            assert d.reason == Reason.UNKNOWN_APPLICATION
        finally:
            await second.stop(grace=0)
    finally:
        guard.close()


async def test_a_sidecar_that_never_comes_fails_in_time(store: Store) -> None:
    target = f"127.0.0.1:{free_port()}"
    async with AsyncGuardClient(target, timeout=0.3) as guard:
        started = time.monotonic()
        with pytest.raises(GuardError) as info:
            await guard.can_create_classroom("nobody")
        assert time.monotonic() - started < 1.3
    assert info.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    async with AsyncGuardClient(target, timeout=5, retries=0) as guard:
        started = time.monotonic()
        with pytest.raises(GuardError) as info:
            await guard.can_create_classroom("nobody")
        assert time.monotonic() - started < 1.0  # fails fast: no waiting, no retry
    assert info.value.code == "UNAVAILABLE"


# -- TLS and mutual TLS ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_sidecar(
    pki: Pki, store: Store, policy: PolicyConfig, clock: FakeClock, *, mutual: bool
) -> AsyncIterator[int]:
    checker = Checker(store, policy, render=RENDER, read_timeout=2.0, clock=clock)
    files = TlsFiles(
        cert=str(pki.server.cert),
        key=str(pki.server.key),
        client_ca=str(pki.ca.ca) if mutual else None,
    )
    running = await start_server(servicer(checker, store), "127.0.0.1:0", tls=files)
    try:
        yield running.port
    finally:
        await running.stop(grace=0)


async def _refused(target: str, tls: TlsConfig | None) -> str:
    # retries=0: fail at once with the transport's error rather than wait
    # out the deadline for a connection that will never be accepted.
    async with AsyncGuardClient(target, tls=tls, retries=0, timeout=5) as guard:
        with pytest.raises(GuardError) as info:
            await guard.can_create_classroom("nobody")
    return info.value.code


async def test_tls_server_authentication(
    pki: Pki,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
    reconciler: Reconciler,
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    async with tls_sidecar(pki, store, policy, clock, mutual=False) as port:
        for host in ("127.0.0.1", "localhost"):
            async with AsyncGuardClient(
                f"{host}:{port}", tls=TlsConfig(root_certificates=pki.ca.ca)
            ) as guard:
                assert (await guard.can_create_classroom(APP)).allowed

        # PEM bytes and str paths work as well as Path.
        def run() -> Decision:
            tls = TlsConfig(root_certificates=pki.ca.ca.read_bytes())
            with GuardClient(f"127.0.0.1:{port}", tls=tls) as guard:
                return guard.can_access_recording(APP, "rec-1")

        assert (await blocking(run)).allowed
        async with AsyncGuardClient(
            f"127.0.0.1:{port}",
            tls=TlsConfig(root_certificates=str(pki.ca.ca), server_name="localhost"),
        ) as guard:
            assert (await guard.get_application_status(APP)).app_id == APP

        target = f"127.0.0.1:{port}"
        # A server name the certificate does not carry is refused.
        wrong_name = TlsConfig(root_certificates=pki.ca.ca, server_name="sidecar.example")
        assert await _refused(target, wrong_name) == "UNAVAILABLE"
        # A server certificate from a CA the client does not trust is refused.
        assert await _refused(target, TlsConfig(root_certificates=pki.other_ca.ca)) == "UNAVAILABLE"
        # Plaintext against a TLS port gets nowhere.
        assert await _refused(target, None) == "UNAVAILABLE"


async def test_mutual_tls(
    pki: Pki,
    store: Store,
    policy: PolicyConfig,
    clock: FakeClock,
    events: Events,
    reconciler: Reconciler,
) -> None:
    await reconciler.ingest(deliveries(events.app(ACCT, APP)))
    async with tls_sidecar(pki, store, policy, clock, mutual=True) as port:
        target = f"127.0.0.1:{port}"
        good = TlsConfig(
            root_certificates=pki.ca.ca,
            certificate_chain=pki.allowed.cert,
            private_key=pki.allowed.key,
        )
        async with AsyncGuardClient(target, tls=good) as guard:
            assert (await guard.can_create_classroom(APP)).allowed
            decisions = await guard.check_batch([access_recording_check(APP, "rec-1")])
            assert decisions[0].allowed

        def run() -> Decision:
            with GuardClient(target, tls=good) as guard:
                return guard.can_enter_classroom(APP, "room-1")

        assert (await blocking(run)).allowed

        # No client certificate: refused.
        no_cert = TlsConfig(root_certificates=pki.ca.ca)
        assert await _refused(target, no_cert) == "UNAVAILABLE"
        # A client certificate from another CA: refused.
        rogue = TlsConfig(
            root_certificates=pki.ca.ca,
            certificate_chain=pki.stranger.cert,
            private_key=pki.stranger.key,
        )
        assert await _refused(target, rogue) == "UNAVAILABLE"

        # With the default client (retries on), refusal is still an error in time.
        async with AsyncGuardClient(target, tls=no_cert, timeout=0.5) as guard:
            with pytest.raises(GuardError) as info:
                await guard.can_create_classroom(APP)
        assert info.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


# -- footprint -----------------------------------------------------------------------------


def test_client_does_not_import_redis_or_the_server() -> None:
    code = (
        "import sys, lcic_guard_client\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
        "assert 'lcic_guard' not in sys.modules, 'server imported'\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
