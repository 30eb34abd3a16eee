"""The reconciler's Prometheus metrics (the names are listed in
:mod:`lcic_guard.metrics`, which serves them).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from lcic_guard.domain.time import Millis
from lcic_guard.reconciler.sources import BillingSource
from lcic_guard.reconciler.stats import IngestStats
from lcic_guard.tasks import wait_event

log = logging.getLogger(__name__)


class Polled(Protocol):
    """What :meth:`ReconcilerMetrics.poll` reads of the reconciler."""

    @property
    def sources(self) -> list[BillingSource]: ...

    async def dead_letter_length(self) -> int: ...

    async def watermark(self) -> Millis | None: ...


class ReconcilerMetrics:
    """The reconciler's metrics, in a registry of their own.

    The reconciler calls the ``on_*`` methods (it takes this object as its
    optional ``metrics``); :meth:`poll` reads the consumer group's pending
    and lag, which only Redis knows.
    """

    OUTCOMES: Final = ("applied", "duplicate", "dead_lettered", "parked")
    DEAD_LETTER_REASONS: Final = ("too_large", "invalid", "reserved_id", "conflict", "registration")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "lcic_guard_reconciler_events_received",
            "Billing events read from the sources.",
            registry=r,
        )
        self.events = Counter(
            "lcic_guard_reconciler_events",
            "Billing events by what became of them.",
            ("outcome",),
            registry=r,
        )
        for outcome in self.OUTCOMES:
            self.events.labels(outcome)
        self.pending = Gauge(
            "lcic_guard_reconciler_stream_pending",
            "Billing stream entries delivered to the consumer group, not yet acknowledged.",
            registry=r,
        )
        self.lag = Gauge(
            "lcic_guard_reconciler_stream_lag",
            "Billing stream entries not yet delivered to the consumer group.",
            registry=r,
        )
        self.watermark_age = Gauge(
            "lcic_guard_reconciler_watermark_age_seconds",
            "Now minus the time up to which every billing event is applied.",
            registry=r,
        )
        self.watermark_age.set(math.nan)
        self.status_changes = Counter(
            "lcic_guard_reconciler_status_changes",
            "Application state changes announced on the reconciler's event stream.",
            registry=r,
        )
        self.deadlines = Counter(
            "lcic_guard_reconciler_deadlines_processed",
            "Deadlines processed by this replica.",
            registry=r,
        )
        self.releases = Counter(
            "lcic_guard_reconciler_releases",
            "Accounts whose resources were released (R10).",
            registry=r,
        )
        self.leader_changes = Counter(
            "lcic_guard_reconciler_leader_changes",
            "Times this replica gained or lost the lead.",
            registry=r,
        )
        self.is_leader = Gauge(
            "lcic_guard_reconciler_is_leader", "1 while this replica leads.", registry=r
        )
        self.deadline_shards = Gauge(
            "lcic_guard_reconciler_deadline_shards",
            "Deadline shards this replica holds the lease of (its share of the deadline work).",
            registry=r,
        )
        self.errors = Counter(
            "lcic_guard_reconciler_errors",
            "Failed rounds of a reconciler loop (each is retried).",
            ("loop",),
            registry=r,
        )
        for loop in ("ingest", "deadlines"):
            self.errors.labels(loop)
        self.dead_letters = Counter(
            "lcic_guard_reconciler_dead_letters",
            "Billing events dead-lettered, by why: too_large (not parsed), invalid, "
            "reserved_id, conflict (event id reused with other content), registration "
            "(an application registered earlier to another account).",
            ("reason",),
            registry=r,
        )
        for reason in self.DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        self.deadletter_length = Gauge(
            "lcic_guard_reconciler_deadletter_length",
            "Entries in the dead-letter stream (trimmed to about --deadletter-maxlen).",
            registry=r,
        )
        self.generation_changes = Counter(
            "lcic_guard_reconciler_generation_changes",
            "Times Redis was found holding a new data set (releases wait for a full read).",
            registry=r,
        )
        self.release_pauses = Counter(
            "lcic_guard_release_pauses",
            "Release pauses started on a store discontinuity (R10), by cause: run_id (a "
            "Redis server restarted or failed over), generation (a new data set), stream_id "
            "(a stream's last id went backwards).",
            ("cause",),
            registry=r,
        )
        for cause in ("run_id", "generation", "stream_id"):
            self.release_pauses.labels(cause)

    def on_ingest(self, stats: IngestStats) -> None:
        self.received.inc(stats.received)
        for outcome, n in (
            ("applied", stats.applied),
            ("duplicate", stats.duplicates),
            ("dead_lettered", stats.dead_lettered),
            ("parked", stats.parked),
        ):
            if n:
                self.events.labels(outcome).inc(n)
        for reason, n in stats.dead_letter_kinds.items():
            self.dead_letters.labels(reason).inc(n)

    def on_status_change(self) -> None:
        self.status_changes.inc()

    def on_deadlines(self, done: int) -> None:
        if done:
            self.deadlines.inc(done)

    def on_release(self) -> None:
        self.releases.inc()

    def on_leadership(self, leading: bool) -> None:
        self.leader_changes.inc()
        self.is_leader.set(1 if leading else 0)

    def on_deadline_shards(self, held: int) -> None:
        self.deadline_shards.set(held)

    def on_generation_change(self) -> None:
        self.generation_changes.inc()

    def on_release_pause(self, cause: str) -> None:
        self.release_pauses.labels(cause).inc()

    def on_error(self, loop: str) -> None:
        self.errors.labels(loop).inc()

    async def poll(self, reconciler: Polled, now: Callable[[], Millis]) -> None:
        """Read the sources' backlog, the dead letters and the watermark."""
        for source in reconciler.sources:
            stats = await source.stats()
            if stats is not None:
                self.pending.set(stats.pending)
                self.lag.set(math.nan if stats.lag is None else stats.lag)
        self.deadletter_length.set(await reconciler.dead_letter_length())
        mark = await reconciler.watermark()
        self.watermark_age.set(math.nan if mark is None else max(0, now() - mark) / 1000)

    async def poll_forever(
        self,
        reconciler: Polled,
        stop: asyncio.Event,
        now: Callable[[], Millis],
        interval: float = 5.0,
    ) -> None:
        """:meth:`poll` every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.poll(reconciler, now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("metrics poll failed (%s: %s)", type(exc).__name__, exc)
            await wait_event(stop, interval)
