"""r6_may_protect, the test a degraded enter check makes before it
denies a room it has not read (SPEC R6, R13): it says "a room may matter"
exactly when some reported class would be let in although the status
denies. Pure: no Redis, no server (hypothesis over random statuses)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.domain.policy import (
    HOUR,
    MINUTE,
    AppStatus,
    Check,
    PolicyConfig,
    Reason,
    Room,
    Segment,
    decide,
    r6_may_protect,
)
from lcic_guard.domain.time import Millis

T0: Millis = 1_790_000_000_000
STEP = 15 * MINUTE
CFGS = (PolicyConfig(), PolicyConfig(protect_when_banned=True, max_class_ms=3 * HOUR))

reason_sets = st.sampled_from(
    [
        (),
        (Reason.OVERDUE_GRACE,),
        (Reason.ACCOUNT_OVERDUE,),
        (Reason.PACKAGE_EXPIRED,),
        (Reason.ACCOUNT_OVERDUE, Reason.PACKAGE_QUOTA_EXHAUSTED),
        (Reason.ACCOUNT_BANNED,),
        (Reason.ACCOUNT_BANNED, Reason.ACCOUNT_OVERDUE),
        (Reason.RESOURCES_RELEASED,),
    ]
)


@st.composite
def statuses(draw: st.DrawFn) -> AppStatus:
    """An active segment, then maybe a second one (a suspension whose effect
    may lag its start, as when the fact was learned late)."""
    reasons = draw(reason_sets)
    start = T0 + draw(st.integers(-60, 60)) * STEP
    suspended = bool(reasons) and reasons != (Reason.OVERDUE_GRACE,)
    lag = draw(st.integers(0, 8)) * STEP if suspended else 0
    seg = Segment(
        start,
        reasons,
        suspended_at=start if suspended else None,
        effective_at=start + lag if suspended else None,
    )
    return AppStatus("app-1", "acct-1", (Segment(start - 100 * HOUR), seg), 1)


rooms = st.builds(
    lambda start, end, ended: Room(
        T0 + start * STEP,
        None if end is None else T0 + (start + end) * STEP,
        None if ended is None else T0 + (start + ended) * STEP,
    ),
    st.integers(-80, 40),
    st.one_of(st.none(), st.integers(1, 60)),
    st.one_of(st.none(), st.integers(0, 60)),
)


@settings(max_examples=500, deadline=None)
@given(
    statuses(),
    st.lists(rooms, max_size=6),
    st.integers(-40, 80).map(lambda k: T0 + k * STEP),
    st.sampled_from(CFGS),
)
def test_an_unread_room_matters_exactly_when_some_class_could_be_let_in(
    status: AppStatus, reported: list[Room], now: Millis, cfg: PolicyConfig
) -> None:
    without = decide(Check.ENTER_CLASSROOM, status, now, cfg, None)
    may = r6_may_protect(status, now, cfg)
    if not may:
        # Whatever was reported, the answer is the one without a room: a
        # denial from what was last seen cannot cut off a class.
        for room in reported:
            with_room = decide(Check.ENTER_CLASSROOM, status, now, cfg, room)
            assert with_room.allowed == without.allowed
    else:
        # The status denies, and a class started just before the suspension
        # took effect would be protected now.
        assert not without.allowed
        seg = status.at(now)
        took = seg.effective_at if seg.effective_at is not None else seg.suspended_at
        assert took is not None
        probe = decide(Check.ENTER_CLASSROOM, status, now, cfg, Room(took - 1))
        assert probe.allowed and probe.reason is Reason.IN_PROGRESS_PROTECTED
