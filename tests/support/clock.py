"""Clocks for tests: a fixed "now", a settable clock and a stopped recording
clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lcic_guard.domain.time import Millis

T0: Millis = 1_790_000_000_000  # 2026-09-21T14:13:20Z, a fixed "now" for tests


def recorded_clock(at: Millis) -> Callable[[], Awaitable[Millis]]:
    """A recording clock stopped at ``at``: facts are stored as if the
    reconciler had read them then (a history read live, not backfilled)."""

    async def read() -> Millis:
        return at

    return read


@dataclass
class FakeClock:
    """A settable clock (ms), so tests can step over deadlines."""

    now: Millis = T0

    def __call__(self) -> Millis:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms
