"""The billing policy, rule by rule (SPEC §4, R1-R13): one table per rule.

Pure: facts -> compute_account -> decide, no Redis, no gRPC. Every time in
the tables is an offset in milliseconds from T0, so that the rows read like
the rules ("alert at 0, now 24 h").
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from lcic_guard.domain.facts import (
    ApplicationRegistered,
    ArrearsSettled,
    ComplianceBan,
    Fact,
    OverdueAlert,
    PackagePurchased,
    PackageUsage,
    PaygChanged,
    ResourcesReleased,
)
from lcic_guard.domain.policy import (
    DAY,
    HOUR,
    MINUTE,
    SUSPENSION_PRECEDENCE,
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Reason,
    Room,
    Segment,
    State,
    compute_account,
    decide,
    decide_without_store,
    explain,
    protected_until,
)
from lcic_guard.domain.time import Millis, format_time

T0: Millis = 1_790_000_000_000  # 2026-09-21T14:13:20Z
ACCT = "acct-1"
CFG = PolicyConfig()
GRACE = 24 * HOUR
RELEASE = 60 * DAY
ALL_CHECKS = (Check.CREATE_CLASSROOM, Check.ENTER_CLASSROOM, Check.ACCESS_RECORDING)

OK = Reason.OK
GR = Reason.OVERDUE_GRACE
OVERDUE = Reason.ACCOUNT_OVERDUE
QUOTA = Reason.PACKAGE_QUOTA_EXHAUSTED
EXPIRED = Reason.PACKAGE_EXPIRED
RELEASED = Reason.RESOURCES_RELEASED
BANNED = Reason.ACCOUNT_BANNED
PROTECTED = Reason.IN_PROGRESS_PROTECTED

# The advice each suspension reason must give the customer.
ADVICE = {
    OVERDUE: "Top up the account",
    EXPIRED: "Buy a monthly package",
    QUOTA: "Enable pay-as-you-go",
    BANNED: "cannot be restored",
    RELEASED: "cannot be recovered",
}

# ---------------------------------------------------------------------------
# Fact builders (times are offsets from T0)

_ids = itertools.count(1)


def _eid() -> str:
    return f"ev-{next(_ids)}"


def reg(at: int = -10 * DAY, app: str = "app-1", account: str = ACCT) -> ApplicationRegistered:
    return ApplicationRegistered(_eid(), T0 + at, account, app)


def alert(at: int, amount: str | None = "100.00") -> OverdueAlert:
    return OverdueAlert(_eid(), T0 + at, ACCT, amount)


def settle(at: int) -> ArrearsSettled:
    return ArrearsSettled(_eid(), T0 + at, ACCT)


def ban(at: int) -> ComplianceBan:
    return ComplianceBan(_eid(), T0 + at, ACCT, "terms violation")


def released(at: int) -> ResourcesReleased:
    return ResourcesReleased(_eid(), T0 + at, ACCT)


def pkg(
    starts: int,
    expires: int,
    quota: int = 6000,
    *,
    at: int | None = None,
    app: str = "app-1",
    package_id: str = "p1",
) -> PackagePurchased:
    occurred = starts if at is None else at
    return PackagePurchased(
        _eid(), T0 + occurred, app, package_id, T0 + starts, T0 + expires, quota
    )


def usage(at: int, used: int, *, app: str = "app-1", package_id: str = "p1") -> PackageUsage:
    return PackageUsage(_eid(), T0 + at, app, package_id, used)


def payg(at: int, enabled: bool, *, app: str = "app-1") -> PaygChanged:
    return PaygChanged(_eid(), T0 + at, app, enabled)


def base(app: str = "app-1", quota: int = 6000) -> list[Fact]:
    """An app registered 10 days ago with a package in force until day 20."""
    return [reg(app=app), pkg(-10 * DAY, 20 * DAY, quota, app=app)]


def two_apps() -> list[Fact]:
    return [*base("app-1"), *base("app-2")]


def room(start: int, sched: int | None = None, ended: int | None = None) -> Room:
    return Room(
        T0 + start,
        None if sched is None else T0 + sched,
        None if ended is None else T0 + ended,
    )


# ---------------------------------------------------------------------------
# Queries


def status(facts: list[Fact], app: str = "app-1", cfg: PolicyConfig = CFG) -> AppStatus:
    statuses = compute_account(facts, cfg)
    assert app in statuses
    return statuses[app]


def seg_at(facts: list[Fact], now: int, app: str = "app-1", cfg: PolicyConfig = CFG) -> Segment:
    return status(facts, app, cfg).at(T0 + now)


def ask(
    facts: list[Fact],
    now: int,
    check: Check = Check.CREATE_CLASSROOM,
    rm: Room | None = None,
    app: str = "app-1",
    cfg: PolicyConfig = CFG,
) -> Decision:
    return decide(check, status(facts, app, cfg), T0 + now, cfg, rm)


def rel(ms: Millis | None) -> int | None:
    """An absolute time as an offset from T0 (for comparing with the tables)."""
    return None if ms is None else ms - T0


def assert_advice(d: Decision) -> None:
    """The message says what the customer can do about each reason."""
    suspensions = [r for r in d.reasons if r in ADVICE]
    if suspensions and suspensions[0] in (BANNED, RELEASED):
        assert ADVICE[suspensions[0]] in d.message
        return
    for r in suspensions:
        assert ADVICE[r] in d.message, (r, d.message)


# ---------------------------------------------------------------------------
# R1 Grace

R1_TABLE = [
    pytest.param([*base(), alert(0)], 1 * HOUR, 24 * HOUR, CFG, id="first-alert-starts-grace"),
    pytest.param([*base(), alert(0)], 0, 24 * HOUR, CFG, id="grace-from-the-alert-instant"),
    pytest.param(
        [*base(), alert(0), alert(5 * HOUR), alert(23 * HOUR)],
        23 * HOUR + 30 * MINUTE,
        24 * HOUR,
        CFG,
        id="later-alerts-do-not-move-A",
    ),
    pytest.param(
        [*base(), alert(2 * HOUR), alert(0)],
        3 * HOUR,
        24 * HOUR,
        CFG,
        id="earliest-alert-wins-whatever-arrival-order",
    ),
    pytest.param(
        [*base(), alert(-72 * HOUR), settle(-40 * HOUR), alert(-10 * HOUR), alert(-5 * HOUR)],
        0,
        14 * HOUR,
        CFG,
        id="earliest-alert-after-last-settlement",
    ),
    pytest.param(
        [*base(), alert(-30 * HOUR), settle(-2 * HOUR), alert(-1 * HOUR)],
        0,
        23 * HOUR,
        CFG,
        id="new-grace-after-settled-suspension",
    ),
    pytest.param(
        [*base(), alert(0)],
        1 * HOUR,
        2 * HOUR,
        PolicyConfig(grace_ms=2 * HOUR),
        id="configured-grace-length",
    ),
    pytest.param(
        [*two_apps(), alert(0)], 1 * HOUR, 24 * HOUR, CFG, id="grace-on-every-app-of-account"
    ),
]


@pytest.mark.parametrize(("facts", "now", "grace_ends", "cfg"), R1_TABLE)
def test_r1_grace(facts: list[Fact], now: int, grace_ends: int, cfg: PolicyConfig) -> None:
    for app in compute_account(facts, cfg):
        seg = seg_at(facts, now, app, cfg)
        assert seg.state is State.GRACE
        assert seg.reasons == (GR,)
        assert rel(seg.grace_ends_at) == grace_ends
        assert seg.suspended_at is None
        assert seg.release_at is None
        for check in ALL_CHECKS:  # every check answered as for ACTIVE
            d = ask(facts, now, check, app=app, cfg=cfg)
            assert d.allowed
            assert d.reason is GR
            assert d.state is State.GRACE
            assert rel(d.grace_ends_at) == grace_ends
            assert "Top up before" in d.message
            assert format_time(T0 + grace_ends) in d.message


R1_NO_GRACE_TABLE = [
    pytest.param([*base()], 0, id="no-alert"),
    pytest.param([*base(), alert(-5 * HOUR), settle(-1 * HOUR)], 0, id="alert-then-settlement"),
    pytest.param([*base(), settle(-1 * HOUR), alert(-1 * HOUR)], 0, id="settlement-same-ms"),
    pytest.param(
        [*base(), settle(0), alert(-3 * HOUR)], 0, id="late-arriving-alert-before-settlement"
    ),
]


@pytest.mark.parametrize(("facts", "now"), R1_NO_GRACE_TABLE)
def test_r1_grace_needs_an_unsettled_alert(facts: list[Fact], now: int) -> None:
    seg = seg_at(facts, now)
    assert seg.state is State.ACTIVE
    assert seg.reasons == ()
    assert seg.grace_ends_at is None
    d = ask(facts, now)
    assert d.allowed
    assert d.reason is OK
    assert d.message == "The application is in good standing."


# ---------------------------------------------------------------------------
# R2 Overdue suspension

R2_TABLE = [
    pytest.param([*base(), alert(0)], 24 * HOUR - 1, "app-1", CFG, None, id="1ms-before-flip"),
    pytest.param([*base(), alert(0)], 24 * HOUR, "app-1", CFG, 24 * HOUR, id="flip-at-A+24h"),
    pytest.param(
        [*base(quota=6000), usage(-1 * HOUR, 10), alert(0)],
        24 * HOUR,
        "app-1",
        CFG,
        24 * HOUR,
        id="flip-even-with-quota-left",
    ),
    pytest.param(
        [*base(), payg(-1 * HOUR, True), alert(0)],
        24 * HOUR,
        "app-1",
        CFG,
        24 * HOUR,
        id="flip-even-with-payg-on",
    ),
    pytest.param(
        [*two_apps(), alert(0)], 24 * HOUR, "app-2", CFG, 24 * HOUR, id="every-app-of-account"
    ),
    pytest.param([*base(), alert(0)], 10 * DAY, "app-1", CFG, 24 * HOUR, id="days-later"),
    pytest.param(
        [*base(), alert(0), alert(30 * HOUR)],
        31 * HOUR,
        "app-1",
        CFG,
        24 * HOUR,
        id="alerts-during-suspension-keep-A",
    ),
    pytest.param(
        [*base(), alert(0)],
        1 * HOUR,
        "app-1",
        PolicyConfig(grace_ms=1 * HOUR),
        1 * HOUR,
        id="configured-grace",
    ),
]


@pytest.mark.parametrize(("facts", "now", "app", "cfg", "suspended_at"), R2_TABLE)
def test_r2_overdue_suspension(
    facts: list[Fact], now: int, app: str, cfg: PolicyConfig, suspended_at: int | None
) -> None:
    seg = seg_at(facts, now, app, cfg)
    d = ask(facts, now, app=app, cfg=cfg)
    if suspended_at is None:
        assert seg.state is State.GRACE
        assert d.allowed
        return
    assert seg.state is State.SUSPENDED
    assert seg.reasons == (OVERDUE,)
    assert rel(seg.suspended_at) == suspended_at
    assert rel(seg.grace_ends_at) == suspended_at
    assert rel(seg.release_at) == suspended_at + cfg.release_after_ms
    assert not d.allowed
    assert d.reason is OVERDUE
    assert "Top up the account" in d.message


def test_r2_flip_is_a_stored_deadline() -> None:
    """The status computed at A already holds the flip at A + 24 h: no
    process has to run then for the answer to change."""
    st = status([*base(), alert(0)])
    assert st.at(T0).state is State.GRACE
    upcoming = st.upcoming(T0)
    assert rel(upcoming[0].starts_at) == 24 * HOUR
    assert upcoming[0].reasons == (OVERDUE,)
    assert rel(upcoming[0].suspended_at) == 24 * HOUR
    assert decide(Check.CREATE_CLASSROOM, st, T0 + 24 * HOUR - 1, CFG).allowed
    assert not decide(Check.CREATE_CLASSROOM, st, T0 + 24 * HOUR, CFG).allowed


# ---------------------------------------------------------------------------
# R3 Settlement

R3_TABLE = [
    pytest.param(
        [*base(), alert(0), settle(12 * HOUR)], 24 * HOUR, State.ACTIVE, (), id="settled-in-grace"
    ),
    pytest.param(
        [*base(), alert(0), settle(24 * HOUR - 1)],
        24 * HOUR,
        State.ACTIVE,
        (),
        id="settled-1ms-before-flip",
    ),
    pytest.param(
        # The code's reading: a settlement at the very instant of the flip
        # pays before the flip (settlements rank first within a millisecond).
        [*base(), alert(0), settle(24 * HOUR)],
        24 * HOUR,
        State.ACTIVE,
        (),
        id="settled-at-flip-instant",
    ),
    pytest.param(
        [*base(), alert(0), settle(30 * HOUR)],
        30 * HOUR,
        State.ACTIVE,
        (),
        id="settled-while-suspended-restores",
    ),
    pytest.param(
        [*base(), settle(0), alert(0)],
        48 * HOUR,
        State.ACTIVE,
        (),
        id="settlement-same-ms-as-alert",
    ),
    pytest.param(
        [*base(), alert(0), alert(30 * HOUR), settle(30 * HOUR)],
        31 * HOUR,
        State.ACTIVE,
        (),
        id="settlement-covers-alert-at-its-ms",
    ),
    pytest.param(
        [*base(), alert(0), settle(5 * HOUR), alert(6 * HOUR)],
        30 * HOUR,
        State.SUSPENDED,
        (OVERDUE,),
        id="settlement-does-not-cover-later-alert",
    ),
    pytest.param(
        [*base(), alert(0), released(24 * HOUR + RELEASE), settle(62 * DAY)],
        62 * DAY,
        State.RELEASED,
        (RELEASED, EXPIRED),
        id="no-restore-from-released",
    ),
    pytest.param(
        [*base(), alert(0), ban(30 * HOUR), settle(40 * HOUR)],
        40 * HOUR,
        State.BANNED,
        (BANNED,),
        id="no-restore-from-banned",
    ),
]


@pytest.mark.parametrize(("facts", "now", "state", "reasons"), R3_TABLE)
def test_r3_settlement(
    facts: list[Fact], now: int, state: State, reasons: tuple[Reason, ...]
) -> None:
    st = status(facts)
    seg = st.at(T0 + now)
    assert seg.state is state
    assert seg.reasons == reasons
    if state is State.ACTIVE:
        assert seg.suspended_at is None
        assert seg.grace_ends_at is None
        # Restored for good: nothing overdue lies ahead either.
        assert all(OVERDUE not in s.reasons for s in st.upcoming(T0 + now))
        assert ask(facts, now).allowed


@pytest.mark.parametrize(
    "settled_at",
    [0, 1, 12 * HOUR, 24 * HOUR - 1],
    ids=["at-alert", "1ms-after", "mid-grace", "last-ms"],
)
def test_r3_settled_in_grace_is_never_suspended(settled_at: int) -> None:
    facts: list[Fact] = [*base(), alert(0), settle(settled_at)]
    st = status(facts)
    # From the settlement on, no segment is ever overdue.
    ahead = [st.at(T0 + settled_at), *st.upcoming(T0 + settled_at)]
    assert all(OVERDUE not in s.reasons and GR not in s.reasons for s in ahead)
    for now in (settled_at, 24 * HOUR, 30 * DAY):
        assert OVERDUE not in st.at(T0 + now).reasons


# ---------------------------------------------------------------------------
# R4, R5 Creating classrooms and reading recordings

STATES_TABLE = [
    pytest.param(base(), 0, State.ACTIVE, OK, id="active"),
    pytest.param([*base(), alert(0)], 1 * HOUR, State.GRACE, GR, id="grace"),
    pytest.param([*base(), alert(0)], 24 * HOUR, State.SUSPENDED, OVERDUE, id="overdue"),
    pytest.param([*base(), usage(0, 6000)], 0, State.SUSPENDED, QUOTA, id="quota"),
    pytest.param([reg(), pkg(-10 * DAY, -1 * HOUR)], 0, State.SUSPENDED, EXPIRED, id="expired"),
    pytest.param(
        [*base(), alert(-62 * DAY), released(-1 * DAY)], 0, State.RELEASED, RELEASED, id="released"
    ),
    pytest.param([*base(), ban(-1 * HOUR)], 0, State.BANNED, BANNED, id="banned"),
]


@pytest.mark.parametrize(("facts", "now", "state", "reason"), STATES_TABLE)
def test_r4_create_classroom(facts: list[Fact], now: int, state: State, reason: Reason) -> None:
    d = ask(facts, now, Check.CREATE_CLASSROOM)
    assert d.state is state
    assert d.allowed == (state in (State.ACTIVE, State.GRACE))
    assert d.reason is reason
    assert_advice(d)


@pytest.mark.parametrize(("facts", "now", "state", "reason"), STATES_TABLE)
def test_r5_access_recording(facts: list[Fact], now: int, state: State, reason: Reason) -> None:
    d = ask(facts, now, Check.ACCESS_RECORDING)
    assert d.state is state
    assert d.allowed == (state in (State.ACTIVE, State.GRACE))
    assert d.reason is reason  # while suspended: the suspension's reason
    assert d.protected_until is None
    if state is State.RELEASED:
        assert "released" in d.message
        assert "cannot be recovered" in d.message
    assert_advice(d)


# ---------------------------------------------------------------------------
# R6 Classes in progress

OVERDUE_AT_24H: list[Fact] = [*base(), alert(0)]  # suspended from 24 h
EXPIRES_AT_2H: list[Fact] = [reg(), pkg(-10 * DAY, 2 * HOUR)]  # suspended from 2 h
QUOTA_AT_2H: list[Fact] = [*base(quota=100), usage(2 * HOUR, 100)]  # suspended from 2 h
BAN_AT_2H: list[Fact] = [*base(), ban(2 * HOUR)]
PROTECT_BANNED = PolicyConfig(protect_when_banned=True)

R6_TABLE = [
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR, sched=25 * HOUR),
        25 * HOUR + 30 * MINUTE,
        CFG,
        PROTECTED,
        26 * HOUR,
        id="overdue-started-before-within-overrun",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR, sched=25 * HOUR),
        26 * HOUR - 1,
        CFG,
        PROTECTED,
        26 * HOUR,
        id="last-ms-of-protection",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR, sched=25 * HOUR),
        26 * HOUR,
        CFG,
        OVERDUE,
        None,
        id="at-protected_until-denied",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR),
        35 * HOUR - 1,
        CFG,
        PROTECTED,
        35 * HOUR,
        id="no-scheduled-end-started+12h",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR),
        35 * HOUR,
        CFG,
        OVERDUE,
        None,
        id="no-scheduled-end-at-limit-denied",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR, sched=25 * HOUR),
        25 * HOUR,
        PolicyConfig(overrun_ms=10 * MINUTE),
        PROTECTED,
        25 * HOUR + 10 * MINUTE,
        id="configured-overrun",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR, sched=25 * HOUR, ended=24 * HOUR + 10 * MINUTE),
        24 * HOUR + 20 * MINUTE,
        CFG,
        OVERDUE,
        None,
        id="reported-ended-denied",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(23 * HOUR, sched=25 * HOUR, ended=24 * HOUR + 10 * MINUTE),
        24 * HOUR + 10 * MINUTE,
        CFG,
        OVERDUE,
        None,
        id="ended-at-now-denied",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(24 * HOUR - 1, sched=25 * HOUR),
        24 * HOUR,
        CFG,
        PROTECTED,
        26 * HOUR,
        id="started-1ms-before-suspension",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(24 * HOUR, sched=25 * HOUR),
        24 * HOUR + 1,
        CFG,
        OVERDUE,
        None,
        id="started-at-suspended_at-denied",
    ),
    pytest.param(
        OVERDUE_AT_24H,
        room(25 * HOUR, sched=26 * HOUR),
        25 * HOUR + 1,
        CFG,
        OVERDUE,
        None,
        id="started-during-suspension-denied",
    ),
    pytest.param(OVERDUE_AT_24H, None, 25 * HOUR, CFG, OVERDUE, None, id="nothing-reported-denied"),
    pytest.param(
        EXPIRES_AT_2H,
        room(1 * HOUR, sched=3 * HOUR),
        2 * HOUR + 30 * MINUTE,
        CFG,
        PROTECTED,
        4 * HOUR,
        id="package-expired-protected",
    ),
    pytest.param(
        QUOTA_AT_2H,
        room(1 * HOUR, sched=3 * HOUR),
        2 * HOUR + 30 * MINUTE,
        CFG,
        PROTECTED,
        4 * HOUR,
        id="quota-exhausted-protected",
    ),
    pytest.param(
        QUOTA_AT_2H,
        room(2 * HOUR, sched=3 * HOUR),
        2 * HOUR + 30 * MINUTE,
        CFG,
        QUOTA,
        None,
        id="quota-started-at-suspension-denied",
    ),
    pytest.param(
        [*EXPIRES_AT_2H, alert(0)],
        room(1 * HOUR),
        12 * HOUR,
        CFG,
        PROTECTED,
        13 * HOUR,
        id="expired-while-in-grace-protected",
    ),
    pytest.param(
        [*EXPIRES_AT_2H, alert(10 * HOUR)],
        room(20 * HOUR),
        35 * HOUR,
        CFG,
        OVERDUE,
        None,
        id="started-in-earlier-reason-of-same-suspension-denied",
    ),
    pytest.param(
        [*EXPIRES_AT_2H, alert(10 * HOUR)],
        room(1 * HOUR, sched=34 * HOUR),
        34 * HOUR + 30 * MINUTE,
        # A class this long is protected only with a maximum class length
        # that allows it (R6 never protects past start + the maximum).
        replace(CFG, max_class_ms=48 * HOUR),
        PROTECTED,
        35 * HOUR,
        id="protection-survives-added-billing-reason",
    ),
    pytest.param(
        BAN_AT_2H,
        room(1 * HOUR, sched=3 * HOUR),
        2 * HOUR + 30 * MINUTE,
        CFG,
        BANNED,
        None,
        id="banned-not-protected-by-default",
    ),
    pytest.param(
        BAN_AT_2H,
        room(1 * HOUR, sched=3 * HOUR),
        2 * HOUR + 30 * MINUTE,
        PROTECT_BANNED,
        PROTECTED,
        4 * HOUR,
        id="banned-protected-when-configured",
    ),
    pytest.param(
        [*OVERDUE_AT_24H, ban(25 * HOUR)],
        room(23 * HOUR, sched=25 * HOUR),
        25 * HOUR + 10 * MINUTE,
        CFG,
        BANNED,
        None,
        id="ban-on-top-of-overdue-not-protected",
    ),
    pytest.param(
        [*OVERDUE_AT_24H, ban(25 * HOUR)],
        room(23 * HOUR, sched=25 * HOUR),
        25 * HOUR + 10 * MINUTE,
        PROTECT_BANNED,
        PROTECTED,
        26 * HOUR,
        id="ban-on-top-of-overdue-protected-when-configured",
    ),
    pytest.param(
        [*OVERDUE_AT_24H, released(25 * HOUR)],
        room(23 * HOUR),
        25 * HOUR + 10 * MINUTE,
        PROTECT_BANNED,
        RELEASED,
        None,
        id="released-never-protected",
    ),
]


@pytest.mark.parametrize(("facts", "rm", "now", "cfg", "reason", "until"), R6_TABLE)
def test_r6_classes_in_progress(
    facts: list[Fact],
    rm: Room | None,
    now: int,
    cfg: PolicyConfig,
    reason: Reason,
    until: int | None,
) -> None:
    d = ask(facts, now, Check.ENTER_CLASSROOM, rm, cfg=cfg)
    assert d.reason is reason
    assert d.allowed == (reason is PROTECTED)
    assert rel(d.protected_until) == until
    assert d.state is not None and d.state not in (State.ACTIVE, State.GRACE)
    if until is not None:
        assert rm is not None
        assert d.suspended_at is not None and rm.started_at < d.suspended_at
        assert "may continue until" in d.message
        assert format_time(T0 + until) in d.message
        assert "no new classroom can start" in d.message
    # A protected class never lets anyone create a classroom or read recordings.
    for check in (Check.CREATE_CLASSROOM, Check.ACCESS_RECORDING):
        other = ask(facts, now, check, rm, cfg=cfg)
        assert not other.allowed
        assert other.protected_until is None


@pytest.mark.parametrize(
    ("rm", "until"),
    [
        pytest.param(room(0, sched=2 * HOUR), 3 * HOUR, id="scheduled-end+60min"),
        pytest.param(room(0), 12 * HOUR, id="started+12h"),
        pytest.param(room(0, sched=2 * HOUR, ended=1 * HOUR), 3 * HOUR, id="ended-does-not-move"),
    ],
)
def test_r6_protected_until(rm: Room, until: int) -> None:
    assert rel(protected_until(rm, CFG)) == until


# ---------------------------------------------------------------------------
# R7 Quota

R7_TABLE = [
    pytest.param([*base(quota=100), usage(1 * HOUR, 100)], 2 * HOUR, 1 * HOUR, id="used==quota"),
    pytest.param([*base(quota=100), usage(1 * HOUR, 150)], 2 * HOUR, 1 * HOUR, id="used>quota"),
    pytest.param([*base(quota=100), usage(1 * HOUR, 99)], 2 * HOUR, None, id="used<quota"),
    pytest.param(
        [*base(quota=100), usage(1 * HOUR + 30 * MINUTE, 100)],
        10 * HOUR,
        1 * HOUR + 30 * MINUTE,
        id="starts-at-occurred_at-of-usage",
    ),
    pytest.param(
        [*base(quota=100), payg(0, True), usage(1 * HOUR, 100)],
        2 * HOUR,
        None,
        id="payg-on-before",
    ),
    pytest.param(
        [*base(quota=100), usage(1 * HOUR, 100), payg(3 * HOUR, True)],
        3 * HOUR,
        None,
        id="payg-on-restores",
    ),
    pytest.param(
        [*base(quota=100), usage(1 * HOUR, 100), payg(3 * HOUR, True), payg(5 * HOUR, False)],
        6 * HOUR,
        5 * HOUR,
        id="payg-off-again-starts-at-its-fact",
    ),
    pytest.param(
        [
            *base(quota=100),
            usage(1 * HOUR, 100),
            pkg(3 * HOUR, 33 * DAY, 100, package_id="p2"),
        ],
        3 * HOUR,
        None,
        id="new-package-restores",
    ),
    pytest.param(
        [*base(quota=100), usage(2 * HOUR, 100), usage(1 * HOUR, 50)],
        3 * HOUR,
        2 * HOUR,
        id="cumulative-usage-latest-wins-any-arrival-order",
    ),
    pytest.param(
        # Usage is absolute: a later, lower report (a billing correction)
        # replaces the earlier one, and service returns from it.
        [*base(quota=100), usage(1 * HOUR, 100), usage(2 * HOUR, 50)],
        3 * HOUR,
        None,
        id="later-lower-report-corrects",
    ),
    pytest.param(
        [*base(quota=100), usage(1 * HOUR, 100, package_id="p-old")],
        2 * HOUR,
        None,
        id="usage-of-another-package",
    ),
    pytest.param(
        [*base(quota=100), usage(1 * HOUR, 100, app="app-2"), reg(app="app-2")],
        2 * HOUR,
        None,
        id="usage-of-another-app",
    ),
    # No report means 0 used: a 0-minute package is exhausted from its start
    # (issue 9, finding 8), and a report of 0 minutes changes nothing.
    pytest.param([*base(quota=0), usage(1 * HOUR, 0)], 2 * HOUR, -10 * DAY, id="zero-quota"),
    pytest.param(base(quota=0), 2 * HOUR, -10 * DAY, id="zero-quota-without-a-report"),
]


@pytest.mark.parametrize(("facts", "now", "suspended_at"), R7_TABLE)
def test_r7_quota(facts: list[Fact], now: int, suspended_at: int | None) -> None:
    seg = seg_at(facts, now)
    d = ask(facts, now)
    if suspended_at is None:
        assert seg.state is State.ACTIVE
        assert QUOTA not in seg.reasons
        assert d.allowed
        return
    assert seg.state is State.SUSPENDED
    assert seg.reasons == (QUOTA,)
    assert rel(seg.suspended_at) == suspended_at
    assert not d.allowed
    assert d.reason is QUOTA
    assert "pay-as-you-go" in d.message
    assert "buy a new monthly package" in d.message


def _same_ms(kind: str) -> tuple[Fact, Fact]:
    """Two facts of one kind at the same ms that disagree (ids fixed, so the
    tie-break is the event id, whatever the arrival order)."""
    at = T0 + 3 * HOUR
    if kind == "payg":
        return PaygChanged("tie-a", at, "app-1", True), PaygChanged("tie-b", at, "app-1", False)
    if kind == "usage":
        return (
            PackageUsage("tie-a", at, "app-1", "p1", 100),
            PackageUsage("tie-b", at, "app-1", "p1", 10),
        )
    return (
        PackagePurchased("tie-a", at, "app-1", "p1", at, at + DAY, 100),
        PackagePurchased("tie-b", at, "app-1", "p1", at, at + HOUR, 100),
    )


@pytest.mark.parametrize(
    ("kind", "reasons"),
    [
        pytest.param("payg", (QUOTA,), id="payg-on-and-off"),  # tie-b (off) applies last
        pytest.param("usage", (QUOTA,), id="usage-100-and-10"),  # the larger value wins
        pytest.param("pkg", (EXPIRED,), id="same-package-two-expiries"),  # tie-b (1 h) last
    ],
)
def test_r7_same_ms_conflicting_facts_do_not_depend_on_arrival_order(
    kind: str, reasons: tuple[Reason, ...]
) -> None:
    first, second = _same_ms(kind)
    facts = [*base(quota=100), usage(1 * HOUR, 100)]
    now = T0 + 5 * HOUR
    one = compute_account([*facts, first, second], CFG)
    other = compute_account([second, *facts, first], CFG)
    assert one == other
    assert one["app-1"].at(now).reasons == reasons


# ---------------------------------------------------------------------------
# R8 Expiry

R8_TABLE = [
    pytest.param([reg(0)], 1 * HOUR, 0, id="none-bought"),
    pytest.param(EXPIRES_AT_2H, 2 * HOUR - 1, None, id="1ms-before-expiry"),
    pytest.param(EXPIRES_AT_2H, 2 * HOUR, 2 * HOUR, id="expires_at-reached"),
    pytest.param(EXPIRES_AT_2H, 5 * DAY, 2 * HOUR, id="long-after-expiry"),
    pytest.param(
        [*EXPIRES_AT_2H, pkg(3 * HOUR, 33 * DAY, package_id="p2")],
        3 * HOUR,
        None,
        id="buying-restores",
    ),
    pytest.param(
        [*EXPIRES_AT_2H, payg(3 * HOUR, True)], 4 * HOUR, 2 * HOUR, id="payg-does-not-restore"
    ),
    pytest.param(
        [*EXPIRES_AT_2H, pkg(2 * HOUR, 32 * DAY, at=1 * HOUR, package_id="p2")],
        2 * HOUR,
        None,
        id="renewal-starting-at-expiry",
    ),
    pytest.param(
        [*EXPIRES_AT_2H, pkg(2 * HOUR, 32 * DAY, at=3 * HOUR, package_id="p2")],
        3 * HOUR,
        None,
        id="renewal-reported-late",
    ),
    pytest.param(
        [reg(0), pkg(5 * HOUR, 30 * DAY, at=0)], 5 * HOUR - 1, 0, id="package-not-yet-started"
    ),
    pytest.param([reg(0), pkg(5 * HOUR, 30 * DAY, at=0)], 5 * HOUR, None, id="package-starts"),
]


@pytest.mark.parametrize(("facts", "now", "suspended_at"), R8_TABLE)
def test_r8_expiry(facts: list[Fact], now: int, suspended_at: int | None) -> None:
    seg = seg_at(facts, now)
    d = ask(facts, now)
    if suspended_at is None:
        assert seg.state is State.ACTIVE
        assert d.allowed
        return
    assert seg.state is State.SUSPENDED
    assert seg.reasons == (EXPIRED,)
    assert rel(seg.suspended_at) == suspended_at
    assert not d.allowed
    assert d.reason is EXPIRED
    assert "Buy a monthly package" in d.message


def test_r8_expiry_is_a_stored_deadline_and_renewal_leaves_no_gap() -> None:
    st = status(EXPIRES_AT_2H)
    assert [(rel(s.starts_at), s.reasons) for s in st.upcoming(T0)] == [(2 * HOUR, (EXPIRED,))]
    renewed = status([*EXPIRES_AT_2H, pkg(2 * HOUR, 32 * DAY, at=1 * HOUR, package_id="p2")])
    # No gap at 2 h: the next change is the renewal's own expiry.
    assert [(rel(s.starts_at), s.reasons) for s in renewed.upcoming(T0 + 1 * HOUR)] == [
        (32 * DAY, (EXPIRED,))
    ]
    assert renewed.at(T0 + 2 * HOUR).reasons == ()


# ---------------------------------------------------------------------------
# R9 Several reasons

OVERDUE_AND_EXPIRED: list[Fact] = [*EXPIRES_AT_2H, alert(0)]  # expired from 2 h, overdue from 24 h
OVERDUE_AND_QUOTA: list[Fact] = [*base(quota=100), usage(1 * HOUR, 100), alert(0)]

R9_TABLE = [
    pytest.param(
        OVERDUE_AND_EXPIRED, 30 * HOUR, (OVERDUE, EXPIRED), 2 * HOUR, id="overdue+expired"
    ),
    pytest.param(OVERDUE_AND_QUOTA, 30 * HOUR, (OVERDUE, QUOTA), 1 * HOUR, id="overdue+quota"),
    pytest.param(
        [*OVERDUE_AND_EXPIRED, ban(40 * HOUR)],
        40 * HOUR,
        (BANNED, OVERDUE, EXPIRED),
        2 * HOUR,
        id="ban+overdue+expired",
    ),
    pytest.param(
        [*base(), alert(0), released(30 * HOUR), ban(31 * HOUR)],
        32 * HOUR,
        (BANNED, RELEASED, OVERDUE),
        24 * HOUR,
        id="ban+released+overdue",
    ),
    pytest.param(
        OVERDUE_AND_EXPIRED, 3 * HOUR, (EXPIRED, GR), 2 * HOUR, id="expired-while-in-grace"
    ),
    pytest.param(
        [*OVERDUE_AND_QUOTA, settle(31 * HOUR)],
        31 * HOUR,
        (QUOTA,),
        1 * HOUR,
        id="settlement-leaves-quota-unbroken",
    ),
    pytest.param(
        [*OVERDUE_AND_QUOTA, settle(31 * HOUR), payg(32 * HOUR, True)],
        32 * HOUR,
        (),
        None,
        id="all-cleared-restores",
    ),
    pytest.param(
        [*OVERDUE_AND_EXPIRED, pkg(30 * HOUR, 30 * DAY, package_id="p2")],
        30 * HOUR,
        (OVERDUE,),
        2 * HOUR,
        id="package-leaves-overdue-unbroken",
    ),
    pytest.param(
        [*EXPIRES_AT_2H, pkg(3 * HOUR, 30 * DAY, package_id="p2"), alert(4 * HOUR)],
        28 * HOUR,
        (OVERDUE,),
        28 * HOUR,
        id="broken-suspension-starts-again",
    ),
]


@pytest.mark.parametrize(("facts", "now", "reasons", "suspended_at"), R9_TABLE)
def test_r9_several_reasons(
    facts: list[Fact], now: int, reasons: tuple[Reason, ...], suspended_at: int | None
) -> None:
    seg = seg_at(facts, now)
    assert seg.reasons == reasons
    assert rel(seg.suspended_at) == suspended_at
    listed = [r for r in reasons if r in SUSPENSION_PRECEDENCE]
    assert listed == sorted(listed, key=SUSPENSION_PRECEDENCE.index)
    for check in ALL_CHECKS:
        d = ask(facts, now, check)
        assert d.reasons == reasons
        assert d.reason is (reasons[0] if reasons else OK)
        assert d.allowed == (not listed)
        assert rel(d.suspended_at) == suspended_at
        assert_advice(d)
    if len(listed) > 1:
        assert any("R9" in line for line in explain(seg))


# ---------------------------------------------------------------------------
# R10 Release of resources

R10_TABLE = [
    pytest.param(
        [*base(), alert(0)], 23 * HOUR, State.GRACE, (GR,), None, CFG, id="none-during-grace"
    ),
    pytest.param(
        [*base(), alert(0)],
        24 * HOUR,
        State.SUSPENDED,
        (OVERDUE,),
        24 * HOUR + RELEASE,
        CFG,
        id="release_at-shown-while-overdue",
    ),
    pytest.param(
        [*base(), alert(0)],
        24 * HOUR + RELEASE,
        State.SUSPENDED,
        (OVERDUE, EXPIRED),
        24 * HOUR + RELEASE,
        CFG,
        id="due-but-no-release-fact",
    ),
    pytest.param(
        [*base(), alert(0)],
        24 * HOUR + RELEASE + 30 * DAY,
        State.SUSPENDED,
        (OVERDUE, EXPIRED),
        24 * HOUR + RELEASE,
        CFG,
        id="long-overdue-still-not-released",
    ),
    pytest.param(
        [*base(), alert(0), released(24 * HOUR + RELEASE + 5 * MINUTE)],
        24 * HOUR + RELEASE + 5 * MINUTE,
        State.RELEASED,
        (RELEASED, OVERDUE, EXPIRED),
        24 * HOUR + RELEASE + 5 * MINUTE,
        CFG,
        id="released-by-the-reconciler-fact",
    ),
    pytest.param(
        [*base(), alert(0), released(24 * HOUR + RELEASE), settle(70 * DAY)],
        70 * DAY,
        State.RELEASED,
        (RELEASED, EXPIRED),
        24 * HOUR + RELEASE,
        CFG,
        id="settlement-after-release-restores-nothing",
    ),
    pytest.param(
        [
            *base(),
            alert(0),
            released(24 * HOUR + RELEASE),
            settle(70 * DAY),
            pkg(70 * DAY, 100 * DAY, package_id="p2"),
            payg(70 * DAY, True),
        ],
        71 * DAY,
        State.RELEASED,
        (RELEASED,),
        24 * HOUR + RELEASE,
        CFG,
        id="package-after-release-restores-nothing",
    ),
    pytest.param(
        [*base(), alert(0), settle(30 * HOUR), alert(40 * HOUR)],
        64 * HOUR,
        State.SUSPENDED,
        (OVERDUE,),
        64 * HOUR + RELEASE,
        CFG,
        id="new-overdue-new-release_at",
    ),
    pytest.param(
        [*base(), alert(0)],
        24 * HOUR,
        State.SUSPENDED,
        (OVERDUE,),
        24 * HOUR + 2 * DAY,
        PolicyConfig(release_after_ms=2 * DAY, release_notice_ms=DAY),
        id="configured-release-delay",
    ),
    pytest.param(
        [*base(), alert(0)],
        24 * HOUR,
        State.SUSPENDED,
        (OVERDUE,),
        24 * HOUR + 7 * DAY,
        PolicyConfig(release_after_ms=2 * DAY),
        id="notice-longer-than-the-release-delay",
    ),
]


@pytest.mark.parametrize(("facts", "now", "state", "reasons", "release_at", "cfg"), R10_TABLE)
def test_r10_release(
    facts: list[Fact],
    now: int,
    state: State,
    reasons: tuple[Reason, ...],
    release_at: int | None,
    cfg: PolicyConfig,
) -> None:
    seg = seg_at(facts, now, cfg=cfg)
    assert seg.state is state
    assert seg.reasons == reasons
    assert rel(seg.release_at) == release_at
    d = ask(facts, now, Check.ACCESS_RECORDING, cfg=cfg)
    assert rel(d.release_at) == release_at
    if state is State.SUSPENDED:
        assert d.reason is OVERDUE
        assert "released for good at" in d.message
        assert release_at is not None and format_time(T0 + release_at) in d.message
    if state is State.RELEASED:
        assert d.reason is RELEASED
        assert not d.allowed
        assert "cannot be recovered" in d.message


def test_r10_released_only_by_the_fact() -> None:
    """No amount of time turns an overdue suspension into RELEASED: only the
    reconciler's ResourcesReleased fact does."""
    st = status([*base(), alert(0)])
    assert all(s.state is not State.RELEASED for s in st.segments)
    assert st.at(T0 + 10 * 365 * DAY).state is State.SUSPENDED


# ---------------------------------------------------------------------------
# R11 Ban

R11_TABLE = [
    pytest.param([*base(), ban(0)], 0, "app-1", (BANNED,), id="ban-from-active"),
    pytest.param([*base(), alert(-1 * HOUR), ban(0)], 0, "app-1", (BANNED, GR), id="ban-in-grace"),
    pytest.param(
        [*base(), ban(0), settle(1 * HOUR)], 2 * HOUR, "app-1", (BANNED,), id="settlement-after"
    ),
    pytest.param(
        [
            *base(quota=100),
            usage(-1 * HOUR, 100),
            ban(0),
            payg(1 * HOUR, True),
            pkg(1 * HOUR, 30 * DAY, package_id="p2"),
        ],
        2 * HOUR,
        "app-1",
        (BANNED,),
        id="payg-and-package-after",
    ),
    pytest.param([*two_apps(), ban(0)], 0, "app-2", (BANNED,), id="every-app-of-account"),
    pytest.param([*base(), ban(0)], 365 * DAY, "app-1", (BANNED, EXPIRED), id="for-good"),
    pytest.param(
        [*base(), ban(0), released(1 * HOUR)],
        2 * HOUR,
        "app-1",
        (BANNED, RELEASED),
        id="release-after-ban",
    ),
]


@pytest.mark.parametrize(("facts", "now", "app", "reasons"), R11_TABLE)
def test_r11_ban(facts: list[Fact], now: int, app: str, reasons: tuple[Reason, ...]) -> None:
    seg = seg_at(facts, now, app)
    assert seg.state is State.BANNED
    assert seg.reasons == reasons
    rm = room(-1 * HOUR, sched=now + 1 * HOUR)  # a class started before the ban
    for check in ALL_CHECKS:
        d = ask(facts, now, check, rm, app=app)
        assert not d.allowed
        assert d.reason is BANNED
        assert d.protected_until is None
        assert "cannot be restored" in d.message
    st = status(facts, app)
    assert all(s.state is State.BANNED for s in [st.at(T0 + now), *st.upcoming(T0 + now)])


# ---------------------------------------------------------------------------
# R12 Unknown application


@pytest.mark.parametrize("check", ALL_CHECKS, ids=[c.value for c in ALL_CHECKS])
def test_r12_unknown_application(check: Check) -> None:
    d = decide(check, None, T0, CFG, room(-1 * HOUR))
    assert not d.allowed
    assert d.reason is Reason.UNKNOWN_APPLICATION
    assert d.reasons == (Reason.UNKNOWN_APPLICATION,)
    assert d.state is None
    assert "not known" in d.message
    assert "Check the application id" in d.message


R12_TABLE = [
    pytest.param([], (), id="no-facts"),
    pytest.param(
        [alert(0), pkg(0, DAY, app="app-9"), usage(0, 1, app="app-9")], (), id="no-registration"
    ),
    pytest.param([*base(), pkg(0, DAY, app="app-9")], ("app-1",), id="unregistered-app-ignored"),
    pytest.param([*two_apps()], ("app-1", "app-2"), id="registered-apps-only"),
]


@pytest.mark.parametrize(("facts", "apps"), R12_TABLE)
def test_r12_only_registered_apps_have_a_status(facts: list[Fact], apps: tuple[str, ...]) -> None:
    statuses = compute_account(facts, CFG)
    assert tuple(statuses) == apps
    for app_id, st in statuses.items():
        assert st.app_id == app_id
        assert st.account_id == ACCT


# ---------------------------------------------------------------------------
# R13 Store trouble

ACTIVE_STATUS = AppStatus("app-1", ACCT, (Segment(T0 - DAY),), version=7)
SUSPENDED_STATUS = AppStatus(
    "app-1",
    ACCT,
    (Segment(T0 - DAY, (OVERDUE,), T0 - DAY, T0 - DAY, T0 + RELEASE),),
    version=8,
)
# In grace when seen, past the flip when asked.
GRACE_STATUS = status([*base(), alert(-24 * HOUR + MINUTE)])
BOUND = CFG.stale_bound_ms
ONLY_CREATE_OPEN = PolicyConfig(fail_open=frozenset({Check.CREATE_CLASSROOM}))
ALL_CLOSED = PolicyConfig(fail_open=frozenset())
C, E, R = Check.CREATE_CLASSROOM, Check.ENTER_CLASSROOM, Check.ACCESS_RECORDING
UNAVAILABLE = Reason.STATUS_UNAVAILABLE

R13_TABLE = [
    pytest.param(ACTIVE_STATUS, 0, C, CFG, True, OK, id="fresh-good-allowed"),
    pytest.param(ACTIVE_STATUS, BOUND, C, CFG, True, OK, id="at-bound-still-used"),
    pytest.param(SUSPENDED_STATUS, 0, C, CFG, False, OVERDUE, id="fresh-suspension-denied"),
    pytest.param(SUSPENDED_STATUS, BOUND, E, CFG, False, OVERDUE, id="suspension-at-bound"),
    pytest.param(
        SUSPENDED_STATUS, 1, R, ALL_CLOSED, False, OVERDUE, id="known-status-beats-failure-mode"
    ),
    pytest.param(GRACE_STATUS, 4 * MINUTE, C, CFG, False, OVERDUE, id="deadline-passed-since-seen"),
    pytest.param(ACTIVE_STATUS, BOUND + 1, C, CFG, True, UNAVAILABLE, id="stale-good-fail-open"),
    pytest.param(
        SUSPENDED_STATUS, BOUND + 1, C, CFG, True, UNAVAILABLE, id="stale-suspension-fail-open"
    ),
    pytest.param(
        ACTIVE_STATUS, BOUND + 1, C, ALL_CLOSED, False, UNAVAILABLE, id="stale-fail-closed"
    ),
    pytest.param(None, 0, C, CFG, True, UNAVAILABLE, id="never-seen-fail-open"),
    pytest.param(None, 0, E, ALL_CLOSED, False, UNAVAILABLE, id="never-seen-fail-closed"),
    pytest.param(None, 0, C, ONLY_CREATE_OPEN, True, UNAVAILABLE, id="per-check-mode-create-open"),
    pytest.param(
        None, 0, E, ONLY_CREATE_OPEN, False, UNAVAILABLE, id="per-check-mode-enter-closed"
    ),
    pytest.param(
        ACTIVE_STATUS,
        BOUND + 1,
        R,
        ONLY_CREATE_OPEN,
        False,
        UNAVAILABLE,
        id="per-check-mode-recording-closed",
    ),
]


@pytest.mark.parametrize(("last_seen", "age", "check", "cfg", "allowed", "reason"), R13_TABLE)
def test_r13_decide_without_store(
    last_seen: AppStatus | None,
    age: int,
    check: Check,
    cfg: PolicyConfig,
    allowed: bool,
    reason: Reason,
) -> None:
    seen_at = T0 - 3 * MINUTE
    now = seen_at + age
    d = decide_without_store(check, last_seen, seen_at if last_seen else None, now, cfg)
    assert d.degraded
    assert d.allowed == allowed
    assert d.reason is reason
    if last_seen is not None:
        assert d.status_version == last_seen.version
    if reason is UNAVAILABLE:
        assert d.reasons == (UNAVAILABLE,)
        assert ("was allowed" if allowed else "was denied") in d.message
        assert "Try again" in d.message
    else:
        assert d.state is not None


def test_r13_status_without_a_seen_time_is_not_used() -> None:
    d = decide_without_store(Check.CREATE_CLASSROOM, SUSPENDED_STATUS, None, T0, CFG)
    assert d.reason is UNAVAILABLE
    assert d.allowed  # default failure mode: open
    assert d.degraded


def test_r13_default_failure_mode_is_open_for_every_check() -> None:
    assert frozenset(ALL_CHECKS) == CFG.fail_open
    for check in ALL_CHECKS:
        d = decide_without_store(check, None, None, T0, CFG)
        assert d.allowed
        assert d.reason is UNAVAILABLE


# ---------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grace_ms": -1},
        {"release_after_ms": -1},
        {"overrun_ms": -1},
        {"max_class_ms": -1},
        {"stale_bound_ms": -1},
    ],
    ids=["grace", "release", "overrun", "max-class", "stale-bound"],
)
def test_negative_durations_refused(kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        PolicyConfig(**kwargs)


def test_a_fact_dated_far_ahead_does_not_hide_the_present() -> None:
    """Billing-system clock skew: a fact dated a year ahead must not make
    the app be answered now with its state of next year."""
    facts: list[Fact] = [*base(), payg(365 * DAY, True)]
    st = compute_account(facts, CFG, now=T0)["app-1"]
    assert st.at(T0).state is State.ACTIVE
    # Without the reader's clock only a day of history is kept before it.
    blind = compute_account(facts, CFG)["app-1"]
    assert blind.at(T0).state is State.SUSPENDED  # what the reader's clock prevents
