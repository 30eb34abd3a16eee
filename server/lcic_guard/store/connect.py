"""Connecting to Redis: plain and TLS URLs, Sentinel (``redis+sentinel://``) and
Cluster, with the retry policy every client gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lcic_guard.domain.time import Millis

# What any store call may raise when Redis fails, for callers outside the
# store that must tell it from their own errors.
StoreError = RedisError

RedisClient = Redis | RedisCluster


def store_unreachable(exc: BaseException) -> bool:
    """Redis refused, reset or did not answer (SPEC R13: unavailable), as
    opposed to an error it answered with (e.g. a command the ACL forbids)."""
    unreachable = (ConnectionError, TimeoutError, OSError, RedisConnectionError, RedisTimeoutError)
    return isinstance(exc, unreachable)


def store_refused(exc: BaseException) -> bool:
    """Redis refused or reset the connection: down for certain. A timeout is
    not proof, since the caller's own busy event loop can make a read that
    Redis answered in time look late."""
    late = (TimeoutError, RedisTimeoutError)
    return store_unreachable(exc) and not isinstance(exc, late)


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
    master = _credentials(userinfo) if at else {}
    sentinels = _sentinel_hosts(hosts if at else netloc)
    service, db = _service_and_db(path)
    sentinel: dict[str, Any] = {}
    for key, value in parse_qsl(query):
        if key in ("sentinel_username", "sentinel_password"):
            sentinel[key.removeprefix("sentinel_")] = value
    if scheme.lower() == "rediss+sentinel":
        master["ssl"] = True
    return SentinelTarget(sentinels, service, db, master, sentinel)


def _credentials(userinfo: str) -> dict[str, Any]:
    """``user:password`` (either may be absent) as the master's options."""
    master: dict[str, Any] = {}
    user, colon, password = userinfo.partition(":")
    if colon:
        master["password"] = unquote(password)
    if user:
        master["username"] = unquote(user)
    return master


def _sentinel_hosts(hosts: str) -> tuple[tuple[str, int], ...]:
    """``host:port[,host2:port2]``, IPv6 in brackets, 26379 by default."""
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
    return tuple(sentinels)


def _service_and_db(path: str) -> tuple[str, int]:
    """``service_name[/db]``."""
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("redis_url: a sentinel URL ends with /service_name[/db]")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ValueError(f"redis_url: invalid database number {parts[1]!r}") from None
    return parts[0], db


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
        manager = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
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


async def redis_time(redis: RedisClient) -> Millis:
    """Redis's own clock (TIME), in ms."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000
