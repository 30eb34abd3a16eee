"""Store continuity (SPEC R10): the signs that Redis may have lost
acknowledged writes, and the release pause they start. A real redis-server of
the test's own, killed and restarted; the reconciler in process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from lcic_guard.demo import EmbeddedRedis
from lcic_guard.domain.policy import PolicyConfig
from lcic_guard.reconciler import Reconciler
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.reconciler.sources import FileSource
from lcic_guard.store.connect import connect
from lcic_guard.store.keys import GUARD_STREAM
from lcic_guard.store.status import Store

from tests.reconciler.test_reconciler import quick
from tests.support.clock import T0, FakeClock
from tests.support.events import Events

NOTICE = PolicyConfig().release_notice_ms


@pytest_asyncio.fixture
async def rdb_only() -> AsyncIterator[tuple[EmbeddedRedis, Store]]:
    server = EmbeddedRedis().start()
    store = Store(connect(server.url))
    yield server, store
    await store.close()
    server.stop()


@pytest_asyncio.fixture
async def aof_always() -> AsyncIterator[tuple[EmbeddedRedis, Store]]:
    server = EmbeddedRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    store = Store(connect(server.url))
    yield server, store
    await store.close()
    server.stop()


def reconciler(store: Store, clock: FakeClock, name: str = "r1") -> Reconciler:
    return Reconciler(
        store,
        PolicyConfig(),
        quick(),
        clock=clock,
        name=name,
        metrics=ReconcilerMetrics(),
    )


async def restart(server: EmbeddedRedis, store: Store) -> None:
    server.kill()
    server.start()
    for _ in range(100):
        try:
            await store.redis.ping()
            return
        except Exception:
            continue


def pauses(rec: Reconciler, cause: str) -> float:
    assert rec.metrics is not None
    return float(rec.metrics.release_pauses.labels(cause)._value.get())


async def test_a_restart_from_rdb_pauses_releases_once_and_the_pause_is_stored(
    rdb_only: tuple[EmbeddedRedis, Store],
) -> None:
    server, store = rdb_only
    clock = FakeClock(T0)
    r1, r2 = reconciler(store, clock, "r1"), reconciler(store, clock, "r2")
    assert "no release pause" in await r1.check_continuity()
    await r2.check_continuity()
    await store.redis.save()
    await restart(server, store)
    clock.advance(1000)
    line = await r1.check_continuity()
    await r2.check_continuity()
    assert "RELEASES PAUSED" in line and "run_id" in line
    assert pauses(r1, "run_id") + pauses(r2, "run_id") == 1  # of two replicas, one reports
    pause = await r1.releaser.continuity.pause()
    assert pause is not None and pause.since == T0 + 1000 and pause.cause == "run_id"
    # A new process (nothing in memory) sees the same pause: it is stored.
    later = reconciler(store, clock, "r3")
    assert "RELEASES PAUSED" in await later.check_continuity()
    clock.now = T0 + 1000 + NOTICE
    assert "only notices made since then count" in await later.check_continuity()


async def test_a_restart_with_every_write_fsynced_needs_no_pause_for_a_process_that_ran_across(
    aof_always: tuple[EmbeddedRedis, Store],
) -> None:
    server, store = aof_always
    clock = FakeClock(T0)
    rec = reconciler(store, clock)
    await rec.check_continuity()
    await restart(server, store)
    clock.advance(1000)
    assert "no release pause" in await rec.check_continuity()
    assert pauses(rec, "run_id") == 0
    # A process that did not run across the restart cannot tell it from a
    # restore of an older file: it pauses.
    await restart(server, store)
    fresh = reconciler(store, clock, "r2")
    assert "RELEASES PAUSED" in await fresh.check_continuity()


async def test_a_stream_id_going_back_and_a_new_generation_pause_releases(
    rdb_only: tuple[EmbeddedRedis, Store],
) -> None:
    _, store = rdb_only
    clock = FakeClock(T0)
    rec = reconciler(store, clock)
    await store.redis.xadd(GUARD_STREAM, {"event": "{}"}, id="5000-0")
    await rec.check_continuity()
    await store.redis.delete(GUARD_STREAM)
    await store.redis.xadd(GUARD_STREAM, {"event": "{}"}, id="10-0")
    clock.advance(1000)
    assert "stream_id" in await rec.check_continuity()
    assert pauses(rec, "stream_id") == 1

    await store.redis.flushall()  # the data set is gone: a new generation
    clock.advance(1000)
    line = await rec.check_continuity()
    assert "RELEASES PAUSED" in line
    pause = await rec.releaser.continuity.pause()
    assert pause is not None and pause.since == T0 + 2000
    assert pauses(rec, "run_id") + pauses(rec, "generation") == 1


async def test_a_stream_going_back_seen_by_racing_replicas_is_reported_once(
    rdb_only: tuple[EmbeddedRedis, Store],
) -> None:
    # The run ids stay what both replicas read: they alone cannot tell the
    # second replica that the first has just reported it.
    _, store = rdb_only
    clock = FakeClock(T0)
    r1, r2 = reconciler(store, clock, "r1"), reconciler(store, clock, "r2")
    await store.redis.xadd(GUARD_STREAM, {"event": "{}"}, id="5000-0")
    await r1.check_continuity()
    await r2.check_continuity()
    await store.redis.delete(GUARD_STREAM)
    await store.redis.xadd(GUARD_STREAM, {"event": "{}"}, id="10-0")
    clock.advance(1000)
    lines = await asyncio.gather(r1.check_continuity(), r2.check_continuity())
    assert all("RELEASES PAUSED" in line for line in lines)
    assert pauses(r1, "stream_id") + pauses(r2, "stream_id") == 1


async def test_a_billing_snapshot_loaded_after_the_detection_lifts_the_pause(
    rdb_only: tuple[EmbeddedRedis, Store], tmp_path: Path, events: Events
) -> None:
    server, store = rdb_only
    clock = FakeClock(T0)
    rec = reconciler(store, clock)
    await rec.check_continuity()
    await store.redis.save()
    await restart(server, store)
    clock.advance(1000)
    assert "RELEASES PAUSED" in await rec.check_continuity()

    snapshot = tmp_path / "snapshot.jsonl"
    snapshot.write_text("".join(json.dumps(e) + "\n" for e in events.app("acct-1", "app-1")))
    clock.advance(1000)
    loader = Reconciler(store, PolicyConfig(), quick(), [FileSource(snapshot)], clock=clock)
    await loader.drain(loader.sources[0])
    pause = await rec.releaser.continuity.pause()
    assert pause is not None and pause.lifted_by_snapshot_at == T0 + 2000
    assert "lifted by a billing snapshot" in await rec.check_continuity()
