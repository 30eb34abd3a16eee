"""Explain (issue 6, item 3): the billing events behind each reason and the
deadlines ahead, from the pure function, through GetApplicationStatus over a
real socket, and printed for a person by ``lcic-guard status`` / ``explain``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic_guard import cli
from lcic_guard.domain.evidence import DeadlineKind, ReasonFact, deadlines, reason_facts
from lcic_guard.domain.facts import Fact, ResourcesReleased, parse_event
from lcic_guard.domain.policy import (
    DAY,
    HOUR,
    MINUTE,
    AppStatus,
    PolicyConfig,
    Reason,
    compute_account,
)
from lcic_guard.domain.time import format_time
from lcic_guard.reconciler import Reconciler
from lcic_guard.render import relative

from tests.support.clock import T0
from tests.support.events import Events, deliveries
from tests.support.fixtures import SidecarUnderTest

CFG = PolicyConfig()


def fold(evs: list[dict[str, Any]], *extra: Fact) -> tuple[AppStatus, list[Fact]]:
    facts: list[Fact] = [parse_event(e) for e in evs] + list(extra)
    statuses = compute_account(facts, CFG)
    return statuses["app-1"], facts


def by_reason(facts: tuple[ReasonFact, ...]) -> dict[Reason, list[ReasonFact]]:
    out: dict[Reason, list[ReasonFact]] = {}
    for f in facts:
        out.setdefault(f.reason, []).append(f)
    return out


def covered(status: AppStatus, facts: list[Fact], now: int) -> tuple[ReasonFact, ...]:
    """Every reason in force has a fact, listed in the order of the reasons."""
    found = reason_facts(status, facts, now, CFG)
    reasons = status.at(now).reasons
    assert set(by_reason(found)) == set(reasons)
    order = [f.reason for f in found]
    assert order == sorted(order, key=reasons.index)
    return found


# -- the pure mapping ------------------------------------------------------------------


def test_grace_names_the_alert_that_started_it_not_a_settled_one(events: Events) -> None:
    evs = [
        *events.app("acct", "app-1"),
        events("overdue_alert", T0 - 3 * DAY, account_id="acct"),
        events("arrears_settled", T0 - 2 * DAY, account_id="acct"),
        events("overdue_alert", T0 - HOUR, account_id="acct", amount_due="12.50"),
        events("overdue_alert", T0 - 30 * MINUTE, account_id="acct"),  # does not move A (R1)
    ]
    status, facts = fold(evs)
    [fact] = covered(status, facts, T0)
    assert fact.reason is Reason.OVERDUE_GRACE
    assert fact.event_id == evs[4]["event_id"] and fact.event_type == "overdue_alert"
    assert fact.occurred_at == T0 - HOUR
    assert "12.50" in fact.detail and format_time(T0 + 23 * HOUR) in fact.detail
    ahead = deadlines(status, facts, T0, CFG)
    assert [(d.kind, d.at) for d in ahead] == [
        (DeadlineKind.GRACE_END, T0 + 23 * HOUR),
        (DeadlineKind.PACKAGE_EXPIRY, T0 + 20 * DAY),
        (DeadlineKind.RELEASE, T0 + 23 * HOUR + 60 * DAY),
    ]
    assert ahead[0].event_id == ahead[2].event_id == evs[4]["event_id"]
    assert ahead[1].event_id == evs[1]["event_id"]  # the package purchase
    assert "suspended (PACKAGE_EXPIRED)" in ahead[1].description


def test_overdue_suspension_names_the_alert_and_the_release_date(events: Events) -> None:
    evs = [*events.app("acct", "app-1"), events("overdue_alert", T0 - 2 * DAY, account_id="acct")]
    status, facts = fold(evs)
    [fact] = covered(status, facts, T0)
    assert fact.reason is Reason.ACCOUNT_OVERDUE and fact.event_id == evs[2]["event_id"]
    release = T0 - 2 * DAY + DAY + 60 * DAY
    assert format_time(release) in fact.detail
    kinds = {d.kind: d for d in deadlines(status, facts, T0, CFG)}
    assert DeadlineKind.GRACE_END not in kinds  # already past
    assert kinds[DeadlineKind.RELEASE].at == release


def test_quota_names_the_package_the_exhausting_report_and_payg_off(events: Events) -> None:
    evs = [
        *events.app("acct", "app-1", quota=100),
        events("payg_changed", T0 - 6 * HOUR, app_id="app-1", enabled=True),
        events("payg_changed", T0 - 5 * HOUR, app_id="app-1", enabled=False),
        events(
            "package_usage", T0 - 4 * HOUR, app_id="app-1", package_id="pkg-app-1", used_minutes=100
        ),
        events(
            "package_usage", T0 - 3 * HOUR, app_id="app-1", package_id="pkg-app-1", used_minutes=90
        ),
        events(
            "package_usage", T0 - 2 * HOUR, app_id="app-1", package_id="pkg-app-1", used_minutes=110
        ),
        events(
            "package_usage", T0 - 1 * HOUR, app_id="app-1", package_id="pkg-app-1", used_minutes=130
        ),
    ]
    status, facts = fold(evs)
    found = covered(status, facts, T0)
    assert [f.event_type for f in found] == ["package_purchased", "package_usage", "payg_changed"]
    purchase, usage, payg = found
    assert purchase.event_id == evs[1]["event_id"] and "quota of 100 minutes" in purchase.detail
    # Not the 100 report (a correction to 90 came after), the 110 one.
    assert usage.event_id == evs[6]["event_id"] and "110 of 100" in usage.detail
    assert payg.event_id == evs[3]["event_id"] and "off" in payg.detail


def test_expired_package_and_one_bought_for_later(events: Events) -> None:
    evs = [
        *events.app("acct", "app-1", at=T0 - 40 * DAY, expires=T0 - DAY),
        events(
            "package_purchased",
            T0 - 2 * HOUR,
            app_id="app-1",
            package_id="pkg-next",
            starts_at=T0 + 2 * DAY,
            expires_at=T0 + 32 * DAY,
            quota_minutes=500,
        ),
    ]
    status, facts = fold(evs)
    expired, later = covered(status, facts, T0)
    assert expired.event_id == evs[1]["event_id"]
    assert f"expired at {format_time(T0 - DAY)}" in expired.detail
    assert later.event_id == evs[2]["event_id"] and "in force only from" in later.detail
    [start] = deadlines(status, facts, T0, CFG)
    assert start.kind is DeadlineKind.PACKAGE_START and start.at == T0 + 2 * DAY


def test_never_bought_a_package_points_at_the_registration(events: Events) -> None:
    reg = events("application_registered", T0 - DAY, account_id="acct", app_id="app-1")
    status, facts = fold([reg])
    [fact] = covered(status, facts, T0)
    assert fact.reason is Reason.PACKAGE_EXPIRED and fact.event_id == reg["event_id"]
    assert "no package was ever bought" in fact.detail


def test_ban_release_and_overdue_together_each_have_their_event(events: Events) -> None:
    evs = [
        *events.app("acct", "app-1", at=T0 - 80 * DAY, expires=T0 + 100 * DAY),
        events("overdue_alert", T0 - 70 * DAY, account_id="acct"),
        events("compliance_ban", T0 - HOUR, account_id="acct", note="illegal content"),
    ]
    released = ResourcesReleased("lcic-guard:release:acct:1", T0 - 5 * DAY, "acct")
    status, facts = fold(evs, released)
    found = by_reason(covered(status, facts, T0))
    assert list(found) == [
        Reason.ACCOUNT_BANNED,
        Reason.RESOURCES_RELEASED,
        Reason.ACCOUNT_OVERDUE,
    ]
    assert found[Reason.ACCOUNT_BANNED][0].detail.endswith("illegal content")
    assert found[Reason.RESOURCES_RELEASED][0].event_id == released.event_id
    assert found[Reason.ACCOUNT_OVERDUE][0].event_id == evs[2]["event_id"]
    assert "resources were released" in found[Reason.ACCOUNT_OVERDUE][0].detail
    assert "if unpaid" not in found[Reason.ACCOUNT_OVERDUE][0].detail
    # Nothing lies ahead that a payment could change: no release deadline.
    assert all(d.kind is not DeadlineKind.RELEASE for d in deadlines(status, facts, T0, CFG))


def test_facts_after_now_are_not_used(events: Events) -> None:
    evs = [*events.app("acct", "app-1"), events("overdue_alert", T0 + HOUR, account_id="acct")]
    status, facts = fold(evs)
    assert reason_facts(status, facts, T0, CFG) == ()
    [fact] = reason_facts(status, facts, T0 + 2 * HOUR, CFG)
    assert fact.reason is Reason.OVERDUE_GRACE


def test_relative_times() -> None:
    assert relative(T0 + 22 * HOUR + 5 * MINUTE, T0) == "in 22h 5m"
    assert relative(T0 - 3 * DAY - 2 * HOUR, T0) == "3d 2h ago"
    assert relative(T0 + 30_000, T0) == "now"


# -- over gRPC -------------------------------------------------------------------------


async def quota_app(reconciler: Reconciler, events: Events) -> list[dict[str, Any]]:
    evs = [
        *events.app("acct-q", "app-q", quota=100),
        events(
            "package_usage", T0 - 2 * HOUR, app_id="app-q", package_id="pkg-app-q", used_minutes=100
        ),
        events("overdue_alert", T0 - HOUR, account_id="acct-q", amount_due="9.90"),
    ]
    await reconciler.ingest(deliveries(evs))
    return evs


def ts(ms: int) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(ms)
    return out


async def test_get_application_status_returns_the_facts_and_deadlines(
    sidecar: SidecarUnderTest, reconciler: Reconciler, events: Events
) -> None:
    evs = await quota_app(reconciler, events)
    resp = await sidecar.stub.GetApplicationStatus(pb.GetApplicationStatusRequest(app_id="app-q"))
    st = resp.status
    assert list(st.reasons) == [
        pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED,
        pb.DECISION_REASON_OVERDUE_GRACE,
    ]
    got = [(f.reason, f.event_id, f.event_type) for f in st.facts]
    assert got == [
        (pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED, evs[1]["event_id"], "package_purchased"),
        (pb.DECISION_REASON_PACKAGE_QUOTA_EXHAUSTED, evs[2]["event_id"], "package_usage"),
        (pb.DECISION_REASON_OVERDUE_GRACE, evs[3]["event_id"], "overdue_alert"),
    ]
    assert st.facts[1].occurred_at.ToMilliseconds() == T0 - 2 * HOUR
    assert "9.90" in st.facts[2].detail
    assert [(d.kind, d.at.ToMilliseconds()) for d in st.deadlines] == [
        (pb.DEADLINE_KIND_GRACE_END, T0 + 23 * HOUR),
        (pb.DEADLINE_KIND_PACKAGE_EXPIRY, T0 + 20 * DAY),
        (pb.DEADLINE_KIND_RELEASE, T0 + 23 * HOUR + 60 * DAY),
    ]
    assert "pay-as-you-go" in st.message and "package" in st.message
    # The grace running under the quota suspension is part of the advice.
    assert f"top up before {format_time(T0 + 23 * HOUR)}" in st.message


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_status_command_prints_for_a_person(
    sidecar: SidecarUnderTest,
    reconciler: Reconciler,
    events: Events,
    capsys: pytest.CaptureFixture[str],
) -> None:
    evs = await quota_app(reconciler, events)
    code, out, _ = await run_cli(capsys, "status", "app-q", "--target", sidecar.target)
    assert code == 0
    assert "Application app-q (account acct-q)" in out
    assert "state:   SUSPENDED" in out
    assert "PACKAGE_QUOTA_EXHAUSTED" in out and "OVERDUE_GRACE" in out
    usage_line = f"package_usage {evs[2]['event_id']} at {format_time(T0 - 2 * HOUR)}"
    assert usage_line in out
    assert f"overdue_alert {evs[3]['event_id']}" in out
    assert "Deadlines ahead:" in out
    assert f"{format_time(T0 + 23 * HOUR)} (" in out and "GRACE_END" in out
    assert "What the customer can do:" in out and "pay-as-you-go" in out
    assert "R7 quota" in out  # the rules applied

    code, out, _ = await run_cli(capsys, "status", "app-q", "--json", "--target", sidecar.target)
    raw = json.loads(out)
    assert code == 0 and raw["app_id"] == "app-q"  # the CLI's one JSON dialect
    assert [f["event_id"] for f in raw["facts"]] == [e["event_id"] for e in evs[1:4]]


async def test_explain_command_gives_the_answer_and_why(
    sidecar: SidecarUnderTest,
    reconciler: Reconciler,
    events: Events,
    capsys: pytest.CaptureFixture[str],
) -> None:
    evs = await quota_app(reconciler, events)
    code, out, _ = await run_cli(
        capsys, "explain", "app-q", "--check", "create", "--target", sidecar.target
    )
    assert code == 1
    assert out.startswith("Check create for app-q: DENIED, reason PACKAGE_QUOTA_EXHAUSTED")
    assert evs[2]["event_id"] in out and "Enable pay-as-you-go" in out

    # A class started before the suspension: entering is allowed, until when.
    await sidecar.stub.ReportClassroomStarted(
        pb.ReportClassroomStartedRequest(
            app_id="app-q",
            room_id="room-live",
            started_at=ts(T0 - 3 * HOUR),
            scheduled_end_time=ts(T0 + HOUR),
        )
    )
    code, out, _ = await run_cli(
        capsys,
        "explain",
        "app-q",
        "--check",
        "enter",
        "--room",
        "room-live",
        "--target",
        sidecar.target,
    )
    assert code == 0
    assert "ALLOWED, reason IN_PROGRESS_PROTECTED" in out
    assert f"protected until {format_time(T0 + 2 * HOUR)}" in out

    code, _, err = await run_cli(
        capsys, "explain", "app-q", "--check", "enter", "--target", sidecar.target
    )
    assert code == 2 and "--room is required" in err

    code, out, _ = await run_cli(
        capsys, "explain", "app-nobody", "--check", "recording", "--target", sidecar.target
    )
    assert code == 1
    assert "Check recording for app-nobody: DENIED, reason UNKNOWN_APPLICATION" in out
    assert "not known to the billing system" in out
