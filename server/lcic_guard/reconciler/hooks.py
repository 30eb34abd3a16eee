"""What an observer (tracing) may put around the reconciler's units of work.

The runner builds the hooks and passes them to the :class:`Reconciler` at
construction; nothing is replaced on a live object. Each unit is handed to
its hook as work not yet started, and the hook returns its result, so the
hook sees what the unit was given, how long it ran, what it returned, and
which units ran inside it (a recomputation inside a batch or a release).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lcic_guard.reconciler.release import ReleasePlan
    from lcic_guard.reconciler.sources import Delivery
    from lcic_guard.reconciler.stats import IngestStats


class ReconcilerHooks:
    """The hooks of an unobserved reconciler: each runs its work and adds
    nothing. An observer overrides the ones it wants."""

    async def ingest(
        self, deliveries: Sequence[Delivery], work: Awaitable[IngestStats]
    ) -> IngestStats:
        """Around one batch of billing events."""
        return await work

    async def recompute(self, account_id: str, work: Awaitable[bool]) -> bool:
        """Around the recomputation of one account's statuses."""
        return await work

    async def release(self, account_id: str, work: Awaitable[ReleasePlan]) -> ReleasePlan:
        """Around one release decision (R10), committed or not."""
        return await work


NO_HOOKS = ReconcilerHooks()
