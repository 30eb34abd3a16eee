"""Who a caller is: the bearer-token file, and the names of client
certificates on the allow-list. No grpc here: the command line reads the
token it sends from a file in the same form (:func:`token_to_send`), and the
flags check the allow-list at start.

The token file has one entry a line; blank lines and ``#`` comments are
ignored:

``NAME:SCOPES:TOKEN``
    a named token: ``NAME`` is the actor an override made with it records
    (``audit`` shows it); ``SCOPES`` is comma-separated and may be empty
    (``check,report,read``). The token is everything after the second
    colon, so it may hold colons itself.
``TOKEN`` or ``TOKEN SCOPES``
    the form from before tokens had names, still read: its actor is
    ``token:`` and the first 12 hex digits of the token's SHA-256. A token
    in this form cannot hold a colon (the line would read as named).

A name is 1-64 characters of ``A-Z a-z 0-9 . _ @ + -``, starting with a
letter or a digit; no two entries may share a name or a token. A line that
breaks a rule is an error naming the file and the line, which stops the
sidecar at start and keeps the old tokens when the file is read again.

A client certificate is known by its DNS subject alternative names, or by
its subject common name when it has no DNS name (as RFC 6125 has it for
servers). URI and e-mail names never match: a CA that issues a URI name for
a workload has not vouched for a DNS name or a common name of the same
spelling, and an allow-list entry must mean one thing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from lcic_guard.domain.facts import MAX_ACTOR, text_problem

log = logging.getLogger(__name__)

SCOPES: Final = ("check", "report", "read", "admin")
DEFAULT_SCOPES: Final = frozenset({"check", "report", "read"})
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def token_identity(token: str) -> str:
    """The actor of an unnamed token: never the token itself."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def parse_scopes(text: str, where: str) -> frozenset[str]:
    scopes = frozenset(x.strip() for x in text.replace("+", ",").split(",") if x.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ValueError(f"{where}: unknown scope {unknown[0]!r} (use {', '.join(SCOPES)})")
    return scopes


@dataclass(frozen=True)
class Grant:
    """One accepted token: who it is (the actor recorded) and what it may do."""

    actor: str
    scopes: frozenset[str]
    named: bool


def _entry(text: str, where: str) -> tuple[str, Grant]:
    """The token and grant of one (non-blank, non-comment) line."""
    if ":" in text:
        name, _, rest = text.partition(":")
        scopes, sep, token = rest.partition(":")
        if not sep or not token or any(c.isspace() for c in token):
            raise ValueError(
                f"{where}: a line with a colon is NAME:SCOPES:TOKEN (SCOPES may be empty); "
                "this one is not"
            )
        if NAME_PATTERN.fullmatch(name) is None:
            raise ValueError(
                f"{where}: name {name[:64]!r} is not 1-64 characters of A-Z a-z 0-9 . _ @ + - "
                "starting with a letter or digit"
            )
        granted = parse_scopes(scopes, where) if scopes.strip() else DEFAULT_SCOPES
        return token, Grant(name, granted, named=True)
    token, _, scopes = text.partition(" ")
    granted = parse_scopes(scopes, where) if scopes.strip() else DEFAULT_SCOPES
    return token, Grant(token_identity(token), granted, named=False)


def parse_token_file(text: str, path: str) -> tuple[tuple[bytes, Grant], ...]:
    """Every entry of a token file; ValueError names the first bad line."""
    out: list[tuple[bytes, Grant]] = []
    names: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path} line {n}"
        token, grant = _entry(stripped, where)
        if token in tokens:
            raise ValueError(f"{where}: the same token as line {tokens[token]}")
        if grant.named and grant.actor in names:
            raise ValueError(
                f"{where}: name {grant.actor!r} is already used on line {names[grant.actor]}"
            )
        tokens[token] = n
        if grant.named:
            names[grant.actor] = n
        out.append((token.encode(), grant))
    return tuple(out)


def read_token_file(path: str) -> tuple[tuple[bytes, Grant], ...]:
    """The entries of the token file at ``path``; ValueError (starting with
    the path) when it cannot be read or a line is wrong."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return parse_token_file(text, path)


def parse_identity(entry: str) -> tuple[str, frozenset[str]]:
    """``NAME`` or ``NAME=SCOPE+SCOPE`` from ``--auth-allow-identity``;
    ValueError when it can never match or could not be shown in ``audit``."""
    name, sep, tail = entry.rpartition("=")
    scopes = DEFAULT_SCOPES
    if sep and tail and all(x in SCOPES for x in tail.replace("+", ",").split(",") if x):
        scopes = parse_scopes(tail, f"--auth-allow-identity {entry}")
    else:
        name = entry
    if "://" in name:
        raise ValueError(
            f"--auth-allow-identity {name}: looks like a URI; only a certificate's DNS names "
            "(or its common name when it has none) match, never its URI or e-mail names"
        )
    problem = text_problem(name, MAX_ACTOR)
    if problem is not None:
        raise ValueError(f"--auth-allow-identity {name!r}: {problem}")
    return name, scopes


def token_to_send(text: str) -> str | None:
    """The token a client sends, from a file holding it alone or a line of
    the sidecar's own token file (either form): its first entry."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if ":" in stripped:
            return stripped.split(":", 2)[-1].strip() or None
        return stripped.split()[0]
    return None


class TokenFile:
    """The accepted bearer tokens, read again (at most once a second) when
    the file changes. A file that cannot be read again keeps the old tokens."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._tokens: tuple[tuple[bytes, Grant], ...] = ()
        self._reload()  # raises if unreadable or malformed at start
        if not self._tokens:
            log.warning("auth: the token file %s lists no token", path)

    def _reload(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        tokens = read_token_file(self.path)
        if self._stamp is not None:
            log.info("auth: token file %s read again (%d tokens)", self.path, len(tokens))
        self._tokens, self._stamp = tokens, stamp

    def tokens(self) -> tuple[tuple[bytes, Grant], ...]:
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

    def grant_of(self, token: str) -> Grant | None:
        """The token's grant, None if it is not listed. Constant time in the
        token: every listed token is compared."""
        presented = token.encode()
        found: Grant | None = None
        for known, grant in self.tokens():
            if hmac.compare_digest(known, presented):
                found = grant
        return found

    def scopes_of(self, token: str) -> frozenset[str] | None:
        grant = self.grant_of(token)
        return None if grant is None else grant.scopes

    def accepts(self, token: str) -> bool:
        return self.grant_of(token) is not None
