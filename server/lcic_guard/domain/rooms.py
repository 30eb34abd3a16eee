"""R6's classroom reports, as pure functions: which reports are believed, how
repeated reports of one room merge, how long a reported class may be
protected, and which report counts as none.

This module is the definition of those rules. The sidecar validates reports
with :func:`start_report_problem` and :func:`end_report_problem`; the store
merges them atomically in Redis with ``store/lua/report_room.lua``, which
implements :func:`merge_report` (a property test runs both on the same
reports); every protection is bounded by :func:`protected_until`. Whether a
reported class *is* protected against a suspension also needs the status:
that is :func:`lcic_guard.domain.policy.r6_protection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from lcic_guard.domain.time import Millis

if TYPE_CHECKING:
    # Only the type: the policy module builds on this one.
    from lcic_guard.domain.policy import PolicyConfig

REPORT_SKEW_MS: Final = 5 * 60_000
"""R6: how far ahead of the sidecar's clock a reported time may be (clock
skew between the classroom service and the sidecar)."""


@dataclass(frozen=True, slots=True)
class Room:
    """What the sidecar was told about a classroom (R6)."""

    started_at: Millis
    scheduled_end: Millis | None = None
    ended_at: Millis | None = None


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """What the store keeps about one room: every report of it merged by
    :func:`merge_report` (R6, ADR 0014). ``until`` is when the record may be
    forgotten: no protection it can give lasts past it."""

    started_at: Millis | None
    scheduled_end: Millis | None
    ended_at: Millis | None
    until: Millis


def protected_until(room: Room, cfg: PolicyConfig) -> Millis:
    """R6: when the protection of a class in progress ends at the latest.

    The scheduled end + the overrun allowance, or with no scheduled end the
    start + the maximum class length; never later than the start + the
    maximum class length, whatever scheduled end was reported, so that a
    report cannot keep a class running for ever. This is the one place the
    bound is computed."""
    cap = room.started_at + cfg.max_class_ms
    if room.scheduled_end is None:
        return cap
    return min(room.scheduled_end + cfg.overrun_ms, cap)


def protection_ends_at(room: Room, cfg: PolicyConfig) -> Millis:
    """R6: when the protection of ``room`` ends: when the class is reported
    ended or at :func:`protected_until`, whichever comes first."""
    until = protected_until(room, cfg)
    if room.ended_at is not None and room.ended_at < until:
        return room.ended_at
    return until


def live_room(room: Room | None, now: Millis) -> Room | None:
    """R6: the report as protection reads it at ``now``: a class reported
    ended (at or before ``now``) counts as no report, since nothing it could
    protect is left."""
    if room is None or (room.ended_at is not None and room.ended_at <= now):
        return None
    return room


def _time_problem(at: Millis, field: str, now: Millis, cfg: PolicyConfig) -> str | None:
    if at < now - cfg.max_class_ms:
        return (
            f"{field}: earlier than now minus the maximum class length "
            f"({cfg.max_class_ms // 60_000} min); not believed"
        )
    if at > now + REPORT_SKEW_MS:
        return f"{field}: more than 5 minutes in the future; not believed"
    return None


def start_report_problem(
    started_at: Millis, scheduled_end: Millis | None, now: Millis, cfg: PolicyConfig
) -> str | None:
    """R6: why a ``ReportClassroomStarted`` is not believed, naming the field,
    or None when it is: ``started_at`` no earlier than now - the maximum class
    length and no later than now + 5 min, ``scheduled_end_time`` (when given)
    after ``started_at``. A report is believed only about a class that could
    be running."""
    problem = _time_problem(started_at, "started_at", now, cfg)
    if problem is None and scheduled_end is not None and scheduled_end <= started_at:
        problem = "scheduled_end_time: must be after started_at"
    return problem


def end_report_problem(ended_at: Millis, now: Millis, cfg: PolicyConfig) -> str | None:
    """R6: why a ``ReportClassroomEnded`` is not believed, naming the field,
    or None when it is: ``ended_at`` within the same window as a start."""
    return _time_problem(ended_at, "ended_at", now, cfg)


def report_record(
    cfg: PolicyConfig,
    *,
    started_at: Millis | None = None,
    scheduled_end: Millis | None = None,
    ended_at: Millis | None = None,
) -> RoomRecord:
    """R6: one believed report as a record, to merge into the stored one. An
    end report keeps its record for as long as a class started at its end
    could be protected."""
    if started_at is not None:
        until = protected_until(Room(started_at, scheduled_end), cfg)
    elif ended_at is not None:
        until = protected_until(Room(ended_at), cfg)
    else:
        raise ValueError("a classroom report has a start or an end")
    return RoomRecord(started_at, scheduled_end, ended_at, until)


def _earliest(a: Millis | None, b: Millis | None) -> Millis | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def merge_report(stored: RoomRecord | None, report: RoomRecord) -> RoomRecord:
    """R6 (ADR 0014): a room's record after one more report. The earliest
    start and the earliest end win and the first scheduled end reported is
    kept, so repeating or re-sending a report can never extend a protection;
    the record is kept until the latest ``until`` of its reports, which is
    never before the protection the merged record gives ends.

    ``store/lua/report_room.lua`` does the same atomically in Redis."""
    if stored is None:
        return report
    return RoomRecord(
        started_at=_earliest(stored.started_at, report.started_at),
        scheduled_end=(
            stored.scheduled_end if stored.scheduled_end is not None else report.scheduled_end
        ),
        ended_at=_earliest(stored.ended_at, report.ended_at),
        until=max(stored.until, report.until),
    )


def reported_room(
    started_at: Millis | None, scheduled_end: Millis | None, ended_at: Millis | None
) -> Room | None:
    """R6: the room a stored record describes, or None when it protects
    nothing: an end reported without a start cannot protect a class."""
    if started_at is None:
        return None
    return Room(started_at, scheduled_end, ended_at)


def forgettable(record: RoomRecord, now: Millis) -> bool:
    """R6: whether a stored record can be dropped at ``now`` (its protection
    window has passed, so the room answers as if never reported)."""
    return record.until < now
