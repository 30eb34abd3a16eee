"""Notices and the evidence a release reads (SPEC R10), pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from lcic_guard.domain.notices import (
    RELEASE_SCHEDULED,
    SUSPENSION_SCHEDULED,
    LedgerRecord,
    Notice,
    Pause,
    due_notice,
    expired_records,
    notice_plan,
    release_evidence,
)
from lcic_guard.domain.policy import DAY

from tests.support.clock import T0

N = 7 * DAY
IDS = ("run-a",)


def notice(
    at: int | None,
    release_at: int,
    episode: str = "alert-1",
    run_ids: tuple[str, ...] = IDS,
    n: int = 0,
) -> LedgerRecord:
    return LedgerRecord(
        f"notice:acct:{episode}:k{n}",
        RELEASE_SCHEDULED,
        "acct",
        episode,
        {"release_at": release_at},
        committed_at=at,
        run_ids=run_ids,
    )


def test_the_plan_is_a_first_notice_then_only_reminders_after_it() -> None:
    release_at = T0 + 60 * DAY
    plan = notice_plan(T0, release_at, (30 * DAY, 7 * DAY, DAY))
    assert plan == [
        Notice("initial", T0),
        Notice("30d", release_at - 30 * DAY),
        Notice("7d", release_at - 7 * DAY),
        Notice("1d", release_at - DAY),
    ]
    late = notice_plan(release_at - 10 * DAY, release_at, (30 * DAY, 7 * DAY, DAY))
    assert [n.kind for n in late] == ["initial", "7d", "1d"]


def test_only_the_latest_notice_due_is_made_and_never_one_already_sent() -> None:
    plan = notice_plan(T0, T0 + 60 * DAY, (30 * DAY, 7 * DAY, DAY))
    assert due_notice(plan, set(), 10_000, T0 + 9_999) is None  # not settled
    assert due_notice(plan, set(), 10_000, T0 + 10_000) == 0
    # Missed while nothing ran: "7d" now, not a stale "30d".
    assert due_notice(plan, {0}, 0, T0 + 54 * DAY) == 2
    assert due_notice(plan, {0, 2}, 0, T0 + 54 * DAY) is None
    assert due_notice(plan, {0, 1, 2, 3}, 0, T0 + 100 * DAY) is None


def test_a_notice_counts_once_it_is_a_notice_period_old_and_names_a_past_release() -> None:
    rec = notice(T0, T0 + N)
    early = release_evidence([rec], "alert-1", T0 + N - 1, N, None, IDS)
    assert not early.complete and early.pending == rec and early.ready_at == T0 + N
    assert "runs until" in early.missing
    ok = release_evidence([rec], "alert-1", T0 + N, N, None, IDS)
    assert ok.complete and ok.notice == rec and ok.missing == ""
    # Naming a release still ahead: not before that time.
    ahead = notice(T0, T0 + 2 * N)
    got = release_evidence([ahead], "alert-1", T0 + N, N, None, IDS)
    assert not got.complete and got.ready_at == T0 + 2 * N


def test_no_record_of_this_episode_is_no_evidence() -> None:
    for records in ([], [notice(T0, T0 + N, episode="alert-0")], [notice(None, T0 + N)]):
        got = release_evidence(records, "alert-1", T0 + 10 * N, N, None, IDS)
        assert not got.complete and got.ready_at is None and got.pending is None
        assert "no release_scheduled on record" in got.missing


def test_a_store_discontinuity_voids_older_notices_unless_a_snapshot_confirmed() -> None:
    rec = notice(T0, T0 + N)
    pause = Pause(T0 + N, "run_id")
    got = release_evidence([rec], "alert-1", T0 + 3 * N, N, pause, IDS)
    assert not got.complete and got.ready_at is None
    assert "predates a store discontinuity" in got.missing and "run_id" in got.missing
    # A notice made after the detection counts a full period later.
    fresh = notice(T0 + N + 5, T0 + 2 * N + 5, n=1)
    got = release_evidence([rec, fresh], "alert-1", T0 + 2 * N + 4, N, pause, IDS)
    assert not got.complete and got.ready_at == T0 + 2 * N + 5
    got = release_evidence([rec, fresh], "alert-1", T0 + 2 * N + 5, N, pause, IDS)
    assert got.notice == fresh
    # A snapshot loaded after the detection confirms the facts.
    lifted = Pause(T0 + N, "run_id", lifted_by_snapshot_at=T0 + N + 60_000)
    assert release_evidence([rec], "alert-1", T0 + N + 60_000, N, lifted, IDS).notice == rec


def test_a_notice_made_on_another_redis_run_counts_only_after_a_pause_was_noted() -> None:
    rec = notice(T0, T0 + N, run_ids=("run-old",))
    assert not release_evidence([rec], "alert-1", T0 + 2 * N, N, None, IDS).complete
    assert release_evidence([rec], "alert-1", T0 + 2 * N, N, None, ("run-old",)).complete


def test_a_record_survives_its_json_and_a_claim_is_no_record() -> None:
    rec = notice(T0, T0 + N)
    assert LedgerRecord.from_json(rec.to_json()) == rec
    assert LedgerRecord.from_json('{"claimed_at": 1, "payload": {}}') is None
    assert LedgerRecord.from_json("not json") is None


def test_a_pause_is_in_force_for_a_notice_period_unless_lifted() -> None:
    pause = Pause(T0, "generation")
    assert pause.active(T0, N) and pause.active(T0 + N - 1, N) and not pause.active(T0 + N, N)
    assert not Pause(T0, "run_id", lifted_by_snapshot_at=T0 + 1).active(T0 + 1, N)


records = st.lists(
    st.builds(
        notice,
        at=st.one_of(st.none(), st.integers(T0 - 3 * N, T0 + 3 * N)),
        release_at=st.integers(T0 - 3 * N, T0 + 4 * N),
        episode=st.sampled_from(["alert-1", "alert-2"]),
        run_ids=st.sampled_from([IDS, ("run-old",)]),
        n=st.integers(0, 9),
    ),
    max_size=6,
)
pauses = st.one_of(
    st.none(),
    st.builds(
        Pause,
        since=st.integers(T0 - 2 * N, T0 + 3 * N),
        cause=st.just("run_id"),
        lifted_by_snapshot_at=st.one_of(st.none(), st.integers(T0, T0 + 4 * N)),
    ),
)


@given(records, pauses, st.integers(T0 - 3 * N, T0 + 5 * N))
def test_evidence_is_never_complete_without_a_notice_a_full_period_old(
    recs: list[LedgerRecord], pause: Pause | None, now: int
) -> None:
    got = release_evidence(recs, "alert-1", now, N, pause, IDS)
    if not got.complete:
        assert got.missing
        return
    r = got.notice
    assert r is not None and r in recs and r.episode == "alert-1"
    assert r.committed_at is not None and r.committed_at + N <= now
    assert r.dates["release_at"] <= now
    if pause is not None and r.committed_at < pause.since:
        assert pause.lifted_by_snapshot_at is not None
    else:
        assert r.run_ids == IDS


# -- which ledger records may be forgotten (ADR 0031) ----------------------------

RETAIN = 400 * DAY
NOW = T0 + 1000 * DAY
LONG_AGO = NOW - RETAIN - 1


def warning(at: int, committed: int | None, n: int = 0) -> LedgerRecord:
    return LedgerRecord(
        f"warn:app:app-{n}:PACKAGE_EXPIRED:{at}:initial",
        SUSPENSION_SCHEDULED,
        "acct",
        f"app:app-{n}:PACKAGE_EXPIRED:{at}",
        {"at": at},
        committed_at=committed,
    )


def other(kind: str, committed: int) -> LedgerRecord:
    return LedgerRecord(f"{kind}:x", kind, "acct", "x", {}, committed_at=committed)


def by_id(*records: LedgerRecord) -> dict[str, LedgerRecord]:
    return {r.announcement_id: r for r in records}


def test_old_notices_of_past_episodes_and_old_warnings_are_forgotten() -> None:
    past = notice(LONG_AGO - DAY, LONG_AGO, episode="alert-0")
    moved = notice(LONG_AGO - DAY, LONG_AGO, episode="alert-0@123", n=1)
    warned = warning(LONG_AGO, LONG_AGO - DAY)
    records = by_id(past, moved, warned)
    assert sorted(expired_records(records, "alert-1", NOW, RETAIN, 100)) == sorted(records)
    assert sorted(expired_records(records, None, NOW, RETAIN, 100)) == sorted(records)


def test_the_open_episode_overrides_releases_claims_and_recent_records_stay() -> None:
    keep = by_id(
        notice(LONG_AGO - DAY, LONG_AGO, episode="alert-1"),  # the open episode
        notice(LONG_AGO - DAY, LONG_AGO, episode="alert-1@99", n=1),  # moved, still open
        notice(LONG_AGO - DAY, NOW - DAY, episode="alert-0", n=2),  # release_at recent
        notice(NOW - DAY, LONG_AGO, episode="alert-0", n=3),  # committed recently
        notice(None, LONG_AGO, episode="alert-0", n=4),  # only claimed
        warning(NOW + DAY, LONG_AGO),  # still ahead
        warning(LONG_AGO, None, n=1),
        other("override_applied", LONG_AGO),
        other("resources_released", LONG_AGO),
    )
    assert expired_records(keep, "alert-1", NOW, RETAIN, 100) == []
    assert (
        expired_records(keep | by_id(warning(LONG_AGO, LONG_AGO, n=9)), "alert-1", NOW, 0, 9) == []
    )


def test_at_most_the_limit_is_forgotten_per_call() -> None:
    records = by_id(*(warning(LONG_AGO, LONG_AGO, n=i) for i in range(30)))
    first = expired_records(records, None, NOW, RETAIN, 10)
    assert len(first) == 10 and set(first) <= set(records)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([RELEASE_SCHEDULED, SUSPENSION_SCHEDULED, "override_applied"]),
            st.sampled_from(["alert-0", "alert-1", "alert-1@5", "alert-10", ""]),
            st.one_of(st.none(), st.integers(NOW - 2 * RETAIN, NOW + DAY)),
            st.integers(NOW - 2 * RETAIN, NOW + 2 * RETAIN),
        ),
        max_size=20,
    ),
    st.sampled_from([None, "alert-1"]),
)
def test_nothing_readable_or_plannable_is_ever_forgotten(
    rows: list[tuple[str, str, int | None, int]], open_alert: str | None
) -> None:
    records = {
        f"{kind}:{i}": LedgerRecord(
            f"{kind}:{i}", kind, "acct", episode, {"release_at": date}, committed_at=committed
        )
        for i, (kind, episode, committed, date) in enumerate(rows)
    }
    gone = expired_records(records, open_alert, NOW, RETAIN, 100)
    for aid in gone:
        r = records[aid]
        assert r.type in (RELEASE_SCHEDULED, SUSPENSION_SCHEDULED)
        assert r.committed_at is not None and r.committed_at < NOW - RETAIN
        assert all(d < NOW - RETAIN for d in r.dates.values())
        if r.type == RELEASE_SCHEDULED:
            assert r.episode and (open_alert is None or r.episode.split("@")[0] != open_alert)
    # Everything else that qualifies is forgotten (the limit is not reached).
    assert len(gone) == sum(
        1
        for r in records.values()
        if r.type in (RELEASE_SCHEDULED, SUSPENSION_SCHEDULED)
        and r.committed_at is not None
        and max(r.committed_at, *r.dates.values()) < NOW - RETAIN
        and not (
            r.type == RELEASE_SCHEDULED and (not r.episode or r.episode.split("@")[0] == open_alert)
        )
    )
