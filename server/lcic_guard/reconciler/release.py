"""R10: release of an account's resources, irreversible, so done only when
it is certain.

A release is decided on the facts as they are in Redis, with every billing
source confirmed read past ``release_at`` (plus a margin), and on a data set
the feed has been read into again since Redis last lost or replaced it. It is
committed only by the holder of the leader lease, fenced per account against
an older leader, and compare-and-set on the account's fact sequence, so a
paused or stale leader cannot commit it and a fact that arrives between the
decision and the commit makes it decide again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from lcic_guard.domain.facts import ReleaseHoldSet, ResourcesReleased
from lcic_guard.domain.notices import Evidence, Notice, Pause, release_evidence
from lcic_guard.domain.policy import (
    DAY,
    AppStatus,
    PolicyConfig,
    Reason,
    compute_account,
    notice_episode,
    overdue_notice,
    sweep_until,
)
from lcic_guard.domain.time import Millis, format_time
from lcic_guard.reconciler.announce import Announcer
from lcic_guard.reconciler.config import MAX_ROUNDS, RETRY_MS, STALE_OUTBOX_MS, ReconcilerConfig
from lcic_guard.reconciler.continuity import StoreContinuity
from lcic_guard.reconciler.deadlines import Lease
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.reconciler.sources import BillingSource, applied_until
from lcic_guard.store.coordination import Coordination
from lcic_guard.store.keys import deadline_of, release_deadline
from lcic_guard.store.status import AccountFacts, Store

log = logging.getLogger(__name__)

ALREADY_RELEASED = "already released"
RESYNCING = "Redis holds a new data set: waiting until the billing feed is read again"
NOT_LEADER = "not the leader: another reconciler holds the lease"
FENCED = "fenced off: a newer leader has acted on the account"
HELD = "release on hold"
NO_EVIDENCE = "no evidence of a notice in time"
# A held release stays listed (release-plan) and is looked at again this
# often; clearing the hold reschedules it at once anyway.
HELD_RECHECK_MS = DAY


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    account_id: str
    app_ids: tuple[str, ...]
    release_at: Millis
    eligible: bool
    why: str
    notices: tuple[Notice, ...] = ()
    """The notices of the overdue episode: sent, and still due."""
    evidence: str = ""
    """The notice on record a release would rest on, or what is missing (R10)."""
    ready_at: Millis | None = None
    """When a notice on record will have been made a notice period ago."""
    released: bool = False
    """Committed by this decision: the account is released now."""


class Releaser:
    """Decides and commits releases; holds what they depend on: the lease
    token, and whether the data set in Redis has been read into again.

    It never calls back into the reconciler: what follows a committed
    release (the account recomputed, the release announced) is the
    reconciler's to do (:meth:`Reconciler.try_release`)."""

    def __init__(
        self,
        store: Store,
        coord: Coordination,
        policy: PolicyConfig,
        config: ReconcilerConfig,
        announcer: Announcer,
        *,
        name: str,
        sources: Sequence[BillingSource],
        clock: Callable[[], Millis],
        recorded_clock: Callable[[], Awaitable[Millis]],
        metrics: ReconcilerMetrics | None = None,
    ) -> None:
        """``sources`` are the billing sources whose watermark a release
        waits for; ``recorded_clock`` stamps the release fact (the
        reconciler's, so both stamp on one clock)."""
        self.store = store
        self.coord = coord
        self.policy = policy
        self.config = config
        self.announcer = announcer
        self.name = name
        self.sources = sources
        self.clock = clock
        self._recorded_clock = recorded_clock
        self.metrics = metrics
        self.continuity = StoreContinuity(
            store, coord, policy.release_notice_ms, metrics, name=name
        )
        # The leader lease, whose fencing token a release needs: taken and
        # renewed by the reconciler's loop (or for one call, below).
        self.lease = Lease()
        # The data set in Redis this replica works on (see the store's
        # generation); after it changes, releases wait until every source
        # was read empty.
        self.generation: str | None = None
        self.resyncing = False
        self._caught_up: set[int] = set()
        # The latest dry-run plan per account: looked at again every minute,
        # so a list would grow by one entry a minute for each due account.
        self.releases_planned: dict[str, ReleasePlan] = {}

    @property
    def token(self) -> int:
        """The leader lease's fencing token while it is held, else 0: a lease
        not renewed in time counts as lost before Redis can give it to
        another replica."""
        return self.lease.token if self.lease.held() else 0

    @token.setter
    def token(self, value: int) -> None:
        self.lease.keep(value)

    def _compute(self, loaded: AccountFacts) -> dict[str, AppStatus]:
        return compute_account(
            loaded.facts, self.policy, now=self.clock(), recorded_at=loaded.recorded_at
        )

    async def schedule(self, account_id: str, statuses: dict[str, AppStatus], now: Millis) -> None:
        """Keep the account's release deadline at R10's time (plus the margin)
        while it is suspended for overdue."""
        if not statuses:
            return
        status = next(iter(statuses.values()))
        member = release_deadline(account_id)
        current = status.at(now)
        if Reason.RESOURCES_RELEASED in current.reasons:
            return  # the leader removes it once the release is announced
        for seg in (current, *status.upcoming(now)):
            if Reason.ACCOUNT_OVERDUE in seg.reasons and seg.release_at is not None:
                await self.coord.schedule(member, seg.release_at + self.config.release_margin_ms)
                return
        if Reason.ACCOUNT_OVERDUE in current.reasons:  # overdue with no release_at: held
            await self.coord.schedule(member, now + HELD_RECHECK_MS)
            return
        await self.coord.unschedule(member)

    async def plan(self, account_id: str, now: Millis) -> tuple[ReleasePlan, int]:
        """Whether the account's release (R10) could be done now, and the fact
        sequence that judgement rests on."""
        loaded = await self.store.load_account_facts(account_id)
        seq = loaded.seq
        statuses = self._compute(loaded)
        apps = tuple(sorted(statuses))
        notices = await self.announcer.notices_of(account_id, loaded, now)

        def result(release_at: Millis, eligible: bool, why: str) -> tuple[ReleasePlan, int]:
            return ReleasePlan(account_id, apps, release_at, eligible, why, notices), seq

        if not statuses:
            return result(0, False, "no registered application")
        seg = statuses[apps[0]].at(now)
        if Reason.RESOURCES_RELEASED in seg.reasons:
            return result(seg.release_at or 0, False, ALREADY_RELEASED)
        if Reason.ACCOUNT_OVERDUE in seg.reasons and seg.release_at is None:
            hold = sweep_until(loaded.facts, apps[0], now, self.policy, loaded.recorded_at).hold
            if isinstance(hold, ReleaseHoldSet):
                return result(
                    0,
                    False,
                    f"{HELD} since {format_time(hold.occurred_at)} by {hold.actor}: {hold.reason}",
                )
        if Reason.ACCOUNT_OVERDUE not in seg.reasons or seg.release_at is None:
            return result(0, False, "not suspended for overdue")
        evidence = await self.evidence(account_id, loaded, now)
        shown = evidence.describe() if evidence else "no overdue episode"

        def with_evidence(release_at: Millis, eligible: bool, why: str) -> tuple[ReleasePlan, int]:
            plan, seq = result(release_at, eligible, why)
            ready = evidence.ready_at if evidence else None
            return replace(plan, evidence=shown, ready_at=ready), seq

        due = seg.release_at + self.config.release_margin_ms
        if now < due:
            return with_evidence(seg.release_at, False, f"due at {format_time(due)}")
        mark = await applied_until(self.sources)
        if mark is None or mark < due:
            seen = format_time(mark) if mark is not None else "unknown"
            return with_evidence(
                seg.release_at, False, f"billing feed confirmed read only up to {seen}"
            )
        # R10: committed on evidence read now, not on the computed date.
        if evidence is None or not evidence.complete:
            return with_evidence(seg.release_at, False, f"{NO_EVIDENCE}: {shown}")
        return with_evidence(seg.release_at, True, "due")

    async def evidence(self, account_id: str, loaded: AccountFacts, now: Millis) -> Evidence | None:
        """R10 (a) and (c): the notice on record the release of the account's
        overdue episode would rest on now (None: no episode leads to one)."""
        episode = overdue_notice(loaded.facts, self.policy, now, loaded.recorded_at)
        if episode is None:
            return None
        alert, _, release_at = episode
        series = notice_episode(alert, release_at, self.policy, loaded.recorded_at)
        pause = await self.continuity.pause()
        run_ids = self.continuity.run_ids
        return release_evidence(
            await self.announcer.ledger(account_id),
            series,
            now,
            self.policy.release_notice_ms,
            pause,
            tuple(run_ids.split(",")) if run_ids else None,
        )

    async def check_generation(self) -> bool:
        """Read the store's generation (creating it on a new store); True if
        it changed: Redis lost its data or was reloaded, so releases are
        refused until the billing sources have been read to their end again."""
        gen = await self.store.ensure_generation()
        if self.generation is None or gen == self.generation:
            self.generation = gen
            return False
        log.warning(
            "Redis holds a new data set (generation %s, was %s): releases are refused until "
            "the billing feed is read again",
            gen,
            self.generation,
        )
        self.generation = gen
        self.resyncing = True
        self._caught_up.clear()
        if self.metrics is not None:
            self.metrics.on_generation_change()
        return True

    def source_read_empty(self, source: BillingSource) -> None:
        """Note that ``source`` was read to its end; once every source was
        since the data set changed, releases are allowed."""
        if not self.resyncing:
            return
        self._caught_up.add(id(source))
        if all(id(s) in self._caught_up for s in self.sources):
            self.resyncing = False
            log.info("billing feed read again after the new data set: releases allowed")

    @asynccontextmanager
    async def lease_for_the_call(self) -> AsyncIterator[None]:
        """Only the holder of the leader lease commits a release. A
        reconciler that is not running as the leader takes the lease for the
        call if no one holds it, and gives it back afterwards."""
        if self.token:
            yield
            return
        sent = time.monotonic()
        ttl = self.config.lease_ttl_ms
        self.lease.note(await self.coord.hold_lease(self.name, ttl), sent, ttl)
        try:
            yield
        finally:
            if self.lease.token:
                await self.coord.resign(self.name)
            self.lease.lose()

    async def release_if_due(self, account_id: str, now: Millis) -> ReleasePlan:
        """R10: commit the account's release if, on the facts as they are now
        in Redis and with the feed confirmed read past ``release_at``, it is
        due (the plan then says ``released``).

        Committed only under the lease (:meth:`lease_for_the_call`), only if
        no newer leader has fenced the account and the account's facts are
        still exactly those the decision rests on (otherwise it decides
        again)."""
        member = release_deadline(account_id)
        pause = await self.continuity.check(now)
        if self.resyncing:
            plan, _ = await self.plan(account_id, now)
            return replace(plan, eligible=False, why=RESYNCING)
        token = self.token
        if token and not await self.coord.fence_account(account_id, token):
            log.warning("not releasing %s: a newer leader has fenced it", account_id)
            return ReleasePlan(account_id, (), 0, False, FENCED)
        plan, seq = await self.plan(account_id, now)
        for _round in range(MAX_ROUNDS):
            if plan.why == ALREADY_RELEASED:
                await self.finish(account_id, plan.app_ids, now)
                return plan
            if not plan.eligible:
                if plan.why.startswith(NO_EVIDENCE) and plan.ready_at is None:
                    plan = await self._announce_evidence(plan, pause, now)
                if plan.release_at:
                    due = plan.release_at + self.config.release_margin_ms
                    await self.coord.schedule(member, max(now + RETRY_MS, due, plan.ready_at or 0))
                elif plan.why.startswith(HELD):
                    await self.coord.schedule(member, now + HELD_RECHECK_MS)
                else:
                    await self.coord.unschedule(member)
                if await self.coord.account_seq(account_id) == seq:
                    return plan
                # New facts meanwhile: their writer may have scheduled the
                # release before this replica unscheduled it. Decide again.
                plan, seq = await self.plan(account_id, now)
                continue
            if self.config.release_dry_run:
                log.warning(
                    "dry run: would release account %s (apps %s), release_at %s",
                    account_id,
                    ",".join(plan.app_ids),
                    format_time(plan.release_at),
                )
                self.releases_planned[account_id] = plan
                await self.coord.schedule(member, now + 60_000)
                return plan
            res = await self._commit(plan, seq, now)
            if isinstance(res, ReleasePlan):
                return res
            if res == -1:
                log.warning("release of %s refused: a newer leader holds the lease", account_id)
                return replace(plan, eligible=False, why=FENCED)
            if res == -2:
                # New facts arrived between the decision and the commit: decide again.
                plan, seq = await self.plan(account_id, now)
                continue
            log.warning(
                "released account %s (apps %s)",
                account_id,
                ",".join(plan.app_ids),
                extra={
                    "event": "resources_released",
                    "account_id": account_id,
                    "app_ids": list(plan.app_ids),
                },
            )
            if self.metrics is not None:
                self.metrics.on_release()
            return replace(plan, released=True)
        await self.coord.schedule(member, now + RETRY_MS)
        return plan

    async def _commit(self, plan: ReleasePlan, seq: int, now: Millis) -> ReleasePlan | int:
        """Record the release fact under the leader lease: the script's
        answer (lua/release.lua), or the plan refused for want of the lease."""
        account_id = plan.account_id
        token = self.token
        if not token or await self.coord.lease_token(self.name) != token:
            log.warning("not releasing %s: %s does not hold the lease", account_id, self.name)
            return replace(plan, eligible=False, why=NOT_LEADER)
        fact = ResourcesReleased(
            event_id=f"lcic-guard:release:{account_id}:{plan.release_at}",
            occurred_at=now,
            account_id=account_id,
            release_at=plan.release_at,
        )
        recorded = await self._recorded_clock()
        # Looked at again with nothing awaited before the commit: a lease
        # that lapsed (or passed to another) meanwhile is not used.
        if self.token != token:
            log.warning("not releasing %s: the lease lapsed before the commit", account_id)
            return replace(plan, eligible=False, why=NOT_LEADER)
        return await self.coord.record_release(account_id, token, seq, fact, recorded)

    async def _announce_evidence(
        self, plan: ReleasePlan, pause: Pause | None, now: Millis
    ) -> ReleasePlan:
        """No notice on record proves the customer was told in time: tell
        them now (not in a dry run), and the release waits a notice period."""
        if self.config.release_dry_run:
            return plan
        loaded = await self.store.load_account_facts(plan.account_id)
        basis = pause.since if pause is not None and pause.lifted_by_snapshot_at is None else 0
        record = await self.announcer.evidence_notice(
            plan.account_id, loaded, plan.app_ids, plan.release_at, basis, now
        )
        if record is None or record.committed_at is None:
            return replace(plan, ready_at=now + STALE_OUTBOX_MS)  # another replica makes it
        ready = max(
            record.committed_at + self.policy.release_notice_ms,
            record.dates.get("release_at", 0),
        )
        return replace(plan, ready_at=ready, evidence=f"notice {record.announcement_id} made now")

    async def finish(self, account_id: str, app_ids: Iterable[str], now: Millis) -> None:
        """Announce a recorded release; unschedule it once it is on the stream,
        else come back when a claimed announcement counts as abandoned."""
        member = release_deadline(account_id)
        if await self.announcer.release(account_id, app_ids, now):
            await self.coord.unschedule(member)
        else:
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)

    async def plan_all(self, now: Millis) -> list[ReleasePlan]:
        """Every scheduled release and whether it could happen now (dry run)."""
        await self.continuity.check(now)
        out = []
        for member, _ in await self.coord.scheduled(release_deadline("")):
            plan, _ = await self.plan(deadline_of(member)[1], now)
            out.append(plan)
        return out

    # -- loops ----------------------------------------------------------------
