"""Settings for a sidecar built inside the test process."""

from __future__ import annotations

from typing import Any

from lcic_guard.config import Settings


def sidecar_settings(**overrides: Any) -> Settings:
    """A sidecar on a free loopback port that is ready without a reconciler
    heartbeat: these tests run no reconciler loop beside it, so the product's
    heartbeat bound would hold health at NOT_SERVING."""
    return Settings(**{"listen": "127.0.0.1:0", "max_heartbeat_age_ms": 0, **overrides})
