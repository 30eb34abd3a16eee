"""The Redis status table and billing-fact store: every key lcic-guard owns.

Key layout (``{...}`` is the Redis Cluster hash tag):

``lcic:app:{APP}:status``
    Hash, one per application, the only key a check reads: ``version``,
    ``data`` (the status timeline, JSON), ``account``, ``updated_at``, and one
    ``room:ROOM`` field per reported classroom (R6). Tagged by application
    because a check knows only the application id.
``lcic:app:{APP}:parked``
    Hash of facts about an application not (yet) registered, applied when its
    registration arrives (event order must not matter).
``lcic:acct:{ACCOUNT}:facts`` and ``lcic:acct:{ACCOUNT}:meta``
    The account's billing facts by event id, and its fact sequence (``seq``),
    which is the version of every status computed from them. Both share the
    account's slot, so one script appends a fact and bumps the sequence.

Writes that must be atomic are Lua scripts touching one slot each, so they
work unchanged on Redis Cluster. Status writes are versioned in Redis itself:
a write whose version is not newer than the stored one is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from lcic_guard.facts import Fact, InvalidEvent, Millis, parse_event_json, to_json
from lcic_guard.policy import AppStatus, Reason, Room, Segment

RedisClient = Redis | RedisCluster

BILLING_STREAM: Final = "lcic:billing:events"
GUARD_STREAM: Final = "lcic:guard:events"
DEAD_LETTER_STREAM: Final = "lcic:guard:deadletter"
CHANGES_STREAM: Final = "lcic:guard:changes"
# The change feed keeps about this many entries; a sidecar that falls
# further behind re-reads everything it caches.
CHANGES_MAXLEN: Final = 100_000
DEADLINES: Final = "lcic:guard:deadlines"
HEARTBEAT: Final = "lcic:guard:heartbeat"


def status_key(app_id: str) -> str:
    return f"lcic:app:{{{app_id}}}:status"


def parked_key(app_id: str) -> str:
    return f"lcic:app:{{{app_id}}}:parked"


def facts_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:facts"


def meta_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:meta"


ROOM_FIELD_PREFIX: Final = "room:"


def connect(url: str, *, timeout: float = 2.0) -> RedisClient:
    """A client for ``url``: ``redis://`` or ``rediss://`` (TLS), with
    ``?cluster=true`` for Redis Cluster. Credentials go in the URL
    (``redis://user:password@host``) and are never logged."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 10,
    }
    if "cluster=true" in url:
        base = url.replace("?cluster=true", "").replace("&cluster=true", "")
        return RedisCluster.from_url(base, **options)
    return Redis.from_url(url, **options)


# ---------------------------------------------------------------------------
# Codec of the status timeline (compact: it is what every check decodes).

_REASON_BY_NAME: Final = {r.value: r for r in Reason}


def encode_segments(segments: Sequence[Segment]) -> str:
    return json.dumps(
        [
            [
                s.starts_at,
                [r.value for r in s.reasons],
                s.grace_ends_at,
                s.suspended_at,
                s.release_at,
            ]
            for s in segments
        ],
        separators=(",", ":"),
    )


def decode_segments(data: str | bytes) -> tuple[Segment, ...]:
    return tuple(
        Segment(start, tuple(_REASON_BY_NAME[r] for r in reasons), grace, susp, release)
        for start, reasons, grace, susp, release in json.loads(data)
    )


def decode_status(app_id: str, fields: Sequence[Any]) -> AppStatus | None:
    """Decode ``HMGET version data account updated_at`` into a status."""
    version, data, account, updated = fields[:4]
    if data is None:
        return None
    return AppStatus(
        app_id=app_id,
        account_id=_text(account) or "",
        segments=decode_segments(data),
        version=int(version or 0),
        updated_at=int(updated or 0),
    )


def encode_room(room: Room, until: Millis) -> str:
    return json.dumps(
        {"s": room.started_at, "e": room.scheduled_end, "x": room.ended_at, "u": until},
        separators=(",", ":"),
    )


def decode_room(raw: str | bytes | None) -> Room | None:
    if raw is None:
        return None
    obj = json.loads(raw)
    if obj.get("s") is None:
        # Only an end was reported: the class cannot be protected.
        return None
    return Room(started_at=obj["s"], scheduled_end=obj.get("e"), ended_at=obj.get("x"))


def _text(value: str | bytes | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode()


# ---------------------------------------------------------------------------
# Lua scripts: each touches the keys of one hash slot only.

# KEYS[1] status. ARGV: version, data, account, updated_at.
# Refuses a version that is not newer than the stored one; returns
# {written (0/1), previous data or false, previous version}.
_WRITE_STATUS: Final = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local old = redis.call('HGET', KEYS[1], 'data')
if cur >= tonumber(ARGV[1]) then return {0, old, cur} end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'data', ARGV[2],
           'account', ARGV[3], 'updated_at', ARGV[4])
return {1, old, cur}
"""

# KEYS[1] facts, KEYS[2] meta. ARGV: event_id, json, event_id, json, ...
# Adds the facts not yet known; bumps seq once if any was added. A known id
# with different content is a conflict (the first one stays).
# Returns {seq, added, conflicting ids...}.
_ADD_FACTS: Final = """
local added = 0
local out = {}
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    added = added + 1
  elseif cur ~= ARGV[i + 1] then
    table.insert(out, ARGV[i])
  end
end
local seq
if added > 0 then
  seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
else
  seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
end
local res = {seq, added}
for _, id in ipairs(out) do table.insert(res, id) end
return res
"""

# KEYS[1] facts, KEYS[2] meta. Returns {seq, id, json, id, json, ...}
# read at one instant.
_LOAD_ACCOUNT: Final = """
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
local res = {seq}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do table.insert(res, all[i]) end
return res
"""

# KEYS[1] status, KEYS[2] parked. ARGV: account.
# Claims the application for the account (first registration wins) and
# returns {owner, parked json...}.
_CLAIM_APP: Final = """
local owner = redis.call('HGET', KEYS[1], 'account')
if not owner then
  redis.call('HSET', KEYS[1], 'account', ARGV[1])
  owner = ARGV[1]
end
local res = {owner}
if owner == ARGV[1] then
  local parked = redis.call('HVALS', KEYS[2])
  for i = 1, #parked do table.insert(res, parked[i]) end
end
return res
"""

# KEYS[1] status, KEYS[2] parked. ARGV: event_id, json.
# Returns the owner account if the application is known; otherwise parks
# the fact and returns false.
_ROUTE_APP_FACT: Final = """
local owner = redis.call('HGET', KEYS[1], 'account')
if owner then return owner end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
return false
"""

# KEYS[1] status. ARGV: field, started_at or '', scheduled_end or '',
# ended_at or '', until, now, prune_threshold.
# Merges a start or end report into the room's record (earliest start,
# earliest end); refuses unknown applications (returns 0). Prunes rooms whose
# protection window has passed once the hash holds many of them.
_REPORT_ROOM: Final = """
if not redis.call('HGET', KEYS[1], 'account') then return 0 end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local room = {}
if raw then room = cjson.decode(raw) end
local function num(v) if v == '' then return nil end return tonumber(v) end
local function earliest(a, b)
  if a == nil or a == cjson.null then return b end
  if b == nil then return a end
  return math.min(a, b)
end
local s, e, x, u = num(ARGV[2]), num(ARGV[3]), num(ARGV[4]), tonumber(ARGV[5])
room.s = earliest(room.s, s)
if e ~= nil and (room.e == nil or room.e == cjson.null) then room.e = e end
room.x = earliest(room.x, x)
if room.u == nil or room.u == cjson.null or u > room.u then room.u = u end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(room))
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[7]) then
  local now = tonumber(ARGV[6])
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 5) == 'room:' and all[i] ~= ARGV[1] then
      local r = cjson.decode(all[i + 1])
      if (r.u ~= nil and r.u ~= cjson.null and r.u < now) then
        redis.call('HDEL', KEYS[1], all[i])
      end
    end
  end
end
return 1
"""

ROOM_PRUNE_THRESHOLD: Final = 64


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed: a new status, or a room report."""

    entry_id: str
    app_id: str
    status: AppStatus | None
    room_id: str | None


@dataclass(frozen=True, slots=True)
class AddResult:
    seq: int
    added: int
    conflicts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: bool
    previous: AppStatus | None


class Store:
    """Every read and write lcic-guard makes to Redis, by meaning."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._write_status = redis.register_script(_WRITE_STATUS)
        self._add_facts = redis.register_script(_ADD_FACTS)
        self._load_account = redis.register_script(_LOAD_ACCOUNT)
        self._claim_app = redis.register_script(_CLAIM_APP)
        self._route_app_fact = redis.register_script(_ROUTE_APP_FACT)
        self._report_room = redis.register_script(_REPORT_ROOM)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- the status table: what checks read ---------------------------------

    async def read_status(
        self, app_id: str, room_id: str | None = None
    ) -> tuple[AppStatus | None, Room | None]:
        """One application's status and, if named, one room: one key, one call."""
        fields = ["version", "data", "account", "updated_at"]
        if room_id:
            fields.append(ROOM_FIELD_PREFIX + room_id)
        values = await self.redis.hmget(status_key(app_id), fields)
        status = decode_status(app_id, values)
        room = decode_room(values[4]) if room_id and status is not None else None
        return status, room

    async def read_statuses(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None]]:
        """Many (app, room) reads in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id, room_id in requests:
                fields = ["version", "data", "account", "updated_at"]
                if room_id:
                    fields.append(ROOM_FIELD_PREFIX + room_id)
                pipe.hmget(status_key(app_id), fields)
            rows = await pipe.execute()
        out: list[tuple[AppStatus | None, Room | None]] = []
        for (app_id, room_id), values in zip(requests, rows, strict=True):
            status = decode_status(app_id, values)
            room = decode_room(values[4]) if room_id and status is not None else None
            out.append((status, room))
        return out

    async def write_status(self, status: AppStatus) -> WriteResult:
        """Write a status unless the stored one is as new or newer."""
        written, old_data, old_version = await self._write_status(
            keys=[status_key(status.app_id)],
            args=[
                status.version,
                encode_segments(status.segments),
                status.account_id,
                status.updated_at,
            ],
        )
        previous = None
        if old_data is not None:
            previous = AppStatus(
                status.app_id, status.account_id, decode_segments(old_data), int(old_version)
            )
        return WriteResult(bool(written), previous)

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
        """Record a classroom's start or end (R6). False if the app is unknown."""

        def arg(v: Millis | None) -> str:
            return "" if v is None else str(v)

        done = await self._report_room(
            keys=[status_key(app_id)],
            args=[
                ROOM_FIELD_PREFIX + room_id,
                arg(started_at),
                arg(scheduled_end),
                arg(ended_at),
                until,
                now,
                ROOM_PRUNE_THRESHOLD,
            ],
        )
        return bool(done)

    # -- billing facts: what the reconciler keeps ---------------------------

    async def add_facts(self, account_id: str, facts: Iterable[Fact]) -> AddResult:
        args: list[str] = []
        for fact in facts:
            args += [fact.event_id, to_json(fact)]
        if not args:
            return AddResult(0, 0, ())
        res = await self._add_facts(keys=[facts_key(account_id), meta_key(account_id)], args=args)
        return AddResult(int(res[0]), int(res[1]), tuple(_text(x) or "" for x in res[2:]))

    async def load_account(self, account_id: str) -> tuple[int, list[Fact]]:
        """The account's fact sequence and its facts, read at one instant."""
        res = await self._load_account(keys=[facts_key(account_id), meta_key(account_id)])
        seq = int(res[0])
        facts: list[Fact] = []
        for raw in res[2::2]:
            try:
                facts.append(parse_event_json(raw, allow_internal=True))
            except InvalidEvent:  # pragma: no cover - only valid facts are stored
                continue
        return seq, facts

    async def claim_app(self, app_id: str, account_id: str) -> tuple[str, list[Fact]]:
        """Bind an application to its account; return the owner and parked facts."""
        res = await self._claim_app(
            keys=[status_key(app_id), parked_key(app_id)], args=[account_id]
        )
        owner = _text(res[0]) or ""
        return owner, [parse_event_json(raw) for raw in res[1:]]

    async def route_app_fact(self, app_id: str, fact: Fact) -> str | None:
        """The owning account of the fact's application, or None once parked."""
        owner = await self._route_app_fact(
            keys=[status_key(app_id), parked_key(app_id)], args=[fact.event_id, to_json(fact)]
        )
        return _text(owner)

    async def drop_parked(self, app_id: str, event_ids: Sequence[str]) -> None:
        if event_ids:
            await self.redis.hdel(parked_key(app_id), *event_ids)

    async def owner_of(self, app_id: str) -> str | None:
        return _text(await self.redis.hget(status_key(app_id), "account"))

    # -- feeds --------------------------------------------------------------

    async def publish_change(self, status: AppStatus) -> None:
        """Tell every sidecar that an application's status changed (the new
        record travels with the notice, so no read is needed to apply it)."""
        await self.redis.xadd(
            CHANGES_STREAM,
            {
                "app": status.app_id,
                "v": status.version,
                "account": status.account_id,
                "data": encode_segments(status.segments),
                "updated_at": status.updated_at,
            },
            maxlen=CHANGES_MAXLEN,
            approximate=True,
        )

    async def publish_room(self, app_id: str, room_id: str) -> None:
        """Tell every sidecar that a classroom report changed a room."""
        await self.redis.xadd(
            CHANGES_STREAM,
            {"app": app_id, "room": room_id},
            maxlen=CHANGES_MAXLEN,
            approximate=True,
        )

    async def changes_tail(self) -> str:
        """The id of the newest change, where a new reader starts."""
        rows: Any = await self.redis.xrevrange(CHANGES_STREAM, count=1)
        return (_text(rows[0][0]) or "0-0") if rows else "0-0"

    async def read_changes(self, after: str, block_ms: int, count: int = 1000) -> list[Change]:
        """Changes after ``after``, waiting up to ``block_ms`` for the first."""
        rows: Any = await self.redis.xread({CHANGES_STREAM: after}, count=count, block=block_ms)
        entries = rows[0][1] if rows else []
        out = []
        for entry_id, fields in entries:
            f = {_text(k): v for k, v in fields.items()}
            app_id = _text(f.get("app")) or ""
            room = _text(f.get("room"))
            status = None
            if room is None and f.get("data") is not None:
                status = AppStatus(
                    app_id,
                    _text(f.get("account")) or "",
                    decode_segments(f["data"]),
                    int(f.get("v") or 0),
                    int(f.get("updated_at") or 0),
                )
            out.append(Change(_text(entry_id) or "", app_id, status, room))
        return out

    async def feed_gap(self, after: str) -> bool:
        """True if changes newer than ``after`` were trimmed from the feed
        (a reader resuming from ``after`` would miss them)."""
        try:
            info: Any = await self.redis.xinfo_stream(CHANGES_STREAM)
        except ResponseError:
            return False  # no feed yet: nothing was missed
        # Trimming removes the oldest entries: if the entry we stopped at is
        # gone, newer ones may be gone too, so count that as a gap.
        deleted = _text(info.get("max-deleted-entry-id")) or "0-0"
        first = info.get("first-entry")
        first_id = _text(first[0]) if first else None
        trimmed = first_id is not None and _id_tuple(first_id) > _id_tuple(after)
        return trimmed or _id_tuple(deleted) > _id_tuple(after)

    async def announce(self, event: dict[str, Any], stream: str = GUARD_STREAM) -> str:
        entry_id = await self.redis.xadd(stream, {"event": json.dumps(event, sort_keys=True)})
        return _text(entry_id) or ""

    async def dead_letter(self, raw: str, reason: str, source: str) -> None:
        await self.redis.xadd(
            DEAD_LETTER_STREAM, {"event": raw[:65536], "reason": reason, "source": source}
        )

    async def server_time(self) -> Millis:
        """Redis's own clock, in ms: the reference for feed watermarks."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


# ---------------------------------------------------------------------------
# Reconciler-only keys: leadership, deadlines, announcements, release.

LEADER: Final = "lcic:guard:{leader}"
FENCE: Final = "lcic:guard:{leader}:fence"

# KEYS[1] leader, KEYS[2] fence. ARGV: holder id, ttl ms.
# Returns the fencing token held (a new one on acquisition), 0 if another
# holder has the lease.
_LEASE: Final = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, token = string.match(cur, '^(.*)|(%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""

# KEYS[1] leader. ARGV: holder id. Gives the lease up if held.
_RESIGN: Final = """
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(.*)|%d+$') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS[1] facts, KEYS[2] meta. ARGV: token, expected seq, event id, json.
# Records the release fact only if the caller's fencing token is not older
# than one already seen for the account and the facts are exactly those the
# caller decided on. Returns the new seq, -1 if fenced off, -2 if the facts
# changed meanwhile.
_RELEASE: Final = """
local fence = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
local token = tonumber(ARGV[1])
if token < fence then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if seq ~= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[2], 'fence', token)
if redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4]) == 0 then return seq end
return redis.call('HINCRBY', KEYS[2], 'seq', 1)
"""

# KEYS[1] a hash holding an announcement cursor. ARGV: cursor field,
# expected value ('' for none), new value, payload, now.
# Claims the right to announce a change: advances the cursor and leaves the
# payload in an outbox, atomically. Returns 1 if claimed.
_CLAIM_ANNOUNCEMENT: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. ':outbox', ARGV[4],
           ARGV[1] .. ':outbox_at', ARGV[5])
return 1
"""

# KEYS[1] the hash. ARGV: cursor field, payload. Clears the outbox once the
# payload it holds is on the stream.
_FINISH_ANNOUNCEMENT: Final = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':outbox') == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1] .. ':outbox', ARGV[1] .. ':outbox_at')
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Outbox:
    payload: str
    at: Millis


class Coordination:
    """Leader lease, deadlines and exactly-once announcements (reconciler)."""

    def __init__(self, store: Store) -> None:
        redis = store.redis
        self.redis = redis
        self._lease = redis.register_script(_LEASE)
        self._resign = redis.register_script(_RESIGN)
        self._release = redis.register_script(_RELEASE)
        self._claim = redis.register_script(_CLAIM_ANNOUNCEMENT)
        self._finish = redis.register_script(_FINISH_ANNOUNCEMENT)

    async def hold_lease(self, holder: str, ttl_ms: int) -> int:
        return int(await self._lease(keys=[LEADER, FENCE], args=[holder, ttl_ms]))

    async def resign(self, holder: str) -> None:
        await self._resign(keys=[LEADER], args=[holder])

    async def record_release(
        self, account_id: str, token: int, expected_seq: int, fact: Fact
    ) -> int:
        return int(
            await self._release(
                keys=[facts_key(account_id), meta_key(account_id)],
                args=[token, expected_seq, fact.event_id, to_json(fact)],
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
        return [(_text(m) or "", int(score)) for m, score in rows]

    async def scheduled(self, prefix: str = "") -> list[tuple[str, Millis]]:
        rows: Any = await self.redis.zrange(DEADLINES, 0, -1, withscores=True)
        return [
            (m, int(score)) for raw, score in rows if (m := _text(raw) or "").startswith(prefix)
        ]

    # -- announcements (outbox) ---------------------------------------------

    async def cursor(self, key: str, field: str) -> tuple[str, Outbox | None]:
        cur, payload, at = await self.redis.hmget(
            key, [field, f"{field}:outbox", f"{field}:outbox_at"]
        )
        outbox = Outbox(_text(payload) or "", int(at or 0)) if payload is not None else None
        return _text(cur) or "", outbox

    async def claim(
        self, key: str, field: str, expected: str, new: str, payload: str, now: Millis
    ) -> bool:
        return bool(await self._claim(keys=[key], args=[field, expected, new, payload, now]))

    async def finish(self, key: str, field: str, payload: str) -> None:
        await self._finish(keys=[key], args=[field, payload])

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
            eid = _text(rows[-1][0]) or "0-0"
            ms, seq = (int(x) for x in eid.split("-"))
            last = f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}-18446744073709551615"
            if ms < since:
                return False

    async def heartbeat(self, now: Millis) -> None:
        await self.redis.set(HEARTBEAT, now)

    async def last_heartbeat(self) -> Millis | None:
        raw = await self.redis.get(HEARTBEAT)
        return int(raw) if raw is not None else None
