"""Untrusted callers (issue 5, item 5): TLS with certificate reload, mutual
TLS identities and bearer tokens for the RPCs that change or reveal state,
Redis AUTH/ACL users and TLS, ids that cannot reach another key, and no
secret in any log. Real sockets, real certificates, real redis-servers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.cli import build_parser
from lcic_guard.config import Settings
from lcic_guard.demo import EmbeddedRedis, find_redis_server, free_port
from lcic_guard.domain.facts import valid_id
from lcic_guard.domain.policy import PolicyConfig
from lcic_guard.flags import settings_from
from lcic_guard.logs import redact_url
from lcic_guard.reconciler import Reconciler
from lcic_guard.runner import RunningSidecar, build_sidecar
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import (
    BILLING_STREAM,
    facts_key,
    feed_key,
    feed_shard,
    meta_key,
    parked_key,
    status_key,
    status_key_app,
)
from lcic_guard.store.status import Store
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError

from tests.support.clock import T0, FakeClock
from tests.support.events import Events, deliveries
from tests.support.pki import ALLOWED, SPIFFE, Authority, Issued, Pki
from tests.support.settings import sidecar_settings

TOKEN = "tok-3f9a6c1e-please-never-log-me"

Code = grpc.StatusCode


# -- certificates ---------------------------------------------------------------


def tls_channel(port: int, root: bytes, client: Issued | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- a sidecar with some data -----------------------------------------------------


@pytest_asyncio.fixture
async def seeded(reconciler: Reconciler, events: Events) -> Reconciler:
    await reconciler.ingest(deliveries(events.app("acct", "app-1")))
    return reconciler


@pytest_asyncio.fixture
async def start_sidecar(
    store: Store, clock: FakeClock, policy: PolicyConfig
) -> AsyncIterator[Callable[..., Awaitable[RunningSidecar]]]:
    started: list[RunningSidecar] = []

    async def start(**kw: Any) -> RunningSidecar:
        settings = sidecar_settings(redis_timeout_ms=2000, policy=policy, **kw)
        sidecar = await build_sidecar(settings, store, clock=clock)
        started.append(sidecar)
        # Health says SERVING once the table is loaded: what the tests read.
        await asyncio.wait_for(sidecar.feed.synced.wait(), 10)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop(grace=0.2)


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def watch_first(stub: pb_grpc.EnforcementServiceStub, **kw: Any) -> grpc.StatusCode:
    call = stub.WatchApplicationStatus(
        pb.WatchApplicationStatusRequest(app_ids=["app-1"]), timeout=5, **kw
    )
    try:
        await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        call.cancel()
    return Code.OK


def report(app: str = "app-1") -> pb.ReportClassroomStartedRequest:
    req = pb.ReportClassroomStartedRequest(app_id=app, room_id="room-1")
    req.started_at.FromMilliseconds(T0)
    return req


async def protected_codes(stub: pb_grpc.EnforcementServiceStub, **kw: Any) -> list[grpc.StatusCode]:
    """The answers of the RPCs that change or reveal state."""
    ended = pb.ReportClassroomEndedRequest(app_id="app-1", room_id="room-1")
    ended.ended_at.FromMilliseconds(T0 + 1000)
    return [
        await code_of(stub.ReportClassroomStarted(report(), **kw)),
        await code_of(stub.ReportClassroomEnded(ended, **kw)),
        await code_of(
            stub.GetApplicationStatus(pb.GetApplicationStatusRequest(app_id="app-1"), **kw)
        ),
        await watch_first(stub, **kw),
    ]


async def check_codes(stub: pb_grpc.EnforcementServiceStub, **kw: Any) -> list[grpc.StatusCode]:
    batch = pb.CheckBatchRequest(
        checks=[pb.Check(create_classroom=pb.CanCreateClassroomRequest(app_id="app-1"))]
    )
    return [
        await code_of(stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1"), **kw)),
        await code_of(
            stub.CanEnterClassroom(pb.CanEnterClassroomRequest(app_id="app-1", room_id="r"), **kw)
        ),
        await code_of(
            stub.CanAccessRecording(
                pb.CanAccessRecordingRequest(app_id="app-1", recording_id="rec"), **kw
            )
        ),
        await code_of(stub.CheckBatch(batch, **kw)),
    ]


def token_file(tmp_path: Path, *tokens: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# bearer tokens of the classroom service\n\n" + "\n".join(tokens) + "\n")
    return path


# -- bearer tokens ----------------------------------------------------------------


async def test_state_rpcs_need_a_bearer_token_and_checks_stay_open(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]],
    seeded: Reconciler,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = token_file(tmp_path, "another-token", TOKEN)
    sidecar = await start_sidecar(auth_token_file=str(tokens))
    U, OK = Code.UNAUTHENTICATED, Code.OK
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        assert await check_codes(stub) == [OK] * 4
        assert await protected_codes(stub) == [U] * 4
        assert await protected_codes(stub, metadata=bearer("not-" + TOKEN)) == [U] * 4
        assert await protected_codes(stub, metadata=bearer(TOKEN[:-1])) == [U] * 4
        basic = (("authorization", f"Basic {TOKEN}"),)
        assert await protected_codes(stub, metadata=basic) == [U] * 4
        assert await protected_codes(stub, metadata=bearer(TOKEN)) == [OK] * 4
        assert await protected_codes(stub, metadata=bearer("another-token")) == [OK] * 4
        # Health and reflection are not behind the token.
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        # The refusal says what is missing, and never echoes the token.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetApplicationStatus(
                pb.GetApplicationStatusRequest(app_id="app-1"), metadata=bearer("wrong")
            )
        assert "invalid bearer token" in (err.value.details() or "")

        # Tokens rotate without a restart: the file is read again on change.
        tokens.write_text("fresh-token\n")
        os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
        await asyncio.sleep(1.1)
        assert await protected_codes(stub, metadata=bearer(TOKEN)) == [U] * 4
        assert await protected_codes(stub, metadata=bearer("fresh-token")) == [OK] * 4
    assert "auth:" in caplog.text and "UNAUTHENTICATED" in caplog.text
    assert TOKEN not in caplog.text and "fresh-token" not in caplog.text


async def test_auth_checks_puts_the_checks_behind_the_token_too(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]], seeded: Reconciler, tmp_path: Path
) -> None:
    sidecar = await start_sidecar(
        auth_token_file=str(token_file(tmp_path, TOKEN)), auth_checks=True
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        assert await check_codes(stub) == [Code.UNAUTHENTICATED] * 4
        assert await check_codes(stub, metadata=bearer(TOKEN)) == [Code.OK] * 4
        # Health needs no token. It says SERVING once the replica is loaded,
        # which a loaded machine may not have finished yet.
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while (await health.Check(health_pb2.HealthCheckRequest())).status != (
            health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline, "health never said SERVING"
            await asyncio.sleep(0.02)


# -- mutual TLS identities ----------------------------------------------------------


async def test_mtls_identities_on_the_allow_list_may_report_and_read(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]],
    seeded: Reconciler,
    pki: Pki,
    tmp_path: Path,
) -> None:
    sidecar = await start_sidecar(
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca.ca),
        auth_allow_identities=frozenset({ALLOWED, "gateway-7"}),
        auth_token_file=str(token_file(tmp_path, TOKEN)),
    )
    root = pki.ca.ca_pem
    OK, DENIED = Code.OK, Code.PERMISSION_DENIED
    for client, expected in [
        (pki.allowed, OK),  # by common name (it has no DNS name)
        (pki.by_san, OK),  # by common name: its URI name (a SPIFFE id) is not a DNS name
        (pki.intruder, DENIED),  # authenticated, not allowed
    ]:
        async with tls_channel(sidecar.port, root, client) as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            assert await protected_codes(stub) == [expected] * 4, client.cert.name
            assert await check_codes(stub) == [OK] * 4
    # A token lets a certificate that is not on the list through.
    async with tls_channel(sidecar.port, root, pki.intruder) as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        assert await protected_codes(stub, metadata=bearer(TOKEN)) == [OK] * 4
    # Mutual TLS: no certificate, or one from another CA (with an allowed
    # name), does not get a connection at all.
    for cert in (None, pki.stranger):
        async with tls_channel(sidecar.port, root, cert) as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            req = pb.CanCreateClassroomRequest(app_id="app-1")
            assert await code_of(stub.CanCreateClassroom(req, timeout=3)) == Code.UNAVAILABLE
    # Plaintext is not served on a TLS port.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        req = pb.CanCreateClassroomRequest(app_id="app-1")
        assert await code_of(stub.CanCreateClassroom(req, timeout=3)) == Code.UNAVAILABLE


# -- who is recorded: named tokens and the certificate name that granted ----------


def hold(reason: str = "dispute 77") -> pb.ApplyOverrideRequest:
    return pb.ApplyOverrideRequest(
        kind=pb.OVERRIDE_KIND_HOLD_RELEASE, account_id="acct", reason=reason
    )


async def actor_of(stub: pb_grpc.EnforcementServiceStub, **kw: Any) -> str:
    """The actor ApplyOverride records for these credentials."""
    return str((await stub.ApplyOverride(hold(), timeout=5, **kw)).override.actor)


async def details_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


async def published_actors(store: Store) -> list[str]:
    entries: Any = await store.redis.xrange(BILLING_STREAM)
    return [json.loads(fields[b"event"])["actor"] for _, fields in entries]


async def test_a_named_token_is_recorded_under_its_name(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]],
    seeded: Reconciler,
    store: Store,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = token_file(
        tmp_path,
        "support-alice:admin:tok-alice:may:hold:colons",
        "classroom-svc::tok-classroom",  # no scopes: check,report,read
        f"{TOKEN} admin",  # the older form, unnamed
    )
    sidecar = await start_sidecar(auth_token_file=str(tokens))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        assert await actor_of(stub, metadata=bearer("tok-alice:may:hold:colons")) == (
            "support-alice"
        )
        unnamed = "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
        assert await actor_of(stub, metadata=bearer(TOKEN)) == unnamed
        assert await protected_codes(stub, metadata=bearer("tok-classroom")) == [Code.OK] * 4
        code, details = await details_of(
            stub.ApplyOverride(hold(), metadata=bearer("tok-classroom"))
        )
        assert code == Code.PERMISSION_DENIED
        assert "needs scope 'admin'; the bearer token classroom-svc has" in details
        # Neither the name nor the scopes are part of the token.
        for wrong in ("support-alice:admin:tok-alice:may:hold:colons", "tok-alice", "admin"):
            assert await code_of(stub.ApplyOverride(hold(), metadata=bearer(wrong))) == (
                Code.UNAUTHENTICATED
            )
    # What the reconciler will apply, and audit list, carries the name.
    assert await published_actors(store) == ["support-alice", unnamed]
    assert "tok-alice" not in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (
            ["alice:admin:tok-1", "alice:read:tok-2"],
            "line 4: name 'alice' is already used on line 3",
        ),
        (["alice:admin:tok-1", "bob:read:tok-1"], "line 4: the same token as line 3"),
        (["tok-1 read", "tok-1 admin"], "line 4: the same token as line 3"),
        (["alice:admin:tok-1", "tok-1"], "line 4: the same token as line 3"),
        (["alice:admin"], "line 3: a line with a colon is NAME:SCOPES:TOKEN"),
        (["alice:admin:"], "line 3: a line with a colon is NAME:SCOPES:TOKEN"),
        (["alice:admin:tok 1"], "line 3: a line with a colon is NAME:SCOPES:TOKEN"),
        (["al ice:admin:tok-1"], "line 3: name 'al ice' is not"),
        ([":admin:tok-1"], "line 3: name '' is not"),
        (["-alice:admin:tok-1"], "line 3: name '-alice' is not"),
        (["alice:root:tok-1"], "line 3: unknown scope 'root'"),
    ],
)
def test_a_malformed_token_file_is_refused_at_start_naming_the_line(
    tmp_path: Path, lines: list[str], says: str
) -> None:
    tokens = token_file(tmp_path, *lines)
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    with pytest.raises(SystemExit) as err:
        settings_from(build_parser().parse_args(["serve", *tls, "--auth-token-file", str(tokens)]))
    message = str(err.value.code)
    assert message.startswith(f"--auth-token-file {tokens} ") and says in message, message


async def test_a_malformed_token_file_read_again_keeps_the_named_tokens(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]],
    seeded: Reconciler,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = token_file(tmp_path, "support-alice:admin:tok-alice")
    sidecar = await start_sidecar(auth_token_file=str(tokens))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        assert await actor_of(stub, metadata=bearer("tok-alice")) == "support-alice"
        tokens.write_text("support-alice:admin:tok-alice\nsupport-alice:admin:tok-mallory\n")
        os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
        await asyncio.sleep(1.1)
        assert await actor_of(stub, metadata=bearer("tok-alice")) == "support-alice"
        assert await code_of(stub.ApplyOverride(hold(), metadata=bearer("tok-mallory"))) == (
            Code.UNAUTHENTICATED
        )
    assert "line 2: name 'support-alice' is already used on line 1" in caplog.text
    assert "keeping the old tokens" in caplog.text


@pytest.fixture
def desk(tmp_path: Path) -> tuple[Authority, Issued]:
    """A CA of its own and its server certificate."""
    ca = Authority(tmp_path, "desk")
    return ca, ca.issue("lcic-guard", server=True)


async def test_the_actor_is_the_certificate_name_that_granted_the_scope(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]],
    seeded: Reconciler,
    store: Store,
    desk: tuple[Authority, Issued],
) -> None:
    ca, server = desk
    both = ca.issue("desk-7", client=True, dns=("classroom-svc", "support-admin"))
    only_classroom = ca.issue("desk-8", client=True, dns=("classroom-svc",))
    sidecar = await start_sidecar(
        tls_cert=str(server.cert),
        tls_key=str(server.key),
        tls_client_ca=str(ca.ca),
        auth_allow_identities=frozenset({"classroom-svc", "support-admin=admin"}),
    )
    async with tls_channel(sidecar.port, ca.ca_pem, both) as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        # classroom-svc sorts first; support-admin is the name that grants admin.
        assert await actor_of(stub) == "support-admin"
        assert await protected_codes(stub) == [Code.OK] * 4
    async with tls_channel(sidecar.port, ca.ca_pem, only_classroom) as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        code, details = await details_of(stub.ApplyOverride(hold(), timeout=5))
        assert code == Code.PERMISSION_DENIED
        assert "needs scope 'admin'; the client identity classroom-svc has" in details
    assert await published_actors(store) == ["support-admin"]


async def test_only_dns_names_and_the_common_name_match_the_allow_list(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]],
    seeded: Reconciler,
    store: Store,
    desk: tuple[Authority, Issued],
) -> None:
    ca, server = desk
    by_uri = ca.issue("gateway-1", client=True, uris=("support-admin",))
    by_email = ca.issue("gateway-2", client=True, emails=("support-admin",))
    # A common name counts only on a certificate without DNS names.
    cn_beside_dns = ca.issue("support-admin", client=True, dns=("gateway-3",))
    by_cn = ca.issue("support-admin", client=True, file_stem="cn-only")
    sidecar = await start_sidecar(
        tls_cert=str(server.cert),
        tls_key=str(server.key),
        tls_client_ca=str(ca.ca),
        auth_allow_identities=frozenset({"support-admin=admin"}),
    )
    for client in (by_uri, by_email, cn_beside_dns):
        async with tls_channel(sidecar.port, ca.ca_pem, client) as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            assert await protected_codes(stub) == [Code.PERMISSION_DENIED] * 4, client.cert
            code, details = await details_of(stub.ApplyOverride(hold(), timeout=5))
            assert code == Code.PERMISSION_DENIED, client.cert
            assert "is not allowed" in details and "support-admin" not in details, details
    async with tls_channel(sidecar.port, ca.ca_pem, by_cn) as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        assert await actor_of(stub) == "support-admin"
    assert await published_actors(store) == ["support-admin"]


# -- certificate reload -------------------------------------------------------------


def replace_file(path: Path, data: bytes) -> None:
    """Atomically, as a secret volume or cert-manager does, with a new mtime."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def served_by(port: int, root: bytes, client: Issued | None = None) -> grpc.StatusCode:
    async with tls_channel(port, root, client) as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        req = pb.CanCreateClassroomRequest(app_id="app-1")
        return await code_of(stub.CanCreateClassroom(req, timeout=3))


async def test_changed_certificate_files_are_used_for_new_connections(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]],
    seeded: Reconciler,
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    sidecar = await start_sidecar(tls_cert=str(cert), tls_key=str(key))
    files = sidecar.server.certificates
    assert files is not None
    old_root, new_root = pki.ca.ca_pem, pki.other_ca.ca_pem
    assert await served_by(sidecar.port, old_root) == Code.OK
    assert await served_by(sidecar.port, new_root) == Code.UNAVAILABLE

    async with tls_channel(sidecar.port, old_root) as kept:
        kept_stub = pb_grpc.EnforcementServiceStub(kept)
        req = pb.CanCreateClassroomRequest(app_id="app-1")
        await kept_stub.CanCreateClassroom(req)

        # A half-done rotation (new certificate, old key) is not taken up.
        replace_file(cert, pki.other_server.cert.read_bytes())
        assert await served_by(sidecar.port, old_root) == Code.OK
        assert files.failures >= 1 and files.reloads == 0
        assert "keeping the old ones" in caplog.text

        # The rotation completes: new connections get the new certificate.
        replace_file(key, pki.other_server.key.read_bytes())
        assert await served_by(sidecar.port, new_root) == Code.OK
        assert await served_by(sidecar.port, old_root) == Code.UNAVAILABLE
        assert files.reloads == 1
        # A connection made before keeps working.
        assert (await kept_stub.CanCreateClassroom(req)).decision.allowed


# -- Redis AUTH, ACL users and TLS ----------------------------------------------------


async def checks_through(url: str, reconciler_url: str | None = None) -> list[pb.Decision]:
    """Load one app through ``reconciler_url`` (default ``url``) and ask a
    sidecar that reads Redis through ``url``."""
    events = Events()
    feeder = Store(connect(reconciler_url or url))
    reader = Store(connect(url))
    sidecar = None
    try:
        rec = Reconciler(feeder, PolicyConfig(), clock=FakeClock())
        await rec.ingest(
            deliveries(
                [*events.app("acct", "app-1"), events("compliance_ban", T0, account_id="acct-b")]
            )
        )
        settings = sidecar_settings(redis_timeout_ms=2000)
        sidecar = await build_sidecar(settings, reader, clock=FakeClock())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = pb_grpc.EnforcementServiceStub(channel)
            out = []
            for app in ("app-1", "app-unknown"):
                req = pb.CanCreateClassroomRequest(app_id=app)
                out.append((await stub.CanCreateClassroom(req)).decision)
            return out
    finally:
        if sidecar is not None:
            await sidecar.stop(grace=0.2)
        await reader.close()
        await feeder.close()


ACL_USER = "guard"
ACL_PASSWORD = "acl-pw-5b1d0e7c-never-log-me"
ADMIN_PASSWORD = "admin-pw-90c2f4a8-never-log-me"


def protect(server: EmbeddedRedis) -> None:
    """A password for the default user, and a user limited to lcic-guard's
    keys without the dangerous commands."""
    cli = ["redis-cli", "-p", str(server.port), "--no-auth-warning"]
    subprocess.run([*cli, "CONFIG", "SET", "requirepass", ADMIN_PASSWORD], check=True)
    subprocess.run(
        [
            *cli,
            "-a",
            ADMIN_PASSWORD,
            "ACL",
            "SETUSER",
            ACL_USER,
            "on",
            f">{ACL_PASSWORD}",
            "~lcic:*",
            "+@all",
            "-@dangerous",
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def redis_with_acl() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    protect(server)
    yield server
    server.stop()


async def test_redis_acl_user_and_password_in_the_url(redis_with_acl: EmbeddedRedis) -> None:
    port = redis_with_acl.port
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}/0"
    admin = f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{port}/0"
    good, unknown = await checks_through(url)
    assert good.allowed and good.reason == pb.DECISION_REASON_OK and not good.degraded
    assert unknown.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION and not unknown.degraded
    # The ACL really applies: the user cannot touch keys that are not ours,
    # nor run dangerous commands.
    client = Redis.from_url(url)
    try:
        with pytest.raises(NoPermissionError):
            await client.get("other-app:secret")
        with pytest.raises(NoPermissionError):
            await client.flushall()
    finally:
        await client.aclose()
    # The password-only (default user) form works too.
    good, _ = await checks_through(admin)
    assert good.allowed
    # Wrong or missing credentials fail, and the error does not carry them.
    for bad in (
        f"redis://{ACL_USER}:wrong-{ACL_PASSWORD}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0",
    ):
        store = Store(connect(bad))
        try:
            with pytest.raises((AuthenticationError, ConnectionError)) as err:
                await store.read_status("app-1")
            assert ACL_PASSWORD not in str(err.value)
        finally:
            await store.close()


@dataclass
class RedisTls:
    port: int
    ca: Authority
    other_ca: Authority
    client: Issued


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTls]:
    d = tmp_path_factory.mktemp("redis-tls")
    ca = Authority(d, "redis-ca")
    server = ca.issue("redis", server=True)
    client = ca.issue("lcic-guard", client=True)
    other = Authority(d, "not-redis-ca")
    port = free_port()
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(server.cert),
            "--tls-key-file",
            str(server.key),
            "--tls-ca-cert-file",
            str(ca.ca),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--logfile",
            str(d / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (d / "redis.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "redis-server with TLS did not listen"
                time.sleep(0.02)
        yield RedisTls(port, ca, other, client)
    finally:
        proc.terminate()
        proc.wait(5)


def rediss(tls: RedisTls, *, ca: Path | None = None, client: bool = True) -> str:
    q = f"ssl_ca_certs={ca or tls.ca.ca}"
    if client:
        q += f"&ssl_certfile={tls.client.cert}&ssl_keyfile={tls.client.key}"
    return f"rediss://127.0.0.1:{tls.port}/0?{q}"


async def test_rediss_with_the_ca_and_client_certificate_in_the_url(redis_tls: RedisTls) -> None:
    good, unknown = await checks_through(rediss(redis_tls))
    assert good.allowed and good.reason == pb.DECISION_REASON_OK and not good.degraded
    assert unknown.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION
    # The server is verified against the CA given, and it verifies us.
    for bad in (rediss(redis_tls, ca=redis_tls.other_ca.ca), rediss(redis_tls, client=False)):
        store = Store(connect(bad))
        try:
            with pytest.raises(ConnectionError):
                await store.read_status("app-1")
        finally:
            await store.close()


# -- ids cannot reach another key ------------------------------------------------------

ID_ALPHABET = st.text(
    alphabet="abcAZ09._:-",
    min_size=1,
    max_size=64,
)
KEYS = (status_key, parked_key, facts_key, meta_key)


@given(a=ID_ALPHABET, b=ID_ALPHABET)
def test_keys_of_different_ids_never_collide(a: str, b: str) -> None:
    assert valid_id(a) and valid_id(b)
    # The hash tag of an account's keys is exactly the id: one id, one slot.
    assert key_slot(facts_key(a).encode()) == key_slot(a.encode())
    assert key_slot(meta_key(a).encode()) == key_slot(a.encode())
    # An app's keys are in its feed shard's slot, the id spelled out after it.
    shard_slot = key_slot(feed_key(feed_shard(a)).encode())
    assert key_slot(status_key(a).encode()) == key_slot(parked_key(a).encode()) == shard_slot
    assert status_key_app(status_key(a)) == a
    keys_a = {make(a) for make in KEYS}
    keys_b = {make(b) for make in KEYS}
    assert len(keys_a) == len(KEYS)
    if a != b:
        assert not keys_a & keys_b


@given(st.text(min_size=1, max_size=64).filter(lambda s: any(c in s for c in "{}*?[] \n\\/")))
def test_ids_that_could_shape_a_key_are_not_valid(text: str) -> None:
    assert not valid_id(text)


@pytest.mark.parametrize(
    "bad", ["{app-1}", "app}:status", "x}{app-1", "app-1*", "lcic:app:{app-1}:status", "a[1]"]
)
async def test_ids_with_key_syntax_are_refused_at_the_api(
    start_sidecar: Callable[..., Awaitable[RunningSidecar]], seeded: Reconciler, bad: str
) -> None:
    sidecar = await start_sidecar()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.EnforcementServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id=bad))
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("app_id:")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CanEnterClassroom(pb.CanEnterClassroomRequest(app_id="app-1", room_id=bad))
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("room_id:")
        # ':' is allowed, and an id holding a colon names its own key only.
        d = (
            await stub.CanCreateClassroom(pb.CanCreateClassroomRequest(app_id="app-1:status"))
        ).decision
        assert d.reason == pb.DECISION_REASON_UNKNOWN_APPLICATION


# -- no secret in any log --------------------------------------------------------------


def test_help_never_shows_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@redis.internal:6379/0?password={ACL_PASSWORD}"
    assert ACL_PASSWORD not in (redact_url(url) or "")
    env = {**os.environ, "LCIC_GUARD_REDIS_URL": url}
    out = subprocess.run(
        [sys.executable, "-m", "lcic_guard.cli", "serve", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ACL_PASSWORD not in out.stdout + out.stderr
    assert f"redis://{ACL_USER}:***@redis.internal:6379" in out.stdout.replace("\n", "")
    assert ACL_PASSWORD not in repr(Settings(redis_url=url))


async def test_no_secret_is_logged_through_faults_and_refusals(
    redis_with_acl: EmbeddedRedis, tmp_path: Path
) -> None:
    tokens = token_file(tmp_path, TOKEN)
    port = free_port()
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{redis_with_acl.port}/0"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lcic_guard.cli",
        "serve",
        "--redis-url",
        url,
        "--listen",
        f"127.0.0.1:{port}",
        "--auth-token-file",
        str(tokens),
        "--log-level",
        "DEBUG",
        "--shutdown-delay",
        "0s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 15)
            stub = pb_grpc.EnforcementServiceStub(channel)
            req = pb.GetApplicationStatusRequest(app_id="app-1")
            assert await code_of(stub.GetApplicationStatus(req)) == Code.UNAUTHENTICATED
            bad = bearer(TOKEN + "x")
            assert await code_of(stub.GetApplicationStatus(req, metadata=bad)) == (
                Code.UNAUTHENTICATED
            )
            assert await code_of(stub.GetApplicationStatus(req, metadata=bearer(TOKEN))) in (
                Code.OK,
                Code.NOT_FOUND,
            )
            # Redis goes away: errors are logged, the checks are answered.
            await asyncio.to_thread(redis_with_acl.kill)
            # Until the change feed notices (its connection is reset), the
            # sidecar still vouches for its copy of the table.
            deadline = time.monotonic() + 5
            probe = pb.CanCreateClassroomRequest(app_id="app-x")
            while not (await stub.CanCreateClassroom(probe)).decision.degraded:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            for _ in range(20):
                c = pb.CanCreateClassroomRequest(app_id="app-x")
                d = (await stub.CanCreateClassroom(c)).decision
                assert d.degraded
            assert await code_of(stub.GetApplicationStatus(req, metadata=bearer(TOKEN))) == (
                Code.UNAVAILABLE
            )
            await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    # Things were logged (so the assertion below means something) ...
    assert "status store unavailable" in text, text
    assert "auth:" in text and "change feed lost" in text, text
    # ... and no secret among them.
    assert ACL_PASSWORD not in text
    assert TOKEN not in text
    assert proc.returncode == 0


def test_auth_flags_from_the_command_line_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]
    monkeypatch.setenv("LCIC_GUARD_AUTH_ALLOW_IDENTITY", "env-a, env-b")
    s = settings_from(build_parser().parse_args(["serve", *tls]))
    assert s.auth_allow_identities == {"env-a", "env-b"}
    args = ["serve", *tls, "--auth-allow-identity", "a,b", "--auth-allow-identity", "c=admin"]
    s = settings_from(build_parser().parse_args(args))
    assert s.auth_allow_identities == {"a", "b", "c=admin"}  # the command line replaces the env
    # A URI never matches (only DNS names and the common name do): said at start.
    args = ["serve", *tls, "--auth-allow-identity", SPIFFE]
    with pytest.raises(SystemExit, match="looks like a URI; only a certificate's DNS names"):
        settings_from(build_parser().parse_args(args))
    monkeypatch.delenv("LCIC_GUARD_AUTH_ALLOW_IDENTITY")
    with pytest.raises(SystemExit, match="needs mutual TLS"):
        settings_from(build_parser().parse_args(["serve", "--auth-allow-identity", "a"]))
    with pytest.raises(SystemExit, match="--auth-checks needs"):
        settings_from(build_parser().parse_args(["serve", "--auth-checks", "true"]))
    s = settings_from(build_parser().parse_args(["serve", "--max-heartbeat-age", "0"]))
    assert s.max_heartbeat_age_ms == 0 and s.shutdown_delay_ms == 1000
