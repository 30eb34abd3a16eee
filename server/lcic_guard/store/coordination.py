"""The reconciler's own keys: leadership lease and fence, deadlines,
announcement cursors and outboxes, and the release record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from lcic_guard.domain.facts import (
    Fact,
    to_json,
)
from lcic_guard.domain.time import Millis
from lcic_guard.store.codec import text
from lcic_guard.store.keys import (
    CONTINUITY,
    DEADLINES,
    FENCE,
    GUARD_STREAM,
    HEARTBEAT,
    LEADER,
    RELEASE_PAUSE,
    facts_key,
    ledger_key,
    meta_key,
    recorded_key,
    status_key,
)
from lcic_guard.store.scripts import script
from lcic_guard.store.status import Store

# ---------------------------------------------------------------------------
# Reconciler-only keys: leadership, deadlines, announcements, release.


@dataclass(frozen=True, slots=True)
class Outbox:
    payload: str
    at: Millis


class Coordination:
    """Leader lease, deadlines and exactly-once announcements (reconciler)."""

    def __init__(self, store: Store) -> None:
        redis = store.redis
        self.redis = redis
        self._lease = redis.register_script(script("lease"))
        self._resign = redis.register_script(script("resign"))
        self._release = redis.register_script(script("now_or_arg") + script("release"))
        self._settle_status = redis.register_script(script("settle_status_announcement"))
        self._finish = redis.register_script(script("finish_announcement"))
        self._fence = redis.register_script(script("fence_account"))
        self._take = redis.register_script(script("take_outbox"))
        self._ledger_claim = redis.register_script(script("ledger_claim"))
        self._ledger_trim = redis.register_script(script("ledger_trim"))
        self._discontinuity = redis.register_script(script("note_discontinuity"))

    async def hold_lease(self, holder: str, ttl_ms: int) -> int:
        return int(await self._lease(keys=[LEADER, FENCE], args=[holder, ttl_ms]))

    async def lease_token(self, holder: str) -> int:
        """The fencing token ``holder`` holds the lease with now, 0 if it does not."""
        cur = text(await self.redis.get(LEADER))
        if cur is None:
            return 0
        who, _, token = cur.rpartition("|")
        return int(token) if who == holder and token.isdigit() else 0

    async def fence_account(self, account_id: str, token: int) -> bool:
        """Raise the account's release fence to ``token``; False if a newer
        leader already did (the caller must not act on the account)."""
        return bool(await self._fence(keys=[meta_key(account_id)], args=[token]))

    async def account_seq(self, account_id: str) -> int:
        """The account's fact sequence now."""
        return int(await self.redis.hget(meta_key(account_id), "seq") or 0)

    async def status_version(self, app_id: str) -> int:
        """The stored status version of an application now (0: none)."""
        return int(await self.redis.hget(status_key(app_id), "version") or 0)

    async def resign(self, holder: str) -> None:
        await self._resign(keys=[LEADER], args=[holder])

    async def record_release(
        self,
        account_id: str,
        token: int,
        expected_seq: int,
        fact: Fact,
        recorded_at: Millis | None = None,
    ) -> int:
        return int(
            await self._release(
                keys=[facts_key(account_id), meta_key(account_id), recorded_key(account_id)],
                args=[
                    token,
                    expected_seq,
                    fact.event_id,
                    to_json(fact),
                    "" if recorded_at is None else recorded_at,
                ],
            )
        )

    # -- deadlines ----------------------------------------------------------

    async def schedule(self, member: str, due: Millis, *, only_earlier: bool = False) -> None:
        await self.redis.zadd(DEADLINES, {member: due}, lt=only_earlier)

    async def unschedule(self, member: str) -> None:
        await self.redis.zrem(DEADLINES, member)

    async def due(self, now: Millis, limit: int = 500) -> list[tuple[str, Millis]]:
        rows: Any = await self.redis.zrangebyscore(
            DEADLINES, "-inf", now, start=0, num=limit, withscores=True
        )
        return [(text(m) or "", int(score)) for m, score in rows]

    async def scheduled(self, prefix: str = "") -> list[tuple[str, Millis]]:
        rows: Any = await self.redis.zrange(DEADLINES, 0, -1, withscores=True)
        return [(m, int(score)) for raw, score in rows if (m := text(raw) or "").startswith(prefix)]

    # -- announcements (outbox) ---------------------------------------------

    async def first_seen(self, key: str, names: list[str], now: Millis) -> dict[str, Millis]:
        """When each of ``names`` was first noted in the hash ``key`` (noted
        now if never before; the first writer's time stays), and forget every
        other name noted there under the same prefix ``seen:``."""
        fields = [f"seen:{n}" for n in names]
        async with self.redis.pipeline(transaction=False) as pipe:
            for field in fields:
                pipe.hsetnx(key, field, now)
            if fields:
                pipe.hmget(key, fields)
            pipe.hkeys(key)
            res: Any = await pipe.execute()
        keep = set(fields)
        stale = [
            f for raw in res[-1] if (f := text(raw) or "").startswith("seen:") and f not in keep
        ]
        if stale:
            await self.redis.hdel(key, *stale)
        if not fields:
            return {}
        values = res[-2]
        return {n: int(v if v is not None else now) for n, v in zip(names, values, strict=True)}

    async def legacy_cursor(self, key: str, field: str) -> str:
        """An announcement cursor an earlier version kept in the account's
        meta hash (now the ledger's): read so that nothing it announced is
        announced again, never written."""
        return text(await self.redis.hget(key, field)) or ""

    async def status_cursor(self, app_id: str, field: str) -> tuple[str, Outbox | None, str | None]:
        """The state last announced for an application, the announcement in
        flight (if any) and the candidate state waiting to settle (if any)."""
        cur, payload, at, cand = await self.redis.hmget(
            status_key(app_id), [field, f"{field}:outbox", f"{field}:outbox_at", f"{field}:cand"]
        )
        outbox = Outbox(text(payload) or "", int(at or 0)) if payload is not None else None
        return text(cur) or "", outbox, text(cand)

    async def settle_status(
        self,
        app_id: str,
        field: str,
        expected: str,
        new: str,
        payload: str,
        now: Millis,
        version: int,
        settle_ms: int,
    ) -> tuple[int, Millis]:
        """Note or claim the announcement of an application's state (see
        lua/settle_status_announcement.lua): (0 nothing to do | 1 claimed | 2 waiting
        | 3 refused, when the candidate was first seen)."""
        code, since = await self._settle_status(
            keys=[status_key(app_id)],
            args=[field, expected, new, payload, now, version, settle_ms],
        )
        return int(code), int(since)

    async def finish(self, key: str, field: str, payload: str) -> None:
        await self._finish(keys=[key], args=[field, payload])

    # -- the announcement ledger ------------------------------------------------

    async def ledger(self, account_id: str) -> dict[str, str]:
        """Every record of the account's ledger, by announcement id."""
        raw: Any = await self.redis.hgetall(ledger_key(account_id))
        return {text(k) or "": text(v) or "" for k, v in raw.items()}

    async def ledger_claim(
        self, account_id: str, announcement_id: str, claim: str, now: Millis, stale_ms: int
    ) -> int:
        """Claim an announcement in the ledger (see lua/ledger_claim.lua):
        1 claimed, 2 taken over from a writer presumed dead, 0 committed
        already, -1 claimed by a live writer."""
        return int(
            await self._ledger_claim(
                keys=[ledger_key(account_id)], args=[announcement_id, claim, now, stale_ms]
            )
        )

    async def ledger_commit(self, account_id: str, announcement_id: str, record: str) -> None:
        await self.redis.hset(ledger_key(account_id), announcement_id, record)

    async def ledger_trim(self, account_id: str, records: dict[str, str]) -> int:
        """Forget expired records of the account's ledger, each only if it is
        still exactly the one read (see lua/ledger_trim.lua); how many were."""
        if not records:
            return 0
        args = [part for aid, raw in records.items() for part in (aid, raw)]
        return int(await self._ledger_trim(keys=[ledger_key(account_id)], args=args))

    # -- store continuity (R10) ---------------------------------------------------

    async def continuity(self) -> dict[str, str]:
        raw: Any = await self.redis.hgetall(CONTINUITY)
        return {text(k) or "": text(v) or "" for k, v in raw.items()}

    async def note_continuity(
        self,
        expected_run_ids: str,
        run_ids: str,
        generation: str,
        now: Millis,
        cause: str,
        checker: str,
        *,
        expected_pause: str,
    ) -> bool:
        """Store what is seen of the store now (and who looked); with a cause,
        start a release pause unless one started since the caller read
        ``expected_pause`` (its ``since``, '' for none): see
        lua/note_discontinuity.lua. True if this call started it."""
        return bool(
            await self._discontinuity(
                keys=[CONTINUITY, RELEASE_PAUSE],
                args=[expected_run_ids, run_ids, generation, now, cause, checker, expected_pause],
            )
        )

    async def writes_survive_restart(self) -> bool:
        """Whether a restart of this Redis loses no write it acknowledged:
        the append-only file on with ``appendfsync always``, and not a replica
        promoted by a failover (replication is asynchronous: the writes it had
        not carried are lost). False whenever it cannot tell (a cluster,
        CONFIG disabled)."""
        if isinstance(self.redis, RedisCluster):
            return False
        try:
            persistence: Any = await self.redis.info("persistence")
            replication: Any = await self.redis.info("replication")
            config: Any = await self.redis.config_get("appendfsync")
        except Exception:
            return False
        return (
            int(persistence.get("aof_enabled", 0)) == 1
            and str(config.get("appendfsync", "")) == "always"
            and int(replication.get("second_repl_offset", -1)) == -1
        )

    async def release_pause(self) -> dict[str, str]:
        raw: Any = await self.redis.hgetall(RELEASE_PAUSE)
        return {text(k) or "": text(v) or "" for k, v in raw.items()}

    async def lift_pause(self, since: Millis, snapshot_at: Millis) -> None:
        """Note that a billing snapshot loaded after the pause began confirmed
        the facts (only for the pause that began at ``since``)."""
        cur = text(await self.redis.hget(RELEASE_PAUSE, "since"))
        if cur == str(since):
            await self.redis.hset(RELEASE_PAUSE, "snapshot_at", snapshot_at)

    async def take_outbox(
        self, key: str, field: str, payload: str, now: Millis, stale_ms: int
    ) -> bool:
        """Take over an abandoned outbox (see lua/take_outbox.lua); True if this caller
        is now the one to finish it."""
        return bool(await self._take(keys=[key], args=[field, payload, now, stale_ms]))

    async def on_stream(
        self, announcement_id: str, since: Millis, stream: str = GUARD_STREAM
    ) -> bool:
        """Whether an announcement with this id was added at or after ``since``."""
        last = "+"
        while True:
            rows: Any = await self.redis.xrevrange(
                stream, max=last, min=f"{max(since, 0)}-0", count=500
            )
            for _entry_id, fields in rows:
                raw = fields.get(b"event") or fields.get("event")
                if raw and json.loads(raw).get("announcement_id") == announcement_id:
                    return True
            if len(rows) < 500:
                return False
            eid = text(rows[-1][0]) or "0-0"
            ms, seq = (int(x) for x in eid.split("-"))
            last = f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}-18446744073709551615"
            if ms < since:
                return False

    async def heartbeat(self, now: Millis) -> None:
        await self.redis.set(HEARTBEAT, now)

    async def last_heartbeat(self) -> Millis | None:
        raw = await self.redis.get(HEARTBEAT)
        return int(raw) if raw is not None else None
