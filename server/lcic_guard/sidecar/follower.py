"""The change feed reader: keeps the sidecar's cache a replica of the status
table, proven current from the feed itself.

The table and its feed are split into feed shards (see
:mod:`lcic_guard.store.keys`). Every status write and room report is one
script that also appends to its shard's stream with the shard's next
sequence number, and the reconciler appends a *progress mark* carrying the
current number to every shard each second. So a reader knows, on every
read and without asking anything else:

- it has applied every change of a shard while the numbers it sees follow
  each other; a jump is a gap (the stream was trimmed past it, a write it
  never saw), and the shard alone is loaded again from its snapshot;
- a number lower than one already applied means the store went back in
  time (restored from an older snapshot): every shard is loaded again;
- a mark (or change) whose number follows what it applied, read at the
  shard's end, proves the shard current as of that read; no mark within
  ``max_age`` (the reconciler stopped, or its marks do not arrive) and the
  shard is no longer vouched for.

A shard is loaded from its packed snapshot (kept by the same scripts, so it
is never behind the feed), then the feed is replayed from the position read
with the shard's number at one instant; a replayed change older than what
the snapshot gave is ignored by version.

While a shard is being loaded its held records are not fresh, and checks of
its applications read Redis (exact answers), or, with Redis down, answer
per R13 (degraded): the sidecar keeps serving. Only the very first load
keeps health NOT_SERVING.

Every ``generation_check_ms``, and at every reconnection, it also looks for
a *store discontinuity* (a new generation id, a new run id): each is
counted, logged, told to ``on_discontinuity`` (every watch stream, SPEC
R15), and every shard is loaded again.

When the feed cannot reach Redis (refused, reset, or no answer within its
blocking read), Redis is down: it opens ``breaker``, so that checks answer
per R13 at once instead of each waiting to find that out.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from lcic_guard.domain.policy import AppStatus, Room
from lcic_guard.domain.time import Millis
from lcic_guard.logs import RateLimitedLog, describe_error
from lcic_guard.sidecar.cache import CircuitBreaker, StatusCache
from lcic_guard.store.connect import StoreError, store_refused, store_unreachable
from lcic_guard.store.feed import FeedEntry
from lcic_guard.store.keys import FEED_SHARDS
from lcic_guard.store.packed import HEAD, unpack
from lcic_guard.tasks import stop_task

log = logging.getLogger(__name__)

# An overrun noticed later than this after its deadline was the event loop's
# delay, not Redis's silence.
LOOP_ON_TIME_S: Final = 0.1
# Loads after a discontinuity (which every sidecar sees at the same instant:
# Redis restarted) start after a random wait of up to this long, so that a
# fleet does not read the snapshot all at once. A sidecar reloading keeps
# serving meanwhile (checks of what it cannot vouch for read Redis), so the
# wait costs reads, not answers. A start is not delayed: pods start spread by
# their orchestrator, and a wait would only keep one out of rotation longer.
RELOAD_JITTER_S: Final = 2.0
# After a read that brought only progress marks, wait this long before the
# next one, so that the marks of every shard (written together each second)
# come in one read rather than one each.
MARKS_PAUSE_S: Final = 0.05

# Entries read per shard at most per read; a read that brings fewer reached
# the shard's end.
READ_COUNT: Final = 1000

# Store discontinuities (SPEC R10, R15): why the store may have lost writes
# it had acknowledged, as sent to watchers (StoreDiscontinuity.cause).
RUN_ID_CHANGED: Final = "run_id_changed"  # Redis restarted or failed over
VERSION_WENT_BACK: Final = "version_went_back"  # a status restored older
STREAM_ID_WENT_BACK: Final = "stream_id_went_back"  # a feed sequence went back
NEW_GENERATION: Final = "new_generation"  # a new data set (ADR 0011)
DISCONTINUITIES: Final = (RUN_ID_CHANGED, VERSION_WENT_BACK, STREAM_ID_WENT_BACK, NEW_GENERATION)
# The table load each one causes (the cause label of lcic_guard_table_loads).
_LOAD_CAUSE: Final = {
    RUN_ID_CHANGED: "restart",
    VERSION_WENT_BACK: "rollback",
    STREAM_ID_WENT_BACK: "rollback",
    NEW_GENERATION: "generation",
}


class FeedStore(Protocol):
    """What the feed reader needs of the store."""

    @property
    def clustered(self) -> bool: ...

    async def feed_head(self, shard: int) -> tuple[int, str]: ...

    async def read_feeds(
        self, positions: dict[int, str], block_ms: int, count: int = 1000
    ) -> list[FeedEntry]: ...

    async def load_snapshot(self, shard: int) -> list[list[bytes]]: ...

    async def read_rows(
        self, requests: Sequence[tuple[str, str | None]]
    ) -> list[tuple[AppStatus | None, Room | None] | Exception]: ...

    async def ensure_generation(self) -> str: ...

    async def run_ids(self) -> frozenset[str]: ...


class _Gap(Exception):
    """A feed shard's numbers jumped: it is loaded again."""


class _WentBack(Exception):
    """A feed shard's number went back: the store lost writes."""


class ChangeFeedReader:
    """Loads the status table from the feed shards' snapshots, then follows
    their feeds, keeping a :class:`StatusCache` a current replica of it
    (see the module's text for how that is proven)."""

    def __init__(
        self,
        store: FeedStore,
        cache: StatusCache,
        clock: Callable[[], Millis],
        *,
        block_ms: int = 500,
        generation_check_ms: int = 1000,
        on_change: Callable[[str, AppStatus | None], Awaitable[None] | None] | None = None,
        on_sync: Callable[[bool], Awaitable[None] | None] | None = None,
        on_discontinuity: Callable[[str, Millis], None] | None = None,
        breaker: CircuitBreaker | None = None,
        reload_jitter_s: float = RELOAD_JITTER_S,
    ) -> None:
        self.store = store
        self.cache = cache
        self.clock = clock
        self.block_ms = block_ms
        self._overrun_late: float | None = None
        self.generation_check_ms = generation_check_ms
        self.on_change = on_change
        self.on_sync = on_sync
        self.on_discontinuity = on_discontinuity
        self.breaker = breaker
        self.reload_jitter_s = reload_jitter_s
        # Per shard: the last number applied (None: not loaded) and the id
        # of the last entry read.
        self.applied: list[int | None] = [None] * FEED_SHARDS
        self.positions: list[str] = ["0-0"] * FEED_SHARDS
        self.generation: str | None = None
        self.run_ids: frozenset[str] | None = None
        self.discontinuities: dict[str, int] = {}
        self.resyncs = 0
        self.resync_causes: dict[str, int] = {}
        self.gaps = 0  # shards loaded again after a gap
        self.applied_changes = 0
        self.in_sync = False  # loaded once, and following the feed
        self.synced = asyncio.Event()
        self._checked_generation_at = 0.0
        self._warn = RateLimitedLog(log)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="lcic-guard-change-feed")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _set_in_sync(self, value: bool) -> None:
        if value == self.in_sync:
            return
        self.in_sync = value
        if value:
            self.synced.set()
        if self.on_sync is not None:
            res = self.on_sync(value)
            if res is not None:
                await res

    # -- loading ------------------------------------------------------------

    async def _load_shard(self, shard: int, held: list[str] | None = None) -> int:
        """Load one shard from its snapshot and position its feed where the
        snapshot's number was read; ``held`` is what the cache holds of the
        shard (looked up if not given; nothing at the first load). Returns
        the records loaded."""
        cache = self.cache
        cache.shard_unsynced(shard)
        self.applied[shard] = None
        start = self.clock()
        seq, last = await self.store.feed_head(shard)
        chunks = await self.store.load_snapshot(shard)
        # Watch streams are told of what a reload changed: the feed entries
        # that made those changes may be before `last`, never to be read.
        if held is None:
            held = cache.shard_app_ids(shard) if self.in_sync else []
        before = {a: cache.held_version(a) for a in held}
        # Replace even a newer version: what Redis holds now is the truth
        # (anything newer than this read is on the feed after `last`).
        loaded = cache.put_loaded(shard, chunks)
        changed: list[tuple[str, bytes]] = []
        if before and self.in_sync and self.on_change is not None:
            changed = [
                (a, rec) for a, rec in loaded.items() if before.get(a) != HEAD.unpack_from(rec)[0]
            ]
        for app_id in before.keys() - loaded.keys():
            if not cache.is_corrupt(app_id):
                cache.put(app_id, None, start, replace=True)  # no longer in the table
        self.applied[shard] = seq
        self.positions[shard] = last
        cache.shard_loaded(shard, start)
        for app_id, rec in changed:
            await self._changed(app_id, unpack(app_id, rec)[0])
        return len(loaded)

    async def _changed(self, app_id: str, status: AppStatus | None) -> None:
        if self.on_change is not None:
            res = self.on_change(app_id, status)
            if res is not None:
                await res

    async def _load_all(self, cause: str, jitter_s: float) -> None:
        """Load every shard (in a random order, after a random wait of up to
        ``jitter_s``), keeping what is held meanwhile."""
        cache = self.cache
        for shard in range(FEED_SHARDS):
            cache.shard_unsynced(shard)
            self.applied[shard] = None
        self.resyncs += 1
        self.resync_causes[cause] = self.resync_causes.get(cause, 0) + 1
        if jitter_s > 0:
            await asyncio.sleep(random.uniform(0, jitter_s))
        start = self.clock()
        evictions, refused = cache.evictions, cache.refused_entries
        cache.complete = False
        order = list(range(FEED_SHARDS))
        random.shuffle(order)
        held = cache.app_ids_by_shard() if self.in_sync else [[] for _ in order]
        loaded = 0
        for shard in order:
            loaded += await self._load_shard(shard, held[shard])
        cache.complete = (
            cache.evictions == evictions
            and len(cache) <= cache.capacity
            and cache.refused_entries == refused
        )
        if not cache.complete:
            log.warning(
                "status table larger than --cache-size (%d): ids not held are read from Redis",
                cache.capacity,
            )
        log.info(
            "status table loaded (%s): %d applications in %.2fs",
            cause,
            loaded,
            (self.clock() - start) / 1000,
        )

    async def _repair(self, shard: int) -> None:
        """A gap in one shard: load that shard again, the others go on."""
        self.gaps += 1
        self.resync_causes["gap"] = self.resync_causes.get("gap", 0) + 1
        self._warn.warning(
            f"gap-{shard}",
            "feed shard %d skipped numbers (trimmed past this reader, or a write not "
            "seen): loading that shard again; its applications are read from Redis meanwhile",
            shard,
        )
        await self._load_shard(shard)

    # -- the store's continuity ---------------------------------------------

    async def _check_store(self) -> str | None:
        """The discontinuity since the last look, if any (one cause, the
        widest: a new data set, then a restart)."""
        gen = await self.store.ensure_generation()
        run_ids = await self._read_run_ids()
        self._checked_generation_at = asyncio.get_running_loop().time()
        cause = None
        if self.generation is not None and gen != self.generation:
            log.warning(
                "Redis holds a new data set (generation %s, was %s): loading the table "
                "again; answers read Redis meanwhile",
                gen,
                self.generation,
            )
            cause = NEW_GENERATION
        elif self.run_ids is not None and run_ids is not None and run_ids != self.run_ids:
            log.warning(
                "Redis restarted or failed over (run id %s, was %s): writes it had "
                "acknowledged may be lost; loading the table again; answers read Redis "
                "meanwhile",
                ",".join(sorted(run_ids)),
                ",".join(sorted(self.run_ids)),
            )
            cause = RUN_ID_CHANGED
        self.generation = gen
        if run_ids is not None:
            self.run_ids = run_ids
        return cause

    async def _read_run_ids(self) -> frozenset[str] | None:
        try:
            return await self.store.run_ids()
        except StoreError as exc:
            if store_unreachable(exc):
                raise
            # Answered with an error (INFO forbidden to this user): restarts
            # are then seen by a feed number going back.
            self._warn.warning("run-id", "cannot read Redis's run id (%s)", describe_error(exc))
            return None

    def _discontinuity(self, cause: str) -> None:
        """Count it and tell every watcher, before the table is loaded again."""
        self.discontinuities[cause] = self.discontinuities.get(cause, 0) + 1
        if self.on_discontinuity is not None:
            self.on_discontinuity(cause, self.clock())

    async def _reload(self, cause: str) -> None:
        """The store went back: every shard is loaded again, serving meanwhile."""
        self._discontinuity(cause)
        await self._load_all(_LOAD_CAUSE[cause], self.reload_jitter_s)

    async def _connect(self) -> None:
        went_back = await self._check_store()
        if self.breaker is not None:
            # Redis answers again: checks read it.
            self.breaker.success()
        if went_back is not None:
            self.cache.feed_healthy = True
            await self._reload(went_back)
        elif not self.in_sync:
            # The first load (or one a lost connection cut short): NOT_SERVING meanwhile.
            await self._load_all("start", 0)
        else:
            # The same store: resume every shard from where it was; a gap
            # shows in its numbers. Shards a lost connection left unloaded
            # are loaded now.
            for shard in range(FEED_SHARDS):
                if self.applied[shard] is None:
                    await self._load_shard(shard)
        self.cache.feed_healthy = True
        await self._set_in_sync(True)

    # -- following ------------------------------------------------------------

    def _silent(self, exc: BaseException) -> bool:
        """The feed's blocking read overran while this process's event loop
        kept time: Redis is silent (frozen, partitioned). When the overrun
        was noticed late, the loop itself was busy (a large batch, a starved
        CPU) and the reply may be sitting unread: SPEC R13 forbids calling
        that down, so the checks' own reads judge it instead."""
        late, self._overrun_late = self._overrun_late, None
        return isinstance(exc, TimeoutError) and late is not None and late < LOOP_ON_TIME_S

    def _groups(self) -> list[list[int]]:
        """Shards read by one command: all of them, or on a cluster (one slot
        per read) each alone."""
        if self.store.clustered:
            return [[s] for s in range(FEED_SHARDS)]
        return [list(range(FEED_SHARDS))]

    async def _read(self, shards: list[int]) -> list[FeedEntry]:
        positions = {s: self.positions[s] for s in shards if self.applied[s] is not None}
        if not positions:
            await asyncio.sleep(self.block_ms / 1000)
            return []
        # A Redis that stopped answering (frozen, partitioned) is noticed when
        # the blocking read overruns, not after the socket timeout. A timeout
        # scope rather than wait_for: Python 3.11's wait_for loses a
        # cancellation that lands as the read completes.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.block_ms / 1000 + 0.5
        try:
            async with asyncio.timeout_at(deadline):
                return await self.store.read_feeds(positions, self.block_ms, READ_COUNT)
        except TimeoutError:
            self._overrun_late = loop.time() - deadline
            raise

    async def _apply(self, entries: list[FeedEntry]) -> None:
        """Apply what a read brought, shard by shard, in each shard's order.
        Raises :class:`_WentBack` if a number went back; a gap loads its
        shard again."""
        now = self.clock()
        gaps: set[int] = set()
        per_shard = Counter(e.shard for e in entries)
        for entry in entries:
            shard = entry.shard
            applied = self.applied[shard]
            if applied is None or shard in gaps:
                continue  # being loaded: the load covers it
            self.positions[shard] = entry.entry_id
            if entry.seq < applied or (entry.seq == applied and not entry.is_mark):
                raise _WentBack(f"feed shard {shard} went from {applied} back to {entry.seq}")
            if entry.seq > applied + (0 if entry.is_mark else 1):
                # Not vouched for from this moment: its checks read Redis
                # until the repair below (which may wait behind others) is done.
                self.cache.shard_unsynced(shard)
                gaps.add(shard)
                continue
            self.applied[shard] = entry.seq
            if per_shard[shard] < READ_COUNT:
                # This read reached the shard's end: every change of it up
                # to now is applied, and the writer is alive.
                self.cache.confirm(shard, now)
            if entry.is_mark:
                continue
            if entry.status is not None:
                held = self.cache.held_version(entry.app_id)
                if held is not None and entry.status.version < held:
                    if await self._went_back(entry.app_id, held):
                        raise _WentBack(VERSION_WENT_BACK)
                    continue  # replayed after a load that held a newer one
                if self.cache.apply(entry.app_id, entry.status, now):
                    self.applied_changes += 1
            elif entry.room_id is not None:
                self.cache.forget_room(entry.app_id, entry.room_id)
            await self._changed(entry.app_id, entry.status)
        for shard in sorted(gaps):
            await self._repair(shard)

    async def _went_back(self, app_id: str, held: int) -> bool:
        """A change older than what is held: a replay after a load (Redis
        still holds the newer one), or Redis itself went backwards?"""
        rows = await self.store.read_rows([(app_id, None)])
        row = rows[0]
        if isinstance(row, Exception):
            return False
        stored = row[0]
        stored_version = stored.version if stored is not None else 0
        if stored_version >= held:
            return False
        log.warning(
            "status of %s went back from version %d to %d in Redis (restored from an older "
            "snapshot?): loading the table again; answers read Redis meanwhile",
            app_id,
            held,
            stored_version,
        )
        return True

    async def _follow(self) -> None:
        """Read every group of shards, one outstanding read each, applying
        what each brings as it comes; returns only by raising."""
        groups = self._groups()
        reads: dict[asyncio.Task[list[FeedEntry]], list[int]] = {}
        try:
            while True:
                for group in groups:
                    if group not in reads.values():
                        reads[asyncio.create_task(self._read(group))] = group
                done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                only_marks = True
                for task in done:
                    reads.pop(task)
                    entries = task.result()
                    only_marks = only_marks and all(e.is_mark for e in entries)
                    try:
                        await self._apply(entries)
                    except _WentBack as exc:
                        cause = str(exc)
                        if cause != VERSION_WENT_BACK:
                            log.warning(
                                "%s (Redis restored from an older snapshot?): loading the "
                                "table again; answers read Redis meanwhile",
                                cause,
                            )
                            cause = STREAM_ID_WENT_BACK
                        await self._cancel(reads)
                        # A new data set, or a restart, says more of what went back.
                        await self._reload(await self._check_store() or cause)
                        break
                due = self._checked_generation_at + self.generation_check_ms / 1000
                if asyncio.get_running_loop().time() >= due:
                    found = await self._check_store()
                    if found is not None:
                        await self._cancel(reads)
                        await self._reload(found)
                if only_marks and not reads:
                    await asyncio.sleep(MARKS_PAUSE_S)
        finally:
            await self._cancel(reads)

    @staticmethod
    async def _cancel(reads: dict[asyncio.Task[list[FeedEntry]], list[int]]) -> None:
        tasks = list(reads)
        reads.clear()
        for task in tasks:
            task.cancel()
        # A cancelled or failed read is dropped; this caller's own
        # cancellation still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self) -> None:
        backoff = 0.05
        connected = False
        warned = 0.0
        while True:
            try:
                if not connected:
                    await self._connect()
                    connected = True
                    backoff = 0.05
                    log.info("following the change feed (%d shards)", FEED_SHARDS)
                await self._follow()
            except asyncio.CancelledError:
                self.cache.feed_healthy = False
                raise
            except Exception as exc:
                if self.breaker is not None and (store_refused(exc) or self._silent(exc)):
                    # Before the cache stops being fresh: no check waits then.
                    self.breaker.trip(self.clock())
                mono = asyncio.get_running_loop().time()
                if connected or mono - warned >= 30:
                    warned = mono
                    log.warning(
                        "change feed lost (%s); answers are degraded until it is back",
                        describe_error(exc),
                    )
                connected = False
                self.cache.feed_healthy = False
                # Jittered, so that many sidecars do not reconnect in step;
                # capped low, so that answers are fresh soon after Redis is back.
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 0.5)
