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
from dataclasses import dataclass, replace
from typing import TypeVar

from lcic_guard.domain.facts import (
    RESERVED_REASON,
    ApplicationRegistered,
    Fact,
    InvalidEvent,
    ResourcesReleased,
    account_of,
    app_of,
    parse_event_json,
    to_json,
)
from lcic_guard.domain.policy import (
    DAY,
    HOUR,
    AppStatus,
    PolicyConfig,
    Reason,
    Segment,
    compute_account,
    overdue_notice,
)
from lcic_guard.domain.time import Millis, format_time, wall_clock
from lcic_guard.ratelimit import RateLimitedLog, describe_error
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.reconciler.sources import BillingSource, Delivery
from lcic_guard.reconciler.stats import IngestStats
from lcic_guard.store.coordination import Coordination, Outbox
from lcic_guard.store.keys import (
    DEADLETTER_MAXLEN,
    MAX_EVENT_BYTES,
    OVERSIZED_KEEP,
    app_deadline,
    deadline_of,
    meta_key,
    notice_deadline,
    release_deadline,
    status_key,
)
from lcic_guard.store.status import AccountFacts, AppClaim, Store
from lcic_guard.tasks import stop_tasks

log = logging.getLogger(__name__)

ANNOUNCED_FIELD = "announced"
RELEASE_FIELD = "released"
NOTICE_FIELD = "notice"
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
    announce_settle_ms: int = 10_000
    """How long a new state must hold before ``status_changed`` announces it
    (a state passed through within this time is never announced)."""
    release_reminders_ms: tuple[int, ...] = (30 * DAY, 7 * DAY, DAY)
    """R10: how long before ``release_at`` a ``release_scheduled`` reminder
    is announced (after the first notice, when the suspension becomes known)."""
    deadletter_maxlen: int = DEADLETTER_MAXLEN
    """About how many dead letters the dead-letter stream keeps (0: all)."""
    parked_ttl_ms: int = 30 * DAY
    """How long facts of an application never registered are kept (0: forever)."""


@dataclass(frozen=True, slots=True)
class Notice:
    """One ``release_scheduled`` announcement of an overdue episode (R10)."""

    kind: str  # "initial", or how long before release_at, e.g. "7d"
    at: Millis
    sent: bool = False


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    account_id: str
    app_ids: tuple[str, ...]
    release_at: Millis
    eligible: bool
    why: str
    notices: tuple[Notice, ...] = ()
    """The notices of the overdue episode: sent, and still due."""


def lead_time(ms: int) -> str:
    """A reminder's lead time in the flag's own syntax (``30d``, ``36h``)."""
    for unit, size in (("d", DAY), ("h", HOUR), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def notice_plan(known: Millis, release_at: Millis, reminders: Iterable[int]) -> list[Notice]:
    """R10: the first notice when the suspension becomes known, then one
    reminder per lead time, only those after the first notice."""
    out = [Notice("initial", known)]
    for lead in sorted(set(reminders), reverse=True):
        if release_at - lead > known:
            out.append(Notice(lead_time(lead), release_at - lead))
    return out


def _sent_notices(cursor: str, episode: str) -> set[int]:
    """The notices of ``episode`` already announced, from the account's cursor
    ``EPISODE|i,j,...``."""
    head, _, indices = cursor.rpartition("|")
    if head != episode or not indices:
        return set()
    return {int(i) for i in indices.split(",")}


def _lifted(clock: Callable[[], Millis]) -> Callable[[], Awaitable[Millis]]:
    async def read() -> Millis:
        return clock()

    return read


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
        recorded_clock: Callable[[], Awaitable[Millis]] | None = None,
        name: str | None = None,
        metrics: ReconcilerMetrics | None = None,
    ) -> None:
        """``recorded_clock`` stamps when facts are first stored (the second
        clock of every fact): Redis's clock by default, so that every replica
        stamps on one clock; a reconciler run on a clock of its own (a
        simulation) stamps on that one."""
        self.store = store
        if recorded_clock is None:
            recorded_clock = store.server_time if clock is wall_clock else _lifted(clock)
        self.recorded_clock = recorded_clock
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
        caller then acknowledges the deliveries.

        Each event is validated, then its id is claimed in the feed-wide
        event-id index, and only then routed: an event dead-lettered at
        either step has no effect at all. A crash anywhere leaves the
        deliveries unacknowledged; redelivered, they find their ids claimed
        with the same content and are applied again, which is idempotent."""
        stats = IngestStats(received=len(deliveries))
        by_id: dict[str, list[tuple[Delivery, Fact]]] = {}
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
                fact = parse_event_json(d.raw)
            except InvalidEvent as exc:
                kind = "reserved_id" if exc.reason == RESERVED_REASON else "invalid"
                await self._dead_letter(stats, d.raw, exc.reason, d.source, kind)
                continue
            by_id.setdefault(fact.event_id, []).append((d, fact))
        # Claimed in delivery order: of one id's deliveries in this batch with
        # different content, the first claims it and the others conflict.
        distinct = list(dict.fromkeys(f for items in by_id.values() for _, f in items))
        verdict = dict(zip(distinct, await self.store.claim_events(distinct), strict=True))
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
        # Each event's routing is a one-key script: independent, so they run
        # concurrently; the results are used in delivery order.
        routes = await self._bounded([self._route(fact) for _, fact in accepted])
        by_account: dict[str, dict[str, Fact]] = defaultdict(dict)
        parked_moved: dict[str, list[str]] = defaultdict(list)
        cleanups: set[tuple[str, str]] = set()
        for (d, fact), route in zip(accepted, routes, strict=True):
            if isinstance(fact, ApplicationRegistered):
                assert isinstance(route, AppClaim)
                cleanups.update((fact.app_id, a) for a in route.moved_from)
                if route.verdict == "later":
                    await self._dead_letter(
                        stats,
                        d.raw,
                        f"app_id: {fact.app_id} is registered to account {route.owner} by an "
                        "earlier registration (the earliest one owns the application)",
                        d.source,
                        "registration",
                    )
                    # A crash may have left it in its account's facts (added
                    # before the app moved): make sure it is gone.
                    cleanups.add((fact.app_id, fact.account_id))
                    continue
                facts = by_account[route.owner]
                for f in (fact, *route.parked):
                    facts[f.event_id] = f
                parked_moved[fact.app_id] += [p.event_id for p in route.parked]
                continue
            assert not isinstance(route, AppClaim)
            if route is None:
                # Kept, and applied when the app's registration arrives:
                # events may come in any order.
                stats.parked += 1
                continue
            by_account[route][fact.event_id] = fact
        recorded = await self.recorded_clock() if by_account else 0
        added = await self._bounded(
            [
                self.store.add_facts(account, facts.values(), recorded_at=recorded)
                for account, facts in by_account.items()
            ]
        )
        for (account, facts), res in zip(by_account.items(), added, strict=True):
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
        for app_id, ids in parked_moved.items():
            await self.store.drop_parked(app_id, ids)
        # An application may have moved to another account while its facts
        # were being added to the one that owned it: look again.
        touched = sorted(
            {
                (account, app)
                for account, facts in by_account.items()
                for f in facts.values()
                if (app := app_of(f)) is not None
            }
        )
        owners = await self.store.app_owners([app for _, app in touched])
        cleanups.update(
            (app, account)
            for (account, app), owner in zip(touched, owners, strict=True)
            if owner != account
        )
        moved = await self._bounded(
            [self._clean_app(stats, app, account) for app, account in sorted(cleanups)]
        )
        for changed in moved:
            stats.accounts.update(changed)
        accounts = sorted(stats.accounts)
        unknown = await self._bounded([self.recompute(a) for a in accounts])
        for account, none_registered in zip(accounts, unknown, strict=True):
            if none_registered:
                stats.parked += len(by_account.get(account, ()))
        # Only now, with both accounts recomputed, is a move finished.
        await self._bounded([self.store.move_done(app, account) for app, account in cleanups])
        if self.metrics is not None:
            self.metrics.on_ingest(stats)
        return stats

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

    async def _route(self, fact: Fact) -> AppClaim | str | None:
        """Where a fact goes: for a registration, what its claim of the app
        found; otherwise the account it belongs to (None: parked)."""
        if isinstance(fact, ApplicationRegistered):
            return await self.store.claim_app(fact)
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
        the account has no registered application yet.

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
            await self._schedule_release(account_id, statuses, now)
            await self._release_notices(account_id, loaded, statuses, now)
            if (
                statuses
                and Reason.RESOURCES_RELEASED in next(iter(statuses.values())).at(now).reasons
            ):
                # An app registered after the release is released too, and
                # announced as such once.
                await self._finish_release(account_id, statuses, now)
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
        # The store assigns the version (monotonic per app across moves).
        status = replace(status, version=res.version)
        # Published even when the write was a no-op from the same facts: a
        # replica that died between its write and this notice is covered by
        # the redelivery.
        await self.store.publish_change(status)
        await self._announce_and_schedule(status, now)

    async def _announce_and_schedule(self, status: AppStatus, now: Millis) -> None:
        """Announce what has settled, and come back at the next moment that
        matters: the next change ahead, or when a state waiting to settle (or
        an announcement in flight) must be looked at again."""
        again = await self.announce_change(status, now)
        upcoming = status.upcoming(now)
        due = [t for t in (upcoming[0].starts_at if upcoming else None, again) if t is not None]
        member = app_deadline(status.app_id)
        if due:
            await self.coord.schedule(member, min(due))
        else:
            await self.coord.unschedule(member)

    async def _schedule_release(
        self, account_id: str, statuses: dict[str, AppStatus], now: Millis
    ) -> None:
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
        await self.coord.unschedule(member)

    # -- announcements ----------------------------------------------------------

    async def announce_change(self, status: AppStatus, now: Millis) -> Millis | None:
        """Announce the app's state at ``now`` once it differs from the last
        one announced and has held for the settle time: noted, then claimed
        atomically, so racing replicas announce it once and a state that
        reverts within the settle time is never announced.

        Returns when the app must be looked at again for it (a state waiting
        to settle, an announcement in flight, a claim lost to another
        replica), or None when nothing is pending."""
        key = status_key(status.app_id)
        announced, outbox, candidate = await self.coord.status_cursor(
            status.app_id, ANNOUNCED_FIELD
        )
        # An announcement in flight: left to its writer unless presumed dead.
        if outbox is not None and (
            now - outbox.at < STALE_OUTBOX_MS
            or not await self._flush(key, ANNOUNCED_FIELD, outbox, now)
        ):
            return now + STALE_OUTBOX_MS
        seg = status.at(now)
        new = _state_key(seg)
        if new == announced and candidate is None:
            return None
        old = json.loads(announced) if announced else [None, []]
        at = seg.starts_at if seg.starts_at <= now else now
        effective = seg.effective_at if seg.effective_at is not None else at
        event = {
            "type": "status_changed",
            "announcement_id": f"{status.app_id}:{status.version}:{at}:{new}",
            "occurred_at": format_time(at),
            "effective_at": format_time(max(effective, at)),
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
        settle = self.config.announce_settle_ms
        if candidate == new or settle == 0:
            # A writer that dies between the claim and the stream leaves the
            # outbox; this deadline makes the leader finish it.
            await self.coord.schedule(
                app_deadline(status.app_id), now + STALE_OUTBOX_MS, only_earlier=True
            )
        code, since = await self.coord.settle_status(
            status.app_id, ANNOUNCED_FIELD, announced, new, payload, now, status.version, settle
        )
        if code == 0:
            return None
        if code == 2:
            return since + settle
        if code == 3:
            return now + STALE_OUTBOX_MS
        await self.store.announce(event)
        await self.coord.finish(key, ANNOUNCED_FIELD, payload)
        log.info(
            "%s: %s -> %s (%s)",
            status.app_id,
            old[0],
            seg.state.value,
            ",".join(event["reasons"]) or "OK",
            extra={
                k: event[k] for k in ("app_id", "account_id", "old_state", "new_state", "reasons")
            }
            | {"event": "status_changed", "status_version": status.version},
        )
        if self.metrics is not None:
            self.metrics.on_status_change()
        return None

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
            kind, ident = deadline_of(member)
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
            elif kind == "notice":
                loaded = await self.store.load_account_facts(ident)
                await self._release_notices(ident, loaded, self._compute(loaded), now)
            else:
                await self.coord.unschedule(member)
            done += 1
        if self.metrics is not None:
            self.metrics.on_deadlines(done)
        return done

    async def dead_letter_length(self) -> int:
        return await self.store.dead_letter_length()

    async def watermark(self) -> Millis | None:
        """The time before which every source's events are applied."""
        # A fully applied file vouches only for the moment it was loaded; once
        # a live feed exists, that feed alone bounds what may still arrive.
        if any(not s.live and not s.exhausted for s in self.sources):
            return None  # a file is still being applied
        live = [s for s in self.sources if s.live]
        marks = [await s.watermark() for s in (live or self.sources)]
        if not marks or any(m is None for m in marks):
            return None
        return min(m for m in marks if m is not None)

    async def release_plan(self, account_id: str, now: Millis) -> tuple[ReleasePlan, int]:
        """Whether the account's release (R10) could be done now, and the fact
        sequence that judgement rests on."""
        loaded = await self.store.load_account_facts(account_id)
        seq = loaded.seq
        statuses = self._compute(loaded)
        apps = tuple(sorted(statuses))
        notices = await self._notices_of(account_id, loaded, now)

        def plan(release_at: Millis, eligible: bool, why: str) -> tuple[ReleasePlan, int]:
            return ReleasePlan(account_id, apps, release_at, eligible, why, notices), seq

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
        member = release_deadline(account_id)
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
                release_at=plan.release_at,
            )
            res = await self.coord.record_release(
                account_id, self.token, seq, fact, await self.recorded_clock()
            )
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
        member = release_deadline(account_id)
        if await self._announce_release(account_id, app_ids, now):
            await self.coord.unschedule(member)
        else:
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)

    async def _announce_release(self, account_id: str, app_ids: Iterable[str], now: Millis) -> bool:
        """Exactly once per app: claim in the account's meta hash (the cursor
        lists the apps announced so far), add to the stream, clear the
        outbox. The release itself is one announcement of every app the
        account had; an app registered to the account afterwards (released
        at once) gets one of its own. An outbox left by a writer presumed
        dead is finished after checking the stream first; a recent one is
        left to its writer. Returns True once every app is known announced."""
        key = meta_key(account_id)
        cursor, outbox = await self.coord.cursor(key, RELEASE_FIELD)
        if outbox is not None:
            if now - outbox.at < STALE_OUTBOX_MS:
                return False  # its writer is probably adding it right now
            if not await self._flush(key, RELEASE_FIELD, outbox, now):
                return False
        # "1": announced before the cursor listed apps; nothing more is owed.
        if cursor == "1":
            return True
        done: set[str] = set(json.loads(cursor)) if cursor else set()
        missing = sorted(set(app_ids) - done)
        if not missing:
            return True
        event = {
            "type": "resources_released",
            "announcement_id": (
                f"release:{account_id}" if not done else f"release:{account_id}:{','.join(missing)}"
            ),
            "occurred_at": format_time(now),
            "account_id": account_id,
            "app_ids": missing,
        }
        payload = json.dumps(event, sort_keys=True)
        new = json.dumps(sorted(done | set(missing)), separators=(",", ":"))
        if await self.coord.claim(key, RELEASE_FIELD, cursor, new, payload, now):
            await self.store.announce(event)
            await self.coord.finish(key, RELEASE_FIELD, payload)
            return True
        return False

    # -- release notices (R10) --------------------------------------------------

    async def _notices_of(
        self, account_id: str, loaded: AccountFacts, now: Millis
    ) -> tuple[Notice, ...]:
        """The notices of the account's overdue episode, marked sent or not."""
        episode = overdue_notice(loaded.facts, self.policy, now, loaded.recorded_at)
        if episode is None:
            return ()
        alert, known, release_at = episode
        cursor, _ = await self.coord.cursor(meta_key(account_id), NOTICE_FIELD)
        sent = _sent_notices(cursor, alert.event_id)
        plan = notice_plan(known, release_at, self.config.release_reminders_ms)
        return tuple(replace(n, sent=i in sent) for i, n in enumerate(plan))

    async def _release_notices(
        self, account_id: str, loaded: AccountFacts, statuses: dict[str, AppStatus], now: Millis
    ) -> None:
        """R10: announce ``release_scheduled`` when the overdue suspension
        becomes known and at each reminder still ahead of it, each once per
        overdue episode (the alert at A), and keep the next one scheduled.

        Only the latest notice due is announced: one missed while no
        reconciler ran would be stale (a "30 days left" that arrives with 7
        days left). A settlement, or the release itself, ends the episode.

        Like a status change, a notice waits for the settle time: the facts of
        one burst may arrive in any order, and a notice made in between (an
        app registered first to the account that loses it to an earlier
        registration, an alert read just before its settlement) would tell a
        customer something the complete facts do not say."""
        settle = self.config.announce_settle_ms
        member = notice_deadline(account_id)
        episode = overdue_notice(loaded.facts, self.policy, now, loaded.recorded_at)
        if episode is None or not statuses:
            await self.coord.unschedule(member)
            return
        alert, known, release_at = episode
        plan = notice_plan(known, release_at, self.config.release_reminders_ms)
        key = meta_key(account_id)
        cursor, outbox = await self.coord.cursor(key, NOTICE_FIELD)
        if outbox is not None and (
            now - outbox.at < STALE_OUTBOX_MS
            or not await self._flush(key, NOTICE_FIELD, outbox, now)
        ):
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)
            return
        sent = _sent_notices(cursor, alert.event_id)
        last = max(sent, default=-1)
        due = [i for i, n in enumerate(plan) if n.at + settle <= now and i > last]
        if due:
            i = due[-1]
            notice = plan[i]
            event = {
                "type": "release_scheduled",
                "announcement_id": f"notice:{account_id}:{alert.event_id}:{notice.kind}",
                "occurred_at": format_time(now),
                "account_id": account_id,
                "app_ids": sorted(statuses),
                "release_at": format_time(release_at),
                "notice": notice.kind,
                "overdue_alert_id": alert.event_id,
                "overdue_since": format_time(alert.occurred_at),
            }
            payload = json.dumps(event, sort_keys=True)
            new = f"{alert.event_id}|{','.join(str(k) for k in sorted(sent | {i}))}"
            # A writer that dies after its claim leaves the outbox; come back for it.
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)
            if not await self.coord.claim(key, NOTICE_FIELD, cursor, new, payload, now):
                return  # another replica announces it; the deadline above checks
            await self.store.announce(event)
            await self.coord.finish(key, NOTICE_FIELD, payload)
            log.info(
                "release of account %s scheduled at %s: notice %s announced",
                account_id,
                format_time(release_at),
                notice.kind,
                extra={"event": "release_scheduled", "account_id": account_id},
            )
            last = i
        ahead = [n.at + settle for i, n in enumerate(plan) if i > last and n.at + settle > now]
        if ahead:
            await self.coord.schedule(member, ahead[0])
        else:
            await self.coord.unschedule(member)

    async def plan_releases(self, now: Millis | None = None) -> list[ReleasePlan]:
        """Every scheduled release and whether it could happen now (dry run)."""
        now = self.clock() if now is None else now
        out = []
        for member, _ in await self.coord.scheduled(release_deadline("")):
            plan, _ = await self.release_plan(deadline_of(member)[1], now)
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_ms / 1000):  # not wait_for:
                    await stop.wait()  # Python 3.11's can lose the cancel at shutdown

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._source_loop(s, stop)) for s in self.sources]
        tasks.append(asyncio.create_task(self._leader_loop(stop)))
        try:
            await stop.wait()
        finally:
            await stop_tasks(tasks)
            with contextlib.suppress(Exception):
                await self.coord.resign(self.name)
