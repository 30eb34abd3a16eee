"""Store continuity (SPEC R10): telling that Redis may have lost writes it
had acknowledged, and pausing releases when it did.

Redis answers OK to a write before it is on disk (and a replica promoted on
failover may miss the last writes of its primary). A payment applied and
answered can therefore vanish, and the facts then say the account still
owes: a release decided on them would be irreversible and wrong. Four signs
that this may have happened: the run id of a Redis server changed (a
restart or a failover), the store's generation changed (a new data set, ADR
0011), or a stream's last id went backwards. On any of them every release
pauses (see :func:`lcic_guard.domain.notices.counts_across`), the pause is
stored (it outlives this process), logged once and counted.
"""

from __future__ import annotations

import logging
from typing import Any

from lcic_guard.domain.notices import Pause
from lcic_guard.domain.time import Millis, format_time
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.store.codec import text
from lcic_guard.store.coordination import Coordination
from lcic_guard.store.keys import FEED_SHARDS, GUARD_STREAM, feed_key
from lcic_guard.store.status import Store

log = logging.getLogger(__name__)

# The streams whose last id must never go back: the announcements, and the
# feed shards every status write is published on (a status version going
# back shows there too).
WATCHED_STREAMS = (GUARD_STREAM, *(feed_key(s) for s in range(FEED_SHARDS)))


def _stream_id(raw: str | None) -> tuple[int, int]:
    if not raw or "-" not in raw:
        return (0, 0)
    ms, _, seq = raw.partition("-")
    return (int(ms), int(seq))


class StoreContinuity:
    """What this process has seen of the store, and the release pause."""

    def __init__(
        self,
        store: Store,
        coord: Coordination,
        notice_ms: int,
        metrics: ReconcilerMetrics | None = None,
        name: str = "",
    ) -> None:
        self.store = store
        self.coord = coord
        self.notice_ms = notice_ms
        self.metrics = metrics
        self.run_ids: str | None = None
        self.generation: str | None = None
        self._tops: dict[str, tuple[int, int]] = {}
        self.name = name
        self._mark: str | None = None  # the checked_at this process last stored

    async def _top(self, stream: str) -> tuple[int, int]:
        try:
            info: Any = await self.store.redis.xinfo_stream(stream)
        except Exception as exc:  # no such stream yet
            if "no such key" in str(exc).lower():
                return (0, 0)
            raise
        return _stream_id(text(info.get("last-generated-id")))

    async def check(self, now: Millis) -> Pause | None:
        """Compare the store with what was seen of it; on a discontinuity
        start a pause (once across replicas). Returns the pause in force."""
        # Read before the store is looked at, so that a pause another replica
        # starts meanwhile is taken as this discontinuity's one report.
        paused = (await self.coord.release_pause()).get("since", "")
        ids = ",".join(sorted(await self.store.run_ids()))
        generation = await self.store.ensure_generation()
        stored = await self.coord.continuity()
        tops = {s: await self._top(s) for s in WATCHED_STREAMS}
        stored_ids = stored.get("run_ids", "")
        cause = ""
        if stored_ids and stored_ids != ids:
            cause = "" if await self._restarted_losing_nothing(stored, tops) else "run_id"
        elif not stored_ids and self.run_ids is not None and self.run_ids != ids:
            cause = "run_id"  # restarted with no data at all
        elif (stored.get("generation") and stored["generation"] != generation) or (
            self.generation is not None
            and self.generation != generation
            and stored.get("generation") != generation
        ):
            cause = "generation"
        elif stored_ids == ids and any(
            tops[s] < self._tops.get(s, (0, 0)) for s in WATCHED_STREAMS
        ):
            cause = "stream_id"
        started = await self.coord.note_continuity(
            stored_ids, ids, generation, now, cause, self.name, expected_pause=paused
        )
        self._mark = str(now)
        if stored_ids and stored_ids != ids and not cause:
            log.info(
                "Redis restarted without losing acknowledged writes (append-only file, "
                "appendfsync always): no release pause",
                extra={"event": "store_restarted"},
            )
        if started:
            log.warning(
                "the store may have lost acknowledged writes (%s): every release is paused "
                "until the notice period has passed with a new notice, or a billing snapshot "
                "is loaded",
                {
                    "run_id": "a Redis server restarted or failed over",
                    "generation": "Redis holds a new data set",
                    "stream_id": "a stream's last id went backwards",
                }[cause],
                extra={"event": "release_pause", "cause": cause},
            )
            if self.metrics is not None:
                self.metrics.on_release_pause(cause)
        self.run_ids, self.generation = ids, generation
        if cause or stored_ids != ids:
            self._tops = tops  # a new history starts here
        else:
            self._tops = {s: max(tops[s], self._tops.get(s, (0, 0))) for s in WATCHED_STREAMS}
        return await self.pause()

    async def _restarted_losing_nothing(
        self, stored: dict[str, str], tops: dict[str, tuple[int, int]]
    ) -> bool:
        """A restart that provably lost no acknowledged write, so that it
        needs no pause: Redis fsyncs every write before answering (AOF,
        ``appendfsync always``) and was not a replica promoted, and this
        process, running across the restart, finds the very last thing it
        stored there and no stream gone back. A process that was not running
        cannot tell a restart from a restore of an older file: it pauses."""
        return (
            self._mark is not None
            and stored.get("checked_at") == self._mark
            and stored.get("checked_by") == self.name
            and all(tops[s] >= self._tops.get(s, (0, 0)) for s in WATCHED_STREAMS)
            and await self.coord.writes_survive_restart()
        )

    async def pause(self) -> Pause | None:
        """The last release pause stored, None if there never was one."""
        raw = await self.coord.release_pause()
        if not raw.get("since"):
            return None
        snapshot = raw.get("snapshot_at")
        return Pause(int(raw["since"]), raw.get("cause", ""), int(snapshot) if snapshot else None)

    async def snapshot_loaded(self, started_at: Millis, now: Millis) -> None:
        """A billing snapshot whose loading began at ``started_at`` is now
        fully applied: it confirms the facts of a pause that began before."""
        pause = await self.pause()
        if pause is None or pause.lifted_by_snapshot_at is not None or started_at < pause.since:
            return
        await self.coord.lift_pause(pause.since, now)
        log.warning(
            "billing snapshot loaded after the store discontinuity of %s: releases confirmed "
            "by it may proceed",
            format_time(pause.since),
            extra={"event": "release_pause_lifted"},
        )

    def describe(self, pause: Pause | None, now: Millis) -> str:
        """One line for release-plan and /readyz."""
        if pause is None:
            return "store continuous: no release pause"
        if pause.lifted_by_snapshot_at is not None:
            return (
                f"release pause of {format_time(pause.since)} ({pause.cause}) lifted by a "
                f"billing snapshot loaded at {format_time(pause.lifted_by_snapshot_at)}"
            )
        if pause.active(now, self.notice_ms):
            return (
                f"RELEASES PAUSED since {format_time(pause.since)} ({pause.cause}): none before "
                f"{format_time(pause.since + self.notice_ms)}, each after a new notice, "
                "unless a billing snapshot is loaded"
            )
        return (
            f"store discontinuity at {format_time(pause.since)} ({pause.cause}): only notices "
            "made since then count"
        )
