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
from lcic_guard.sidecar.checker import Answer, CheckRequest
from lcic_guard.sidecar.metrics import SidecarMetrics

decision_log = logging.getLogger("lcic_guard.decisions")

_SCHEDULE_FIELDS: Final = (
    ("create_classroom", Check.CREATE_CLASSROOM),
    ("enter_classroom", Check.ENTER_CLASSROOM),
    ("access_recording", Check.ACCESS_RECORDING),
)


class DecisionObserver:
    """Makes the checker's answers (:meth:`render`, once per memoized
    decision) and accounts for each one sent (:meth:`observe`): metrics,
    logs, shadow mode."""

    def __init__(self, metrics: SidecarMetrics | None = None, shadow: Iterable[Check] = ()) -> None:
        self.metrics = metrics
        self.shadow = frozenset(shadow)

    def render(self, check: Check, d: Decision) -> Answer:
        """The answer to send for ``d``: shadow mode applied, serialized once."""
        shadowed = not d.allowed and check in self.shadow
        out = wire.decision_to_pb(d)
        if shadowed:
            out.allowed = True
            out.shadow = True
        # Every check response holds its decision as field 1, so these bytes
        # are the answer to any of the three, and a CheckBatchResponse is its
        # items' bytes joined.
        payload = pb.CanCreateClassroomResponse(decision=out).SerializeToString()
        allowed = "true" if d.allowed or shadowed else "false"
        return Answer(d, payload, (check.value, d.reason.value, allowed), shadowed)

    def observe(self, req: CheckRequest, a: Answer) -> None:
        """Count, and log if asked, one answer sent."""
        m = self.metrics
        if m is not None:
            m.decided(a.labels)
        if a.shadowed:
            d = a.decision
            if m is not None:
                m.shadowed(req.check, d.reason)
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
            d = a.decision
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

    def observe_many(self, reqs: Sequence[CheckRequest], answers: Sequence[Answer]) -> None:
        """:meth:`observe` for each item of a batch."""
        m = self.metrics
        if self.shadow or decision_log.isEnabledFor(logging.DEBUG) or m is None:
            for r, a in zip(reqs, answers, strict=True):
                self.observe(r, a)
            return
        decided = m.counts.decided
        for a in answers:  # only counted: nothing to log
            labels = a.labels
            decided[labels] = decided.get(labels, 0) + 1

    def needs_request_id(self, answers: Sequence[Answer]) -> bool:
        """Whether a log line is made for these answers (then it carries the
        call's request id, made up if the caller sent none)."""
        if decision_log.isEnabledFor(logging.DEBUG):
            return True
        return bool(self.shadow) and any(a.shadowed for a in answers)

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
