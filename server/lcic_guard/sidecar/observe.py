"""What the sidecar does after each decision: count it, time it, log it at
debug level, and apply shadow mode.

Shadow mode (``--shadow create,enter,recording``, env ``LCIC_GUARD_SHADOW``)
rolls enforcement out without risk: for a check kind in shadow mode the
sidecar never denies. A decision that would deny is returned with
``allowed = true`` and ``shadow = true``, keeping the denial's ``reason``,
``reasons`` and ``message`` so the would-be denial stays visible; it is
counted in ``lcic_guard_shadow_denials_total{check,reason}`` and logged
(``event=shadow_denial``). Allowed decisions are unchanged (``shadow`` is
false). The decision schedules sent to watchers (the cached client) and the
answers of PreviewApplication are shadowed the same way, so a caller gets the
same answer wherever it asks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Final

from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.domain.policy import Check, Decision
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.checker import CheckRequest
from lcic_guard.sidecar.metrics import BATCH, SidecarMetrics

decision_log = logging.getLogger("lcic_guard.decisions")
PB_MEMO_SIZE: Final = 8192

_SCHEDULE_FIELDS: Final = (
    ("create_classroom", Check.CREATE_CLASSROOM),
    ("enter_classroom", Check.ENTER_CLASSROOM),
    ("access_recording", Check.ACCESS_RECORDING),
)


class DecisionObserver:
    """Turns the checker's decisions into answers: metrics, logs, shadow mode."""

    def __init__(self, metrics: SidecarMetrics | None = None, shadow: Iterable[Check] = ()) -> None:
        self.metrics = metrics
        self.shadow = frozenset(shadow)
        # The checker memoizes decisions, so the same Decision object comes
        # back for most checks: convert it once. Keyed by identity, holding
        # the decision so the identity stays valid. A memo keyed otherwise
        # must include valid_until's inputs (the timeline ahead of the
        # segment in force, the room and, for a protected class, the time).
        self._pb: dict[int, tuple[Decision, pb.Decision]] = {}

    def _to_pb(self, d: Decision) -> pb.Decision:
        hit = self._pb.get(id(d))
        if hit is not None and hit[0] is d:
            return hit[1]
        out = wire.decision_to_pb(d)
        if len(self._pb) >= PB_MEMO_SIZE:
            self._pb.clear()
        self._pb[id(d)] = (d, out)
        return out

    def _one(self, req: CheckRequest, d: Decision) -> pb.Decision:
        shadowed = not d.allowed and req.check in self.shadow
        m = self.metrics
        if m is not None:
            m.decided(req.check, d, d.allowed or shadowed)
            if shadowed:
                m.shadowed(req.check, d.reason)
        out = self._to_pb(d)
        if shadowed:
            shadow_copy = pb.Decision()
            shadow_copy.CopyFrom(out)
            out = shadow_copy
            out.allowed = True
            out.shadow = True
            decision_log.info(
                "shadow mode: allowed a %s check that enforcement would deny (%s)",
                req.check.value,
                d.reason.value,
                extra={
                    "event": "shadow_denial",
                    "check": req.check.value,
                    "app_id": req.app_id,
                    "reason": d.reason.value,
                },
            )
        elif decision_log.isEnabledFor(logging.DEBUG):
            decision_log.debug(
                "decision",
                extra={
                    "event": "decision",
                    "check": req.check.value,
                    "app_id": req.app_id,
                    "room_id": req.room_id,
                    "allowed": d.allowed,
                    "reason": d.reason.value,
                    "degraded": d.degraded,
                    "status_version": d.status_version,
                },
            )
        return out

    def finish(self, req: CheckRequest, d: Decision, seconds: float) -> pb.Decision:
        """The answer to one check, decided in ``seconds``."""
        if self.metrics is not None:
            self.metrics.timed(req.check.value, seconds)
        return self._one(req, d)

    def finish_batch(
        self, reqs: Sequence[CheckRequest], ds: Sequence[Decision], seconds: float
    ) -> list[pb.Decision]:
        """The answers to a CheckBatch, decided in ``seconds`` altogether."""
        if self.metrics is not None:
            self.metrics.timed(BATCH, seconds)
        return [self._one(r, d) for r, d in zip(reqs, ds, strict=True)]

    def shadow_pb(self, check: Check, decision: pb.Decision) -> None:
        """Apply shadow mode to an answer computed outside the checks (a
        schedule entry, a preview): not counted, not logged."""
        if check in self.shadow and not decision.allowed:
            decision.allowed = True
            decision.shadow = True

    def shadow_schedule(self, resp: pb.WatchApplicationStatusResponse) -> None:
        if not self.shadow:
            return
        for entry in resp.schedule:
            for name, check in _SCHEDULE_FIELDS:
                self.shadow_pb(check, getattr(entry, name))


PREVIEW_CHECKS: Final = _SCHEDULE_FIELDS
"""The fields of a PreviewApplicationResponse that hold decisions, by check."""
