"""The classroom-report merge has one definition, the domain's
(:func:`lcic_guard.domain.rooms.merge_report`, R6 and ADR 0014); the store
runs it atomically in Redis as ``lua/report_room.lua``. Random report
sequences go through the real script on a real redis-server and through the
domain function, and every stored record must be the one the domain gives,
including which other rooms the script forgets once a hash holds many."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcic_guard.domain.policy import HOUR, MINUTE, PolicyConfig
from lcic_guard.domain.rooms import RoomRecord, forgettable, merge_report, report_record
from lcic_guard.domain.time import Millis
from lcic_guard.store.keys import ROOM_FIELD_PREFIX, status_key
from lcic_guard.store.status import ROOM_PRUNE_THRESHOLD, Store

T0: Millis = 1_790_000_000_000
APP = "app-1"
CFG = PolicyConfig()

# A report as the sidecar sends it once believed (see start_report_problem):
# (room, now, started_at, scheduled_end, ended_at). Times stay near the
# present, as believed reports do; the store keeps them exactly (Lua's cjson
# would round numbers of 15 digits and more, which no believed time reaches).
Report = tuple[str, Millis, Millis | None, Millis | None, Millis | None]


@st.composite
def reports(draw: st.DrawFn, room_ids: st.SearchStrategy[str]) -> Report:
    room = draw(room_ids)
    now = T0 + draw(st.integers(0, 30 * HOUR))
    if draw(st.booleans()):
        started = now + draw(st.integers(-CFG.max_class_ms, 5 * MINUTE))
        end = draw(st.one_of(st.none(), st.integers(1, 30 * HOUR).map(lambda d: started + d)))
        return room, now, started, end, None
    return room, now, None, None, now + draw(st.integers(-CFG.max_class_ms, 5 * MINUTE))


def record_of(raw: Any) -> RoomRecord:
    obj = json.loads(raw)
    return RoomRecord(obj.get("s"), obj.get("e"), obj.get("x"), obj["u"])


async def stored_rooms(store: Store) -> dict[str, RoomRecord]:
    fields = await store.redis.hgetall(status_key(APP))
    names = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    return {
        k.removeprefix(ROOM_FIELD_PREFIX): record_of(v)
        for k, v in names.items()
        if k.startswith(ROOM_FIELD_PREFIX)
    }


async def run(store: Store, sequence: list[Report]) -> None:
    await store.redis.flushall()
    # The script refuses a report for an application the table does not know.
    await store.redis.hset(status_key(APP), "account", "acct-1")
    model: dict[str, RoomRecord] = {}
    for room, now, started, end, ended in sequence:
        report = report_record(CFG, started_at=started, scheduled_end=end, ended_at=ended)
        known = await store.report_room(
            APP,
            room,
            now=now,
            until=report.until,
            started_at=started,
            scheduled_end=end,
            ended_at=ended,
        )
        assert known
        model[room] = merge_report(model.get(room), report)
        if len(model) + 1 > ROOM_PRUNE_THRESHOLD:  # + the account field
            model = {r: v for r, v in model.items() if r == room or not forgettable(v, now)}
        assert await stored_rooms(store) == model


FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURES)
@given(st.lists(reports(st.sampled_from(["r1", "r2", "r3"])), min_size=1, max_size=12))
async def test_the_script_merges_reports_as_the_domain_does(
    store: Store, sequence: list[Report]
) -> None:
    await run(store, sequence)


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURES)
@given(
    st.lists(
        # Mostly distinct rooms, so that the hash outgrows the threshold.
        reports(st.integers(0, 10**6).map(lambda i: f"r{i}")),
        min_size=ROOM_PRUNE_THRESHOLD + 5,
        max_size=ROOM_PRUNE_THRESHOLD + 30,
    )
)
async def test_the_script_forgets_the_rooms_the_domain_forgets(
    store: Store, sequence: list[Report]
) -> None:
    await run(store, sequence)


async def test_a_report_for_an_unknown_application_is_refused(store: Store) -> None:
    assert not await store.report_room(APP, "r1", now=T0, until=T0 + HOUR, started_at=T0)
    assert await store.redis.exists(status_key(APP)) == 0
