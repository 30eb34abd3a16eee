"""The reconciler: billing events into statuses, deadlines, release (R10)."""

from lcic_guard.reconciler.config import ReconcilerConfig
from lcic_guard.reconciler.reconciler import Reconciler
from lcic_guard.reconciler.release import ReleasePlan
from lcic_guard.reconciler.sources import BillingSource, Delivery, FileSource, StreamSource

__all__ = [
    "BillingSource",
    "Delivery",
    "FileSource",
    "Reconciler",
    "ReconcilerConfig",
    "ReleasePlan",
    "StreamSource",
]
