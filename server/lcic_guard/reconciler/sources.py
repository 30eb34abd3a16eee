"""Billing sources: where the reconciler's events come from.

Every source sits behind :class:`BillingSource`, three methods small enough to
fake in a unit test. A new source (HTTP, Kafka, ...) implements them and is
wired in the runner; nothing else changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from redis.exceptions import ResponseError

from lcic_guard.domain.time import Millis
from lcic_guard.store.status import BILLING_STREAM, RedisClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as delivered: its raw JSON text and how to acknowledge it."""

    raw: str
    token: str
    source: str


class BillingSource(Protocol):
    name: str

    async def fetch(self, max_count: int, block_ms: int) -> list[Delivery]:
        """Up to ``max_count`` events; waits up to ``block_ms`` for the first."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Called only once the deliveries' effects are durable in Redis."""
        ...

    async def watermark(self) -> Millis | None:
        """A time before which every event of this source has been applied
        (None: unknown). Release (R10) waits for it to pass ``release_at``."""
        ...


@dataclass
class FileSource:
    """Events from a file, one JSON object a line (the snapshot format).

    Blank lines and lines starting with ``#`` are skipped. Its watermark is
    the Redis time at which the whole file had been applied.
    """

    path: Path
    clock_ms: object = None  # an async callable returning Redis time, set by the runner
    name: str = "file"
    _lines: list[tuple[int, str]] | None = None
    _pos: int = 0
    _unacked: int = 0
    _done_at: Millis | None = None

    def _load(self) -> list[tuple[int, str]]:
        if self._lines is None:
            text = Path(self.path).read_text(encoding="utf-8", errors="replace")
            self._lines = [
                (n, line)
                for n, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
        return self._lines

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self._load()) and self._unacked == 0

    async def fetch(self, max_count: int, block_ms: int) -> list[Delivery]:
        lines = self._load()
        chunk = lines[self._pos : self._pos + max_count]
        self._pos += len(chunk)
        self._unacked += len(chunk)
        if not chunk:
            await asyncio.sleep(block_ms / 1000)
        return [Delivery(line, f"{self.path}:{n}", self.name) for n, line in chunk]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._unacked -= len(deliveries)
        if self.exhausted and self._done_at is None and callable(self.clock_ms):
            self._done_at = await self.clock_ms()

    async def watermark(self) -> Millis | None:
        return self._done_at


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


@dataclass
class StreamSource:
    """The production feed: a Redis Stream read through a consumer group.

    At-least-once: an entry is acknowledged only after :meth:`ack`, which the
    reconciler calls once the entry's effect is durable. Entries left pending
    by a consumer that died are claimed with XAUTOCLAIM after ``claim_idle_ms``.
    """

    redis: RedisClient
    group: str = "lcic-guard"
    consumer: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    stream: str = BILLING_STREAM
    claim_idle_ms: int = 30_000
    name: str = "stream"
    _claim_cursor: str = "0-0"
    _ready: bool = False

    async def ensure_group(self) -> None:
        if self._ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    def _deliveries(self, entries: Any) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            # An entry deleted (trimmed) while pending comes back without
            # fields (None or {}): there is nothing left to apply. Streams
            # cannot hold an entry with no fields otherwise.
            if not fields:
                continue
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            raw = fields.get(b"event", fields.get("event"))
            if raw is None:
                # Dead-lettered by the reconciler ("type: missing"), naming
                # the fields the entry had instead of ``event``.
                raw = json.dumps({"_fields": sorted(_s(k) for k in fields)})
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            out.append(Delivery(text, eid, self.name))
        return out

    async def fetch(self, max_count: int, block_ms: int) -> list[Delivery]:
        await self.ensure_group()
        try:
            claimed = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                start_id=self._claim_cursor,
                count=max_count,
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._ready = False
                return []
            raise
        self._claim_cursor = claimed[0].decode() if isinstance(claimed[0], bytes) else claimed[0]
        if claimed[1]:
            return self._deliveries(claimed[1])
        # Our own pending entries (a restart under the same name) come first.
        for start in ("0", ">"):
            resp: Any = await self.redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: start},
                count=max_count,
                block=None if start == "0" else block_ms,
            )
            entries = resp[0][1] if resp else []
            gone = [entry_id for entry_id, fields in entries if not fields]
            if gone:  # deleted while pending to us: acknowledge, or they stay forever
                await self.redis.xack(self.stream, self.group, *gone)
            deliveries = self._deliveries(entries)
            if deliveries:
                return deliveries
        return []

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self.redis.xack(self.stream, self.group, *[d.token for d in deliveries])

    async def watermark(self) -> Millis | None:
        """Everything added to the stream before the returned time is applied.

        With nothing undelivered and nothing pending, that is Redis's clock
        now; otherwise just before the oldest unapplied entry.
        """
        await self.ensure_group()
        seconds, micros = await self.redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        groups = await self.redis.xinfo_groups(self.stream)
        info = next((g for g in groups if _s(g.get("name")) == self.group), None)
        if info is None:
            return None
        lag = info.get("lag")
        pending = await self.redis.xpending(self.stream, self.group)
        marks = [now]
        if pending and int(pending.get("pending", 0)) > 0:
            marks.append(_entry_ms(_s(pending["min"])) - 1)
        if lag is None or int(lag) > 0:
            last = _s(info.get("last-delivered-id")) or "0-0"
            marks.append(_entry_ms(last))
        return min(marks)


def _s(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
