"""Who may call what: bearer tokens and mutual-TLS identities, with scopes.

When configured (``--auth-token-file`` and/or ``--auth-allow-identity``),
every EnforcementService RPC other than the checks — the reports that change
state (``ReportClassroomStarted/Ended``) and those that reveal it
(``GetApplicationStatus``, ``PreviewApplication``, ``WatchApplicationStatus``
and any added later) — requires one of:

* ``authorization: Bearer <token>`` metadata with a token listed in the token
  file, compared in constant time (its form, ``NAME:SCOPES:TOKEN`` or the
  older unnamed ``TOKEN [SCOPES]``, is in
  :mod:`lcic_guard.sidecar.identities`); the file is read again when it
  changes;
* a client certificate (mutual TLS, ``--tls-client-ca``) one of whose DNS
  subject alternative names (or its common name, when it has no DNS name) is
  on the allow-list (``NAME`` or ``NAME=SCOPE+SCOPE``). URI and e-mail names
  never match.

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

The caller's identity (:data:`CALLER`) is what an override records as its
actor: a token's name, or the certificate name that granted the scope the
RPC needs (for ``ApplyOverride``, the name that granted ``admin``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.sidecar.errors import Refused
from lcic_guard.sidecar.identities import Grant, TokenFile, parse_identity

log = logging.getLogger(__name__)

SERVICE: Final = pb.DESCRIPTOR.services_by_name["EnforcementService"].full_name
CHECK_METHODS: Final = frozenset(
    f"/{SERVICE}/{name}"
    for name in ("CanCreateClassroom", "CanEnterClassroom", "CanAccessRecording", "CheckBatch")
)
_PREFIX: Final = f"/{SERVICE}/"
_LOG_EVERY_S: Final = 10.0
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
or auth is off): the name of a named token; ``token:`` and the first 12 hex
digits of an unnamed token's SHA-256 (never the token); or the allowed
certificate name that granted the scope the RPC needs. Set by
:class:`Auth` around the handler; an override records it as its
actor."""


def scope_of(method: str) -> str:
    """The scope an RPC needs (``admin`` for any not listed)."""
    return _SCOPE_OF.get(method, "admin")


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


def _values(auth: Any, key: str) -> list[str]:
    return [
        v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in auth.get(key, ())
    ]


def peer_identities(context: grpc.ServicerContext) -> tuple[str, ...]:
    """The names the verified client certificate may be allowed by: its DNS
    subject alternative names, or its common name when it has none. Never
    its URI or e-mail names (see :mod:`lcic_guard.sidecar.identities`)."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # pragma: no cover - no transport security at all
        return ()
    dns = _values(auth, "peer_dns")
    return tuple(sorted(set(dns or _values(auth, "x509_common_name"))))


class Auth:
    """Enforces :class:`AuthConfig` on EnforcementService: a hook of the
    serving core (:class:`~lcic_guard.sidecar.calls.Hook`), run on the
    serving thread before a call it :meth:`wants` is answered, so that a
    protected check the cache answers stays on that thread. A refusal is
    :class:`~lcic_guard.sidecar.errors.Refused`; the admitted caller is
    :data:`CALLER` for the rest of the call (on the event loop too)."""

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

    wants = protects

    def enter(self, method: str, raw: bytes, context: grpc.ServicerContext) -> Any:
        return CALLER.set(self.authorize(method, context))

    def leave(self, state: Any, response: bytes | None, code: grpc.StatusCode) -> None:
        CALLER.reset(state)

    def _refuse(
        self, context: grpc.ServicerContext, method: str, code: grpc.StatusCode, why: str
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
        raise Refused(code, why)

    def identity_grant(self, names: Sequence[str], needed: str) -> Grant | None:
        """What the allowed ``names`` of one certificate may do together, and
        the actor: the first name that grants ``needed`` itself, else the
        first that grants ``admin``, so that an override is recorded under
        the name that allowed it, not the certificate's first name."""
        allowed = [(n, self.identities[n]) for n in names if n in self.identities]
        if not allowed:
            return None
        scopes = frozenset().union(*(s for _, s in allowed))
        actor = next(
            (n for n, s in allowed if needed in s),
            next((n for n, s in allowed if "admin" in s), allowed[0][0]),
        )
        return Grant(actor, scopes, named=True)

    def authorize(self, method: str, context: grpc.ServicerContext) -> str:
        """The caller's identity (the actor it is recorded as) if it may call
        ``method``; else :class:`~lcic_guard.sidecar.errors.Refused`."""
        name = method.rpartition("/")[2]
        needed = scope_of(method)
        token = bearer_token(context.invocation_metadata())
        grant: Grant | None = None
        who = ""
        if token is not None and self.tokens is not None:
            grant = self.tokens.grant_of(token)
            who = f"bearer token {grant.actor}" if grant and grant.named else "bearer token"
        if grant is not None and (needed in grant.scopes or "admin" in grant.scopes):
            return grant.actor  # the common case: no certificate to look at
        identities = peer_identities(context)
        if grant is None:
            grant = self.identity_grant(identities, needed)
            who = f"client identity {','.join(identities)}"
        if grant is not None:
            if needed in grant.scopes or "admin" in grant.scopes:
                return grant.actor
            self._refuse(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name}: needs scope {needed!r}; the {who} has "
                f"{','.join(sorted(grant.scopes)) or 'none'}",
            )
        if token is not None:
            self._refuse(
                context, method, grpc.StatusCode.UNAUTHENTICATED, f"{name}: invalid bearer token"
            )
        if identities:
            shown = ",".join(identities)
            self._refuse(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name}: client identity {shown} is not allowed (a certificate is known by "
                "its DNS names, or its common name when it has none)",
            )
        self._refuse(
            context,
            method,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{name}: needs a bearer token (authorization metadata) or an allowed client "
            "certificate",
        )


def hooks(config: AuthConfig) -> list[Auth]:
    """The hooks ``config`` asks for (none when auth is off)."""
    if not config.enabled:
        return []
    return [Auth(config)]
