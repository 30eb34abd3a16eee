"""Store.run_ids: the evidence that Redis restarted or failed over (SPEC R10)."""

from __future__ import annotations

from lcic_guard.demo import EmbeddedRedis
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store


async def test_a_restart_changes_the_run_ids() -> None:
    server = EmbeddedRedis().start()
    try:
        store = Store(connect(server.url))
        before = await store.run_ids()
        assert len(before) == 1 and len(next(iter(before))) == 40
        assert await store.run_ids() == before  # stable while the server runs
        await store.close()
        port = server.port
        server.stop()
        server = EmbeddedRedis(port=port).start()
        store = Store(connect(server.url))
        after = await store.run_ids()
        assert after != before and len(after) == 1
        await store.close()
    finally:
        server.stop()
