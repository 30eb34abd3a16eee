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

import hashlib
import json
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ResponseError

from lcic_guard.domain.facts import (
    ApplicationRegistered,
    Fact,
    InvalidEvent,
    parse_event_json,
    to_json,
)
from lcic_guard.domain.policy import AppStatus, Reason, Room, Segment
from lcic_guard.domain.time import Millis

RedisClient = Redis | RedisCluster

BILLING_STREAM: Final = "lcic:billing:events"
GUARD_STREAM: Final = "lcic:guard:events"
DEAD_LETTER_STREAM: Final = "lcic:guard:deadletter"
CHANGES_STREAM: Final = "lcic:guard:changes"
# The change feed keeps about this many entries; a sidecar that falls
# further behind re-reads everything it caches.
CHANGES_MAXLEN: Final = 100_000
# Default bound of the dead-letter stream (approximate MAXLEN).
DEADLETTER_MAXLEN: Final = 100_000
# An event longer than this is dead-lettered without being parsed.
MAX_EVENT_BYTES: Final = 65_536
# What is kept of such an event in its dead letter.
OVERSIZED_KEEP: Final = 4_096
EVENT_INDEX_BUCKETS: Final = 1024
DEADLINES: Final = "lcic:guard:deadlines"
HEARTBEAT: Final = "lcic:guard:heartbeat"
# A random id naming the data set Redis holds: created when a process first
# finds none (a new table, or one emptied by FLUSHALL or a restart without
# data, before a snapshot is loaded again). A different id means whatever a
# process holds from Redis describes data that is gone.
GENERATION: Final = "lcic:guard:generation"
STATUS_PATTERN: Final = "lcic:app:{*}:status"


def status_key(app_id: str) -> str:
    return f"lcic:app:{{{app_id}}}:status"


def parked_key(app_id: str) -> str:
    return f"lcic:app:{{{app_id}}}:parked"


def facts_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:facts"


def meta_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:meta"


def recorded_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:recorded"


def event_index_key(event_id: str) -> str:
    """The index bucket of an event id: a stable hash, so every process
    picks the same bucket, and the bucket is the hash tag (one slot)."""
    bucket = zlib.crc32(event_id.encode()) % EVENT_INDEX_BUCKETS
    return f"lcic:evt:{{{bucket:04d}}}"


def event_digest(fact: Fact) -> str:
    """What the index keeps of an event's content: enough to tell a repeat
    from a reuse of the id (128 bits of SHA-256 of its canonical JSON)."""
    return hashlib.sha256(to_json(fact).encode()).hexdigest()[:32]


ROOM_FIELD_PREFIX: Final = "room:"


SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
SENTINEL_DEFAULT_PORT: Final = 26379


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    master_options: dict[str, Any] = field(default_factory=dict)
    sentinel_options: dict[str, Any] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[user:pass@]host:port[,host2:port2]/service[/db]``.

    The credentials are those of the Redis master (and replicas). Sentinels
    that need their own take ``?sentinel_username=...&sentinel_password=...``.
    ``rediss+sentinel://`` connects to the master with TLS. A host without a
    port uses 26379.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError("redis_url: a sentinel URL starts with redis+sentinel://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    master: dict[str, Any] = {}
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if colon:
            master["password"] = unquote(password)
        if user:
            master["username"] = unquote(user)
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [IPv6]:port
            host, _, tail = item[1:].partition("]")
            port_text = tail.removeprefix(":")
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host, port_text = item, ""
        try:
            port = int(port_text) if port_text else SENTINEL_DEFAULT_PORT
        except ValueError:
            raise ValueError(f"redis_url: invalid sentinel port in {host!r}") from None
        sentinels.append((host, port))
    if not sentinels:
        raise ValueError("redis_url: a sentinel URL names at least one sentinel host:port")
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("redis_url: a sentinel URL ends with /service_name[/db]")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ValueError(f"redis_url: invalid database number {parts[1]!r}") from None
    sentinel: dict[str, Any] = {}
    for key, value in parse_qsl(query):
        if key in ("sentinel_username", "sentinel_password"):
            sentinel[key.removeprefix("sentinel_")] = value
    if scheme.lower() == "rediss+sentinel":
        master["ssl"] = True
    return SentinelTarget(tuple(sentinels), parts[0], db, master, sentinel)


def connect(url: str, *, timeout: float = 2.0) -> RedisClient:
    """A client for ``url``: ``redis://`` or ``rediss://`` (TLS), with
    ``?cluster=true`` for Redis Cluster, or
    ``redis+sentinel://host:port[,host2:port2]/service_name[/db]`` for the
    master that Redis Sentinel names (followed across failovers).
    Credentials go in the URL (``redis://user:password@host``) and are never
    logged."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 10,
        "max_connections": 256,
        # One quick retry (a pooled connection that died is replaced) and no
        # more: redis-py's default (10 retries, up to 1 s apart) would hide a
        # dead Redis for seconds; the callers retry on their own terms (R13).
        "retry": Retry(ExponentialWithJitterBackoff(base=0.005, cap=0.05), 1),
    }
    if url.split("://", 1)[0].lower() in SENTINEL_SCHEMES:
        target = parse_sentinel_url(url)
        sentinel_options = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            # A sentinel that is down is skipped for the next one at once,
            # rather than retried with backoff (seconds per discovery).
            "retry": Retry(NoBackoff(), 0),
            **target.sentinel_options,
        }
        manager = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=sentinel_options
        )
        master: Redis = manager.master_for(
            target.service, db=target.db, **options, **target.master_options
        )
        return master
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    if ("cluster", "true") in query:
        rest = urlencode([(k, v) for k, v in query if k != "cluster"])
        return RedisCluster.from_url(urlunsplit(parts._replace(query=rest)), **options)
    return Redis.from_url(url, **options)


# ---------------------------------------------------------------------------
# Codec of the status timeline (compact: it is what every check decodes).

_REASON_BY_NAME: Final = {r.value: r for r in Reason}


def encode_segments(segments: Sequence[Segment]) -> str:
    # effective_at (R6) is written only where it differs from suspended_at
    # (a late fact), so the common record keeps its five fields.
    return json.dumps(
        [
            [
                s.starts_at,
                [r.value for r in s.reasons],
                s.grace_ends_at,
                s.suspended_at,
                s.release_at,
            ]
            + ([s.effective_at] if s.effective_at != s.suspended_at else [])
            for s in segments
        ],
        separators=(",", ":"),
    )


def decode_segments(data: str | bytes) -> tuple[Segment, ...]:
    out = []
    for start, reasons, grace, susp, release, *rest in json.loads(data):
        out.append(
            Segment(
                start,
                tuple(_REASON_BY_NAME[r] for r in reasons),
                grace,
                susp,
                release,
                rest[0] if rest else susp,
            )
        )
    return tuple(out)


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


def _stored_millis(value: Any) -> Millis | None:
    """A stored time as int ms. Lua's cjson writes numbers >= 1e14 as floats;
    a value that is not a number at all is a corrupt record."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"stored time is not a number: {value!r:.40}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("stored time is not finite")
    return int(value)


def decode_room(raw: str | bytes | None) -> Room | None:
    if raw is None:
        return None
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("stored room is not an object")
    started = _stored_millis(obj.get("s"))
    if started is None:
        # Only an end was reported: the class cannot be protected.
        return None
    return Room(
        started_at=started,
        scheduled_end=_stored_millis(obj.get("e")),
        ended_at=_stored_millis(obj.get("x")),
    )


def status_key_app(key: str | bytes) -> str | None:
    """The application id of a status key, None for any other key."""
    text = _text(key) or ""
    if not (text.startswith("lcic:app:{") and text.endswith("}:status")):
        return None
    return text[len("lcic:app:{") : -len("}:status")]


_STATUS_FIELDS: Final = ("version", "data", "account", "updated_at")


def _status_fields(room_id: str | None) -> list[str]:
    """The status hash fields a check reads (what decode_status expects)."""
    return [*_STATUS_FIELDS, ROOM_FIELD_PREFIX + room_id] if room_id else list(_STATUS_FIELDS)


def _status_row(
    app_id: str, room_id: str | None, values: Sequence[Any]
) -> tuple[AppStatus | None, Room | None]:
    status = decode_status(app_id, values)
    room = decode_room(values[4]) if room_id and status is not None else None
    return status, room


def _text(value: str | bytes | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode()


# ---------------------------------------------------------------------------
# Lua scripts: each touches the keys of one hash slot only.

# KEYS[1] status. ARGV: account, account seq, data, updated_at.
# The stored version is the store's own, monotonic per application even when
# the application moves to another account (whose fact sequence may be
# lower): it is max(stored + 1, seq), which is the account's seq while one
# account owns the app. A write is accepted only from the owning account (or
# for an application no registration has claimed) and only if its seq is
# newer than the last one accepted from that account (``wseq:ACCOUNT``).
# Returns {code, previous data or false, previous version, stored version}:
# code 1 written, 2 already stored from this very seq, 0 refused.
_WRITE_STATUS: Final = """
local owner = redis.call('HGET', KEYS[1], 'account')
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local old = redis.call('HGET', KEYS[1], 'data')
if owner and owner ~= ARGV[1] then return {0, old, cur, cur} end
local seq = tonumber(ARGV[2])
local seen = tonumber(redis.call('HGET', KEYS[1], 'wseq:' .. ARGV[1]) or '-1')
if seen >= seq then
  if seen == seq and redis.call('HGET', KEYS[1], 'wacct') == ARGV[1] then
    return {2, old, cur, cur}
  end
  return {0, old, cur, cur}
end
local v = math.max(cur + 1, seq)
redis.call('HSET', KEYS[1], 'version', v, 'data', ARGV[3], 'account', ARGV[1],
           'updated_at', ARGV[4], 'wseq:' .. ARGV[1], ARGV[2], 'wacct', ARGV[1])
return {1, old, cur, v}
"""

# Redis's own clock in ms, for a recording time the caller did not give.
_NOW_OR_ARG: Final = """
local function now_or(arg)
  if arg ~= '' then return arg end
  local t = redis.call('TIME')
  return tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
"""

# KEYS[1] facts, KEYS[2] meta, KEYS[3] recorded. ARGV: recorded ms ('' for
# Redis's clock now), then event_id, json, event_id, json, ...
# Adds the facts not yet known, each with its recording time; bumps seq once
# if any was added. A known id with different content is a conflict (the
# first one stays). Returns {seq, added, conflicting ids...}.
_ADD_FACTS: Final = (
    _NOW_OR_ARG
    + """
ARGV[1] = now_or(ARGV[1])
local added = 0
local out = {}
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[1])
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
)

# KEYS[1] facts, KEYS[2] meta, KEYS[3] recorded.
# Returns {seq, {id, json, ...}, {id, recorded ms, ...}} read at one instant.
_LOAD_ACCOUNT: Final = """
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
return {seq, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[3])}
"""

# KEYS[1] status, KEYS[2] parked. ARGV: account, occurred_at, event_id, the
# event id's UTF-8 bytes in hex (compared instead of the id: Lua compares
# strings by the server's locale, hex compares like the bytes).
# The earliest registration (occurred_at, then event id) owns the app,
# whatever the arrival order. Returns {verdict, owner, moved_from, parked
# json...}: 'own' (the registration's account owns the app), 'later' (another
# account owns it by an earlier registration; nothing changes) or 'moved'
# (this registration is earlier than the owner's: the app is now its
# account's). ``moved_from`` lists accounts whose copies of the app's facts
# have not been cleaned up yet (space-separated); the mover clears each entry
# once done, so a redelivered registration finishes a move a crash cut short.
# Parked facts are returned only to the owner.
_CLAIM_APP: Final = """
local cur = redis.call('HMGET', KEYS[1], 'account', 'reg_at', 'reg_ord', 'moved_from')
local owner, moved = cur[1], cur[4] or ''
local at, id = tonumber(ARGV[2]), ARGV[4]
local verdict = 'own'
if not owner then
  redis.call('HSET', KEYS[1], 'account', ARGV[1], 'reg_at', ARGV[2], 'reg_ord', id,
             'reg_id', ARGV[3])
  owner = ARGV[1]
else
  local oat, oid = tonumber(cur[2]), cur[3]
  local earlier = oat ~= nil and (at < oat or (at == oat and id < oid))
  if owner == ARGV[1] then
    if oat == nil or earlier then
      redis.call('HSET', KEYS[1], 'reg_at', ARGV[2], 'reg_ord', id, 'reg_id', ARGV[3])
    end
  elseif earlier then
    if not string.find(' ' .. moved .. ' ', ' ' .. owner .. ' ', 1, true) then
      moved = (moved == '' and owner) or (moved .. ' ' .. owner)
    end
    redis.call('HSET', KEYS[1], 'account', ARGV[1], 'reg_at', ARGV[2], 'reg_ord', id,
               'reg_id', ARGV[3], 'moved_from', moved)
    owner = ARGV[1]
    verdict = 'moved'
  else
    verdict = 'later'
  end
end
local res = {verdict, owner, moved}
if verdict ~= 'later' then
  local parked = redis.call('HVALS', KEYS[2])
  for i = 1, #parked do table.insert(res, parked[i]) end
end
return res
"""

# KEYS[1] status. ARGV: account. Marks the cleanup of ``account``'s copy of
# the app's facts done (see _CLAIM_APP).
_MOVE_DONE: Final = """
local moved = redis.call('HGET', KEYS[1], 'moved_from')
if not moved then return 0 end
local rest = {}
for a in string.gmatch(moved, '%S+') do
  if a ~= ARGV[1] then table.insert(rest, a) end
end
if #rest == 0 then
  redis.call('HDEL', KEYS[1], 'moved_from')
else
  redis.call('HSET', KEYS[1], 'moved_from', table.concat(rest, ' '))
end
return 1
"""

# KEYS[1] status, KEYS[2] parked. ARGV: event_id, json, parked ttl ms.
# Returns the owner account if the application is known; otherwise parks
# the fact (the parked hash expires ttl after the last fact parked) and
# returns false.
_ROUTE_APP_FACT: Final = """
local owner = redis.call('HGET', KEYS[1], 'account')
if owner then return owner end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return false
"""

# KEYS[1] facts, KEYS[2] meta. ARGV: event ids. Removes the facts (an app's
# facts from an account that no longer owns it); bumps seq if any was there.
_REMOVE_FACTS: Final = """
local removed = 0
for i = 1, #ARGV do removed = removed + redis.call('HDEL', KEYS[1], ARGV[i]) end
if removed > 0 then return redis.call('HINCRBY', KEYS[2], 'seq', 1) end
return tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
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
class AppClaim:
    """What a registration found in its application's slot (see _CLAIM_APP)."""

    verdict: str  # 'own', 'later' or 'moved'
    owner: str
    moved_from: tuple[str, ...]
    parked: list[Fact]


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
        self._move_done = redis.register_script(_MOVE_DONE)
        self._remove_facts = redis.register_script(_REMOVE_FACTS)

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
        values = await self.redis.hmget(status_key(app_id), _status_fields(room_id))
        return _status_row(app_id, room_id, values)

    async def read_statuses(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None]]:
        """Many (app, room) reads in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id, room_id in requests:
                pipe.hmget(status_key(app_id), _status_fields(room_id))
            rows = await pipe.execute()
        return [
            _status_row(app_id, room_id, values)
            for (app_id, room_id), values in zip(requests, rows, strict=True)
        ]

    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]:
        """Like :meth:`read_statuses`, but a record that does not decode is
        its row's exception, not the whole read's: one corrupt record must
        not take the other answers with it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id, room_id in requests:
                pipe.hmget(status_key(app_id), _status_fields(room_id))
            rows = await pipe.execute()
        out: list[tuple[AppStatus | None, Room | None] | Exception] = []
        for (app_id, room_id), values in zip(requests, rows, strict=True):
            try:
                out.append(_status_row(app_id, room_id, values))
            except Exception as exc:
                out.append(exc)
        return out

    async def scan_app_ids(self, count: int = 1000) -> AsyncIterator[list[str]]:
        """Every application id in the status table, in chunks (SCAN, so a
        large table never blocks Redis; on Redis Cluster, every master)."""
        kwargs: dict[str, Any] = {"match": STATUS_PATTERN, "count": count}
        if isinstance(self.redis, RedisCluster):
            kwargs["target_nodes"] = RedisCluster.PRIMARIES
        chunk: list[str] = []
        async for key in self.redis.scan_iter(**kwargs):
            app_id = status_key_app(key)
            if app_id is not None:
                chunk.append(app_id)
            if len(chunk) >= count:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    async def generation(self) -> str | None:
        return _text(await self.redis.get(GENERATION))

    async def ensure_generation(self) -> str:
        """The data set's generation id, created if Redis has none."""
        await self.redis.set(GENERATION, uuid.uuid4().hex, nx=True)
        return _text(await self.redis.get(GENERATION)) or ""

    async def write_status(self, status: AppStatus) -> WriteResult:
        """Write a status computed from its account's facts at sequence
        ``status.version``, unless the account no longer owns the app or a
        status from the same or newer facts of that account is stored. The
        stored version (the store's own, see _WRITE_STATUS) is returned."""
        code, old_data, old_version, stored = await self._write_status(
            keys=[status_key(status.app_id)],
            args=[
                status.account_id,
                status.version,
                encode_segments(status.segments),
                status.updated_at,
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
        return AddResult(int(res[0]), int(res[1]), tuple(_text(x) or "" for x in res[2:]))

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
        recorded = {_text(times[i]) or "": int(times[i + 1]) for i in range(0, len(times), 2)}
        return AccountFacts(int(res[0]), facts, recorded)

    async def load_account(self, account_id: str) -> tuple[int, list[Fact]]:
        """The account's fact sequence and its facts, read at one instant."""
        loaded = await self.load_account_facts(account_id)
        return loaded.seq, loaded.facts

    async def claim_events(self, facts: Sequence[Fact]) -> list[int]:
        """Claim the facts' event ids in the feed-wide index, in order: for
        each, 0 new (claimed now), 1 claimed before with the same content, 2
        claimed with other content.

        An index entry is written once and never changed, so HSETNX (atomic)
        followed by HGET on the same key is the whole claim: plain commands,
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
            0 if int(res[2 * i]) else (1 if _text(res[2 * i + 1]) == digest else 2)
            for i, digest in enumerate(digests)
        ]

    async def claim_app(self, fact: ApplicationRegistered) -> AppClaim:
        """Bind an application to the account of its earliest registration."""
        res = await self._claim_app(
            keys=[status_key(fact.app_id), parked_key(fact.app_id)],
            args=[fact.account_id, fact.occurred_at, fact.event_id, fact.event_id.encode().hex()],
        )
        return AppClaim(
            verdict=_text(res[0]) or "",
            owner=_text(res[1]) or "",
            moved_from=tuple((_text(res[2]) or "").split()),
            parked=[parse_event_json(raw) for raw in res[3:]],
        )

    async def app_owner(self, app_id: str) -> str | None:
        return _text(await self.redis.hget(status_key(app_id), "account"))

    async def app_owners(self, app_ids: Sequence[str]) -> list[str | None]:
        """The owning accounts of many applications, in one round trip."""
        if not app_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for app_id in app_ids:
                pipe.hget(status_key(app_id), "account")
            res = await pipe.execute()
        return [_text(x) for x in res]

    async def move_done(self, app_id: str, account_id: str) -> None:
        """The app's facts are cleaned out of ``account_id`` (see _CLAIM_APP)."""
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
        return _text(owner)

    async def drop_parked(self, app_id: str, event_ids: Sequence[str]) -> None:
        if event_ids:
            await self.redis.hdel(parked_key(app_id), *event_ids)

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
            # No feed: nothing was missed, unless we had read from one, in
            # which case Redis lost it (restarted without its data).
            return _id_tuple(after) > (0, 0)
        # Trimming removes the oldest entries: if the entry we stopped at is
        # gone, newer ones may be gone too, so count that as a gap.
        deleted = _text(info.get("max-deleted-entry-id")) or "0-0"
        first = info.get("first-entry")
        first_id = _text(first[0]) if first else None
        trimmed = first_id is not None and _id_tuple(first_id) > _id_tuple(after)
        # A feed that ends before where we stopped was rolled back (Redis
        # restarted from an older snapshot): what we applied may be gone.
        last = _text(info.get("last-generated-id")) or "0-0"
        rolled_back = _id_tuple(last) < _id_tuple(after)
        return trimmed or rolled_back or _id_tuple(deleted) > _id_tuple(after)

    async def announce(self, event: dict[str, Any], stream: str = GUARD_STREAM) -> str:
        entry_id = await self.redis.xadd(stream, {"event": json.dumps(event, sort_keys=True)})
        return _text(entry_id) or ""

    async def dead_letter(
        self, raw: str, reason: str, source: str, maxlen: int = DEADLETTER_MAXLEN
    ) -> None:
        """Keep a rejected event with its reason; the stream keeps about the
        last ``maxlen`` (0: all)."""
        await self.redis.xadd(
            DEAD_LETTER_STREAM,
            {"event": raw[:MAX_EVENT_BYTES], "reason": reason, "source": source},
            maxlen=maxlen or None,
            approximate=True,
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

# KEYS[1] facts, KEYS[2] meta, KEYS[3] recorded. ARGV: token, expected seq,
# event id, json, recorded ms ('' for Redis's clock now).
# Records the release fact (with its recording time) only if the caller's
# fencing token is not older than one already seen for the account and the
# facts are exactly those the caller decided on. Returns the new seq, -1 if
# fenced off, -2 if the facts changed meanwhile.
_RELEASE: Final = (
    _NOW_OR_ARG
    + """
local fence = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
local token = tonumber(ARGV[1])
if token < fence then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if seq ~= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[2], 'fence', token)
if redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4]) == 0 then return seq end
redis.call('HSET', KEYS[3], ARGV[3], now_or(ARGV[5]))
return redis.call('HINCRBY', KEYS[2], 'seq', 1)
"""
)

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

# KEYS[1] an application's status hash. ARGV: cursor field, announced state
# expected ('' for none), new state, payload, now, version, settle ms.
# Announces a status change only once the new state has held for the settle
# time: the first evaluation that sees it notes it as a candidate (with the
# time), and a later one, at least `settle` ms after, claims it (cursor
# advanced, payload in the outbox, candidate cleared). A state that reverts
# to the announced one drops the candidate, so it is never announced.
# Nothing is noted or claimed from another status version than the stored
# one (a replica holding an older status cannot announce it), from an
# evaluation older than the last claimed at that version (a lagging clock
# cannot announce a deadline backwards), from a stale view of the cursor, or
# while the previous announcement is still in the outbox (it would be lost).
# Returns {code, since}: 0 nothing to announce, 1 claimed, 2 waiting for the
# candidate first seen at `since`, 3 refused.
_SETTLE_STATUS_ANNOUNCEMENT: Final = """
local f = ARGV[1]
local now, version, settle = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') ~= version then return {3, 0} end
local mark = redis.call('HMGET', KEYS[1], f, f .. ':version', f .. ':now', f .. ':cand',
                        f .. ':cand_at', f .. ':outbox')
if mark[6] then return {3, 0} end
if (mark[1] or '') ~= ARGV[2] then return {3, 0} end
local mv, mn = tonumber(mark[2] or '0'), tonumber(mark[3] or '0')
if version < mv or (version == mv and now < mn) then return {3, 0} end
if ARGV[2] == ARGV[3] then
  if mark[4] then redis.call('HDEL', KEYS[1], f .. ':cand', f .. ':cand_at') end
  return {0, 0}
end
local since = tonumber(mark[5] or '0')
if mark[4] ~= ARGV[3] then
  redis.call('HSET', KEYS[1], f .. ':cand', ARGV[3], f .. ':cand_at', now)
  since = now
end
if now - since < settle then return {2, since} end
redis.call('HSET', KEYS[1], f, ARGV[3], f .. ':outbox', ARGV[4], f .. ':outbox_at', now,
           f .. ':version', version, f .. ':now', now)
redis.call('HDEL', KEYS[1], f .. ':cand', f .. ':cand_at')
return {1, since}
"""

# KEYS[1] account meta. ARGV: token. Raises the account's fence to the
# caller's token; returns 0 if a newer token has already fenced it.
_FENCE_ACCOUNT: Final = """
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local token = tonumber(ARGV[1])
if token < fence then return 0 end
if token > fence then redis.call('HSET', KEYS[1], 'fence', token) end
return 1
"""

# KEYS[1] the hash. ARGV: cursor field, payload. Clears the outbox once the
# payload it holds is on the stream.
_FINISH_ANNOUNCEMENT: Final = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':outbox') == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1] .. ':outbox', ARGV[1] .. ':outbox_at',
             ARGV[1] .. ':outbox_taken')
end
return 1
"""

# KEYS[1] the hash. ARGV: cursor field, payload, now, stale ms.
# Takes over an outbox whose writer is presumed dead (it was claimed, or last
# taken over, at least `stale` ms ago), so that exactly one replica finishes
# it. Returns 1 if taken.
_TAKE_OUTBOX: Final = """
local f = ARGV[1]
local cur = redis.call('HMGET', KEYS[1], f .. ':outbox', f .. ':outbox_at', f .. ':outbox_taken')
if cur[1] ~= ARGV[2] then return 0 end
local last = math.max(tonumber(cur[2] or '0'), tonumber(cur[3] or '0'))
if tonumber(ARGV[3]) - last < tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], f .. ':outbox_taken', ARGV[3])
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
        self._settle_status = redis.register_script(_SETTLE_STATUS_ANNOUNCEMENT)
        self._finish = redis.register_script(_FINISH_ANNOUNCEMENT)
        self._fence = redis.register_script(_FENCE_ACCOUNT)
        self._take = redis.register_script(_TAKE_OUTBOX)

    async def hold_lease(self, holder: str, ttl_ms: int) -> int:
        return int(await self._lease(keys=[LEADER, FENCE], args=[holder, ttl_ms]))

    async def lease_token(self, holder: str) -> int:
        """The fencing token ``holder`` holds the lease with now, 0 if it does not."""
        cur = _text(await self.redis.get(LEADER))
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

    async def status_cursor(self, app_id: str, field: str) -> tuple[str, Outbox | None, str | None]:
        """The state last announced for an application, the announcement in
        flight (if any) and the candidate state waiting to settle (if any)."""
        cur, payload, at, cand = await self.redis.hmget(
            status_key(app_id), [field, f"{field}:outbox", f"{field}:outbox_at", f"{field}:cand"]
        )
        outbox = Outbox(_text(payload) or "", int(at or 0)) if payload is not None else None
        return _text(cur) or "", outbox, _text(cand)

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
        _SETTLE_STATUS_ANNOUNCEMENT): (0 nothing to do | 1 claimed | 2 waiting
        | 3 refused, when the candidate was first seen)."""
        code, since = await self._settle_status(
            keys=[status_key(app_id)],
            args=[field, expected, new, payload, now, version, settle_ms],
        )
        return int(code), int(since)

    async def finish(self, key: str, field: str, payload: str) -> None:
        await self._finish(keys=[key], args=[field, payload])

    async def take_outbox(
        self, key: str, field: str, payload: str, now: Millis, stale_ms: int
    ) -> bool:
        """Take over an abandoned outbox (see _TAKE_OUTBOX); True if this caller
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
