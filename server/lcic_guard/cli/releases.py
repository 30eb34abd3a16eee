"""``release-plan``: the releases (R10) the reconciler has scheduled and
whether each could run now; a dry run that changes nothing."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from lcic_guard import render
from lcic_guard.cli._common import needs_redis, settings
from lcic_guard.config import Settings
from lcic_guard.domain.time import wall_clock
from lcic_guard.flags import add_debug_flag, add_policy_flags, add_reconcile_flags, add_store_flags
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "release-plan",
        help="list scheduled releases (a dry run)",
        description="List every release of resources (R10) the reconciler has "
        "scheduled: the account, its applications, release_at, and whether it "
        "would be performed if it fell due now, with the reason. Changes nothing.",
    )
    add_store_flags(p)
    add_policy_flags(p, sidecar=False)
    add_reconcile_flags(p, embedded=False)
    add_debug_flag(p)


def release_plan(args: argparse.Namespace) -> int:
    return asyncio.run(_release_plan(settings(args)))


async def _release_plan(settings: Settings) -> int:
    from lcic_guard import runner

    url = needs_redis(settings, "release-plan")
    store = Store(connect(url))
    try:
        await runner.require_redis(store, url)
        rec = runner.build_reconciler(settings, store, None, clock=wall_clock)
        plans = await rec.plan_releases()
        continuity = await rec.check_continuity()  # a discontinuity pauses every release
    finally:
        await store.close()
    print(render.release_plan(plans, wall_clock(), continuity))
    return 0
