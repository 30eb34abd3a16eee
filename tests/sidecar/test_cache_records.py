"""The cache's packed records and the memoized fast path agree with the
policy they stand in for."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.domain.policy import (
    HOUR,
    SUSPENSION_PRECEDENCE,
    AppStatus,
    Check,
    PolicyConfig,
    Reason,
    Room,
    Segment,
    decide,
)
from lcic_guard.domain.time import MAX_TIME
from lcic_guard.sidecar.cache import StatusCache, pack, segment_span, unpack, unpack_segment
from lcic_guard.sidecar.checker import Checker, CheckRequest

T0 = 1_790_000_000_000
CANONICAL = (*SUSPENSION_PRECEDENCE, Reason.OVERDUE_GRACE)
# Times a record can hold: the messages of a decision format them.
times = st.one_of(st.none(), st.integers(0, MAX_TIME))


@st.composite
def statuses(draw: st.DrawFn) -> AppStatus:
    starts = sorted(
        draw(st.sets(st.integers(T0 - 100 * HOUR, T0 + 100 * HOUR), min_size=1, max_size=5))
    )
    segments = []
    for start in starts:
        held = draw(st.sets(st.sampled_from(CANONICAL)))
        reasons = tuple(r for r in CANONICAL if r in held)
        suspended = draw(times)
        # R6's effective time exists with a suspension start, often equal to it.
        effective = (
            None
            if suspended is None
            else draw(st.one_of(st.just(suspended), st.integers(suspended, MAX_TIME)))
        )
        segments.append(Segment(start, reasons, draw(times), suspended, draw(times), effective))
    return AppStatus("app-1", "", tuple(segments), draw(st.integers(0, 2**40)))


@settings(max_examples=300, deadline=None)
@given(
    status=statuses(),
    fetched=st.integers(0, 2**45),
    now=st.integers(T0 - 200 * HOUR, T0 + 200 * HOUR),
)
def test_a_packed_record_is_the_status_it_packs(status: AppStatus, fetched: int, now: int) -> None:
    rec = pack(status, fetched)
    back, fetched_at = unpack("app-1", rec)
    assert back == status and fetched_at == fetched
    start, _end = segment_span(rec, len(status.segments), now)
    assert unpack_segment(rec, start) == status.at(now)


def test_unknown_apps_pack_too() -> None:
    assert unpack("x", pack(None, 42)) == (None, 42)


class Reader:
    """Serves statuses from memory: the fast path must not need it."""

    def __init__(self, status: AppStatus) -> None:
        self.status = status
        self.reads = 0

    async def read_status(
        self, app_id: str, room_id: str | None = None
    ) -> tuple[AppStatus | None, Room | None]:
        self.reads += 1
        return (self.status if app_id == "app-1" else None), None

    async def read_statuses(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None]]:
        return [await self.read_status(a, r) for a, r in requests]

    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]:
        return list(await self.read_statuses(requests))


@settings(max_examples=100, deadline=None)
@given(
    status=statuses(),
    offsets=st.lists(st.integers(-150 * HOUR, 150 * HOUR), min_size=1, max_size=20),
)
def test_memoized_fast_path_equals_the_policy(status: AppStatus, offsets: list[int]) -> None:
    cfg = PolicyConfig()
    cache = StatusCache(10, max_age_ms=10**15)
    cache.feed_healthy, cache.synced_since = True, 0
    clock = [T0]
    checker = Checker(Reader(status), cfg, clock=lambda: clock[0], cache=cache)
    cache.put("app-1", status, 1)
    cache.put("app-2", None, 1)
    for off in offsets:  # crossing deadlines: each segment memoized apart
        clock[0] = T0 + off
        for check in (Check.CREATE_CLASSROOM, Check.ACCESS_RECORDING):
            got = checker.check_cached(CheckRequest(check, "app-1"))
            assert got == decide(check, status, clock[0], cfg)
            unknown = checker.check_cached(CheckRequest(check, "app-2"))
            assert unknown == decide(check, None, clock[0], cfg)
        enter = checker.check_cached(CheckRequest(Check.ENTER_CLASSROOM, "app-1", "room-1"))
        expected = decide(Check.ENTER_CLASSROOM, status, clock[0], cfg)
        # A suspended app's classroom needs the room: no cached answer yet.
        assert enter == (expected if expected.allowed else None)


def test_the_least_recently_used_app_is_forgotten_first() -> None:
    cache = StatusCache(2, max_age_ms=1000)
    st_ = AppStatus("a", "", (Segment(T0),), 1)
    cache.put("a", st_, 1)
    cache.put("b", st_, 1)
    assert cache.lookup("a") is not None  # "a" is now the most recent
    cache.put("c", st_, 1)
    assert cache.app_ids() == ["a", "c"]


@settings(max_examples=100, deadline=None)
@given(
    status=statuses(),
    start=st.integers(-30 * HOUR, 30 * HOUR),
    length=st.one_of(st.none(), st.integers(1, 20 * HOUR)),
    ended=st.one_of(st.none(), st.integers(-30 * HOUR, 30 * HOUR)),
    offsets=st.lists(st.integers(-40 * HOUR, 40 * HOUR), min_size=1, max_size=20),
)
def test_memoized_room_answers_follow_the_clock(
    status: AppStatus, start: int, length: int | None, ended: int | None, offsets: list[int]
) -> None:
    """An enter check of a suspended app is memoized with its room: the same
    record and room must still give a new answer once now passes the end of
    the class's protection or its reported end."""
    cfg = PolicyConfig()
    cache = StatusCache(10, max_age_ms=10**15)
    cache.feed_healthy, cache.synced_since = True, 0
    clock = [T0]
    checker = Checker(Reader(status), cfg, clock=lambda: clock[0], cache=cache)
    cache.put("app-1", status, 1)
    room = Room(
        T0 + start,
        None if length is None else T0 + start + length,
        None if ended is None else T0 + ended,
    )
    cache.put_room("app-1", "room-1", room, 0)
    for off in sorted(offsets) + sorted(offsets):  # again: now from the memo
        clock[0] = T0 + off
        got = checker.check_cached(CheckRequest(Check.ENTER_CLASSROOM, "app-1", "room-1"))
        want = decide(Check.ENTER_CLASSROOM, status, clock[0], cfg, room)
        assert got == want


def test_a_memoized_protected_room_is_denied_once_its_protection_ends() -> None:
    cfg = PolicyConfig()
    cache = StatusCache(10, max_age_ms=10**15)
    cache.feed_healthy, cache.synced_since = True, 0
    overdue = Segment(
        T0 - HOUR, (Reason.ACCOUNT_OVERDUE,), T0 - HOUR, T0 - HOUR, T0 + 1000 * HOUR, T0 - HOUR
    )
    status = AppStatus("app-1", "acct-1", (overdue,), 3)
    clock = [T0]
    checker = Checker(Reader(status), cfg, clock=lambda: clock[0], cache=cache)
    cache.put("app-1", status, 1)
    cache.put_room("app-1", "room-1", Room(T0 - 2 * HOUR, T0 + HOUR), 0)
    enter = CheckRequest(Check.ENTER_CLASSROOM, "app-1", "room-1")
    first = checker.check_cached(enter)
    assert first is not None and first.reason is Reason.IN_PROGRESS_PROTECTED
    clock[0] = T0 + 3 * HOUR  # past the scheduled end and the overrun: same record, same room
    later = checker.check_cached(enter)
    assert later is not None and not later.allowed and later.reason is Reason.ACCOUNT_OVERDUE
