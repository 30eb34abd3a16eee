"""Warnings an operator can act on: the real cause of a Redis error, and a
repeated warning logged at most once per interval with a count of the rest."""

from __future__ import annotations

import logging
import time
from typing import Final

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
