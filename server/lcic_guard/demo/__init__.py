"""The demo ``serve`` runs without a Redis URL (the embedded default): a
private redis-server (also used by the tests and benchmarks) and sample
billing data with one account in each situation the policy knows."""

from lcic_guard.demo.redis_server import (
    EmbeddedRedis,
    RedisServerMissing,
    find_redis_server,
    free_port,
)
from lcic_guard.demo.sample import (
    SAMPLE_APPS,
    SAMPLE_ROOMS,
    sample_events,
    sample_jsonl,
    sample_recorded_at,
)

__all__ = [
    "SAMPLE_APPS",
    "SAMPLE_ROOMS",
    "EmbeddedRedis",
    "RedisServerMissing",
    "find_redis_server",
    "free_port",
    "sample_events",
    "sample_jsonl",
    "sample_recorded_at",
]
