"""R6's classroom reports (lcic_guard.domain.rooms): the protection bound,
which reports are believed, how reports of one room merge, and which report
counts as none. Pure: hypothesis over random rooms, reports and settings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.domain.policy import (
    HOUR,
    MINUTE,
    AppStatus,
    Check,
    PolicyConfig,
    Reason,
    Segment,
    decide,
    message_for,
    status_message,
)
from lcic_guard.domain.rooms import (
    REPORT_SKEW_MS,
    Room,
    RoomRecord,
    end_report_problem,
    forgettable,
    live_room,
    merge_report,
    protected_until,
    protection_ends_at,
    report_record,
    reported_room,
    start_report_problem,
)
from lcic_guard.domain.time import Millis

T0: Millis = 1_790_000_000_000

configs = st.builds(
    lambda overrun, max_class: PolicyConfig(overrun_ms=overrun, max_class_ms=max_class),
    st.integers(0, 48 * HOUR),
    st.integers(0, 48 * HOUR),
)


@st.composite
def rooms(draw: st.DrawFn) -> Room:
    start = T0 + draw(st.integers(-48 * HOUR, 48 * HOUR))
    end = draw(st.one_of(st.none(), st.integers(1, 96 * HOUR).map(lambda d: start + d)))
    ended = draw(st.one_of(st.none(), st.integers(0, 96 * HOUR).map(lambda d: start + d)))
    return Room(start, end, ended)


# -- the protection bound --------------------------------------------------


@settings(max_examples=500)
@given(rooms(), configs)
def test_protection_never_outlasts_start_plus_the_maximum_class_length(
    room: Room, cfg: PolicyConfig
) -> None:
    until = protected_until(room, cfg)
    assert until <= room.started_at + cfg.max_class_ms
    if room.scheduled_end is None:
        assert until == room.started_at + cfg.max_class_ms
    elif room.scheduled_end + cfg.overrun_ms <= room.started_at + cfg.max_class_ms:
        # Within the cap: never earlier than the scheduled end + the overrun.
        assert until == room.scheduled_end + cfg.overrun_ms
    else:
        assert until == room.started_at + cfg.max_class_ms


@settings(max_examples=300)
@given(rooms(), configs, st.integers(0, 100 * HOUR))
def test_a_decision_protects_exactly_within_the_bound(
    room: Room, cfg: PolicyConfig, later: int
) -> None:
    """Whatever room reaches decide (bounded or not by its caller), the class
    is let in only before start + the maximum class length, before its
    scheduled end + the overrun, and before its reported end."""
    suspended = room.started_at + 1  # the class started just before
    status = AppStatus(
        "app-1",
        "acct-1",
        (
            Segment(room.started_at - HOUR),
            Segment(suspended, (Reason.ACCOUNT_OVERDUE,), suspended_at=suspended),
        ),
    )
    now = suspended + later
    got = decide(Check.ENTER_CLASSROOM, status, now, cfg, room)
    inside = now < room.started_at + cfg.max_class_ms
    if room.scheduled_end is not None:
        inside = inside and now < room.scheduled_end + cfg.overrun_ms
    if room.ended_at is not None:
        inside = inside and now < room.ended_at
    assert got.allowed == inside
    if inside:
        assert got.reason is Reason.IN_PROGRESS_PROTECTED
        assert got.protected_until == protected_until(room, cfg)
        assert now < protection_ends_at(room, cfg)
    else:
        assert got.reason is Reason.ACCOUNT_OVERDUE


def test_an_overrun_longer_than_the_maximum_class_length_is_still_capped() -> None:
    cfg = PolicyConfig(overrun_ms=13 * HOUR, max_class_ms=12 * HOUR)
    assert protected_until(Room(T0, T0 + MINUTE), cfg) == T0 + 12 * HOUR
    assert protected_until(Room(T0, T0 + 20 * HOUR), cfg) == T0 + 12 * HOUR
    assert protected_until(Room(T0), cfg) == T0 + 12 * HOUR


def test_protection_ends_at_the_reported_end_when_that_is_first() -> None:
    cfg = PolicyConfig()
    assert protection_ends_at(Room(T0, T0 + HOUR, T0 + 30 * MINUTE), cfg) == T0 + 30 * MINUTE
    assert protection_ends_at(Room(T0, T0 + HOUR, T0 + 3 * HOUR), cfg) == T0 + 2 * HOUR
    assert protection_ends_at(Room(T0), cfg) == T0 + 12 * HOUR


# -- believability ---------------------------------------------------------


def believed(at: Millis, now: Millis, cfg: PolicyConfig) -> bool:
    return now - cfg.max_class_ms <= at <= now + 5 * MINUTE


@settings(max_examples=500)
@given(
    st.integers(-60 * HOUR, 60 * HOUR),
    st.one_of(st.none(), st.integers(-HOUR, 60 * HOUR)),
    configs,
)
def test_a_start_is_believed_exactly_within_the_spec_bounds(
    start_offset: int, end_offset: int | None, cfg: PolicyConfig
) -> None:
    now = T0
    started = now + start_offset
    end = None if end_offset is None else started + end_offset
    problem = start_report_problem(started, end, now, cfg)
    ok = believed(started, now, cfg) and (end is None or end > started)
    assert (problem is None) == ok
    if problem is not None:
        field = "started_at" if not believed(started, now, cfg) else "scheduled_end_time"
        assert problem.startswith(f"{field}: ")


@settings(max_examples=300)
@given(st.integers(-60 * HOUR, 60 * HOUR), configs)
def test_an_end_is_believed_exactly_within_the_same_window(offset: int, cfg: PolicyConfig) -> None:
    problem = end_report_problem(T0 + offset, T0, cfg)
    assert (problem is None) == believed(T0 + offset, T0, cfg)
    assert problem is None or problem.startswith("ended_at: ")


@pytest.mark.parametrize(
    ("started", "end", "problem"),
    [
        (T0 - 12 * HOUR, None, None),
        (
            T0 - 12 * HOUR - 1,
            None,
            "started_at: earlier than now minus the maximum class length (720 min); not believed",
        ),
        (T0 + REPORT_SKEW_MS, None, None),
        (
            T0 + REPORT_SKEW_MS + 1,
            None,
            "started_at: more than 5 minutes in the future; not believed",
        ),
        (T0, T0 + 1, None),
        (T0, T0, "scheduled_end_time: must be after started_at"),
        # The start is judged first.
        (T0 + HOUR, T0, "started_at: more than 5 minutes in the future; not believed"),
    ],
)
def test_the_customer_is_told_which_field_is_not_believed(
    started: Millis, end: Millis | None, problem: str | None
) -> None:
    assert start_report_problem(started, end, T0, PolicyConfig()) == problem


# -- merging reports (ADR 0014) --------------------------------------------

starts = st.builds(
    lambda s, e: ("start", T0 + s, None if e is None else T0 + s + e),
    st.integers(-12 * HOUR, 5 * MINUTE),
    st.one_of(st.none(), st.integers(1, 30 * HOUR)),
)
ends = st.builds(lambda x: ("end", T0 + x, None), st.integers(-12 * HOUR, 5 * MINUTE))
reports = st.lists(st.one_of(starts, ends), min_size=1, max_size=10)


def as_record(report: tuple[str, Millis, Millis | None], cfg: PolicyConfig) -> RoomRecord:
    kind, at, end = report
    if kind == "start":
        return report_record(cfg, started_at=at, scheduled_end=end)
    return report_record(cfg, ended_at=at)


def fold(sequence: list[tuple[str, Millis, Millis | None]], cfg: PolicyConfig) -> RoomRecord:
    record: RoomRecord | None = None
    for report in sequence:
        record = merge_report(record, as_record(report, cfg))
    assert record is not None
    return record


@settings(max_examples=300)
@given(reports, configs, st.randoms(use_true_random=False))
def test_the_earliest_start_and_end_win_in_any_order(
    sequence: list[tuple[str, Millis, Millis | None]], cfg: PolicyConfig, rnd: object
) -> None:
    record = fold(sequence, cfg)
    started = [at for kind, at, _ in sequence if kind == "start"]
    ended = [at for kind, at, _ in sequence if kind == "end"]
    assert record.started_at == min(started, default=None)
    assert record.ended_at == min(ended, default=None)
    # The first scheduled end reported is kept, whatever follows.
    firsts = [end for kind, _, end in sequence if kind == "start" and end is not None]
    assert record.scheduled_end == (firsts[0] if firsts else None)
    # Sending every report again changes nothing.
    assert fold(sequence + sequence, cfg) == record


@settings(max_examples=300)
@given(reports, configs)
def test_more_reports_never_extend_a_protection(
    sequence: list[tuple[str, Millis, Millis | None]], cfg: PolicyConfig
) -> None:
    record: RoomRecord | None = None
    before: Millis | None = None
    for report in sequence:
        record = merge_report(record, as_record(report, cfg))
        room = reported_room(record.started_at, record.scheduled_end, record.ended_at)
        if room is None:
            continue
        now = protection_ends_at(room, cfg)
        if before is not None:
            assert now <= before
        before = now
        # The store keeps the record at least until its protection ends, so
        # forgetting a record never cuts off a class.
        assert record.until >= protected_until(room, cfg)
        assert not forgettable(record, protected_until(room, cfg))


def test_an_end_without_a_start_protects_nothing() -> None:
    cfg = PolicyConfig()
    record = report_record(cfg, ended_at=T0)
    assert record == RoomRecord(None, None, T0, T0 + cfg.max_class_ms)
    assert reported_room(record.started_at, record.scheduled_end, record.ended_at) is None
    # A start reported afterwards is protected until its end.
    merged = merge_report(record, report_record(cfg, started_at=T0 - HOUR))
    assert reported_room(merged.started_at, merged.scheduled_end, merged.ended_at) == Room(
        T0 - HOUR, None, T0
    )


def test_a_record_is_forgotten_only_after_its_until() -> None:
    record = RoomRecord(T0, None, None, T0 + HOUR)
    assert not forgettable(record, T0 + HOUR)
    assert forgettable(record, T0 + HOUR + 1)


def test_a_report_needs_a_start_or_an_end() -> None:
    with pytest.raises(ValueError, match="start or an end"):
        report_record(PolicyConfig())


# -- an ended class counts as no report ------------------------------------


@settings(max_examples=300)
@given(rooms(), configs, st.integers(-HOUR, 100 * HOUR), st.booleans())
def test_an_ended_class_is_answered_as_if_never_reported(
    room: Room, cfg: PolicyConfig, offset: int, banned: bool
) -> None:
    suspended = room.started_at + 1
    reasons = (Reason.ACCOUNT_BANNED,) if banned else (Reason.PACKAGE_EXPIRED,)
    status = AppStatus(
        "app-1",
        "acct-1",
        (Segment(room.started_at - HOUR), Segment(suspended, reasons, suspended_at=suspended)),
    )
    now = suspended + offset
    live = live_room(room, now)
    if room.ended_at is not None and room.ended_at <= now:
        assert live is None
    else:
        assert live == room
    # What the cache keeps for a room answers every check as the room does.
    assert decide(Check.ENTER_CLASSROOM, status, now, cfg, live) == decide(
        Check.ENTER_CLASSROOM, status, now, cfg, room
    )


# -- the customer's message for a status -----------------------------------


def test_a_status_message_adds_a_grace_running_alongside_a_suspension() -> None:
    seg = Segment(
        T0,
        (Reason.PACKAGE_EXPIRED, Reason.OVERDUE_GRACE),
        grace_ends_at=T0 + 24 * HOUR,
        suspended_at=T0,
    )
    assert status_message(seg, T0) == (
        "Service is suspended because the application has no monthly package in force. "
        "To restore it: Buy a monthly package for the application. The account also has "
        "an overdue payment: top up before 2026-09-22T14:13:20.000Z or every application "
        "of the account will be suspended for it too."
    )


@pytest.mark.parametrize(
    "reasons",
    [(), (Reason.OVERDUE_GRACE,), (Reason.ACCOUNT_OVERDUE,), (Reason.ACCOUNT_BANNED,)],
)
def test_otherwise_the_status_message_is_the_decisions(reasons: tuple[Reason, ...]) -> None:
    suspended = T0 if reasons and reasons != (Reason.OVERDUE_GRACE,) else None
    seg = Segment(T0, reasons, grace_ends_at=T0 + HOUR, suspended_at=suspended)
    assert status_message(seg, T0) == message_for(seg)
