"""What a reconciler can be told (:class:`ReconcilerConfig`, each default
here once), and the fixed timings its parts share."""

from __future__ import annotations

from dataclasses import dataclass

from lcic_guard.domain.policy import DAY, HOUR
from lcic_guard.store.keys import DEADLETTER_MAXLEN

# An outbox older than this was left by a writer that died before announcing.
STALE_OUTBOX_MS = 10_000
# When a release that could not be decided is looked at again.
RETRY_MS = 5_000
# How often a replica redoes its work on an account whose facts keep changing
# under it before leaving the rest to the replicas that changed them.
MAX_ROUNDS = 20
# Independent store calls in flight at once during ingest (well under the
# connection pool's size).
CONCURRENCY = 32
# A batch of deadlines of one shard: this many of the most recently due
# transitions (so that one just due is not held up behind a backlog), this
# many of the longest due, and this many of the longest due re-checks (a
# state waiting to settle: the second pass of a burst); a lane with too few
# due leaves its share to the other. Small, so that a just-due deadline
# waits one short batch.
FRESH_LANE = 32
BACKLOG_LANE = 48
RECHECK_LANE = 48
# Deadline work in flight at once in one process, over every set it works
# (well under the connection pool's size).
DEADLINE_CONCURRENCY = 64
# Ledger records forgotten per read of an account's ledger at most, so that
# a backlog (the first run after an upgrade) is worked off in small steps.
LEDGER_TRIM_BATCH = 100


@dataclass(frozen=True, slots=True)
class ReconcilerConfig:
    batch_size: int = 500
    block_ms: int = 500
    lease_ttl_ms: int = 5_000
    tick_ms: int = 250
    release_margin_ms: int = HOUR
    """R10: how far past ``release_at`` the feed must be confirmed read."""
    release_dry_run: bool = False
    """Report releases that fall due without performing them."""
    claim_idle_ms: int = 30_000
    """How long a billing-stream entry may stay unacknowledged by a consumer
    before another replica claims it (the consumer is presumed dead)."""
    announce_settle_ms: int = 10_000
    """How long a new state must hold before ``status_changed`` announces it
    (a state passed through within this time is never announced)."""
    release_reminders_ms: tuple[int, ...] = (30 * DAY, 7 * DAY, DAY)
    """R10: how long before ``release_at`` a ``release_scheduled`` reminder
    is announced (after the first notice, when the suspension becomes known)."""
    suspension_reminders_ms: tuple[int, ...] = (HOUR,)
    """How long before a scheduled suspension a ``suspension_scheduled``
    reminder is announced (after the first warning, when it becomes known)."""
    deadletter_maxlen: int = DEADLETTER_MAXLEN
    """About how many dead letters the dead-letter stream keeps (0: all)."""
    parked_ttl_ms: int = 30 * DAY
    """How long facts of an application never registered are kept (0: forever)."""
    ledger_retention_ms: int = 400 * DAY
    """How long after its last date a notice or warning stays in the
    account's ledger once nothing can read or make it again, and about how
    long an announcement stays on the stream (0: forever; ADR 0031)."""
