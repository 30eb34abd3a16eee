"""Notices and the evidence a release reads (SPEC R10), pure.

The reconciler keeps a ledger of what it announced: one record per
announcement, written once it is on the event stream. A release is committed
on that record, not on a computed date: the customer must really have been
told, long enough ago, on a store that has not gone back in time since.
This module decides, from the records and the store's continuity, whether
that evidence is there, and which notices are due; it reads no store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lcic_guard.domain.policy import format_duration
from lcic_guard.domain.time import Millis, format_time

RELEASE_SCHEDULED = "release_scheduled"
SUSPENSION_SCHEDULED = "suspension_scheduled"


@dataclass(frozen=True, slots=True)
class Notice:
    """One ``release_scheduled`` announcement of an overdue episode (R10)."""

    kind: str  # "initial", or how long before release_at, e.g. "7d"
    at: Millis
    sent: bool = False


def notice_plan(known: Millis, release_at: Millis, reminders: Iterable[int]) -> list[Notice]:
    """R10: the first notice when the suspension becomes known, then one
    reminder per lead time, only those after the first notice."""
    out = [Notice("initial", known)]
    for lead in sorted(set(reminders), reverse=True):
        if release_at - lead > known:
            out.append(Notice(format_duration(lead), release_at - lead))
    return out


def due_notice(plan: list[Notice], sent: set[int], settle_ms: int, now: Millis) -> int | None:
    """The one notice of ``plan`` to announce at ``now``: the latest due (and
    settled) after every one sent. A notice missed while no reconciler ran is
    not sent late: a "30 days left" that arrives with 7 days left would tell
    the customer something false."""
    last = max(sent, default=-1)
    due = [i for i, n in enumerate(plan) if n.at + settle_ms <= now and i > last]
    return due[-1] if due else None


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One announcement as the ledger keeps it."""

    announcement_id: str
    type: str
    account_id: str
    episode: str
    """What the announcement belongs to: for a notice, the overdue episode
    (the alert at A, and the release time once an override moved it)."""
    dates: Mapping[str, Millis] = field(default_factory=dict)
    """The dates the announcement named (``release_at`` for a notice)."""
    committed_at: Millis | None = None
    """When it was on the stream (the reconciler's clock); None while it is
    only claimed."""
    run_ids: tuple[str, ...] = ()
    """The Redis run ids when it was committed."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "announcement_id": self.announcement_id,
                "type": self.type,
                "account_id": self.account_id,
                "episode": self.episode,
                "dates": dict(self.dates),
                "committed_at": self.committed_at,
                "run_ids": list(self.run_ids),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(raw: str) -> LedgerRecord | None:
        """The record, None for anything that is not one (a claim in flight)."""
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or "type" not in d:
                return None
            return LedgerRecord(
                announcement_id=str(d["announcement_id"]),
                type=str(d["type"]),
                account_id=str(d["account_id"]),
                episode=str(d.get("episode", "")),
                dates={str(k): int(v) for k, v in (d.get("dates") or {}).items()},
                committed_at=(
                    int(d["committed_at"]) if d.get("committed_at") is not None else None
                ),
                run_ids=tuple(str(r) for r in d.get("run_ids") or ()),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class Pause:
    """Releases paused after a store discontinuity (R10)."""

    since: Millis
    """When the discontinuity was detected."""
    cause: str
    """``run_id``, ``generation``, ``stream_id`` or ``version``."""
    lifted_by_snapshot_at: Millis | None = None
    """When a billing snapshot loaded after the detection was fully applied:
    the facts are confirmed again, so notices made before the discontinuity
    count again."""

    def active(self, now: Millis, notice_ms: int) -> bool:
        return self.lifted_by_snapshot_at is None and now < self.since + notice_ms


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a release of one account reads at the moment of release."""

    notice: LedgerRecord | None
    """The ledger record of a notice that makes the release possible now."""
    pending: LedgerRecord | None
    """A notice on record that will make it possible later (its period runs)."""
    ready_at: Millis | None
    """When the evidence will be complete, if a notice is on record; None
    when a new notice must be announced first."""
    missing: str
    """What is missing, '' when nothing is."""

    @property
    def complete(self) -> bool:
        return self.notice is not None

    def describe(self) -> str:
        """What release-plan shows of it."""
        if self.notice is not None:
            return (
                f"notice {self.notice.announcement_id} committed at "
                f"{format_time(self.notice.committed_at or 0)}"
            )
        return self.missing


def counts_across(
    record: LedgerRecord, pause: Pause | None, run_ids: tuple[str, ...] | None = None
) -> bool:
    """Whether a notice is still evidence after the store's discontinuities:
    made after the last one was detected, or confirmed by a snapshot loaded
    after it (a notice on record survived the rollback, since its record is
    written only once it is on the stream; what the rollback may have lost
    is the facts, and the snapshot brings those back)."""
    if record.committed_at is None:
        return False
    if pause is not None and record.committed_at < pause.since:
        return pause.lifted_by_snapshot_at is not None
    # Made on the store as it is now: a run id that changed since, with no
    # pause noted after the record, is a discontinuity not yet noted.
    return run_ids is None or set(record.run_ids) == set(run_ids)


def release_evidence(
    records: Iterable[LedgerRecord],
    episode: str,
    now: Millis,
    notice_ms: int,
    pause: Pause | None,
    run_ids: tuple[str, ...] | None = None,
) -> Evidence:
    """R10 (a) and (c): a ``release_scheduled`` of this episode naming a
    ``release_at`` no later than now, committed at least the notice period
    ago on a store continuous since (or confirmed by a snapshot)."""
    notices = [
        r
        for r in records
        if r.type == RELEASE_SCHEDULED and r.episode == episode and r.committed_at is not None
    ]
    valid = [r for r in notices if counts_across(r, pause, run_ids)]
    for r in sorted(valid, key=lambda r: r.committed_at or 0):
        assert r.committed_at is not None
        if r.committed_at + notice_ms <= now and r.dates.get("release_at", now + 1) <= now:
            return Evidence(r, None, None, "")
    later = [
        (max((r.committed_at or 0) + notice_ms, r.dates.get("release_at", 0)), r) for r in valid
    ]
    if later:
        at, r = min(later, key=lambda x: x[0])
        return Evidence(
            None,
            r,
            at,
            f"notice {r.announcement_id} committed at {format_time(r.committed_at or 0)}: "
            f"its notice period runs until {format_time(at)}",
        )
    if notices:
        since = f" detected at {format_time(pause.since)} ({pause.cause})" if pause else ""
        return Evidence(
            None,
            None,
            None,
            f"every notice on record predates a store discontinuity{since}: a new one is needed",
        )
    return Evidence(None, None, None, "no release_scheduled on record for this episode")


def expired_records(
    records: Mapping[str, LedgerRecord],
    open_alert: str | None,
    now: Millis,
    retention_ms: int,
    limit: int,
) -> list[str]:
    """The ids of at most ``limit`` ledger records that no release can read
    and no planner make again, so the ledger may forget them (ADR 0031):
    a committed ``release_scheduled`` or ``suspension_scheduled`` whose
    every named date and ``committed_at`` lie more than ``retention_ms``
    before ``now`` and, for a notice, of an overdue episode other than the
    one open now (``open_alert``, its alert's event id). ``retention_ms``
    0 keeps every record.

    Why such an id is never planned again (exactly once):

    * ``suspension_scheduled``: its id ``warn:SCOPE:WHO:REASON:AT:KIND``
      names the suspension's time ``at`` (the record's ``at``), and only
      suspensions still ahead of now are planned
      (``scheduled_suspensions`` reads ``upcoming(now)``, segments starting
      after now); an ``at`` in the past is never ahead again.
    * ``release_scheduled``: its id names its episode (the alert at A, and
      the moved release time), and the planners (``release_notices``,
      ``evidence_notice``, ``notices_of_history``) and the release's
      evidence check only take the episode :func:`overdue_notice` finds
      now, which is the one open now or none. An episode that ended
      (settled) never opens again: facts are only added, and the settlement
      stays after its alert in the sweep. The retention is a further
      margin, and keeps recent notices for audit.

    ``override_applied`` and ``resources_released`` are never forgotten:
    their planners take every override among the facts and every app of
    the account, whatever their age, so one forgotten would be announced
    again; they grow with the account's facts and apps, not with time.
    A claim in flight (``committed_at`` None) is never forgotten."""
    if retention_ms <= 0:
        return []
    horizon = now - retention_ms
    out: list[str] = []
    for aid, r in sorted(records.items()):
        if len(out) >= limit:
            break
        if r.committed_at is None or r.committed_at >= horizon:
            continue
        if r.type not in (RELEASE_SCHEDULED, SUSPENSION_SCHEDULED) or not r.dates:
            continue
        if any(at >= horizon for at in r.dates.values()):
            continue
        if r.type == RELEASE_SCHEDULED and (
            not r.episode or (open_alert is not None and _of_episode(r.episode, open_alert))
        ):
            continue
        out.append(aid)
    return out


def _of_episode(series: str, alert_id: str) -> bool:
    """Whether a notice series (the alert's id, or ``ALERT@RELEASE_AT``
    once an override moved the release) belongs to the alert's episode;
    any doubt counts as belonging."""
    return series == alert_id or series.startswith(f"{alert_id}@")
