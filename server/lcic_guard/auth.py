"""Who may call what: bearer tokens and mutual-TLS identities.

When configured (``--auth-token-file`` and/or ``--auth-allow-identity``),
every EnforcementService RPC other than the checks — the reports that change
state (``ReportClassroomStarted/Ended``) and those that reveal it
(``GetApplicationStatus``, ``WatchApplicationStatus`` and any added later) —
requires one of:

* ``authorization: Bearer <token>`` metadata with a token listed in the token
  file (one a line; blank lines and ``#`` comments ignored; the file is read
  again when it changes), compared in constant time;
* a client certificate (mutual TLS, ``--tls-client-ca``) whose common name or
  one of whose subject alternative names is on the allow-list.

The checks (``CanCreateClassroom``, ``CanEnterClassroom``,
``CanAccessRecording``, ``CheckBatch``) stay open to whoever can reach the
port unless ``--auth-checks`` is set. Health and reflection are always open.

No credentials: ``UNAUTHENTICATED``. A token that is not listed:
``UNAUTHENTICATED``. A client certificate whose identity is not allowed:
``PERMISSION_DENIED``. Tokens are never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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


class TokenFile:
    """The accepted bearer tokens, read again (at most once a second) when
    the file changes. A file that cannot be read again keeps the old tokens."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._tokens: tuple[bytes, ...] = ()
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
        tokens = tuple(
            line.strip().encode()
            for line in lines
            if line.strip() and not line.strip().startswith("#")
        )
        if self._stamp is not None:
            log.info("auth: token file %s read again (%d tokens)", self.path, len(tokens))
        self._tokens, self._stamp = tokens, stamp

    def tokens(self) -> tuple[bytes, ...]:
        now = self.clock()
        if now - self._checked >= 1.0:
            with self._lock:
                self._checked = now
                try:
                    self._reload()
                except OSError as exc:
                    log.warning(
                        "auth: cannot read the token file (%s); keeping the old tokens", exc
                    )
        return self._tokens

    def accepts(self, token: str) -> bool:
        """Constant time in the token: every listed token is compared."""
        presented = token.encode()
        ok = False
        for known in self.tokens():
            ok |= hmac.compare_digest(known, presented)
        return ok


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

    async def authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:
        token = bearer_token(context.invocation_metadata())
        if token is not None and self.tokens is not None and self.tokens.accepts(token):
            return
        identities = peer_identities(context)
        if identities & self.config.allow_identities:
            return
        name = method.rpartition("/")[2]
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
                await self.authorize(method, context)
                return await inner(request, context)

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
