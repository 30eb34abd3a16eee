"""Structured logs and request ids.

``--log-format`` chooses the output (see docs/configuration.md):

``json``
    One JSON object a line: ``ts`` (RFC 3339 UTC), ``level``, ``logger``,
    ``msg``, ``request_id`` when the line was made while handling a gRPC
    call, every field passed as ``extra={...}`` (``event``, ``app_id``,
    ``old_state``...), and ``exc`` with the traceback of an exception. For
    production: log shippers parse it as is.
``text``
    ``time LEVEL logger: message [key=value ...]`` for a person.
``auto`` (the default)
    ``text`` when standard error is a terminal, ``json`` otherwise (a
    container, a service manager, a pipe).

What is logged: every state change (``event=status_changed``) and every
release (``event=resources_released``) at INFO/WARNING, every error, and
each decision at DEBUG only (``event=decision``).

Request ids: the sidecar reads ``x-request-id`` from the call's metadata
(or makes one), keeps it in :data:`request_id` while the call is handled, so
that every line logged meanwhile carries it, and returns it to the caller in
the trailing metadata under the same key.

What logs may show: a Redis error in words an operator acts on
(:func:`describe_error`), a repeated warning at most once per interval with a
count of the rest (:class:`RateLimitedLog`), and no secret (:func:`redact_url`,
also for help texts and error messages).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import Iterable
from typing import Any, Final, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from lcic_guard.domain.time import format_time

REQUEST_ID_KEY: Final = "x-request-id"
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lcic_guard_request_id", default=None
)
"""The id of the gRPC call being handled, if any."""

FORMATS: Final = ("auto", "json", "text")
# A caller's id is kept if it is short printable ASCII, else replaced.
_VALID_ID: Final = re.compile(r"[\x21-\x7e]{1,128}")
_PREFIX: Final = secrets.token_hex(4)
_COUNTER = itertools.count(1)

# LogRecord attributes that are not "extra" fields.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def new_request_id() -> str:
    """A new id, unique per process run (a random prefix and a counter)."""
    return f"{_PREFIX}-{next(_COUNTER):x}"


def pick_request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's ``x-request-id`` if it has a usable one, else a new id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.fullmatch(value):
            return value
    return new_request_id()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": format_time(int(record.created * 1000)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message`` then the request id and extra fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _extras(record)
        rid = request_id.get()
        if rid is not None:
            fields = {"request_id": rid, **fields}
        if not fields:
            return text
        first, nl, rest = text.partition("\n")
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{first} [{pairs}]{nl}{rest}"


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` -> ``text`` on a terminal, ``json`` otherwise."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        try:
            return "text" if os.isatty(stream.fileno()) else "json"
        except (AttributeError, OSError, ValueError):
            return "json"
    return fmt


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


class _OurHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure` installs, told apart from others'."""


def configure(level: str, fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Set up the root logger: ``level`` and the format. Returns the format used."""
    stream = stream if stream is not None else sys.stderr
    used = resolve_format(fmt, stream)
    handler = _OurHandler(stream)
    handler.setFormatter(formatter(used))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _OurHandler):  # configured again: replace ours, keep others'
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return used


def bind_call(context: Any) -> contextvars.Token[str | None]:
    """Start handling a gRPC call: pick its request id, return it to the
    caller in the trailing metadata, and keep it in :data:`request_id`."""
    rid = pick_request_id(context.invocation_metadata())
    context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
    return request_id.set(rid)


# Warnings an operator can act on.

WARN_EVERY_S: Final = 10.0


def describe_error(exc: BaseException) -> str:
    """What went wrong with Redis, in words an operator acts on: a refused
    password says so (redis-py may surface it only as the cause of a timeout
    or connection error)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        text = str(cur)
        if name == "AuthenticationError" or "WRONGPASS" in text or "NOAUTH" in text:
            return f"Redis refused the credentials: {name}: {text}"
        cur = cur.__cause__ or cur.__context__
    if isinstance(exc, TimeoutError):
        return "TimeoutError: no answer from Redis in time"
    return f"{type(exc).__name__}: {exc}"


class RateLimitedLog:
    """A warning repeated at most once per ``every`` seconds per key, with the
    number of times it was suppressed meanwhile."""

    def __init__(self, logger: logging.Logger, every: float = WARN_EVERY_S) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last < self.every:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.warning(msg, *args)


# Keeping secrets out of logs, help texts and reprs.

MASK = "***"
# Query parameters of a Redis URL that carry secrets.
_SECRET_PARAMS = frozenset({"password", "sentinel_password", "ssl_password"})


def redact_url(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***`` (user and host kept)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hosts}" if colon else f"{user}@{hosts}"
        if user and not colon:
            # redis://secret@host: a lone userinfo is taken as the password.
            netloc = f"{MASK}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*/"
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
