"""The reconciler's own keys: leadership lease and fence, deadlines,
announcement cursors and outboxes, and the release record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from lcic_guard.domain.facts import (
    Fact,
    to_json,
)
from lcic_guard.domain.policy import AppStatus
from lcic_guard.domain.time import Millis
from lcic_guard.store.codec import check_fields, decode_check_fields, text
from lcic_guard.store.feed import stream_id_order
from lcic_guard.store.keys import (
    CONTINUITY,
    DEADLINE_SHARDS,
    DEADLINES,
    FENCE,
    GUARD_STREAM,
    HEARTBEAT,
    LEADER,
    RELEASE_PAUSE,
    REPLICAS,
    deadline_key,
    facts_key,
    ledger_key,
    meta_key,
    recheck_key,
    recorded_key,
    shard_deadlines,
    shard_fence,
    shard_lease,
    shard_rechecks,
    status_key,
)
from lcic_guard.store.scripts import script
from lcic_guard.store.status import Store

# ---------------------------------------------------------------------------
# Reconciler-only keys: leadership, deadlines, announcements, release.


def _cursor_fields(field: str) -> list[str]:
    return [field, f"{field}:outbox", f"{field}:outbox_at", f"{field}:cand"]


def _cursor(values: Sequence[Any]) -> tuple[str, Outbox | None, str | None]:
    cur, payload, at, cand = values
    outbox = Outbox(text(payload) or "", int(at or 0)) if payload is not None else None
    return text(cur) or "", outbox, text(cand)


@dataclass(frozen=True, slots=True)
class Outbox:
    payload: str
    at: Millis


@dataclass(frozen=True, slots=True)
class SettleRow:
    """One application's state to note or claim (lua/settle_status_announcement.lua)."""

    app_id: str
    expected: str
    new: str
    payload: str
    version: int


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
        self._register_replica = redis.register_script(script("register_replica"))
        self._forget_moved = redis.register_script(script("forget_moved_deadlines"))

    async def hold_lease(self, holder: str, ttl_ms: int) -> int:
        return int(await self._lease(keys=[LEADER, FENCE], args=[holder, ttl_ms]))

    async def hold_shard(self, shard: int, holder: str, ttl_ms: int) -> int:
        """Take or renew a deadline shard's lease (lua/lease.lua on the
        shard's keys): its token, 0 if another replica holds it."""
        return int(
            await self._lease(keys=[shard_lease(shard), shard_fence(shard)], args=[holder, ttl_ms])
        )

    async def resign_shard(self, shard: int, holder: str) -> None:
        await self._resign(keys=[shard_lease(shard)], args=[holder])

    async def register_replica(self, holder: str, ttl_ms: int) -> int:
        """Note this replica alive for ``ttl_ms`` more; how many are alive
        (see lua/register_replica.lua)."""
        return int(await self._register_replica(keys=[REPLICAS], args=[holder, ttl_ms]))

    async def forget_replica(self, holder: str) -> None:
        """A replica stopping: the others take its share at once."""
        await self.redis.zrem(REPLICAS, holder)

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
    # A member lives in the set deadline_key() names: a release in the
    # leader's set, any other kind in its shard.

    async def schedule(self, member: str, due: Millis, *, only_earlier: bool = False) -> None:
        await self.redis.zadd(deadline_key(member), {member: due}, lt=only_earlier)

    async def unschedule(self, member: str) -> None:
        await self.redis.zrem(deadline_key(member), member)

    async def reschedule(
        self,
        due: Mapping[str, Millis],
        gone: Iterable[str] = (),
        *,
        rechecks: Mapping[str, Millis | None] | None = None,
    ) -> None:
        """Schedule many members and unschedule others, and set (or, for
        None, clear) applications' re-checks, in one round trip."""
        gone = list(gone)
        rechecks = rechecks or {}
        if not due and not gone and not rechecks:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for member, at in due.items():
                pipe.zadd(deadline_key(member), {member: at})
            for member in gone:
                pipe.zrem(deadline_key(member), member)
            for member, again in rechecks.items():
                if again is None:
                    pipe.zrem(recheck_key(member), member)
                else:
                    pipe.zadd(recheck_key(member), {member: again})
            await pipe.execute()

    async def recheck_earlier(self, due: Mapping[str, Millis]) -> None:
        """Bring applications' re-checks forward to these times (never
        later), in one round trip."""
        if not due:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for member, at in due.items():
                pipe.zadd(recheck_key(member), {member: at}, lt=True)
            await pipe.execute()

    async def schedule_earlier(self, due: Mapping[str, Millis]) -> None:
        """Bring each member forward to its time (never later), in one round trip."""
        if not due:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for member, at in due.items():
                pipe.zadd(deadline_key(member), {member: at}, lt=True)
            await pipe.execute()

    async def due(
        self,
        key: str,
        now: Millis,
        fresh: int,
        backlog: int,
        *,
        rechecks_key: str | None = None,
        rechecks: int = 0,
    ) -> tuple[list[str], list[str], list[str]]:
        """Members of one deadline set due at ``now``, in one round trip: the
        ``fresh`` most recently due (what keeps a deadline just due from
        waiting behind a backlog), the ``backlog`` longest due, and the
        ``rechecks`` longest due of ``rechecks_key`` (a shard's re-checks)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrevrangebyscore(key, now, "-inf", start=0, num=fresh)
            pipe.zrangebyscore(key, "-inf", now, start=0, num=backlog)
            if rechecks_key is not None:
                pipe.zrangebyscore(rechecks_key, "-inf", now, start=0, num=rechecks)
            rows = await pipe.execute()
        newest, oldest, *again = ([text(m) or "" for m in row] for row in rows)
        return newest, oldest, again[0] if again else []

    async def scores(self, key: str, members: Sequence[str]) -> list[Millis | None]:
        rows: Any = await self.redis.zmscore(key, list(members)) if members else []
        return [None if v is None else int(v) for v in rows]

    async def scheduled(self, prefix: str = "") -> list[tuple[str, Millis]]:
        """Every member starting with ``prefix`` and its time, from every set
        that may hold it (the earliest time, should a member an earlier
        version left in the leader's set not be moved yet)."""
        keys = [DEADLINES]
        if not prefix.startswith("release:"):
            keys += [shard_deadlines(s) for s in range(DEADLINE_SHARDS)]
            keys += [shard_rechecks(s) for s in range(DEADLINE_SHARDS)]
        found: dict[str, Millis] = {}
        for key in keys:
            rows: Any = await self.redis.zrange(key, 0, -1, withscores=True)
            for raw, score in rows:
                member = text(raw) or ""
                if member.startswith(prefix):
                    found[member] = min(int(score), found.get(member, int(score)))
        return sorted(found.items(), key=lambda row: (row[1], row[0]))

    async def legacy_deadlines(
        self, cursor: int, count: int
    ) -> tuple[int, list[tuple[str, Millis]]]:
        """One page of the leader's set (ZSCAN): the next cursor, and the
        members of other kinds than release an earlier version left there."""
        page: Any = await self.redis.zscan(DEADLINES, cursor, count=count)
        nxt, rows = page
        members = [(text(m) or "", int(score)) for m, score in rows]
        return int(nxt), [(m, at) for m, at in members if deadline_key(m) != DEADLINES]

    async def move_to_shards(self, members: Sequence[tuple[str, Millis]]) -> int:
        """Move members an earlier version left in the leader's set to their
        shards. Each is added first, never later than it is there already,
        then removed from the old set only if still at the time read: a crash
        in between leaves it in both (processed early at worst, never lost).
        How many left the old set."""
        if not members:
            return 0
        await self.schedule_earlier(dict(members))
        args = [part for member, at in members for part in (member, at)]
        return int(await self._forget_moved(keys=[DEADLINES], args=args))

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
        return (await self.status_cursors([app_id], field))[0]

    async def status_cursors(
        self, app_ids: Sequence[str], field: str
    ) -> list[tuple[str, Outbox | None, str | None]]:
        """:meth:`status_cursor` of many applications, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id in app_ids:
                pipe.hmget(status_key(app_id), _cursor_fields(field))
            rows: Any = await pipe.execute()
        return [_cursor(row) for row in rows]

    async def statuses_and_cursors(
        self, app_ids: Sequence[str], field: str
    ) -> list[tuple[AppStatus | Exception | None, tuple[str, Outbox | None, str | None]]]:
        """Each application's status (an exception if it does not decode)
        and its announcement cursor (:meth:`status_cursor`), one read of
        its hash each, in one round trip: what a batch of deadlines starts
        from."""
        fields = [*check_fields(None), *_cursor_fields(field)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id in app_ids:
                pipe.hmget(status_key(app_id), fields)
            rows: Any = await pipe.execute()
        out: list[tuple[AppStatus | Exception | None, tuple[str, Outbox | None, str | None]]] = []
        split = len(fields) - 4
        for app_id, row in zip(app_ids, rows, strict=True):
            status: AppStatus | Exception | None
            try:
                status = decode_check_fields(app_id, None, row[:split])[0]
            except Exception as exc:  # one corrupt record is its own failure
                status = exc
            out.append((status, _cursor(row[split:])))
        return out

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

    async def settle_statuses(
        self, field: str, rows: Sequence[SettleRow], now: Millis, settle_ms: int
    ) -> list[tuple[int, Millis]]:
        """:meth:`settle_status` for many applications, in one round trip."""
        calls = [
            (
                [status_key(r.app_id)],
                [field, r.expected, r.new, r.payload, now, r.version, settle_ms],
            )
            for r in rows
        ]
        return [
            (int(code), int(since)) for code, since in await self._each(self._settle_status, calls)
        ]

    async def finish(self, key: str, field: str, payload: str) -> None:
        await self._finish(keys=[key], args=[field, payload])

    async def finish_many(self, field: str, done: Sequence[tuple[str, str]]) -> None:
        """:meth:`finish` for many (hash key, payload), in one round trip."""
        await self._each(self._finish, [([key], [field, payload]) for key, payload in done])

    async def announce_many(
        self, events: Sequence[dict[str, Any]], *, keep_ms: int = 0, stream: str = GUARD_STREAM
    ) -> None:
        """Add announcements in order in one round trip, as the store's
        ``announce`` adds one (the same entry), trimmed once for them all."""
        if not events:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(stream, {"event": json.dumps(event, sort_keys=True)})
            ids: Any = await pipe.execute()
        last = text(ids[-1]) or ""
        if keep_ms > 0 and last:
            added = stream_id_order(last)[0]
            await self.redis.xtrim(stream, minid=f"{added - keep_ms}-0", approximate=True)

    async def _each(self, scr: Any, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """One script run for each (keys, args), pipelined: one round trip.
        A server that does not know the script yet (a cluster node it never
        ran on: a cluster pipeline does not load scripts) gets it by a call
        of its own, which loads it."""
        if not calls:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await scr(keys=keys, args=args, client=pipe)
            res: Any = await pipe.execute(raise_on_error=False)
        out: list[Any] = []
        for (keys, args), r in zip(calls, res, strict=True):
            if isinstance(r, NoScriptError):
                r = await scr(keys=keys, args=args)
            elif isinstance(r, Exception):
                raise r
            out.append(r)
        return out

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
