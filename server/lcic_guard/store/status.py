"""The Redis status table and billing-fact store: every key lcic-guard owns.

Key layout (``{...}`` is the Redis Cluster hash tag):

``lcic:app:{fNN}:APP:status``
    Hash, one per application, the only key a check reads: ``version``,
    ``data`` (the status timeline, JSON), ``account``, ``updated_at``, and one
    ``room:ROOM`` field per reported classroom (R6). Tagged by the app's feed
    shard (a stable hash of its id, which is all a check knows), so that a
    write, the shard's feed entry and its packed snapshot entry are one
    script (see :mod:`lcic_guard.store.feed`).
``lcic:app:{fNN}:APP:parked``
    Hash of facts about an application not (yet) registered, applied when its
    registration arrives (event order must not matter).
``lcic:acct:{ACCOUNT}:facts`` and ``lcic:acct:{ACCOUNT}:meta``
    The account's billing facts by event id, and its fact sequence (``seq``),
    which is the version of every status computed from them. Both share the
    account's slot, so one script appends a fact and bumps the sequence.
``lcic:acct:{ACCOUNT}:recorded``
    When each of those facts was first stored (event id -> ms, Redis's
    clock): the second clock that R6 and R10 read. Written by the same
    script as the fact, only when the fact is new. Facts stored before it
    existed have no entry and count as recorded when they occurred.

Writes that must be atomic are Lua scripts touching one slot each, so they
work unchanged on Redis Cluster. Status writes are versioned in Redis itself:
a write whose version is not newer than the stored one is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ResponseError

from lcic_guard.domain.facts import (
    ApplicationRegistered,
    Fact,
    InvalidEvent,
    parse_event_json,
    to_json,
)
from lcic_guard.domain.policy import AppStatus, Room
from lcic_guard.domain.time import Millis
from lcic_guard.store.codec import (
    check_fields,
    decode_check_fields,
    decode_segments,
    encode_segments,
    text,
)
from lcic_guard.store.connect import RedisClient, redis_time
from lcic_guard.store.feed import Feeds
from lcic_guard.store.keys import (
    FEED_MAXLEN,
    GENERATION,
    LAYOUT,
    LEGACY_APP_PATTERN,
    ROOM_FIELD_PREFIX,
    event_digest,
    event_index_key,
    facts_key,
    feed_key,
    feed_seq_key,
    feed_shard,
    legacy_app_key,
    legacy_app_key_parts,
    meta_key,
    parked_key,
    recorded_key,
    snapshot_key_of,
    status_key,
)
from lcic_guard.store.packed import pack
from lcic_guard.store.scripts import script

ROOM_PRUNE_THRESHOLD: Final = 64
# How long keys of the layout before feed shards are kept after they were
# carried over: processes of the previous version may still read them.
LEGACY_KEEP_S: Final = 86_400


@dataclass(frozen=True, slots=True)
class AccountFacts:
    """An account's facts read at one instant: the sequence they make, the
    facts, and when each was first stored (event id -> ms; absent for facts
    stored before recording times were kept)."""

    seq: int
    facts: list[Fact]
    recorded_at: dict[str, Millis]


@dataclass(frozen=True, slots=True)
class AddResult:
    seq: int
    added: int
    conflicts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: bool
    previous: AppStatus | None
    version: int = 0
    """The stored version when the stored status is the one written (or was
    already written from the same facts); 0 when the write was refused."""


@dataclass(frozen=True, slots=True)
class Ownership:
    """What a registration found in its application's slot (see lua/register_owner.lua)."""

    verdict: str  # 'own', 'later' or 'moved'
    owner: str
    moved_from: tuple[str, ...]
    parked: list[Fact]


class Store(Feeds):
    """Every read and write lcic-guard makes to Redis, by meaning: the status
    table (what checks read), the billing facts (what the reconciler keeps)
    and, inherited from :class:`~lcic_guard.store.feed.Feeds`, the streams
    it writes."""

    def __init__(self, redis: RedisClient) -> None:
        super().__init__(redis)
        self._write_status = redis.register_script(script("feed_append") + script("write_status"))
        self._publish_status = redis.register_script(
            script("feed_append") + script("publish_status")
        )
        self._add_facts = redis.register_script(script("now_or_arg") + script("add_facts"))
        self._load_account = redis.register_script(script("load_account"))
        self._register_owner = redis.register_script(script("register_owner"))
        self._route_app_fact = redis.register_script(script("route_app_fact"))
        self._report_room = redis.register_script(script("feed_append") + script("report_room"))
        self._move_done = redis.register_script(script("move_done"))
        self._remove_facts = redis.register_script(script("remove_facts"))

    async def close(self) -> None:
        # A Sentinel-managed client does not own its connections to the
        # sentinels: close those too.
        pool = getattr(self.redis, "connection_pool", None)
        manager = getattr(pool, "sentinel_manager", None)
        await self.redis.aclose()
        if isinstance(manager, Sentinel):
            await manager.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- the status table: what checks read ---------------------------------

    async def read_status(
        self, app_id: str, room_id: str | None = None
    ) -> tuple[AppStatus | None, Room | None]:
        """One application's status and, if named, one room: one key, one call."""
        values = await self.redis.hmget(status_key(app_id), check_fields(room_id))
        return decode_check_fields(app_id, room_id, values)

    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]:
        """Many (app, room) reads in one round trip. A record that does not
        decode is its row's exception, not the whole read's: one corrupt
        record must not take the other answers with it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id, room_id in requests:
                pipe.hmget(status_key(app_id), check_fields(room_id))
            rows = await pipe.execute()
        out: list[tuple[AppStatus | None, Room | None] | Exception] = []
        for (app_id, room_id), values in zip(requests, rows, strict=True):
            try:
                out.append(decode_check_fields(app_id, room_id, values))
            except Exception as exc:
                out.append(exc)
        return out

    async def read_versions(self, app_ids: Sequence[str]) -> list[int | None]:
        """The stored status versions of many applications in one round trip
        (None: no status). A version is assigned by the store on every write,
        so an equal one tells a status did not change meanwhile."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id in app_ids:
                pipe.hget(status_key(app_id), "version")
            res = await pipe.execute()
        return [None if v is None else int(v) for v in res]

    async def generation(self) -> str | None:
        return text(await self.redis.get(GENERATION))

    async def run_ids(self) -> frozenset[str]:
        """The ``run_id`` of every Redis server behind the store (one, or one
        per primary of a cluster). A different set means a restart or a
        failover: writes acknowledged before it may be lost (SPEC R10)."""
        if isinstance(self.redis, RedisCluster):
            infos = await self.redis.info("server", target_nodes=RedisCluster.PRIMARIES)
            values = infos.values() if isinstance(infos, dict) else []
            ids = {str(v.get("run_id", "")) for v in values if isinstance(v, dict)}
            if not ids:
                ids = {str(infos.get("run_id", ""))}
            return frozenset(ids)
        info = await self.redis.info("server")
        return frozenset({str(info.get("run_id", ""))})

    async def ensure_generation(self) -> str:
        """The data set's generation id, created if Redis has none."""
        await self.redis.set(GENERATION, uuid.uuid4().hex, nx=True)
        return text(await self.redis.get(GENERATION)) or ""

    async def write_status(self, status: AppStatus) -> WriteResult:
        """Write a status computed from its account's facts at sequence
        ``status.version``, unless the account no longer owns the app or a
        status from the same or newer facts of that account is stored. The
        stored version (the store's own, see lua/write_status.lua) is
        returned. A write that is accepted is on the app's feed shard, with
        its packed snapshot entry, in the same step."""
        shard = feed_shard(status.app_id)
        code, old_data, old_version, stored = await self._write_status(
            keys=[
                status_key(status.app_id),
                feed_key(shard),
                feed_seq_key(shard),
                snapshot_key_of(status.app_id),
            ],
            args=[
                status.account_id,
                status.version,
                encode_segments(status.segments),
                status.updated_at,
                pack(status, 0, shard),
                status.app_id,
                FEED_MAXLEN,
            ],
        )
        previous = None
        if old_data is not None:
            previous = AppStatus(
                status.app_id, status.account_id, decode_segments(old_data), int(old_version)
            )
        return WriteResult(int(code) == 1, previous, int(stored) if int(code) else 0)

    async def report_room(
        self,
        app_id: str,
        room_id: str,
        *,
        now: Millis,
        until: Millis,
        started_at: Millis | None = None,
        scheduled_end: Millis | None = None,
        ended_at: Millis | None = None,
    ) -> bool:
        """Record a classroom's start or end (R6), and put it on the app's
        feed shard in the same step. False if the app is unknown."""

        def arg(v: Millis | None) -> str:
            return "" if v is None else str(v)

        shard = feed_shard(app_id)
        done = await self._report_room(
            keys=[status_key(app_id), feed_key(shard), feed_seq_key(shard)],
            args=[
                ROOM_FIELD_PREFIX + room_id,
                arg(started_at),
                arg(scheduled_end),
                arg(ended_at),
                until,
                now,
                ROOM_PRUNE_THRESHOLD,
                app_id,
                FEED_MAXLEN,
            ],
        )
        return bool(done)

    # -- billing facts: what the reconciler keeps ---------------------------

    async def add_facts(
        self, account_id: str, facts: Iterable[Fact], *, recorded_at: Millis | None = None
    ) -> AddResult:
        """Store the facts not yet known, each recorded at ``recorded_at``
        (default: Redis's clock when they are stored)."""
        args: list[str | int] = ["" if recorded_at is None else recorded_at]
        for fact in facts:
            args += [fact.event_id, to_json(fact)]
        if len(args) == 1:
            return AddResult(0, 0, ())
        res = await self._add_facts(
            keys=[facts_key(account_id), meta_key(account_id), recorded_key(account_id)],
            args=args,
        )
        return AddResult(int(res[0]), int(res[1]), tuple(text(x) or "" for x in res[2:]))

    async def load_account_facts(self, account_id: str) -> AccountFacts:
        """The account's fact sequence, facts and recording times, read at one instant."""
        res = await self._load_account(
            keys=[facts_key(account_id), meta_key(account_id), recorded_key(account_id)]
        )
        facts: list[Fact] = []
        for raw in res[1][1::2]:
            try:
                facts.append(parse_event_json(raw, allow_internal=True))
            except InvalidEvent:  # pragma: no cover - only valid facts are stored
                continue
        times = res[2]
        recorded = {text(times[i]) or "": int(times[i + 1]) for i in range(0, len(times), 2)}
        return AccountFacts(int(res[0]), facts, recorded)

    async def index_events(self, facts: Sequence[Fact]) -> list[int]:
        """Enter the facts' event ids in the feed-wide index, in order: for
        each, 0 new (entered now), 1 entered before with the same content, 2
        entered with other content.

        An index entry is written once and never changed, so HSETNX (atomic)
        followed by HGET on the same key is the whole step: plain commands,
        one pipelined round trip for a batch, in order per key on a cluster
        too (one id, one bucket, one node)."""
        if not facts:
            return []
        digests = [event_digest(f) for f in facts]
        async with self.redis.pipeline(transaction=False) as pipe:
            for fact, digest in zip(facts, digests, strict=True):
                key = event_index_key(fact.event_id)
                pipe.hsetnx(key, fact.event_id, digest)
                pipe.hget(key, fact.event_id)
            res = await pipe.execute()
        return [
            0 if int(res[2 * i]) else (1 if text(res[2 * i + 1]) == digest else 2)
            for i, digest in enumerate(digests)
        ]

    async def register_owner(self, fact: ApplicationRegistered) -> Ownership:
        """Bind an application to the account of its earliest registration."""
        res = await self._register_owner(
            keys=[status_key(fact.app_id), parked_key(fact.app_id)],
            args=[fact.account_id, fact.occurred_at, fact.event_id, fact.event_id.encode().hex()],
        )
        return Ownership(
            verdict=text(res[0]) or "",
            owner=text(res[1]) or "",
            moved_from=tuple((text(res[2]) or "").split()),
            parked=[parse_event_json(raw) for raw in res[3:]],
        )

    async def app_owner(self, app_id: str) -> str | None:
        return text(await self.redis.hget(status_key(app_id), "account"))

    async def app_owners(self, app_ids: Sequence[str]) -> list[str | None]:
        """The owning accounts of many applications, in one round trip."""
        if not app_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id in app_ids:
                pipe.hget(status_key(app_id), "account")
            res = await pipe.execute()
        return [text(x) for x in res]

    async def move_done(self, app_id: str, account_id: str) -> None:
        """The app's facts are cleaned out of ``account_id`` (see lua/register_owner.lua)."""
        await self._move_done(keys=[status_key(app_id)], args=[account_id])

    async def remove_facts(self, account_id: str, event_ids: Sequence[str]) -> int:
        """Remove facts from an account (bumping its seq if any was there)."""
        if not event_ids:
            return await self.account_seq(account_id)
        return int(
            await self._remove_facts(
                keys=[facts_key(account_id), meta_key(account_id)], args=list(event_ids)
            )
        )

    async def account_seq(self, account_id: str) -> int:
        return int(await self.redis.hget(meta_key(account_id), "seq") or 0)

    async def route_app_fact(self, app_id: str, fact: Fact, parked_ttl_ms: int = 0) -> str | None:
        """The owning account of the fact's application, or None once parked
        (for ``parked_ttl_ms`` after the app's last parked fact; 0: forever)."""
        owner = await self._route_app_fact(
            keys=[status_key(app_id), parked_key(app_id)],
            args=[fact.event_id, to_json(fact), parked_ttl_ms],
        )
        return text(owner)

    async def drop_parked(self, app_id: str, event_ids: Sequence[str]) -> None:
        if event_ids:
            await self.redis.hdel(parked_key(app_id), *event_ids)

    async def server_time(self) -> Millis:
        """Redis's own clock, in ms: the reference for feed watermarks."""
        return await redis_time(self.redis)

    # -- the layout before feed shards --------------------------------------

    async def migrate_legacy_layout(self, batch: int = 500) -> int:
        """Carry the status and parked keys of the layout before feed shards
        (``lcic:app:{APP}:...``) over to their shard, and put each status in
        its shard's snapshot and feed. Idempotent, and skipped once a pass
        has finished (``lcic:guard:layout``). The old keys are left to expire
        a day later, so that processes of the previous version still running
        during an upgrade keep answering meanwhile. Returns the keys carried over."""
        if await self.redis.get(LAYOUT) is not None:
            return 0
        kwargs: dict[str, Any] = {"match": LEGACY_APP_PATTERN, "count": 1000}
        if isinstance(self.redis, RedisCluster):
            kwargs["target_nodes"] = RedisCluster.PRIMARIES
        moved = 0
        pending: list[tuple[str, str]] = []
        async for key in self.redis.scan_iter(**kwargs):
            parts = legacy_app_key_parts(key)
            if parts is not None:
                pending.append(parts)
            if len(pending) >= batch:
                moved += await self._carry_over(pending)
                pending = []
        moved += await self._carry_over(pending)
        await self.redis.set(LAYOUT, "feed-shards")
        return moved

    async def _carry_over(self, keys: list[tuple[str, str]]) -> int:
        moved = 0
        for app_id, kind in keys:
            old = legacy_app_key(app_id, kind)
            new = status_key(app_id) if kind == "status" else parked_key(app_id)
            dump = await self.redis.dump(old)
            if dump is None:
                continue
            ttl = int(await self.redis.pttl(old))
            if not await self.redis.exists(new):
                # RESTORE keeps the hash as it was, field for field; a key the
                # new layout wrote meanwhile is newer and stays.
                try:
                    await self.redis.restore(new, max(ttl, 0), dump)
                    moved += 1
                except ResponseError as exc:
                    if "BUSYKEY" not in str(exc):
                        raise
            await self.redis.expire(old, LEGACY_KEEP_S)
            if kind == "status":
                await self._publish_carried(app_id)
        return moved

    async def _publish_carried(self, app_id: str) -> None:
        status, _ = await self.read_status(app_id)
        if status is None:
            return
        shard = feed_shard(app_id)
        await self._publish_status(
            keys=[
                status_key(app_id),
                feed_key(shard),
                feed_seq_key(shard),
                snapshot_key_of(app_id),
            ],
            args=[status.version, pack(status, 0, shard), app_id, FEED_MAXLEN],
        )
