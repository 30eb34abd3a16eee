"""The reconciler: billing facts into the status table, and deadlines on
time. Its parts: ingest and recompute here, announcements in
:mod:`.announce`, release (R10) in :mod:`.release`.

Any number of replicas may run. Ingest is shared through the sources (the
stream's consumer group); deadline work and release are done by the holder
of a Redis lease (see :mod:`.release` for how a release is made certain).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Final, TypeVar

from lcic_guard.domain.facts import (
    RESERVED_REASON,
    ApplicationRegistered,
    Fact,
    InvalidEvent,
    account_of,
    app_of,
    parse_event_json,
    to_json,
)
from lcic_guard.domain.policy import (
    AppStatus,
    PolicyConfig,
    Reason,
    compute_account,
    overdue_notice,
)
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.logs import RateLimitedLog, describe_error
from lcic_guard.reconciler.announce import ANNOUNCED_FIELD, Announcer
from lcic_guard.reconciler.config import (
    BACKLOG_LANE,
    CONCURRENCY,
    DEADLINE_CONCURRENCY,
    FRESH_LANE,
    MAX_ROUNDS,
    RECHECK_LANE,
    RETRY_MS,
    ReconcilerConfig,
)
from lcic_guard.reconciler.deadlines import DeadlineLanes
from lcic_guard.reconciler.hooks import NO_HOOKS, ReconcilerHooks
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.reconciler.release import ReleasePlan, Releaser
from lcic_guard.reconciler.sources import BillingSource, Delivery, applied_until
from lcic_guard.reconciler.stats import IngestStats
from lcic_guard.store.coordination import Coordination, Outbox
from lcic_guard.store.keys import (
    DEADLINE_SHARDS,
    DEADLINES,
    MAX_EVENT_BYTES,
    OVERSIZED_KEEP,
    app_deadline,
    deadline_key,
    deadline_of,
    release_deadline,
    shard_deadlines,
    shard_rechecks,
)
from lcic_guard.store.status import AccountFacts, Ownership, Store
from lcic_guard.tasks import stop_task, stop_tasks, wait_event

# How often every replica writes a progress mark on each feed shard.
MARK_INTERVAL_S: Final = 1.0
log = logging.getLogger(__name__)
T = TypeVar("T")


def _lifted(clock: Callable[[], Millis]) -> Callable[[], Awaitable[Millis]]:
    async def read() -> Millis:
        return clock()

    return read


@dataclass
class _Routed:
    """A batch's accepted facts by the account they go to, and what routing
    them left to tidy once they are added."""

    by_account: dict[str, dict[str, Fact]] = field(default_factory=partial(defaultdict, dict))
    parked_moved: dict[str, list[str]] = field(default_factory=partial(defaultdict, list))
    """Parked facts a registration took along, by app: dropped once added."""
    cleanups: set[tuple[str, str]] = field(default_factory=set)
    """(app, account): the app's facts leave that account, which does not own it."""


class Reconciler:
    """Owns the sequence of the reconciler's work: a batch is validated,
    claimed, routed, added and cleaned, and each account it touched is
    recomputed; a recomputation writes the statuses, then has the releaser
    schedule the account's release; a release the releaser commits is
    followed by the account's recomputation and the release's announcement.
    The parts it calls (announcer, releaser) never call back into it."""

    def __init__(
        self,
        store: Store,
        policy: PolicyConfig,
        config: ReconcilerConfig | None = None,
        sources: Sequence[BillingSource] = (),
        *,
        clock: Callable[[], Millis] = wall_clock,
        recorded_clock: Callable[[], Awaitable[Millis]] | None = None,
        name: str | None = None,
        metrics: ReconcilerMetrics | None = None,
        hooks: ReconcilerHooks = NO_HOOKS,
    ) -> None:
        """``recorded_clock`` stamps when facts are first stored (the second
        clock of every fact), and a release: Redis's clock by default, so that
        every replica stamps on one clock; a reconciler run on a clock of its
        own (a simulation) stamps on that one. ``hooks`` are put around each
        batch, recomputation and release (tracing)."""
        self.store = store
        if recorded_clock is None:
            recorded_clock = store.server_time if clock is wall_clock else _lifted(clock)
        self._recorded_clock = recorded_clock
        self.metrics = metrics
        self.hooks = hooks
        self.coord = Coordination(store)
        self.policy = policy
        self.config = config or ReconcilerConfig()
        self._sources = list(sources)
        self.clock = clock
        self.name = name or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._warn = RateLimitedLog(log)
        self._snapshot_started: dict[int, Millis] = {}
        self._snapshot_done: set[int] = set()
        self.continuity_detail = "store continuity not checked yet"
        self.releases_done: list[str] = []
        self.announcer = Announcer(store, self.coord, policy, self.config, metrics)
        self.releaser = Releaser(
            store,
            self.coord,
            policy,
            self.config,
            self.announcer,
            name=self.name,
            sources=self._sources,
            clock=clock,
            recorded_clock=recorded_clock,
            metrics=metrics,
        )
        self.lanes = DeadlineLanes(
            self.coord,
            self.name,
            leader=self.releaser.lease,
            work=self.deadline_batch,
            clock=clock,
            ttl_ms=self.config.lease_ttl_ms,
            idle_s=self.config.tick_ms / 1000,
            metrics=metrics,
        )
        # Each shard's re-checks, worked with its transitions.
        self._rechecks = {shard_deadlines(s): shard_rechecks(s) for s in range(DEADLINE_SHARDS)}
        # Deadline work in flight at once, over every set this replica works.
        self._deadline_slots = asyncio.Semaphore(DEADLINE_CONCURRENCY)
        # The leader lease's token the loop last saw, to log a change.
        self._led = 0

    @property
    def sources(self) -> list[BillingSource]:
        """The billing sources, one list shared with the releaser (whose
        releases wait for their watermark): changed in place, never rebound."""
        return self._sources

    @property
    def recorded_clock(self) -> Callable[[], Awaitable[Millis]]:
        """The one recording clock, shared with the releaser (fixed at
        construction; a batch recorded at another time says so to
        :meth:`ingest`)."""
        return self._recorded_clock

    # The lease and the release state live with the releaser; these are the
    # reconciler's view of them.
    @property
    def token(self) -> int:
        return self.releaser.token

    @token.setter
    def token(self, value: int) -> None:
        self.releaser.token = value

    @property
    def resyncing(self) -> bool:
        return self.releaser.resyncing

    @property
    def generation(self) -> str | None:
        return self.releaser.generation

    @property
    def releases_planned(self) -> list[ReleasePlan]:
        return list(self.releaser.releases_planned.values())

    # -- ingest ---------------------------------------------------------------

    async def ingest(
        self, deliveries: Sequence[Delivery], *, recorded_at: Millis | None = None
    ) -> IngestStats:
        """Apply a batch of raw events. Durable in Redis when it returns; the
        caller then acknowledges the deliveries.

        Its phases, in order: :meth:`_validate`, :meth:`_claim`,
        :meth:`_route`, :meth:`_add`, :meth:`_clean`, then
        :meth:`_recompute_touched`. An event dead-lettered at validation or
        claim has no effect at all. A crash anywhere leaves the deliveries
        unacknowledged; redelivered, they find their ids claimed with the
        same content and are applied again, which is idempotent.

        ``recorded_at`` stores the batch's new facts as first recorded then
        (a history loaded as if read live: the embedded sample) instead of
        by :attr:`recorded_clock`."""
        return await self.hooks.ingest(deliveries, self._ingest(deliveries, recorded_at))

    async def _ingest(
        self, deliveries: Sequence[Delivery], recorded_at: Millis | None
    ) -> IngestStats:
        stats = IngestStats(received=len(deliveries))
        by_id = await self._validate(deliveries, stats)
        accepted = await self._claim(by_id, stats)
        routed = await self._route(accepted, stats)
        await self._add(routed, by_id, stats, recorded_at)
        await self._clean(routed, stats)
        await self._recompute_touched(routed, stats)
        if self.metrics is not None:
            self.metrics.on_ingest(stats)
        return stats

    async def _validate(
        self, deliveries: Sequence[Delivery], stats: IngestStats
    ) -> dict[str, list[tuple[Delivery, Fact]]]:
        """Parse each delivery into a fact, dead-lettering what is too large
        or invalid; the facts by event id, in delivery order."""
        by_id: dict[str, list[tuple[Delivery, Fact]]] = {}
        # SPEC §2: nothing dated past the reconciler's own "now" (plus skew)
        # is recorded, so that no fact outranks what is done in the meantime.
        now = self.clock()
        for d in deliveries:
            size = len(d.raw.encode("utf-8", "surrogatepass"))
            if size > MAX_EVENT_BYTES:
                await self._dead_letter(
                    stats,
                    d.raw[:OVERSIZED_KEEP],
                    f"event: {size} bytes, over the limit of {MAX_EVENT_BYTES} "
                    f"(not parsed; its first {OVERSIZED_KEEP} characters are kept)",
                    d.source,
                    "too_large",
                )
                continue
            try:
                fact = parse_event_json(d.raw, now=now)
            except InvalidEvent as exc:
                kind = "reserved_id" if exc.reason == RESERVED_REASON else "invalid"
                await self._dead_letter(stats, d.raw, exc.reason, d.source, kind)
                continue
            by_id.setdefault(fact.event_id, []).append((d, fact))
        return by_id

    async def _claim(
        self, by_id: dict[str, list[tuple[Delivery, Fact]]], stats: IngestStats
    ) -> list[tuple[Delivery, Fact]]:
        """Claim each event id in the feed-wide event-id index: an id reused
        with other content is dead-lettered, a repeat is a duplicate. The
        facts to route, one per id."""
        # Claimed in delivery order: of one id's deliveries in this batch with
        # different content, the first claims it and the others conflict.
        distinct = list(dict.fromkeys(f for items in by_id.values() for _, f in items))
        verdict = dict(zip(distinct, await self.store.index_events(distinct), strict=True))
        accepted: list[tuple[Delivery, Fact]] = []
        for items in by_id.values():
            taken = False
            for d, fact in items:
                if verdict[fact] == 2:
                    await self._dead_letter(
                        stats,
                        d.raw,
                        f"event_id: {fact.event_id} reused with different content "
                        "(the first one is kept)",
                        d.source,
                        "conflict",
                    )
                elif taken:
                    stats.duplicates += 1
                else:
                    accepted.append((d, fact))
                    taken = True
        return accepted

    async def _route(self, accepted: list[tuple[Delivery, Fact]], stats: IngestStats) -> _Routed:
        """Find each fact's account: a registration claims its app (the
        earliest one owns it), a fact naming only an app follows the app's
        owner or is parked until the app is registered."""
        # Each event's routing is a one-key script: independent, so they run
        # concurrently; the results are used in delivery order.
        routes = await self._bounded([self._route_one(fact) for _, fact in accepted])
        routed = _Routed()
        for (d, fact), route in zip(accepted, routes, strict=True):
            if isinstance(fact, ApplicationRegistered):
                assert isinstance(route, Ownership)
                await self._route_registration(routed, stats, d, fact, route)
                continue
            assert not isinstance(route, Ownership)
            if route is None:
                # Kept, and applied when the app's registration arrives:
                # events may come in any order.
                stats.parked += 1
                continue
            routed.by_account[route][fact.event_id] = fact
        return routed

    async def _route_registration(
        self,
        routed: _Routed,
        stats: IngestStats,
        d: Delivery,
        fact: ApplicationRegistered,
        owner: Ownership,
    ) -> None:
        routed.cleanups.update((fact.app_id, a) for a in owner.moved_from)
        if owner.verdict == "later":
            await self._dead_letter(
                stats,
                d.raw,
                f"app_id: {fact.app_id} is registered to account {owner.owner} by an "
                "earlier registration (the earliest one owns the application)",
                d.source,
                "registration",
            )
            # A crash may have left it in its account's facts (added
            # before the app moved): make sure it is gone.
            routed.cleanups.add((fact.app_id, fact.account_id))
            return
        facts = routed.by_account[owner.owner]
        for f in (fact, *owner.parked):
            facts[f.event_id] = f
        routed.parked_moved[fact.app_id] += [p.event_id for p in owner.parked]

    async def _add(
        self,
        routed: _Routed,
        by_id: dict[str, list[tuple[Delivery, Fact]]],
        stats: IngestStats,
        recorded_at: Millis | None,
    ) -> None:
        """Add each account's facts, stamped with when they were first
        recorded; a fact whose id the account holds with other content is
        dead-lettered."""
        if not routed.by_account:
            return
        recorded = recorded_at if recorded_at is not None else await self._recorded_clock()
        added = await self._bounded(
            [
                self.store.add_facts(account, facts.values(), recorded_at=recorded)
                for account, facts in routed.by_account.items()
            ]
        )
        for (account, facts), res in zip(routed.by_account.items(), added, strict=True):
            stats.applied += res.added
            stats.duplicates += len(facts) - res.added - len(res.conflicts)
            for event_id in res.conflicts:
                # Only facts stored before the event-id index existed can
                # disagree with it here.
                carriers = by_id.get(event_id, [])
                raw, source = (
                    (carriers[0][0].raw, carriers[0][0].source)
                    if carriers
                    else (json.dumps({"event_id": event_id}), "reconciler")
                )
                await self._dead_letter(
                    stats,
                    raw,
                    f"event_id: {event_id} reused with different content (the first one is kept)",
                    source,
                    "conflict",
                )
            stats.accounts.add(account)

    async def _clean(self, routed: _Routed, stats: IngestStats) -> None:
        """Drop the parked facts a registration took along, and take each
        application's facts out of the accounts that do not own it."""
        for app_id, ids in routed.parked_moved.items():
            await self.store.drop_parked(app_id, ids)
        # An application may have moved to another account while its facts
        # were being added to the one that owned it: look again.
        touched = sorted(
            {
                (account, app)
                for account, facts in routed.by_account.items()
                for f in facts.values()
                if (app := app_of(f)) is not None
            }
        )
        owners = await self.store.app_owners([app for _, app in touched])
        routed.cleanups.update(
            (app, account)
            for (account, app), owner in zip(touched, owners, strict=True)
            if owner != account
        )
        moved = await self._bounded(
            [self._clean_app(stats, app, account) for app, account in sorted(routed.cleanups)]
        )
        for changed in moved:
            stats.accounts.update(changed)

    async def _recompute_touched(self, routed: _Routed, stats: IngestStats) -> None:
        """Recompute every account the batch changed; then the app moves it
        made are finished."""
        accounts = sorted(stats.accounts)
        unknown = await self._bounded([self.recompute(a) for a in accounts])
        for account, none_registered in zip(accounts, unknown, strict=True):
            if none_registered:
                stats.parked += len(routed.by_account.get(account, ()))
        # Only now, with both accounts recomputed, is a move finished.
        await self._bounded(
            [self.store.move_done(app, account) for app, account in routed.cleanups]
        )

    async def _dead_letter(
        self, stats: IngestStats, raw: str, reason: str, source: str, kind: str
    ) -> None:
        await self.store.dead_letter(raw, reason, source, self.config.deadletter_maxlen)
        stats.dead_lettered += 1
        stats.dead_letter_kinds[kind] += 1

    async def _clean_app(self, stats: IngestStats, app_id: str, account_id: str) -> set[str]:
        """Take an application's facts out of an account that does not own it
        (any more): its registrations there lost to an earlier one and are
        dead-lettered; its other facts go to the owner. Idempotent, so a
        redelivery redoes whatever a crash left undone. Returns the accounts
        whose facts changed."""
        owner = await self.store.app_owner(app_id)
        if owner is None or owner == account_id:
            return set()
        loaded = await self.store.load_account_facts(account_id)
        mine = [f for f in loaded.facts if app_of(f) == app_id]
        if not mine:
            return set()
        app_facts = [f for f in mine if not isinstance(f, ApplicationRegistered)]
        # A fact keeps the time it was first recorded wherever it moves: R6
        # and R10 read when a fact became known, not which account held it.
        by_recorded: dict[Millis | None, list[Fact]] = defaultdict(list)
        for f in app_facts:
            by_recorded[loaded.recorded_at.get(f.event_id)].append(f)
        changed = {account_id}
        # The app may move again while its facts are being added: the facts
        # follow it until its owner stays the same across an add, and leave
        # the accounts it passed through (their own movers may have looked
        # before the facts arrived).
        passed: list[str] = []
        while app_facts:
            for recorded_at, group in by_recorded.items():
                await self.store.add_facts(owner, group, recorded_at=recorded_at)
            changed.add(owner)
            now_owner = await self.store.app_owner(app_id)
            if now_owner is None or now_owner == owner:
                break
            passed.append(owner)
            owner = now_owner
        for account in passed:
            await self.store.remove_facts(account, [f.event_id for f in app_facts])
        for reg in mine:
            if isinstance(reg, ApplicationRegistered):
                await self._dead_letter(
                    stats,
                    to_json(reg),
                    f"app_id: {app_id} moved to account {owner}, whose registration is "
                    "earlier (the earliest one owns the application)",
                    "reconciler",
                    "registration",
                )
        await self.store.remove_facts(account_id, [f.event_id for f in mine])
        return changed

    async def _route_one(self, fact: Fact) -> Ownership | str | None:
        """Where a fact goes: for a registration, what its claim of the app
        found; otherwise the account it belongs to (None: parked)."""
        if isinstance(fact, ApplicationRegistered):
            return await self.store.register_owner(fact)
        account = account_of(fact)
        if account is not None:
            return account
        return await self.store.route_app_fact(app_of(fact) or "", fact, self.config.parked_ttl_ms)

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
        the account has no registered application yet."""
        return await self.hooks.recompute(account_id, self._recompute(account_id))

    async def _recompute(self, account_id: str) -> bool:
        """Its statuses written, the account's release is scheduled (or
        unscheduled), its notices and warnings made, and a release already
        recorded is announced (an app registered after it is released too).

        A replica that read the facts and was overtaken by another that added
        more cannot undo the newer status: its write is refused (versions),
        its announcements are refused (claimed only from the stored version),
        and its deadline updates are redone from the newer facts, because the
        account's sequence is checked again after them."""
        statuses: dict[str, AppStatus] = {}
        for _round in range(MAX_ROUNDS):
            loaded = await self.store.load_account_facts(account_id)
            seq = loaded.seq
            statuses = self._compute(loaded)
            now = self.clock()
            # Accounts are recomputed concurrently; one account's apps in turn,
            # so concurrency (and connections) stay bounded by CONCURRENCY.
            for st in statuses.values():
                status = AppStatus(st.app_id, account_id, st.segments, version=seq, updated_at=now)
                await self._write_app(status, now)
            await self.releaser.schedule(account_id, statuses, now)
            await self.announcer.release_notices(account_id, loaded, statuses, now)
            await self.announcer.warnings(account_id, loaded, statuses, now)
            if (
                statuses
                and Reason.RESOURCES_RELEASED in next(iter(statuses.values())).at(now).reasons
            ):
                # An app registered after the release is released too, and
                # announced as such once.
                await self.releaser.finish(account_id, statuses, now)
            if await self.coord.account_seq(account_id) == seq:
                break
        else:
            log.warning("facts of account %s kept changing while it was recomputed", account_id)
        return not statuses

    def _compute(self, loaded: AccountFacts) -> dict[str, AppStatus]:
        return compute_account(
            loaded.facts, self.policy, now=self.clock(), recorded_at=loaded.recorded_at
        )

    async def _write_app(self, status: AppStatus, now: Millis) -> None:
        res = await self.store.write_status(status)
        if not res.version:
            # Refused: newer facts of the account were written already, or the
            # app belongs to another account now; that writer publishes.
            return
        # The store assigns the version (monotonic per app across moves); the
        # write put it on the feed in the same step.
        status = replace(status, version=res.version)
        await self._announce_and_schedule(status, now)

    async def _announce_and_schedule(self, status: AppStatus, now: Millis) -> None:
        """Announce what has settled, and come back at the next moment that
        matters: the next change ahead, or when a state waiting to settle (or
        an announcement in flight) must be looked at again."""
        await self._announce_and_schedule_many([status], now)

    async def _announce_and_schedule_many(
        self,
        statuses: list[AppStatus],
        now: Millis,
        cursors: list[tuple[str, Outbox | None, str | None]] | None = None,
    ) -> None:
        """:meth:`_announce_and_schedule` for many applications, each step's
        Redis work pipelined (``cursors``: their announcement cursors, when
        read with the statuses)."""
        again = await self.announcer.status_changes(statuses, now, cursors)
        due: dict[str, Millis] = {}
        gone: list[str] = []
        rechecks: dict[str, Millis | None] = {}
        for status, later in zip(statuses, again, strict=True):
            upcoming = status.upcoming(now)
            member = app_deadline(status.app_id)
            if upcoming:
                due[member] = upcoming[0].starts_at
            else:
                gone.append(member)
            rechecks[member] = later
        await self.coord.reschedule(due, gone, rechecks=rechecks)

    # -- deadlines ---------------------------------------------------------------
    # Worked in batches: the running reconciler's share by DeadlineLanes
    # (under leases), everything at once by run_deadlines (a tool, a test).

    async def run_deadlines(self, now: Millis | None = None) -> int:
        """Process every deadline due at ``now``, each once, whatever lease
        this replica holds (a release still needs the leader lease: it takes
        it for the call if free). Returns how many were."""
        now = self.clock() if now is None else now
        # The leader's set first: what an earlier version left there moves to
        # its shard, and is processed there below.
        done = await self._drain(DEADLINES, now)
        shards = [self._drain(shard_deadlines(s), now) for s in range(DEADLINE_SHARDS)]
        return done + sum(await asyncio.gather(*shards))

    async def _drain(self, key: str, now: Millis) -> int:
        seen: set[str] = set()
        done = 0
        while taken := await self.deadline_batch(key, now, seen):
            done += taken
        return done

    async def deadline_batch(self, key: str, now: Millis, seen: set[str] | None = None) -> int:
        """One batch of the deadline set ``key`` due at ``now``: the most
        recently due members, so that one just due is not held up behind a
        backlog, the longest due, and for a shard its longest due re-checks
        (FRESH_LANE, BACKLOG_LANE, RECHECK_LANE), all processed together.
        Members in ``seen`` are skipped (and those taken added). Returns how
        many were taken: 0 when nothing (new) is due."""
        lanes = BACKLOG_LANE + RECHECK_LANE
        newest, oldest, again = await self.coord.due(
            key, now, FRESH_LANE, lanes, rechecks_key=self._rechecks.get(key), rechecks=lanes
        )
        members = list(
            dict.fromkeys(
                [
                    *newest,
                    *oldest[: BACKLOG_LANE + max(0, RECHECK_LANE - len(again))],
                    *again[: RECHECK_LANE + max(0, BACKLOG_LANE - len(oldest))],
                ]
            )
        )
        if seen is not None:
            members = [m for m in members if m not in seen]
            seen.update(members)
        if not members:
            return 0
        mine = [m for m in members if deadline_key(m) == key]
        if len(mine) < len(members):  # left in the leader's set by an earlier version
            strays = [m for m in members if deadline_key(m) != key]
            scores = await self.coord.scores(key, strays)
            await self.coord.move_to_shards(
                [(m, at) for m, at in zip(strays, scores, strict=True) if at is not None]
            )
        await self._process_deadlines(mine, now)
        if self.metrics is not None:
            self.metrics.on_deadlines(len(mine))
        return len(members)

    async def _process_deadlines(self, members: list[str], now: Millis) -> None:
        apps: list[str] = []
        calls: list[tuple[str, Awaitable[object]]] = []
        releases: list[str] = []
        for member in members:
            kind, ident = deadline_of(member)
            if kind == "app":
                apps.append(ident)
            elif kind == "release":
                releases.append(ident)
            elif kind in ("notice", "warn"):
                calls.append((member, self._account_deadline(kind, ident, now)))
            else:
                await self.coord.unschedule(member)
        await asyncio.gather(
            *(self._guarded(member, call, now) for member, call in calls),
            *([self._app_deadlines(apps, now)] if apps else []),
        )
        # Rare, and each under the lease: one at a time, as before.
        for account in releases:
            await self._guarded(release_deadline(account), self.try_release(account, now), now)

    async def _guarded(self, member: str, call: Awaitable[object], now: Millis) -> None:
        """Run one deadline's work, at most DEADLINE_CONCURRENCY at once in
        this process; a failure is logged and the deadline tried again after
        RETRY_MS, so it neither stops the rest of its batch nor comes back at
        once."""
        async with self._deadline_slots:
            try:
                await call
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._warn.warning(
                    "deadline", "deadline %s failed (%s); retried", member, describe_error(exc)
                )
                if self.metrics is not None:
                    self.metrics.on_error("deadlines")
                with contextlib.suppress(Exception):
                    await self.coord.schedule(member, now + RETRY_MS)

    async def _account_deadline(self, kind: str, account_id: str, now: Millis) -> None:
        loaded = await self.store.load_account_facts(account_id)
        if kind == "notice":
            await self.announcer.release_notices(account_id, loaded, self._compute(loaded), now)
        else:
            await self.announcer.warnings(account_id, loaded, self._compute(loaded), now)

    async def _app_deadlines(self, apps: list[str], now: Millis) -> None:
        """Applications whose deadline is due, together: their statuses read
        in one round trip, announced and rescheduled step by step for all
        (pipelined), then their versions read again in one round trip; one
        whose status changed meanwhile is done again on its own, so that a
        schedule made from an older status does not replace a newer one's."""
        try:
            rows = await self.coord.statuses_and_cursors(apps, ANNOUNCED_FIELD)
            statuses: list[AppStatus] = []
            cursors: list[tuple[str, Outbox | None, str | None]] = []
            alone: list[str] = []  # unreadable, or gone: each on its own
            for app, (status, cursor) in zip(apps, rows, strict=True):
                if status is None or isinstance(status, Exception):
                    alone.append(app)
                else:
                    statuses.append(status)
                    cursors.append(cursor)
            await self._announce_and_schedule_many(statuses, now, cursors)
            versions = await self.store.read_versions([s.app_id for s in statuses])
            alone += [s.app_id for s, v in zip(statuses, versions, strict=True) if v != s.version]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # One at a time then, so that whatever failed holds up only itself.
            self._warn.warning(
                "deadline:apps",
                "a batch of deadlines failed (%s); done one by one",
                describe_error(exc),
            )
            alone = apps
        await asyncio.gather(
            *(self._guarded(app_deadline(a), self._app_deadline(a, now), now) for a in alone)
        )

    async def _app_deadline(self, app_id: str, now: Millis) -> None:
        # Redone if the status changed meanwhile, so that a schedule made
        # from an older status does not replace a newer one's.
        for _round in range(MAX_ROUNDS):
            status, _ = await self.store.read_status(app_id)
            if status is None:
                member = app_deadline(app_id)
                await self.coord.reschedule({}, [member], rechecks={member: None})
                return
            await self._announce_and_schedule(status, now)
            if await self.coord.status_version(app_id) == status.version:
                return

    async def migrate_deadlines(self) -> int:
        """Move every deadline an earlier version left in the leader's set
        to its shard (ADR 0033); how many were. Those not moved here (Redis
        away at start, an earlier version still running and adding more) are
        moved by the leader as they fall due."""
        cursor, moved = 0, 0
        while True:
            cursor, page = await self.coord.legacy_deadlines(cursor, 1000)
            moved += await self.coord.move_to_shards(page)
            if cursor == 0:
                break
        if moved:
            log.info("moved %d deadlines of an earlier version to their shards", moved)
        return moved

    async def dead_letter_length(self) -> int:
        return await self.store.dead_letter_length()

    async def watermark(self) -> Millis | None:
        """The time before which every source's events are applied."""
        return await applied_until(self.sources)

    # -- release (R10): see lcic_guard.reconciler.release -----------------------

    async def release_plan(self, account_id: str, now: Millis) -> tuple[ReleasePlan, int]:
        """Whether the account's release could be done now, and the fact
        sequence that judgement rests on."""
        return await self.releaser.plan(account_id, now)

    async def try_release(self, account_id: str, now: Millis) -> ReleasePlan:
        """R10: release the account if it is due; the release sequence in one
        place. The releaser decides and commits under the lease; a committed
        release is then written into the account's statuses and announced,
        still under the lease."""
        return await self.hooks.release(account_id, self._release(account_id, now))

    async def _release(self, account_id: str, now: Millis) -> ReleasePlan:
        async with self.releaser.lease_for_the_call():
            plan = await self.releaser.release_if_due(account_id, now)
            if plan.released:
                await self.recompute(account_id)
                await self.releaser.finish(account_id, plan.app_ids, now)
                self.releases_done.append(account_id)
        return plan

    async def plan_releases(self, now: Millis | None = None) -> list[ReleasePlan]:
        """Every scheduled release and whether it could happen now (dry run)."""
        return await self.releaser.plan_all(self.clock() if now is None else now)

    async def check_generation(self) -> bool:
        return await self.releaser.check_generation()

    async def notices_of_history(self) -> int:
        """For a history loaded as if it had been read live all along (the
        embedded sample, whose facts are stamped recorded long ago): make each
        overdue episode's first notice as of when its suspension became known,
        as a reconciler following the feed would have (R10: no release
        without a notice on record). Returns how many were made."""
        made = 0
        now = self.clock()
        for member, _ in await self.coord.scheduled(release_deadline("")):
            account = deadline_of(member)[1]
            loaded = await self.store.load_account_facts(account)
            episode = overdue_notice(loaded.facts, self.policy, now, loaded.recorded_at)
            statuses = self._compute(loaded)
            if episode is None or not statuses:
                continue
            _, known, release_at = episode
            if known > now:  # still in grace: its notice comes when the suspension does
                continue
            if await self.announcer.evidence_notice(
                account, loaded, statuses, release_at, 0, known, missing=False
            ):
                made += 1
        return made

    async def check_continuity(self, now: Millis | None = None) -> str:
        """Look for a store discontinuity (R10); a line saying whether
        releases are paused (kept for /readyz)."""
        now = self.clock() if now is None else now
        cont = self.releaser.continuity
        self.continuity_detail = cont.describe(await cont.check(now), now)
        return self.continuity_detail

    # -- loops ----------------------------------------------------------------

    async def ingest_source(
        self, source: BillingSource, *, recorded_at: Millis | None = None
    ) -> IngestStats:
        """One fetch-apply-ack round for one source (``recorded_at``: see
        :meth:`ingest`)."""
        if not source.live:
            self._snapshot_started.setdefault(id(source), self.clock())
        deliveries = await source.fetch(self.config.batch_size, self.config.block_ms)
        if not deliveries:
            self.releaser.source_read_empty(source)
            if not source.live and source.exhausted and id(source) not in self._snapshot_done:
                # A billing snapshot fully applied: it confirms the facts of
                # a store discontinuity detected before it began (R10).
                self._snapshot_done.add(id(source))
                await self.releaser.continuity.snapshot_loaded(
                    self._snapshot_started[id(source)], self.clock()
                )
            return IngestStats()
        stats = await self.ingest(deliveries, recorded_at=recorded_at)
        await source.ack(deliveries)
        return stats

    async def drain(
        self, source: BillingSource, *, recorded_at: Millis | None = None
    ) -> IngestStats:
        """Apply everything a finite source holds (a snapshot file;
        ``recorded_at``: see :meth:`ingest`)."""
        total = IngestStats()
        while True:
            stats = await self.ingest_source(source, recorded_at=recorded_at)
            if stats.received == 0:
                return total
            total.received += stats.received
            total.applied += stats.applied
            total.dead_lettered += stats.dead_lettered

    async def _source_loop(self, source: BillingSource, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.ingest_source(source)
                if source.exhausted:
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
        """Every tick: look at the store, take or keep the leader lease, and
        hold this replica's share of the deadline shards; the deadlines
        themselves are worked by the lanes' own tasks, and the leases renewed
        by a task of their own, so that no batch, however long, delays a
        renewal. Cancelled (a kill), it stops its tasks without resigning."""
        renewal = asyncio.create_task(self.lanes.renew_forever(stop), name="lease renewal")
        try:
            while not stop.is_set():
                try:
                    now = self.clock()
                    await self.check_generation()
                    await self.check_continuity(now)
                    await self.coord.heartbeat(now)
                    await self._hold_leader_lease()
                    await self.lanes.tick()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._warn.warning(
                        "deadlines", "deadline work failed (%s); retrying", describe_error(exc)
                    )
                    if self.metrics is not None:
                        self.metrics.on_error("deadlines")
                await wait_event(stop, self.config.tick_ms / 1000)
        finally:
            # Cancelled at once, before anything here is awaited: a second
            # cancellation of this task (stop_task asks again) cannot leave
            # a worker running.
            renewal.cancel()
            self.lanes.cancel()
            await stop_task(renewal)
            await self.lanes.stop(resign=False)

    async def _hold_leader_lease(self) -> None:
        before = self._led
        sent = time.monotonic()
        token = await self.coord.hold_lease(self.name, self.config.lease_ttl_ms)
        self.releaser.lease.note(token, sent, self.config.lease_ttl_ms)
        self._led = token
        if token and token != before:
            log.info("%s is now the leader (token %d)", self.name, token)
        elif not token and before:
            log.info("%s lost the lead", self.name)
        if token != before and self.metrics is not None:
            self.metrics.on_leadership(bool(token))

    async def _progress_loop(self, stop: asyncio.Event) -> None:
        """A progress mark on every feed shard each second, by every replica:
        what lets a sidecar prove its replica current when nothing changes
        (see sidecar/follower.py). Marks need no lease: a mark only repeats
        a shard's current number, atomically."""
        while not stop.is_set():
            try:
                await self.store.mark_progress()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._warn.warning(
                    "progress", "cannot write progress marks (%s); retrying", describe_error(exc)
                )
            await wait_event(stop, MARK_INTERVAL_S)

    async def _carry_over_layout(self) -> None:
        moved = await self.store.migrate_legacy_layout()
        if moved:
            log.info(
                "carried %d keys over to the feed-shard layout; the old ones expire in a day",
                moved,
            )

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._carry_over_layout()
        except Exception as exc:
            # Retried at the next start; statuses are rewritten as accounts
            # are recomputed meanwhile.
            log.warning("cannot carry keys over to the feed-shard layout (%s)", exc)
        tasks = [asyncio.create_task(self._source_loop(s, stop)) for s in self.sources]
        tasks.append(asyncio.create_task(self._migrate_once()))
        tasks.append(asyncio.create_task(self._leader_loop(stop)))
        tasks.append(asyncio.create_task(self._progress_loop(stop)))
        try:
            await stop.wait()
        finally:
            await stop_tasks(tasks)
            # Given up at once, so that the other replicas take over now
            # rather than a lease's TTL later.
            with contextlib.suppress(Exception):
                await self.lanes.stop(resign=True)
            with contextlib.suppress(Exception):
                await self.coord.resign(self.name)

    async def _migrate_once(self) -> None:
        try:
            await self.migrate_deadlines()
        except Exception as exc:  # the leader moves the rest as they fall due
            log.warning(
                "could not move the deadlines of an earlier version (%s)", describe_error(exc)
            )
