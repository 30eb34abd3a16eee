"""Who works which deadlines, under which lease (ADR 0033).

Release deadlines (R10) stay in one set worked only by the holder of the
leader lease: a release needs its fencing token. Every other deadline
(``app:``, ``notice:``, ``warn:``) lives in one of ``DEADLINE_SHARDS``
shards, each worked by the replica holding that shard's lease. Each replica
notes itself alive in Redis every tick and holds about its fair share of the
shards (all of them divided by the replicas alive, rounded up): a replica
joining makes the others give shards up, one killed leaves its shards to be
taken once their leases lapse. Two replicas working one member at once
(a lease handed over mid-batch) is safe: every announcement is claimed once
(status cursor or ledger) and every deadline update is redone from the
newest facts.

Each held set is worked by a task of its own, batch after batch, so a
backlog in one shard never holds up another. The leases are renewed by one
background task, whatever the workers are doing; a worker checks its lease
before each batch, and a lease that could not be renewed in time stops its
worker, before the lease can have passed to anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lcic_guard.domain.time import Millis
from lcic_guard.logs import RateLimitedLog, describe_error
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.store.coordination import Coordination
from lcic_guard.store.keys import DEADLINE_SHARDS, DEADLINES, shard_deadlines
from lcic_guard.tasks import stop_tasks, wait_event

log = logging.getLogger(__name__)

# Of a lease's TTL, the part its holder uses after the renewal was sent: the
# rest covers the two clocks (this process's and Redis's) not running at
# exactly the same rate, so the holder always stops first.
USABLE_SHARE = 0.8
# Leases are renewed this many times per TTL: two renewals may fail (Redis
# slow or away) before the holder stops.
RENEWALS_PER_TTL = 3
# A failed batch is tried again after this pause (Redis away: not in a loop).
FAILED_BATCH_PAUSE_S = 1.0


@dataclass
class Lease:
    """One lease this replica holds or may take: the leader's or a shard's.

    ``expires`` is on this process's monotonic clock: from then on the
    holder acts as if it had lost the lease, renewed or not (a renewal that
    failed, one stuck in a slow Redis)."""

    token: int = 0
    expires: float = 0.0

    def held(self) -> bool:
        return self.token > 0 and time.monotonic() < self.expires

    def note(self, token: int, sent: float, ttl_ms: int) -> None:
        """What a take or renewal sent at ``sent`` (monotonic) answered: the
        lease then runs at least ``ttl_ms`` from ``sent``, so the holder may
        use it for its usable share of that."""
        self.token = token
        self.expires = sent + ttl_ms * USABLE_SHARE / 1000 if token else 0.0

    def keep(self, token: int) -> None:
        """A token set by hand (a tool, a test): held until changed."""
        self.token = token
        self.expires = math.inf if token else 0.0

    def lose(self) -> None:
        self.token = 0
        self.expires = 0.0


def fair_share(live: int) -> int:
    """How many shards a replica holds when ``live`` replicas are alive."""
    return -(-DEADLINE_SHARDS // max(live, 1))


@dataclass
class _Worker:
    giving_up: asyncio.Event
    task: asyncio.Task[None] = field(init=False)


class DeadlineLanes:
    """This replica's share of the deadline work: the leader's set while it
    holds the leader lease, and its fair share of the shards.

    :meth:`tick` (from the reconciler's loop) takes and gives up shards and
    starts and stops their workers; :meth:`renew_forever` renews every held
    lease in the background; :meth:`stop` ends it all. ``work(key, now)``
    processes one batch of the set ``key`` due at ``now`` and says how many
    members it took: the reconciler's, which owns what a deadline does."""

    def __init__(
        self,
        coord: Coordination,
        name: str,
        *,
        leader: Lease,
        work: Callable[[str, Millis], Awaitable[int]],
        clock: Callable[[], Millis],
        ttl_ms: int,
        idle_s: float,
        metrics: ReconcilerMetrics | None = None,
    ) -> None:
        self.coord = coord
        self.name = name
        self.leader = leader
        self.shards = {s: Lease() for s in range(DEADLINE_SHARDS)}
        self._work = work
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._idle_s = idle_s
        self._metrics = metrics
        self._warn = RateLimitedLog(log)
        self._workers: dict[str, _Worker] = {}
        # Where this replica starts looking for a free shard: replicas that
        # start together do not all try the same ones first.
        self._first = zlib.crc32(name.encode()) % DEADLINE_SHARDS

    def held_shards(self) -> list[int]:
        return [s for s, lease in self.shards.items() if lease.held()]

    # -- the fair split ------------------------------------------------------------

    async def tick(self) -> None:
        """Note this replica alive, hold its fair share of the shards, and
        have a worker on every set it holds (the leader's included)."""
        live = await self.coord.register_replica(self.name, self._ttl_ms)
        for shard, lease in self.shards.items():
            if lease.token and not lease.held():
                self._lapsed(shard_deadlines(shard), lease)
        share = fair_share(live)
        mine = [s for s in self.held_shards() if not self._giving_up(shard_deadlines(s))]
        for shard in sorted(mine, reverse=True)[: max(0, len(mine) - share)]:
            worker = self._workers.get(shard_deadlines(shard))
            if worker is None or worker.task.done():
                await self._give_up(shard, self.shards[shard])
            else:
                # Given up once its worker ends the batch in hand, so that
                # the replica taking it over does not start the same members.
                worker.giving_up.set()
        want = share - len(mine)
        for i in range(DEADLINE_SHARDS):
            if want <= 0:
                break
            shard = (self._first + i) % DEADLINE_SHARDS
            lease = self.shards[shard]
            if lease.token or shard_deadlines(shard) in self._workers:
                continue
            sent = time.monotonic()
            lease.note(
                await self.coord.hold_shard(shard, self.name, self._ttl_ms), sent, self._ttl_ms
            )
            if lease.token:
                want -= 1
        self._run_workers()
        if self._metrics is not None:
            self._metrics.on_deadline_shards(len(self.held_shards()))

    def _run_workers(self) -> None:
        sets: dict[str, tuple[int | None, Lease]] = {
            shard_deadlines(s): (s, lease) for s, lease in self.shards.items()
        }
        sets[DEADLINES] = (None, self.leader)
        for key, (shard, lease) in sets.items():
            worker = self._workers.get(key)
            if worker is not None and worker.task.done():
                del self._workers[key]
                worker = None
            if worker is None:
                if lease.held():
                    worker = _Worker(asyncio.Event())
                    worker.task = asyncio.create_task(
                        self._run(key, shard, lease, worker.giving_up), name=f"deadlines {key}"
                    )
                    self._workers[key] = worker
            elif not lease.held() and not worker.giving_up.is_set():
                # Lost (the leader lease taken, or not renewed in time): its
                # work stops now, not at the end of the batch.
                worker.task.cancel()

    def _giving_up(self, key: str) -> bool:
        worker = self._workers.get(key)
        return worker is not None and not worker.task.done() and worker.giving_up.is_set()

    def _lapsed(self, key: str, lease: Lease) -> None:
        """A lease not renewed in time: its worker stops now, mid-batch if
        need be (as if this replica had died there), before another replica
        can hold the lease."""
        if lease.token:
            log.warning("%s: the lease on %s lapsed; its work stops", self.name, key)
        lease.lose()
        worker = self._workers.get(key)
        if worker is not None:
            worker.task.cancel()

    # -- the workers --------------------------------------------------------------

    async def _run(
        self, key: str, shard: int | None, lease: Lease, giving_up: asyncio.Event
    ) -> None:
        """Work one set, batch after batch, while its lease is held; a shard
        given up is resigned once the batch in hand is done."""
        try:
            while lease.held() and not giving_up.is_set():
                try:
                    done = await self._work(key, self._clock())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._warn.warning(
                        f"deadlines:{key}",
                        "deadline work on %s failed (%s); retrying",
                        key,
                        describe_error(exc),
                    )
                    if self._metrics is not None:
                        self._metrics.on_error("deadlines")
                    await asyncio.sleep(FAILED_BATCH_PAUSE_S)
                    continue
                if not done:
                    await wait_event(giving_up, self._idle_s)
        finally:
            if giving_up.is_set() and shard is not None:
                await self._give_up(shard, lease)

    async def _give_up(self, shard: int, lease: Lease) -> None:
        lease.lose()
        try:
            await self.coord.resign_shard(shard, self.name)
        except Exception as exc:  # it lapses on its own within a TTL
            self._warn.warning(
                "deadlines:resign", "could not give up shard %d (%s)", shard, describe_error(exc)
            )

    # -- renewal -----------------------------------------------------------------

    async def renew_forever(self, stop: asyncio.Event) -> None:
        """Renew every held lease :data:`RENEWALS_PER_TTL` times a TTL, in
        the background: a batch that takes longer than a TTL keeps its lease."""
        every = self._ttl_ms / 1000 / RENEWALS_PER_TTL
        while not stop.is_set():
            await self.renew()
            await wait_event(stop, every)

    async def renew(self) -> None:
        held = [(s, lease) for s, lease in self.shards.items() if lease.token]
        calls = [self.coord.hold_shard(s, self.name, self._ttl_ms) for s, _ in held]
        leases = [(shard_deadlines(s), lease) for s, lease in held]
        if self.leader.token:
            leases.append((DEADLINES, self.leader))
            calls.append(self.coord.hold_lease(self.name, self._ttl_ms))
        # Noted alive here too: a tick held up by a busy process must not
        # make the other replicas count this one out.
        calls.append(self.coord.register_replica(self.name, self._ttl_ms))
        tokens = [lease.token for _, lease in leases]
        sent = time.monotonic()
        answers = await asyncio.gather(*calls, return_exceptions=True)
        # The last answer is the replicas' count.
        for (key, lease), token, answer in zip(leases, tokens, answers, strict=False):
            if lease.token != token:
                continue  # given up or taken again meanwhile: this answer is stale
            if isinstance(answer, BaseException):
                self._warn.warning(
                    "deadlines:renew", "could not renew a lease (%s)", describe_error(answer)
                )
                if not lease.held():
                    self._lapsed(key, lease)
            elif answer:
                lease.note(int(answer), sent, self._ttl_ms)
            else:
                self._lapsed(key, lease)

    # -- stopping ------------------------------------------------------------------

    def cancel(self) -> None:
        """Cancel every worker now (nothing awaited); :meth:`stop` waits."""
        for worker in self._workers.values():
            worker.task.cancel()

    async def stop(self, *, resign: bool) -> None:
        """Stop every worker; with ``resign`` (a clean stop), give every
        shard up and leave the replicas alive, so the others take over at
        once rather than after a TTL. Without it, as if killed."""
        self.cancel()
        await stop_tasks([w.task for w in self._workers.values()])
        self._workers = {k: w for k, w in self._workers.items() if not w.task.done()}
        if not resign:
            return
        for shard, lease in self.shards.items():
            if lease.token:
                await self._give_up(shard, lease)
        await self.coord.forget_replica(self.name)
