"""What a process of lcic-guard can be told: one frozen settings tree, built
once by :mod:`lcic_guard.flags` from the command line and the environment, or
directly by a program embedding the sidecar or the reconciler.

Every default is written here (and in the nested PolicyConfig and
ReconcilerConfig) and nowhere else: each row of the table of settings
(:data:`lcic_guard.flags.SETTINGS`) names the field it sets and reads its
default from it. A field no row names is in ``flags.INTERNAL``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lcic_guard.domain.policy import Check, PolicyConfig
from lcic_guard.reconciler.config import ReconcilerConfig


@dataclass(frozen=True)
class Settings:
    """Everything a process of lcic-guard can be told."""

    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    listen: str = "127.0.0.1:50051"
    redis_timeout_ms: int = 5  # deprecated: a lower bound of store_down_ms
    events: Path | None = None
    log_level: str = "INFO"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    cache_size: int = 1_000_000
    cache_max_age_ms: int = 10_000
    workers: int = 1
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reconciler: ReconcilerConfig = field(default_factory=ReconcilerConfig)
    consume_stream: bool = True
    log_format: str = "auto"
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; empty: off
    shadow: frozenset[Check] = frozenset()  # checks that never deny (shadow mode)
    # Who may call the RPCs that change or reveal state (see lcic_guard.sidecar.auth).
    auth_token_file: str | None = None
    auth_allow_identities: frozenset[str] = frozenset()
    auth_checks: bool = False  # the checks too
    # Health NOT_SERVING when the reconciler's heartbeat is older (0: off): on by
    # default, since a sidecar whose statuses nobody keeps current must not look ready.
    max_heartbeat_age_ms: int = 30_000
    # SIGTERM: NOT_SERVING for shutdown_delay, then in-flight calls get shutdown_grace.
    shutdown_delay_ms: int = 1000
    shutdown_grace_ms: int = 5000
    # R13: how long Redis may answer no read before it counts as down.
    store_down_ms: int = 250
    max_watch_streams: int = 1000
    # Serve a non-loopback address with no authentication (refused otherwise).
    insecure: bool = False
