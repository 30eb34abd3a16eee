"""ApplyOverride and ListOverrides: support overrides as billing facts.

An override is published on the billing feed like any billing event and
applied by the reconciler, so it is replayed, ordered and audited with the
rest of the account's facts; nothing here writes a status. The actor is the
caller's authenticated identity (:data:`lcic_guard.sidecar.auth.CALLER`),
never a request field, so without authentication no override is recorded.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Final

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.domain.evidence import OverrideEntry, override_log
from lcic_guard.domain.facts import (
    MAX_OVERRIDE_REASON,
    GraceExtended,
    Override,
    ReleaseHoldCleared,
    ReleaseHoldSet,
    parse_event_json,
    text_problem,
    to_json,
)
from lcic_guard.domain.policy import PolicyConfig, extension_limit, sweep_until
from lcic_guard.domain.text import unsafe_text_problem
from lcic_guard.domain.time import Millis, format_time
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.wire import BadRequest
from lcic_guard.store.billing_stream import publish_events
from lcic_guard.store.status import AccountFacts, Store

ORDER_WAIT_MS: Final = 1000
"""How far ahead of this sidecar's clock a hold or clear made elsewhere may
be dated and still be waited for, so that the new one is dated after it."""
KINDS: Final[dict[pb.OverrideKind.ValueType, type[Override]]] = {
    pb.OVERRIDE_KIND_EXTEND_GRACE: GraceExtended,
    pb.OVERRIDE_KIND_HOLD_RELEASE: ReleaseHoldSet,
    pb.OVERRIDE_KIND_CLEAR_HOLD: ReleaseHoldCleared,
}
_KIND_OF: Final = {cls: kind for kind, cls in KINDS.items()}
EVENT_ID_PREFIX: Final = "override:"
"""Ids of the overrides ApplyOverride publishes: not the reserved
``lcic-guard:`` prefix, which the reconciler dead-letters on the feed."""


def override_to_pb(fact: Override, recorded_at: Millis | None, effect: str) -> pb.Override:
    out = pb.Override(
        event_id=fact.event_id,
        kind=_KIND_OF[type(fact)],
        account_id=fact.account_id,
        actor=fact.actor,
        reason=fact.reason,
        effect=effect,
    )
    out.occurred_at.FromMilliseconds(fact.occurred_at)
    if recorded_at is not None:
        out.recorded_at.FromMilliseconds(recorded_at)
    if isinstance(fact, GraceExtended):
        out.until.FromMilliseconds(fact.until)
    return out


def entries_to_pb(entries: tuple[OverrideEntry, ...]) -> list[pb.Override]:
    return [override_to_pb(e.fact, e.recorded_at, e.effect) for e in entries]


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> None:
    await context.abort(code, msg)
    raise AssertionError("abort returned")  # pragma: no cover


async def _load(
    store: Store, account_id: str, context: grpc.aio.ServicerContext, timeout: float
) -> AccountFacts:
    try:
        return await asyncio.wait_for(store.load_account_facts(account_id), timeout)
    except Exception:
        await _abort(context, grpc.StatusCode.UNAVAILABLE, "status store unavailable")
        raise  # pragma: no cover


def _check_fields(request: pb.ApplyOverrideRequest, now: Millis) -> type[Override]:
    """The checks that need no store: each field on its own."""
    cls = KINDS.get(request.kind)
    if cls is None:
        raise BadRequest("kind: required (EXTEND_GRACE, HOLD_RELEASE or CLEAR_HOLD)")
    wire.require_id(request.account_id, "account_id")
    problem = text_problem(request.reason, MAX_OVERRIDE_REASON) or unsafe_text_problem(
        request.reason
    )
    if problem is not None:
        raise BadRequest(f"reason: {problem}")
    if cls is not GraceExtended:
        if request.HasField("until"):
            raise BadRequest("until: only for OVERRIDE_KIND_EXTEND_GRACE")
    elif wire.required_millis(request, "until", "until") <= now:
        raise BadRequest("until: must be in the future")
    return cls


def _fact(
    request: pb.ApplyOverrideRequest,
    cfg: PolicyConfig,
    actor: str,
    loaded: AccountFacts,
    account_id: str,
    now: Millis,
) -> Override:
    """The override the request asks for, checked against the account as it
    is now; BadRequest names the field that is wrong."""
    cls = _check_fields(request, now)
    # The account-level facts only: an app id no fact has keeps app facts out.
    account = sweep_until(loaded.facts, "", now, cfg, loaded.recorded_at)
    event_id = f"{EVENT_ID_PREFIX}{uuid.uuid4()}"
    if cls is not GraceExtended:
        if cls is ReleaseHoldCleared and not account.release_held:
            raise BadRequest(f"kind: account {account_id} has no release hold to clear")
        if cls is ReleaseHoldCleared:
            return ReleaseHoldCleared(event_id, now, account_id, actor, request.reason)
        return ReleaseHoldSet(event_id, now, account_id, actor, request.reason)
    until = wire.required_millis(request, "until", "until")
    alert = account.overdue_alert
    if alert is None:
        raise BadRequest(
            f"until: account {account_id} has no overdue episode open; there is no grace to extend"
        )
    bound = extension_limit(alert.occurred_at, cfg)
    if until > bound:
        raise BadRequest(
            f"until: at most {format_time(bound)} (the overdue alert of "
            f"{format_time(alert.occurred_at)} + the grace + --max-grace-extension)"
        )
    return GraceExtended(event_id, now, account_id, until, actor, request.reason)


async def _stamp(
    loaded: AccountFacts,
    account: str,
    cls: type[Override],
    clock: Callable[[], Millis],
    context: grpc.aio.ServicerContext,
) -> Millis:
    """When the override is made: now, never later (SPEC §2: a fact from the
    future is not recorded, and one dated ahead would not be in force now).

    The latest hold or clear by occurred_at decides (R14), so a hold or a
    clear must be dated after the one support made just before it: when one
    is dated at this very instant or a moment ahead (another sidecar's clock),
    wait for the clock to pass it. One dated further ahead is not waited for:
    this override is dated now and precedes it, and its effect says so."""
    now = clock()
    if cls is GraceExtended:  # the longest extension counts, whatever the order
        return now
    holds = [
        f.occurred_at for f in loaded.facts if isinstance(f, ReleaseHoldSet | ReleaseHoldCleared)
    ]
    newest = max(holds, default=now - 1)
    if now <= newest <= now + ORDER_WAIT_MS:
        await asyncio.sleep((newest - now + 1) / 1000)
        now = clock()
        if now <= newest:
            await _abort(
                context,
                grpc.StatusCode.ABORTED,
                f"another release-hold override of account {account} is "
                f"dated {format_time(newest)}, not yet past; try again",
            )
    return now


async def apply_override(
    store: Store,
    cfg: PolicyConfig,
    actor: str | None,
    request: pb.ApplyOverrideRequest,
    clock: Callable[[], Millis],
    context: grpc.aio.ServicerContext,
    *,
    timeout: float = 1.0,
) -> pb.ApplyOverrideResponse:
    """Validate the request, then publish the override on the billing feed."""
    cls = _check_fields(request, clock())
    if not actor:
        await _abort(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            "ApplyOverride: an override records who made it; the sidecar must authenticate "
            "callers (--auth-token-file or mutual TLS) and the caller needs scope 'admin'",
        )
    assert actor is not None
    account_id = wire.require_id(request.account_id, "account_id")
    loaded = await _load(store, account_id, context, timeout)
    if not loaded.facts:
        await _abort(context, grpc.StatusCode.NOT_FOUND, f"account_id: {account_id} is not known")
    now = await _stamp(loaded, account_id, cls, clock, context)
    fact = _fact(request, cfg, actor, loaded, account_id, now)
    text = to_json(fact)
    parse_event_json(text, now=now)  # what the reconciler will accept, or a bug here
    try:
        await asyncio.wait_for(publish_events(store.redis, [text]), timeout)
    except Exception:
        await _abort(context, grpc.StatusCode.UNAVAILABLE, "billing feed unavailable")
    # What it will do once recorded, by the same audit as ListOverrides.
    audit = override_log([*loaded.facts, fact], cfg, loaded.recorded_at)
    [effect] = [e.effect for e in audit if e.fact.event_id == fact.event_id]
    return pb.ApplyOverrideResponse(
        override=override_to_pb(fact, None, f"published; once the reconciler records it: {effect}")
    )


async def list_overrides(
    store: Store,
    cfg: PolicyConfig,
    request: pb.ListOverridesRequest,
    context: grpc.aio.ServicerContext,
    *,
    timeout: float = 1.0,
) -> pb.ListOverridesResponse:
    account_id = wire.require_id(request.account_id, "account_id")
    loaded = await _load(store, account_id, context, timeout)
    entries = override_log(loaded.facts, cfg, loaded.recorded_at)
    return pb.ListOverridesResponse(overrides=entries_to_pb(entries))
