"""The reconciler: billing facts into the status table, deadlines on time,
and release of resources (R10) only when it is certain.

Any number of replicas may run. Ingest is shared through the sources (the
stream's consumer group); deadline work and release are done by the holder
of a Redis lease, and release is additionally fenced and compare-and-set on
the account's fact sequence, so a paused or stale leader cannot commit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from lcic_guard.checker import wall_clock
from lcic_guard.facts import (
    ApplicationRegistered,
    Fact,
    InvalidEvent,
    Millis,
    ResourcesReleased,
    account_of,
    app_of,
    format_time,
    parse_event_json,
)
from lcic_guard.policy import (
    HOUR,
    AppStatus,
    PolicyConfig,
    Reason,
    Segment,
    compute_account,
)
from lcic_guard.ratelimit import RateLimitedLog, describe_error
from lcic_guard.sources import BillingSource, Delivery
from lcic_guard.store import Coordination, Outbox, Store, meta_key, status_key

if TYPE_CHECKING:
    from lcic_guard.metrics import ReconcilerMetrics

log = logging.getLogger(__name__)

ANNOUNCED_FIELD = "announced"
RELEASE_FIELD = "released"
# An outbox older than this was left by a writer that died before announcing.
STALE_OUTBOX_MS = 10_000
RETRY_MS = 5_000
ALREADY_RELEASED = "already released"
RESYNCING = "Redis holds a new data set: waiting until the billing feed is read again"
NOT_LEADER = "not the leader: another reconciler holds the lease"
FENCED = "fenced off: a newer leader has acted on the account"
# How often a replica redoes its work on an account whose facts keep changing
# under it before leaving the rest to the replicas that changed them.
MAX_ROUNDS = 20
# Independent store calls in flight at once during ingest (well under the
# connection pool's size).
CONCURRENCY = 32
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReconcilerConfig:
    batch_size: int = 500
    block_ms: int = 500
    lease_ttl_ms: int = 5_000
    tick_ms: int = 250
    release_margin_ms: int = HOUR
    """R10: how far past ``release_at`` the feed must be confirmed read."""
    release_dry_run: bool = False
    """Report releases that fall due without performing them."""
    claim_idle_ms: int = 30_000
    """How long a billing-stream entry may stay unacknowledged by a consumer
    before another replica claims it (the consumer is presumed dead)."""


@dataclass
class IngestStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    parked: int = 0
    accounts: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    account_id: str
    app_ids: tuple[str, ...]
    release_at: Millis
    eligible: bool
    why: str


def _state_key(seg: Segment) -> str:
    return json.dumps([seg.state.value, [r.value for r in seg.reasons]], separators=(",", ":"))


class Reconciler:
    def __init__(
        self,
        store: Store,
        policy: PolicyConfig,
        config: ReconcilerConfig | None = None,
        sources: Sequence[BillingSource] = (),
        *,
        clock: Callable[[], Millis] = wall_clock,
        name: str | None = None,
        metrics: ReconcilerMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.coord = Coordination(store)
        self.policy = policy
        self.config = config or ReconcilerConfig()
        self.sources = list(sources)
        self.clock = clock
        self.name = name or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.token = 0
        # The data set in Redis this replica works on (see store.GENERATION);
        # after it changes, releases wait until every source was read empty.
        self.generation: str | None = None
        self.resyncing = False
        self._caught_up: set[int] = set()
        self._warn = RateLimitedLog(log)
        self.releases_done: list[str] = []
        self.releases_planned: list[ReleasePlan] = []

    # -- ingest ---------------------------------------------------------------

    async def ingest(self, deliveries: Sequence[Delivery]) -> IngestStats:
        """Apply a batch of raw events. Durable in Redis when it returns; the
        caller then acknowledges the deliveries."""
        stats = IngestStats(received=len(deliveries))
        by_account: dict[str, list[Fact]] = defaultdict(list)
        parked_moved: dict[str, list[str]] = defaultdict(list)
        raw_of: dict[str, list[Delivery]] = defaultdict(list)
        parsed: list[tuple[Delivery, Fact]] = []
        for d in deliveries:
            try:
                fact = parse_event_json(d.raw)
            except InvalidEvent as exc:
                await self.store.dead_letter(d.raw, exc.reason, d.source)
                stats.dead_lettered += 1
                continue
            raw_of[fact.event_id].append(d)
            parsed.append((d, fact))
        # Each event's routing is a one-key script: independent, so they run
        # concurrently; the results are used in delivery order.
        routes = await self._bounded([self._route(fact) for _, fact in parsed])
        for (d, fact), (owner, parked) in zip(parsed, routes, strict=True):
            if isinstance(fact, ApplicationRegistered):
                if owner != fact.account_id:
                    await self.store.dead_letter(
                        d.raw, f"app_id: already registered to account {owner}", d.source
                    )
                    stats.dead_lettered += 1
                    continue
                by_account[owner] += [fact, *parked]
                parked_moved[fact.app_id] += [p.event_id for p in parked]
                continue
            if owner is None:
                # Kept, and applied when the app's registration arrives:
                # events may come in any order.
                app_id = app_of(fact) or ""
                await self.store.dead_letter(
                    d.raw,
                    f"app_id: unknown application {app_id} (parked until it is registered)",
                    d.source,
                )
                stats.parked += 1
                continue
            by_account[owner].append(fact)
        added = await self._bounded(
            [self.store.add_facts(account, facts) for account, facts in by_account.items()]
        )
        for (account, facts), res in zip(by_account.items(), added, strict=True):
            stats.applied += res.added
            stats.duplicates += len(facts) - res.added - len(res.conflicts)
            for event_id in res.conflicts:
                # The rejected event itself when this batch delivered it once
                # (it may also be a parked fact: then only its id is known).
                carriers = raw_of.get(event_id, [])
                raw, source = (
                    (carriers[0].raw, carriers[0].source)
                    if len(carriers) == 1
                    else (json.dumps({"event_id": event_id}), "reconciler")
                )
                await self.store.dead_letter(
                    raw,
                    f"event_id: {event_id} reused with different content (the first one is kept)",
                    source,
                )
                stats.dead_lettered += 1
            stats.accounts.add(account)
        for app_id, ids in parked_moved.items():
            await self.store.drop_parked(app_id, ids)
        accounts = sorted(stats.accounts)
        unknown = await self._bounded([self.recompute(a) for a in accounts])
        for account, none_registered in zip(accounts, unknown, strict=True):
            if none_registered:
                stats.parked += len(by_account[account])
        if self.metrics is not None:
            self.metrics.on_ingest(stats)
        return stats

    async def _route(self, fact: Fact) -> tuple[str | None, list[Fact]]:
        """The account a fact belongs to (None: parked) and, for a
        registration, the facts that were parked waiting for it."""
        if isinstance(fact, ApplicationRegistered):
            return await self.store.claim_app(fact.app_id, fact.account_id)
        account = account_of(fact)
        if account is not None:
            return account, []
        return await self.store.route_app_fact(app_of(fact) or "", fact), []

    async def _bounded(self, calls: Sequence[Awaitable[T]]) -> list[T]:
        """Run independent store calls concurrently, at most CONCURRENCY at once."""
        if len(calls) <= 1:
            return [await c for c in calls]
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(call: Awaitable[T]) -> T:
            async with sem:
                return await call

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def recompute(self, account_id: str) -> bool:
        """Recompute and write every status of the account. Returns True if
        the account has no registered application yet.

        A replica that read the facts and was overtaken by another that added
        more cannot undo the newer status: its write is refused (versions),
        its announcements are refused (claimed only from the stored version),
        and its deadline updates are redone from the newer facts, because the
        account's sequence is checked again after them."""
        statuses: dict[str, AppStatus] = {}
        for _round in range(MAX_ROUNDS):
            seq, facts = await self.store.load_account(account_id)
            statuses = compute_account(facts, self.policy, now=self.clock())
            now = self.clock()
            # Accounts are recomputed concurrently; one account's apps in turn,
            # so concurrency (and connections) stay bounded by CONCURRENCY.
            for st in statuses.values():
                status = AppStatus(st.app_id, account_id, st.segments, version=seq, updated_at=now)
                await self._write_app(status, now)
            await self._schedule_release(account_id, statuses, now)
            if await self.coord.account_seq(account_id) == seq:
                break
        else:
            log.warning("facts of account %s kept changing while it was recomputed", account_id)
        return not statuses

    async def _write_app(self, status: AppStatus, now: Millis) -> None:
        await self.store.write_status(status)
        # Published even when the write was a no-op: a replica that died
        # between its write and this notice is covered by the redelivery.
        await self.store.publish_change(status)
        await self._announce_and_schedule(status, now)

    async def _announce_and_schedule(self, status: AppStatus, now: Millis) -> None:
        settled = await self.announce_change(status, now)
        await self._schedule_app(status, now)
        if not settled:
            # Another announcement is in flight: look again once it must be done.
            await self.coord.schedule(
                f"app:{status.app_id}", now + STALE_OUTBOX_MS, only_earlier=True
            )

    async def _schedule_app(self, status: AppStatus, now: Millis) -> None:
        upcoming = status.upcoming(now)
        member = f"app:{status.app_id}"
        if upcoming:
            await self.coord.schedule(member, upcoming[0].starts_at)
        else:
            await self.coord.unschedule(member)

    async def _schedule_release(
        self, account_id: str, statuses: dict[str, AppStatus], now: Millis
    ) -> None:
        if not statuses:
            return
        status = next(iter(statuses.values()))
        member = f"release:{account_id}"
        current = status.at(now)
        if Reason.RESOURCES_RELEASED in current.reasons:
            return  # the leader removes it once the release is announced
        for seg in (current, *status.upcoming(now)):
            if Reason.ACCOUNT_OVERDUE in seg.reasons and seg.release_at is not None:
                await self.coord.schedule(member, seg.release_at + self.config.release_margin_ms)
                return
        await self.coord.unschedule(member)

    # -- announcements ----------------------------------------------------------

    async def announce_change(self, status: AppStatus, now: Millis) -> bool:
        """Announce the app's state at ``now`` if it differs from the last one
        announced: claimed atomically, so racing replicas announce it once.

        Returns False when it could not be settled now (another announcement
        of the app is in flight, or another replica claimed first): the
        caller makes sure the app is looked at again."""
        key = status_key(status.app_id)
        announced, outbox = await self.coord.cursor(key, ANNOUNCED_FIELD)
        # An announcement in flight: left to its writer unless presumed dead.
        if outbox is not None and (
            now - outbox.at < STALE_OUTBOX_MS
            or not await self._flush(key, ANNOUNCED_FIELD, outbox, now)
        ):
            return False
        seg = status.at(now)
        new = _state_key(seg)
        if new == announced:
            return True
        old = json.loads(announced) if announced else [None, []]
        at = seg.starts_at if seg.starts_at <= now else now
        event = {
            "type": "status_changed",
            "announcement_id": f"{status.app_id}:{status.version}:{at}:{new}",
            "occurred_at": format_time(at),
            "app_id": status.app_id,
            "account_id": status.account_id,
            "old_state": old[0],
            "old_reasons": old[1],
            "new_state": seg.state.value,
            "reasons": [r.value for r in seg.reasons],
            "version": status.version,
            "suspended_at": format_time(seg.suspended_at) if seg.suspended_at else None,
            "grace_ends_at": format_time(seg.grace_ends_at) if seg.grace_ends_at else None,
            "release_at": format_time(seg.release_at) if seg.release_at else None,
        }
        payload = json.dumps(event, sort_keys=True)
        # A writer that dies between the claim and the stream leaves the
        # outbox; this deadline makes the leader finish it.
        await self.coord.schedule(f"app:{status.app_id}", now + STALE_OUTBOX_MS, only_earlier=True)
        if await self.coord.claim_status(
            status.app_id, ANNOUNCED_FIELD, announced, new, payload, now, status.version
        ):
            await self.store.announce(event)
            await self.coord.finish(key, ANNOUNCED_FIELD, payload)
            log.info(
                "%s: %s -> %s (%s)",
                status.app_id,
                old[0],
                seg.state.value,
                ",".join(event["reasons"]) or "OK",
                extra={
                    k: event[k]
                    for k in ("app_id", "account_id", "old_state", "new_state", "reasons")
                }
                | {"event": "status_changed", "status_version": status.version},
            )
            if self.metrics is not None:
                self.metrics.on_status_change()
            return True
        return False

    async def _flush(self, key: str, cursor: str, outbox: Outbox, now: Millis) -> bool:
        """Finish an announcement a writer claimed but may not have made.

        The outbox is taken over atomically first, so of several replicas
        that find it abandoned exactly one finishes it. Returns True if this
        one did."""
        if not await self.coord.take_outbox(key, cursor, outbox.payload, now, STALE_OUTBOX_MS):
            return False
        event = json.loads(outbox.payload)
        if not await self.coord.on_stream(event["announcement_id"], outbox.at - 1000):
            await self.store.announce(event)
        await self.coord.finish(key, cursor, outbox.payload)
        return True

    # -- deadlines and release (leader only) -----------------------------------

    async def run_deadlines(self, now: Millis | None = None) -> int:
        """Process every deadline due at ``now``. Returns how many were."""
        now = self.clock() if now is None else now
        done = 0
        for member, _due in await self.coord.due(now):
            kind, _, ident = member.partition(":")
            if kind == "app":
                # Redone if the status changed meanwhile, so that a schedule
                # made from an older status does not replace a newer one's.
                for _round in range(MAX_ROUNDS):
                    status, _ = await self.store.read_status(ident)
                    if status is None:
                        await self.coord.unschedule(member)
                        break
                    await self._announce_and_schedule(status, now)
                    if await self.coord.status_version(ident) == status.version:
                        break
            elif kind == "release":
                await self.try_release(ident, now)
            else:
                await self.coord.unschedule(member)
            done += 1
        if self.metrics is not None:
            self.metrics.on_deadlines(done)
        return done

    async def watermark(self) -> Millis | None:
        """The time before which every source's events are applied."""
        # A fully applied file vouches only for the moment it was loaded; once
        # a live feed exists, that feed alone bounds what may still arrive.
        live = [s for s in self.sources if not getattr(s, "exhausted", False)]
        if any(getattr(s, "exhausted", False) is False and hasattr(s, "exhausted") for s in live):
            return None  # a file is still being applied
        marks = [await s.watermark() for s in (live or self.sources)]
        if not marks or any(m is None for m in marks):
            return None
        return min(m for m in marks if m is not None)

    async def release_plan(self, account_id: str, now: Millis) -> tuple[ReleasePlan, int]:
        """Whether the account's release (R10) could be done now, and the fact
        sequence that judgement rests on."""
        seq, facts = await self.store.load_account(account_id)
        statuses = compute_account(facts, self.policy, now=self.clock())
        apps = tuple(sorted(statuses))

        def plan(release_at: Millis, eligible: bool, why: str) -> tuple[ReleasePlan, int]:
            return ReleasePlan(account_id, apps, release_at, eligible, why), seq

        if not statuses:
            return plan(0, False, "no registered application")
        seg = statuses[apps[0]].at(now)
        if Reason.RESOURCES_RELEASED in seg.reasons:
            return plan(seg.release_at or 0, False, ALREADY_RELEASED)
        if Reason.ACCOUNT_OVERDUE not in seg.reasons or seg.release_at is None:
            return plan(0, False, "not suspended for overdue")
        due = seg.release_at + self.config.release_margin_ms
        if now < due:
            return plan(seg.release_at, False, f"due at {format_time(due)}")
        mark = await self.watermark()
        if mark is None or mark < due:
            seen = format_time(mark) if mark is not None else "unknown"
            return plan(seg.release_at, False, f"billing feed confirmed read only up to {seen}")
        return plan(seg.release_at, True, "due")

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

    def _source_read_empty(self, source: BillingSource) -> None:
        if not self.resyncing:
            return
        self._caught_up.add(id(source))
        if all(id(s) in self._caught_up for s in self.sources):
            self.resyncing = False
            log.info("billing feed read again after the new data set: releases allowed")

    async def try_release(self, account_id: str, now: Millis) -> ReleasePlan:
        """R10: release the account if, on the facts as they are now in Redis
        and with the feed confirmed read past ``release_at``, it is due.

        Only the holder of the leader lease commits a release, and only if no
        newer leader has fenced the account and the account's facts are still
        exactly those the decision rests on (otherwise it decides again). A
        reconciler that is not running as the leader takes the lease for the
        call if no one holds it, and gives it back afterwards."""
        if self.token:
            return await self._try_release(account_id, now)
        self.token = await self.coord.hold_lease(self.name, self.config.lease_ttl_ms)
        try:
            return await self._try_release(account_id, now)
        finally:
            if self.token:
                await self.coord.resign(self.name)
            self.token = 0

    async def _try_release(self, account_id: str, now: Millis) -> ReleasePlan:
        member = f"release:{account_id}"
        if self.resyncing:
            plan, _ = await self.release_plan(account_id, now)
            return replace(plan, eligible=False, why=RESYNCING)
        if self.token and not await self.coord.fence_account(account_id, self.token):
            log.warning("not releasing %s: a newer leader has fenced it", account_id)
            return ReleasePlan(account_id, (), 0, False, FENCED)
        plan, seq = await self.release_plan(account_id, now)
        for _round in range(MAX_ROUNDS):
            if plan.why == ALREADY_RELEASED:
                await self._finish_release(account_id, plan.app_ids, now)
                return plan
            if not plan.eligible:
                if plan.release_at:
                    due = plan.release_at + self.config.release_margin_ms
                    await self.coord.schedule(member, max(now + RETRY_MS, due))
                else:
                    await self.coord.unschedule(member)
                if await self.coord.account_seq(account_id) == seq:
                    return plan
                # New facts meanwhile: their writer may have scheduled the
                # release before this replica unscheduled it. Decide again.
                plan, seq = await self.release_plan(account_id, now)
                continue
            if self.config.release_dry_run:
                log.warning(
                    "dry run: would release account %s (apps %s), release_at %s",
                    account_id,
                    ",".join(plan.app_ids),
                    format_time(plan.release_at),
                )
                self.releases_planned.append(plan)
                await self.coord.schedule(member, now + 60_000)
                return plan
            if not self.token or await self.coord.lease_token(self.name) != self.token:
                log.warning("not releasing %s: %s does not hold the lease", account_id, self.name)
                return replace(plan, eligible=False, why=NOT_LEADER)
            fact = ResourcesReleased(
                event_id=f"lcic-guard:release:{account_id}:{plan.release_at}",
                occurred_at=now,
                account_id=account_id,
            )
            res = await self.coord.record_release(account_id, self.token, seq, fact)
            if res == -1:
                log.warning("release of %s refused: a newer leader holds the lease", account_id)
                return replace(plan, eligible=False, why=FENCED)
            if res == -2:
                # New facts arrived between the decision and the commit: decide again.
                plan, seq = await self.release_plan(account_id, now)
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
            await self.recompute(account_id)
            await self._finish_release(account_id, plan.app_ids, now)
            self.releases_done.append(account_id)
            return plan
        await self.coord.schedule(member, now + RETRY_MS)
        return plan

    async def _finish_release(self, account_id: str, app_ids: Iterable[str], now: Millis) -> None:
        """Announce a recorded release; unschedule it once it is on the stream,
        else come back when a claimed announcement counts as abandoned."""
        member = f"release:{account_id}"
        if await self._announce_release(account_id, app_ids, now):
            await self.coord.unschedule(member)
        else:
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)

    async def _announce_release(self, account_id: str, app_ids: Iterable[str], now: Millis) -> bool:
        """Exactly once per account: claim in the account's meta hash, add to
        the stream, clear the outbox. An outbox left by a writer presumed dead
        is finished after checking the stream first; a recent one is left to
        its writer. Returns True once the announcement is known to be made."""
        key = meta_key(account_id)
        cursor, outbox = await self.coord.cursor(key, RELEASE_FIELD)
        if outbox is not None:
            if now - outbox.at < STALE_OUTBOX_MS:
                return False  # its writer is probably adding it right now
            return await self._flush(key, RELEASE_FIELD, outbox, now)
        if cursor:
            return True
        event = {
            "type": "resources_released",
            "announcement_id": f"release:{account_id}",
            "occurred_at": format_time(now),
            "account_id": account_id,
            "app_ids": sorted(app_ids),
        }
        payload = json.dumps(event, sort_keys=True)
        if await self.coord.claim(key, RELEASE_FIELD, "", "1", payload, now):
            await self.store.announce(event)
            await self.coord.finish(key, RELEASE_FIELD, payload)
            return True
        return False

    async def plan_releases(self, now: Millis | None = None) -> list[ReleasePlan]:
        """Every scheduled release and whether it could happen now (dry run)."""
        now = self.clock() if now is None else now
        out = []
        for member, _ in await self.coord.scheduled("release:"):
            plan, _ = await self.release_plan(member.partition(":")[2], now)
            out.append(plan)
        return out

    # -- loops ----------------------------------------------------------------

    async def ingest_source(self, source: BillingSource) -> IngestStats:
        """One fetch-apply-ack round for one source."""
        deliveries = await source.fetch(self.config.batch_size, self.config.block_ms)
        if not deliveries:
            self._source_read_empty(source)
            return IngestStats()
        stats = await self.ingest(deliveries)
        await source.ack(deliveries)
        return stats

    async def drain(self, source: BillingSource) -> IngestStats:
        """Apply everything a finite source holds (a snapshot file)."""
        total = IngestStats()
        while True:
            stats = await self.ingest_source(source)
            if stats.received == 0:
                return total
            total.received += stats.received
            total.applied += stats.applied
            total.dead_lettered += stats.dead_lettered

    async def _source_loop(self, source: BillingSource, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.ingest_source(source)
                if getattr(source, "exhausted", False):
                    await asyncio.sleep(self.config.block_ms / 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._warn.warning(
                    f"ingest:{source.name}",
                    "ingest from %s failed (%s); retrying",
                    source.name,
                    describe_error(exc),
                )
                if self.metrics is not None:
                    self.metrics.on_error("ingest")
                await asyncio.sleep(1.0)

    async def _leader_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                now = self.clock()
                await self.check_generation()
                await self.coord.heartbeat(now)
                token = await self.coord.hold_lease(self.name, self.config.lease_ttl_ms)
                if token and token != self.token:
                    log.info("%s is now the leader (token %d)", self.name, token)
                elif not token and self.token:
                    log.info("%s lost the lead", self.name)
                if token != self.token and self.metrics is not None:
                    self.metrics.on_leadership(bool(token))
                self.token = token
                if token:
                    await self.run_deadlines(now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._warn.warning(
                    "deadlines", "deadline work failed (%s); retrying", describe_error(exc)
                )
                if self.metrics is not None:
                    self.metrics.on_error("deadlines")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.tick_ms / 1000)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._source_loop(s, stop)) for s in self.sources]
        tasks.append(asyncio.create_task(self._leader_loop(stop)))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.coord.resign(self.name)
