"""Properties of the pure policy over random billing histories (hypothesis).

A history is the facts of one account with 1-3 applications: registrations,
alerts, settlements, packages, usage, pay-as-you-go switches, and maybe a
ban and a release. Times are multiples of 15 minutes in a five-day window,
so that ties, exact deadlines (24 h = 96 steps) and same-ms settlements
happen often; a few land 1 ms off a step.

A status is a timeline kept from its newest fact on, so "the state at time
t" is computed from the facts that had occurred by t (what the reconciler
would have known then): :class:`Oracle`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from lcic_guard.domain.facts import (
    ApplicationRegistered,
    ArrearsSettled,
    ComplianceBan,
    Fact,
    GraceExtended,
    OverdueAlert,
    PackagePurchased,
    PackageUsage,
    PaygChanged,
    ReleaseHoldCleared,
    ReleaseHoldSet,
    ResourcesReleased,
)
from lcic_guard.domain.policy import (
    BILLING_SUSPENSIONS,
    FUTURE_SKEW_MS,
    HOUR,
    MINUTE,
    SUSPENSION_PRECEDENCE,
    AppStatus,
    Check,
    PolicyConfig,
    Reason,
    Room,
    Segment,
    State,
    compute_account,
    decide,
    protected_until,
)
from lcic_guard.domain.time import Millis

T0: Millis = 1_790_000_000_000
ACCT = "acct-1"
APPS = ("app-1", "app-2", "app-3")
STEP = 15 * MINUTE
WINDOW_STEPS = 5 * 24 * 4  # five days
CFG = PolicyConfig()
GRACE = CFG.grace_ms
ALL_CHECKS = (Check.CREATE_CLASSROOM, Check.ENTER_CLASSROOM, Check.ACCESS_RECORDING)
STATE_OF = {
    Reason.ACCOUNT_BANNED: State.BANNED,
    Reason.RESOURCES_RELEASED: State.RELEASED,
    Reason.ACCOUNT_OVERDUE: State.SUSPENDED,
    Reason.PACKAGE_EXPIRED: State.SUSPENDED,
    Reason.PACKAGE_QUOTA_EXHAUSTED: State.SUSPENDED,
    Reason.OVERDUE_GRACE: State.GRACE,
}

PROPS = settings(max_examples=200, deadline=None)

# ---------------------------------------------------------------------------
# Strategies

times = st.builds(
    lambda k, jitter: T0 + k * STEP + jitter,
    st.integers(0, WINDOW_STEPS),
    st.sampled_from((0, 0, 0, 0, 0, 0, 1, -1)),
)


@dataclass
class History:
    facts: list[Fact]
    apps: tuple[str, ...]

    def of(self, kind: type[Fact]) -> list[Fact]:
        return [f for f in self.facts if isinstance(f, kind)]

    def times_of(self, kind: type[Fact]) -> list[Millis]:
        return sorted(f.occurred_at for f in self.of(kind))


# A handful of instants, so that many facts share a millisecond.
crowded_times = st.sampled_from([T0 + k * STEP for k in (0, 1, 96, 97)])


@st.composite
def histories(
    draw: st.DrawFn,
    *,
    ban: bool = True,
    release: bool = True,
    when: st.SearchStrategy[Millis] = times,
    overrides: bool = False,
) -> History:
    n = 0

    def eid() -> str:
        nonlocal n
        n += 1
        return f"e{n}"

    apps = APPS[: draw(st.integers(1, 3))]
    app = st.sampled_from(apps)
    package_id = st.sampled_from(("p1", "p2", "p3"))
    facts: list[Fact] = [ApplicationRegistered(eid(), draw(when), ACCT, a) for a in apps]
    # Most apps start with a package bought at registration time.
    for reg in list(facts):
        if isinstance(reg, ApplicationRegistered) and draw(st.integers(0, 3)) > 0:
            length = draw(st.integers(1, WINDOW_STEPS)) * STEP
            facts.append(
                PackagePurchased(
                    eid(),
                    reg.occurred_at,
                    reg.app_id,
                    "p1",
                    reg.occurred_at,
                    reg.occurred_at + length,
                    draw(st.integers(0, 100)),
                )
            )
    kinds = draw(
        st.lists(
            st.sampled_from(("alert", "alert", "settle", "settle", "pkg", "usage", "payg")),
            max_size=14,
        )
    )
    for kind in kinds:
        at = draw(when)
        if kind == "alert":
            facts.append(OverdueAlert(eid(), at, ACCT, None))
        elif kind == "settle":
            facts.append(ArrearsSettled(eid(), at, ACCT))
        elif kind == "pkg":
            starts = draw(when)
            length = draw(st.integers(1, WINDOW_STEPS)) * STEP
            quota = draw(st.integers(0, 100))
            facts.append(
                PackagePurchased(
                    eid(), at, draw(app), draw(package_id), starts, starts + length, quota
                )
            )
        elif kind == "usage":
            used = draw(st.integers(0, 120))
            facts.append(PackageUsage(eid(), at, draw(app), draw(package_id), used))
        else:
            facts.append(PaygChanged(eid(), at, draw(app), draw(st.booleans())))
    if overrides:  # support overrides (issue 15): extensions, release holds
        for kind in draw(st.lists(st.sampled_from(("extend", "hold", "clear")), max_size=4)):
            at = draw(when)
            if kind == "extend":
                until = at + draw(st.integers(1, 40 * 24 * 4)) * STEP
                facts.append(GraceExtended(eid(), at, ACCT, until, "support", "why"))
            elif kind == "hold":
                facts.append(ReleaseHoldSet(eid(), at, ACCT, "support", "why"))
            else:
                facts.append(ReleaseHoldCleared(eid(), at, ACCT, "support", "why"))
    if ban and draw(st.integers(0, 3)) == 0:
        facts.append(ComplianceBan(eid(), draw(when), ACCT, ""))
    if release and draw(st.integers(0, 3)) == 0:
        facts.append(ResourcesReleased(eid(), draw(when), ACCT))
    return History(facts, apps)


def rooms(near: list[Millis]) -> st.SearchStrategy[Room]:
    """Classes starting around the given instants (suspension starts), from
    four hours before to one hour after, give or take a millisecond."""
    start = st.builds(
        lambda anchor, k, jitter: anchor + k * STEP + jitter,
        st.sampled_from(near),
        st.integers(-16, 4),
        st.sampled_from((0, 0, 1, -1)),
    )
    return st.builds(
        lambda start, sched, ended: Room(
            start,
            None if sched is None else start + sched,
            None if ended is None else start + ended,
        ),
        start,
        st.one_of(st.none(), st.integers(1, 4 * 4).map(lambda k: k * STEP)),
        st.one_of(st.none(), st.integers(0, 16 * 4).map(lambda k: k * STEP)),
    )


# ---------------------------------------------------------------------------
# The state at any time, from the facts known by then


@dataclass
class Oracle:
    """``seg(app, t)``: the segment in force at t given the facts that had
    occurred by t. A status computed from all facts with occurred_at <= tau
    is valid for every t >= tau until the next fact."""

    facts: list[Fact]
    cfg: PolicyConfig = CFG
    _times: list[Millis] = field(init=False)
    _cache: dict[Millis, dict[str, AppStatus]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._times = sorted({f.occurred_at for f in self.facts})

    def statuses(self, t: Millis) -> dict[str, AppStatus]:
        i = bisect.bisect_right(self._times, t)
        if i == 0:
            return {}
        tau = self._times[i - 1]
        if tau not in self._cache:
            self._cache[tau] = compute_account(
                [f for f in self.facts if f.occurred_at <= tau], self.cfg
            )
        return self._cache[tau]

    def status(self, app: str, t: Millis) -> AppStatus | None:
        return self.statuses(t).get(app)

    def seg(self, app: str, t: Millis) -> Segment | None:
        st_ = self.status(app, t)
        return None if st_ is None else st_.at(t)

    def sample_times(self, extra: Iterable[Millis] = ()) -> list[Millis]:
        """Every instant where something may change, and the ms around it."""
        points: set[Millis] = set(extra)
        for f in self.facts:
            points.add(f.occurred_at)
            if isinstance(f, OverdueAlert):
                points.add(f.occurred_at + self.cfg.grace_ms)
            if isinstance(f, PackagePurchased):
                points.update((f.starts_at, f.expires_at))
        around = {p + d for p in points for d in (-1, 0, 1)}
        return sorted(around | {max(points) + 7 * 24 * HOUR})


def ref_overdue_start(facts: list[Fact], t: Millis) -> Millis | None:
    """R1 by definition: the earliest alert at or before t after the last
    settlement at or before t (a settlement at the alert's ms covers it)."""
    settled = [f.occurred_at for f in facts if isinstance(f, ArrearsSettled) and f.occurred_at <= t]
    last = max(settled, default=None)
    alerts = [
        f.occurred_at
        for f in facts
        if isinstance(f, OverdueAlert)
        and f.occurred_at <= t
        and (last is None or f.occurred_at > last)
    ]
    return min(alerts, default=None)


def ref_package_in_force(facts: list[Fact], app: str, t: Millis) -> bool:
    """R8: some package of the app, as last reported by t, is in force at t.
    A package id reported twice is one package: the later report (by time,
    then event id) replaces the earlier one."""
    latest: dict[str, PackagePurchased] = {}
    for f in facts:
        if isinstance(f, PackagePurchased) and f.app_id == app and f.occurred_at <= t:
            seen = latest.get(f.package_id)
            if seen is None or (f.occurred_at, f.event_id) > (seen.occurred_at, seen.event_id):
                latest[f.package_id] = f
    return any(p.starts_at <= t < p.expires_at for p in latest.values())


# ---------------------------------------------------------------------------
# (a) order independence


@PROPS
@given(st.one_of(histories(), histories(when=crowded_times)), st.data())
def test_order_and_duplicates_do_not_matter(h: History, data: st.DataObject) -> None:
    expected = compute_account(h.facts, CFG)
    assert set(expected) == set(h.apps)
    dupes = data.draw(st.lists(st.sampled_from(h.facts), max_size=10))
    shuffled = data.draw(st.permutations([*h.facts, *dupes]))
    assert compute_account(shuffled, CFG) == expected
    assert compute_account(reversed(h.facts), CFG) == expected


# ---------------------------------------------------------------------------
# (b) grace flips exactly at A + 24 h; (c) a settlement in grace prevents it


@PROPS
@given(histories())
def test_r2_grace_flips_exactly_at_a_plus_24h(h: History) -> None:
    oracle = Oracle(h.facts)
    settlements = h.times_of(ArrearsSettled)
    starts = {ref_overdue_start(h.facts, a) for a in h.times_of(OverdueAlert)}
    for a in sorted(s for s in starts if s is not None):
        flip = a + GRACE
        if any(a <= s <= flip for s in settlements):
            continue  # settled in time (see the next property)
        for app in h.apps:
            before, at_flip = oracle.seg(app, flip - 1), oracle.seg(app, flip)
            if before is None or at_flip is None:
                continue  # not registered yet
            assert Reason.OVERDUE_GRACE in before.reasons
            assert Reason.ACCOUNT_OVERDUE not in before.reasons
            assert before.grace_ends_at == flip
            assert before.state is State.GRACE or before.suspended
            assert Reason.ACCOUNT_OVERDUE in at_flip.reasons
            assert Reason.OVERDUE_GRACE not in at_flip.reasons
            assert at_flip.grace_ends_at == flip
            assert at_flip.state is not State.ACTIVE and at_flip.state is not State.GRACE
            assert at_flip.suspended_at is not None and at_flip.suspended_at <= flip
            if Reason.RESOURCES_RELEASED not in at_flip.reasons:
                assert at_flip.release_at == flip + CFG.release_after_ms
            d = decide(Check.CREATE_CLASSROOM, oracle.status(app, flip), flip, CFG)
            assert not d.allowed


@PROPS
@given(histories())
def test_r3_settled_in_grace_never_overdue_for_that_alert(h: History) -> None:
    oracle = Oracle(h.facts)
    settlements = h.times_of(ArrearsSettled)
    starts = {ref_overdue_start(h.facts, a) for a in h.times_of(OverdueAlert)}
    for a in sorted(s for s in starts if s is not None):
        paid = [s for s in settlements if a <= s < a + GRACE]
        if not paid:
            continue
        for t in oracle.sample_times():
            if t < a:
                continue
            for app in h.apps:
                seg = oracle.seg(app, t)
                if seg is None or Reason.ACCOUNT_OVERDUE not in seg.reasons:
                    continue
                # Overdue again only because of a later, unsettled alert.
                assert seg.grace_ends_at is not None
                assert seg.grace_ends_at != a + GRACE
                assert seg.grace_ends_at - GRACE > paid[0]


@PROPS
@given(histories())
def test_reasons_match_their_definitions(h: History) -> None:
    """R1, R2, R8, R10, R11 checked against their plain definitions."""
    oracle = Oracle(h.facts)
    bans, releases = h.times_of(ComplianceBan), h.times_of(ResourcesReleased)
    for t in oracle.sample_times():
        a = ref_overdue_start(h.facts, t)
        for app in h.apps:
            seg = oracle.seg(app, t)
            if seg is None:
                continue
            assert (Reason.OVERDUE_GRACE in seg.reasons) == (a is not None and t < a + GRACE)
            assert (Reason.ACCOUNT_OVERDUE in seg.reasons) == (a is not None and t >= a + GRACE)
            assert seg.grace_ends_at == (None if a is None else a + GRACE)
            assert (Reason.ACCOUNT_BANNED in seg.reasons) == any(b <= t for b in bans)
            assert (Reason.RESOURCES_RELEASED in seg.reasons) == any(r <= t for r in releases)
            in_force = ref_package_in_force(h.facts, app, t)
            assert (Reason.PACKAGE_EXPIRED in seg.reasons) == (not in_force)
            if Reason.PACKAGE_QUOTA_EXHAUSTED in seg.reasons:
                assert in_force


# ---------------------------------------------------------------------------
# (d) BANNED and RELEASED are absorbing


@PROPS
@given(histories(release=False), times)
def test_r11_banned_is_absorbing(h: History, ban_at: Millis) -> None:
    facts = [*h.facts, ComplianceBan("the-ban", ban_at, ACCT, "")]
    oracle = Oracle(facts)
    first_ban = min(f.occurred_at for f in facts if isinstance(f, ComplianceBan))
    for t in oracle.sample_times():
        for app in h.apps:
            seg = oracle.seg(app, t)
            if seg is None:
                continue
            if t >= first_ban:
                assert seg.state is State.BANNED
                assert seg.reasons[0] is Reason.ACCOUNT_BANNED
                for check in ALL_CHECKS:
                    assert not decide(check, oracle.status(app, t), t, CFG).allowed
            else:
                assert seg.state is not State.BANNED


@PROPS
@given(histories(), times)
def test_r10_released_is_absorbing(h: History, released_at: Millis) -> None:
    facts = [*h.facts, ResourcesReleased("the-release", released_at, ACCT)]
    oracle = Oracle(facts)
    first = min(f.occurred_at for f in facts if isinstance(f, ResourcesReleased))
    for t in oracle.sample_times():
        for app in h.apps:
            seg = oracle.seg(app, t)
            if seg is None:
                continue
            if t >= first:
                assert seg.state in (State.RELEASED, State.BANNED)
                assert Reason.RESOURCES_RELEASED in seg.reasons
                assert seg.release_at == first
                for check in ALL_CHECKS:
                    d = decide(check, oracle.status(app, t), t, CFG)
                    assert not d.allowed
                    assert d.reason in (Reason.RESOURCES_RELEASED, Reason.ACCOUNT_BANNED)
            else:
                assert seg.state is not State.RELEASED


# ---------------------------------------------------------------------------
# (e) classes in progress


@PROPS
@given(histories(), st.data())
def test_r6_class_started_before_suspension_is_protected_until_its_limit(
    h: History, data: st.DataObject
) -> None:
    app = data.draw(st.sampled_from(h.apps))
    cfg = data.draw(st.sampled_from((CFG, PolicyConfig(protect_when_banned=True))))
    oracle = Oracle(h.facts, cfg)
    samples = oracle.sample_times()
    suspension_starts = {
        seg.suspended_at
        for seg in (oracle.seg(app, t) for t in samples)
        if seg is not None and seg.suspended_at is not None
    }
    room = data.draw(rooms(sorted(suspension_starts) or [T0]))
    until = protected_until(room, cfg)
    extra = [room.started_at, until] + ([room.ended_at] if room.ended_at is not None else [])
    for t in oracle.sample_times(extra):
        status = oracle.status(app, t)
        if status is None:
            continue
        seg = status.at(t)
        d = decide(Check.ENTER_CLASSROOM, status, t, cfg, room)
        if seg.state in (State.ACTIVE, State.GRACE):
            assert d.allowed
            assert d.protected_until is None
            continue
        assert seg.suspended_at is not None and seg.suspended_at <= t
        coverable = BILLING_SUSPENSIONS | (
            {Reason.ACCOUNT_BANNED} if cfg.protect_when_banned else set()
        )
        billing_only = set(seg.reasons) - {Reason.OVERDUE_GRACE} <= coverable
        running = room.ended_at is None or room.ended_at > t
        if billing_only and room.started_at < seg.suspended_at and running and t < until:
            assert d.allowed
            assert d.reason is Reason.IN_PROGRESS_PROTECTED
            assert d.protected_until == until
        else:
            assert not d.allowed
            assert d.reason is seg.reasons[0]
            assert d.protected_until is None
        if room.started_at >= seg.suspended_at or t >= until:
            assert not d.allowed  # never started during the suspension, never past its limit


@PROPS
@given(histories())
def test_r9_suspended_at_is_the_start_of_the_unbroken_suspension(h: History) -> None:
    oracle = Oracle(h.facts)
    samples = oracle.sample_times()
    for app in h.apps:
        registered = min(
            f.occurred_at
            for f in h.facts
            if isinstance(f, ApplicationRegistered) and f.app_id == app
        )
        for t in samples:
            seg = oracle.seg(app, t)
            if seg is None or not seg.suspended:
                continue
            assert seg.suspended_at is not None and seg.suspended_at <= t
            # A suspension that began before the app was registered (the
            # account was already suspended, or the app had no package yet)
            # is, for the app, one that began at its registration.
            s = max(seg.suspended_at, registered)
            # Suspended all the way from s to t (at every instant we know of)...
            for u in samples:
                if s <= u <= t:
                    useg = oracle.seg(app, u)
                    assert useg is not None and useg.suspended
                    assert useg.suspended_at is not None
                    assert max(useg.suspended_at, registered) == s
            # ...and not just before s, if the app was known then.
            if s > registered:
                prev = oracle.seg(app, s - 1)
                assert prev is not None and not prev.suspended


# ---------------------------------------------------------------------------
# (f) reasons, state and decision agree


@PROPS
@given(histories())
def test_r9_reasons_ordered_and_state_follows_first(h: History) -> None:
    oracle = Oracle(h.facts)
    for t in oracle.sample_times():
        for app in h.apps:
            status = oracle.status(app, t)
            if status is None:
                continue
            seg = status.at(t)
            reasons = seg.reasons
            assert len(set(reasons)) == len(reasons)
            listed = [r for r in reasons if r is not Reason.OVERDUE_GRACE]
            assert listed == [r for r in SUSPENSION_PRECEDENCE if r in listed]
            if Reason.OVERDUE_GRACE in reasons:
                assert reasons[-1] is Reason.OVERDUE_GRACE
                assert Reason.ACCOUNT_OVERDUE not in reasons
            expected_state = STATE_OF[reasons[0]] if reasons else State.ACTIVE
            assert seg.state is expected_state
            assert seg.suspended == bool(listed)
            assert (seg.suspended_at is not None) == seg.suspended
            for check in ALL_CHECKS:
                d = decide(check, status, t, CFG)  # no room: no protection
                assert d.reasons == reasons
                assert d.state is expected_state
                assert d.reason is (reasons[0] if reasons else Reason.OK)
                assert d.allowed == (expected_state in (State.ACTIVE, State.GRACE))
                assert d.message


# ---------------------------------------------------------------------------
# (g) the timeline is well formed


@PROPS
@given(histories())
def test_segments_well_formed_and_at_consistent(h: History) -> None:
    for app, status in compute_account(h.facts, CFG).items():
        # The app's timeline is built from the account's facts and its own.
        latest = max(f.occurred_at for f in h.facts if getattr(f, "app_id", app) == app)
        assert status.app_id == app
        assert status.account_id == ACCT
        segs = status.segments
        assert segs
        starts = [s.starts_at for s in segs]
        assert all(a < b for a, b in itertools.pairwise(starts))
        # Kept from the segment in force a skew allowance before the newest
        # fact on, so a fact dated slightly ahead cannot hide the present.
        keep = latest - FUTURE_SKEW_MS
        assert len(starts) == 1 or starts[1] > keep
        for prev, nxt in itertools.pairwise(segs):
            assert not prev.same_status(nxt)
        for i, seg in enumerate(segs):
            assert status.at(seg.starts_at) is seg
            assert status.at(seg.starts_at - 1) is segs[max(i - 1, 0)]
            assert status.upcoming(seg.starts_at) == segs[i + 1 :]
            overdue = {Reason.OVERDUE_GRACE, Reason.ACCOUNT_OVERDUE} & set(seg.reasons)
            assert (seg.grace_ends_at is not None) == bool(overdue)
            if seg.suspended_at is not None:
                assert seg.suspended
        assert status.at(starts[0] - 10 * HOUR) is segs[0]
        assert status.at(starts[-1] + 365 * 24 * HOUR) is segs[-1]
