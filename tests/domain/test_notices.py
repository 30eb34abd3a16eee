"""Notices and the evidence a release reads (SPEC R10), pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from lcic_guard.domain.notices import (
    RELEASE_SCHEDULED,
    LedgerRecord,
    Notice,
    Pause,
    due_notice,
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
