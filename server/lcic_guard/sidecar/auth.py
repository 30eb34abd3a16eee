"""Who may call what: bearer tokens and mutual-TLS identities, with scopes.

When configured (``--auth-token-file`` and/or ``--auth-allow-identity``),
every EnforcementService RPC other than the checks — the reports that change
state (``ReportClassroomStarted/Ended``) and those that reveal it
(``GetApplicationStatus``, ``PreviewApplication``, ``WatchApplicationStatus``
and any added later) — requires one of:

* ``authorization: Bearer <token>`` metadata with a token listed in the token
  file, compared in constant time. A line is ``TOKEN`` or ``TOKEN SCOPES``
  (``SCOPES`` comma-separated); blank lines and ``#`` comments are ignored;
  the file is read again when it changes;
* a client certificate (mutual TLS, ``--tls-client-ca``) whose common name or
  one of whose subject alternative names is on the allow-list
  (``NAME`` or ``NAME=SCOPE+SCOPE``).

Scopes: ``check`` (the four checks, when ``--auth-checks`` protects them),
``report`` (``ReportClassroomStarted/Ended``), ``read``
(``GetApplicationStatus``, ``PreviewApplication``, ``WatchApplicationStatus``,
``ListOverrides``) and ``admin`` (everything, including ``ApplyOverride`` and
RPCs added later). A token or identity
listed without scopes gets ``check,report,read`` — what every listed token
could do before scopes existed. A credential without the scope an RPC needs
is refused with ``PERMISSION_DENIED`` naming the scope.

The checks (``CanCreateClassroom``, ``CanEnterClassroom``,
``CanAccessRecording``, ``CheckBatch``) stay open to whoever can reach the
port unless ``--auth-checks`` is set. Health and reflection are always open.

No credentials: ``UNAUTHENTICATED``. A token that is not listed:
``UNAUTHENTICATED``. A client certificate whose identity is not allowed:
``PERMISSION_DENIED``. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

log = logging.getLogger(__name__)

SERVICE: Final = pb.DESCRIPTOR.services_by_name["EnforcementService"].full_name
CHECK_METHODS: Final = frozenset(
    f"/{SERVICE}/{name}"
    for name in ("CanCreateClassroom", "CanEnterClassroom", "CanAccessRecording", "CheckBatch")
)
_PREFIX: Final = f"/{SERVICE}/"
_LOG_EVERY_S: Final = 10.0
SCOPES: Final = ("check", "report", "read", "admin")
DEFAULT_SCOPES: Final = frozenset({"check", "report", "read"})
_SCOPE_OF: Final = {
    **{m: "check" for m in CHECK_METHODS},
    f"/{SERVICE}/ReportClassroomStarted": "report",
    f"/{SERVICE}/ReportClassroomEnded": "report",
    f"/{SERVICE}/GetApplicationStatus": "read",
    f"/{SERVICE}/PreviewApplication": "read",
    f"/{SERVICE}/WatchApplicationStatus": "read",
    f"/{SERVICE}/ListOverrides": "read",
}


CALLER: ContextVar[str | None] = ContextVar("lcic_guard_caller", default=None)
"""Who the RPC being served was authenticated as (None: not authenticated,
or auth is off): the allowed client-certificate name, or ``token:`` and the
first 12 hex digits of the bearer token's SHA-256 (never the token). Set by
:class:`AuthInterceptor` around the handler; an override records it as its
actor."""


def token_identity(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def scope_of(method: str) -> str:
    """The scope an RPC needs (``admin`` for any not listed)."""
    return _SCOPE_OF.get(method, "admin")


def parse_scopes(text: str, where: str) -> frozenset[str]:
    scopes = frozenset(x.strip() for x in text.replace("+", ",").split(",") if x.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ValueError(f"{where}: unknown scope {unknown[0]!r} (use {', '.join(SCOPES)})")
    return scopes


def parse_identity(entry: str) -> tuple[str, frozenset[str]]:
    """``NAME`` or ``NAME=SCOPE+SCOPE`` from ``--auth-allow-identity``."""
    name, sep, tail = entry.rpartition("=")
    if sep and tail and all(x in SCOPES for x in tail.replace("+", ",").split(",") if x):
        return name, parse_scopes(tail, f"--auth-allow-identity {entry}")
    return entry, DEFAULT_SCOPES


class TokenFile:
    """The accepted bearer tokens, read again (at most once a second) when
    the file changes. A file that cannot be read again keeps the old tokens."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._tokens: tuple[tuple[bytes, frozenset[str]], ...] = ()
        self._reload()  # raises if unreadable at start
        if not self._tokens:
            log.warning("auth: the token file %s lists no token", path)

    def _reload(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        tokens = []
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            token, _, scopes = text.partition(" ")
            granted = (
                parse_scopes(scopes, f"{self.path} line {n}") if scopes.strip() else DEFAULT_SCOPES
            )
            tokens.append((token.encode(), granted))
        if self._stamp is not None:
            log.info("auth: token file %s read again (%d tokens)", self.path, len(tokens))
        self._tokens, self._stamp = tuple(tokens), stamp

    def tokens(self) -> tuple[tuple[bytes, frozenset[str]], ...]:
        now = self.clock()
        if now - self._checked >= 1.0:
            with self._lock:
                self._checked = now
                try:
                    self._reload()
                except (OSError, ValueError) as exc:
                    log.warning(
                        "auth: cannot read the token file (%s); keeping the old tokens", exc
                    )
        return self._tokens

    def scopes_of(self, token: str) -> frozenset[str] | None:
        """The token's scopes, None if it is not listed. Constant time in the
        token: every listed token is compared."""
        presented = token.encode()
        found: frozenset[str] | None = None
        for known, scopes in self.tokens():
            if hmac.compare_digest(known, presented):
                found = scopes
        return found

    def accepts(self, token: str) -> bool:
        return self.scopes_of(token) is not None


@dataclass(frozen=True)
class AuthConfig:
    token_file: str | None = None
    allow_identities: frozenset[str] = frozenset()
    protect_checks: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.token_file or self.allow_identities)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return ""  # present but not a bearer token: counts as a bad token
    return None


def peer_identities(context: grpc.aio.ServicerContext) -> frozenset[str]:
    """The verified client certificate's common name and alternative names."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # pragma: no cover - no transport security at all
        return frozenset()
    out: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            out.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return frozenset(out)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Enforces :class:`AuthConfig` on EnforcementService."""

    def __init__(self, config: AuthConfig, tokens: TokenFile | None = None) -> None:
        self.config = config
        self.tokens = tokens
        if tokens is None and config.token_file:
            self.tokens = TokenFile(config.token_file)
        self.identities: dict[str, frozenset[str]] = dict(
            parse_identity(e) for e in config.allow_identities
        )
        self.denied = 0
        self._last_log: dict[tuple[str, str], float] = {}

    def protects(self, method: str) -> bool:
        if not method.startswith(_PREFIX):
            return False  # health, reflection
        return self.config.protect_checks or method not in CHECK_METHODS

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        code: grpc.StatusCode,
        why: str,
    ) -> NoReturn:
        self.denied += 1
        now = time.monotonic()
        key = (method, code.name)
        if now - self._last_log.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_log[key] = now
            log.warning(
                "auth: %s refused %s from %s: %s (refusals so far: %d)",
                method,
                code.name,
                context.peer(),
                why,
                self.denied,
            )
        await context.abort(code, why)
        raise AssertionError("abort returned")  # pragma: no cover

    async def authorize(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """The caller's identity if it may call ``method``; else the call is
        aborted."""
        name = method.rpartition("/")[2]
        needed = scope_of(method)
        token = bearer_token(context.invocation_metadata())
        granted: frozenset[str] | None = None
        who = caller = ""
        if token is not None and self.tokens is not None:
            granted = self.tokens.scopes_of(token)
            who, caller = "bearer token", token_identity(token)
        identities = peer_identities(context)
        if granted is None:
            for identity in sorted(identities):
                scopes = self.identities.get(identity)
                if scopes is not None:
                    granted = scopes if granted is None else granted | scopes
                    who = f"client identity {identity}"
                    caller = caller or identity
        if granted is not None:
            if needed in granted or "admin" in granted:
                return caller
            await self._refuse(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name}: needs scope {needed!r}; the {who} has "
                f"{','.join(sorted(granted)) or 'none'}",
            )
        if token is not None:
            await self._refuse(
                context, method, grpc.StatusCode.UNAUTHENTICATED, f"{name}: invalid bearer token"
            )
        if identities:
            shown = ",".join(sorted(identities))
            await self._refuse(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name}: client identity {shown} is not allowed",
            )
        await self._refuse(
            context,
            method,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{name}: needs a bearer token (authorization metadata) or an allowed client "
            "certificate",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.protects(method):
            return handler
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                caller = CALLER.set(await self.authorize(method, context))
                try:
                    return await inner(request, context)
                finally:
                    CALLER.reset(caller)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self.authorize(method, context)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # pragma: no cover - the service has no client streaming


def interceptors(config: AuthConfig) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors ``config`` asks for (none when auth is off)."""
    if not config.enabled:
        return []
    return [AuthInterceptor(config)]
