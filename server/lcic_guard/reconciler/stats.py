"""What one ingest pass did, for logs, traces and metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class IngestStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    parked: int = 0
    accounts: set[str] = field(default_factory=set)
    dead_letter_kinds: Counter[str] = field(default_factory=Counter)
    """Dead letters by kind: too_large, invalid, reserved_id, conflict,
    registration."""
