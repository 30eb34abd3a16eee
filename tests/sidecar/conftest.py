"""These tests run against a real redis-server and the real servers."""

from tests.support.fixtures import (  # noqa: F401 (fixtures)
    own_redis,
    reconciler,
    redis_server,
    rstore,
    sidecar,
    store,
)
