"""Billing sources: where the reconciler's events come from.

Every source sits behind :class:`BillingSource`, a few methods small enough
to fake in a unit test. A new source (HTTP, Kafka, ...) implements them and is
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

from lcic_guard.domain.time import Millis
from lcic_guard.store.billing_stream import BillingStream, GroupMissing, GroupStats
from lcic_guard.store.codec import text
from lcic_guard.store.connect import RedisClient
from lcic_guard.store.keys import BILLING_STREAM

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as delivered: its raw JSON text and how to acknowledge it."""

    raw: str
    token: str
    source: str


class BillingSource(Protocol):
    name: str

    @property
    def live(self) -> bool:
        """A feed that never ends (a stream), as opposed to a file applied once."""
        ...

    @property
    def exhausted(self) -> bool:
        """A finite source whose every event is applied; never for a live one."""
        ...

    async def stats(self) -> GroupStats | None:
        """Entries pending and not yet delivered, when the source can tell."""
        ...

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
    live: bool = False
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

    async def stats(self) -> GroupStats | None:
        return None


@dataclass
class StreamSource:
    """The production feed: a Redis Stream read through a consumer group.

    At-least-once: an entry is acknowledged only after :meth:`ack`, which the
    reconciler calls once the entry's effect is durable. Entries left pending
    by a consumer that died are taken over (XAUTOCLAIM) after ``claim_idle_ms``
    (``--claim-idle``, named after that command).
    The Redis commands are in :mod:`lcic_guard.store.billing_stream`.
    """

    redis: RedisClient
    group: str = "lcic-guard"
    consumer: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    stream: str = BILLING_STREAM
    claim_idle_ms: int = 30_000
    name: str = "stream"
    live: bool = True
    _reclaim_cursor: str = "0-0"
    _ready: bool = False
    _feed: BillingStream = field(init=False)

    def __post_init__(self) -> None:
        self._feed = BillingStream(self.redis, self.group, self.consumer, self.stream)

    @property
    def exhausted(self) -> bool:
        return False

    async def ensure_group(self) -> None:
        if not self._ready:
            await self._feed.ensure_group()
            self._ready = True

    def _deliveries(self, entries: Any) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            # An entry deleted (trimmed) while pending comes back without
            # fields (None or {}): there is nothing left to apply. Streams
            # cannot hold an entry with no fields otherwise.
            if not fields:
                continue
            eid = text(entry_id) or ""
            raw = fields.get(b"event", fields.get("event"))
            if raw is None:
                # Dead-lettered by the reconciler ("type: missing"), naming
                # the fields the entry had instead of ``event``.
                raw = json.dumps({"_fields": sorted(text(k) or "" for k in fields)})
            body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            out.append(Delivery(body, eid, self.name))
        return out

    async def fetch(self, max_count: int, block_ms: int) -> list[Delivery]:
        await self.ensure_group()
        try:
            self._reclaim_cursor, reclaimed = await self._feed.reclaim_idle(
                self.claim_idle_ms, self._reclaim_cursor, max_count
            )
        except GroupMissing:
            self._ready = False
            return []
        if reclaimed:
            return self._deliveries(reclaimed)
        # Our own pending entries (a restart under the same name) come first.
        for start in ("0", ">"):
            entries = await self._feed.read(start, max_count, None if start == "0" else block_ms)
            gone = [entry_id for entry_id, fields in entries if not fields]
            if gone:  # deleted while pending to us: acknowledge, or they stay forever
                await self._feed.ack(gone)
            deliveries = self._deliveries(entries)
            if deliveries:
                return deliveries
        return []

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._feed.ack([d.token for d in deliveries])

    async def watermark(self) -> Millis | None:
        await self.ensure_group()
        return await self._feed.watermark()

    async def stats(self) -> GroupStats | None:
        await self.ensure_group()
        return await self._feed.stats()


async def applied_until(sources: Sequence[BillingSource]) -> Millis | None:
    """The time before which every source's events are applied (None: not
    known yet)."""
    # A fully applied file vouches only for the moment it was loaded; once
    # a live feed exists, that feed alone bounds what may still arrive.
    if any(not s.live and not s.exhausted for s in sources):
        return None  # a file is still being applied
    live = [s for s in sources if s.live]
    marks = [await s.watermark() for s in (live or sources)]
    if not marks or any(m is None for m in marks):
        return None
    return min(m for m in marks if m is not None)
