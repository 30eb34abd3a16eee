"""Announcements on ``lcic:guard:events``, each exactly once across replicas:
``status_changed`` once a state has settled, ``release_scheduled`` (R10's
notice and reminders) and ``resources_released``.

Every one follows the same steps: a cursor records what was announced; a
writer claims the next one atomically (cursor and an outbox holding the
payload, in one script), adds it to the stream, then clears the outbox. A
writer that dies in between leaves the outbox, which another replica takes
over once it is stale and finishes after checking the stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lcic_guard.domain.evidence import override_log
from lcic_guard.domain.facts import GraceExtended
from lcic_guard.domain.notices import (
    RELEASE_SCHEDULED,
    LedgerRecord,
    Notice,
    due_notice,
    expired_records,
    notice_plan,
)
from lcic_guard.domain.policy import (
    AppStatus,
    PolicyConfig,
    Segment,
    notice_episode,
    open_overdue_alert,
    overdue_notice,
)
from lcic_guard.domain.time import Millis, format_time, parse_time
from lcic_guard.domain.warnings import ScheduledSuspension, scheduled_suspensions
from lcic_guard.reconciler.config import LEDGER_TRIM_BATCH, STALE_OUTBOX_MS, ReconcilerConfig
from lcic_guard.reconciler.metrics import ReconcilerMetrics
from lcic_guard.store.coordination import Coordination, Outbox, SettleRow
from lcic_guard.store.keys import (
    app_deadline,
    meta_key,
    notice_deadline,
    status_key,
    warning_deadline,
)
from lcic_guard.store.status import AccountFacts, Store

log = logging.getLogger(__name__)

ANNOUNCED_FIELD = "announced"
RELEASE_FIELD = "released"
NOTICE_FIELD = "notice"
WARNED_FIELD = "warned"


def _state_key(seg: Segment) -> str:
    return json.dumps([seg.state.value, [r.value for r in seg.reasons]], separators=(",", ":"))


def _status_event(
    status: AppStatus, seg: Segment, announced: str, new: str, now: Millis
) -> dict[str, Any]:
    """The ``status_changed`` announcing ``seg`` (state key ``new``) after
    the state last announced."""
    old = json.loads(announced) if announced else [None, []]
    at = seg.starts_at if seg.starts_at <= now else now
    effective = seg.effective_at if seg.effective_at is not None else at
    return {
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


def _notice_series(announcement_id: str, account_id: str) -> str:
    """The episode of a ``release_scheduled`` from its id
    ``notice:ACCOUNT:SERIES:KIND`` (a kind holds no colon)."""
    rest = announcement_id.removeprefix(f"notice:{account_id}:")
    return rest.rsplit(":", 1)[0]


def ledger_record(event: dict[str, Any], now: Millis, run_ids: str) -> LedgerRecord:
    """What the ledger keeps of an announcement committed at ``now``."""
    kind = str(event["type"])
    account = str(event.get("account_id", ""))
    aid = str(event["announcement_id"])
    dates: dict[str, Millis] = {}
    episode = ""
    if kind == RELEASE_SCHEDULED:
        episode = _notice_series(aid, account)
        dates["release_at"] = parse_time(event["release_at"], "release_at")
    elif kind == "suspension_scheduled":
        episode = aid.removeprefix("warn:").rsplit(":", 1)[0]
        dates["at"] = parse_time(event["at"], "at")
    elif kind == "override_applied":
        episode = str(event.get("event_id", ""))
        if event.get("until"):
            dates["until"] = parse_time(event["until"], "until")
    elif kind == "resources_released":
        episode = ",".join(str(a) for a in event.get("app_ids") or ())
    return LedgerRecord(
        aid, kind, account, episode, dates, committed_at=now, run_ids=tuple(run_ids.split(","))
    )


class Announcer:
    def __init__(
        self,
        store: Store,
        coord: Coordination,
        policy: PolicyConfig,
        config: ReconcilerConfig,
        metrics: ReconcilerMetrics | None = None,
    ) -> None:
        self.store = store
        self.coord = coord
        self.policy = policy
        self.config = config
        self.metrics = metrics

    async def _announce(self, event: dict[str, Any]) -> None:
        """Add an announcement to the stream, which keeps about the last
        ``ledger_retention_ms`` of them (ADR 0031): what reads it back here
        (a takeover's check) looks only seconds back."""
        await self.store.announce(event, keep_ms=self.config.ledger_retention_ms)

    async def _committed(self, event: dict[str, Any], now: Millis) -> tuple[str, str, str]:
        """The ledger entry of an account's announcement now on the stream:
        written with the outbox's clearing, in one step."""
        ids = ",".join(sorted(await self.store.run_ids()))
        record = ledger_record(event, now, ids)
        return record.account_id, record.announcement_id, record.to_json()

    async def status_change(self, status: AppStatus, now: Millis) -> Millis | None:
        """Announce the app's state at ``now`` once it differs from the last
        one announced and has held for the settle time: noted, then claimed
        atomically, so racing replicas announce it once and a state that
        reverts within the settle time is never announced.

        Returns when the app must be looked at again for it (a state waiting
        to settle, an announcement in flight, a claim lost to another
        replica), or None when nothing is pending."""
        return (await self.status_changes([status], now))[0]

    async def status_changes(
        self,
        statuses: Sequence[AppStatus],
        now: Millis,
        cursors: Sequence[tuple[str, Outbox | None, str | None]] | None = None,
    ) -> list[Millis | None]:
        """:meth:`status_change` for many applications at once (a batch of
        deadlines): the same steps in the same order for each, each step's
        Redis work for all of them in one round trip. ``cursors``: their
        announcement cursors, when read with the statuses."""
        again: list[Millis | None] = [None] * len(statuses)
        if cursors is None:
            cursors = await self.coord.status_cursors([s.app_id for s in statuses], ANNOUNCED_FIELD)
        settle = self.config.announce_settle_ms
        todo: list[tuple[int, SettleRow, dict[str, Any], str | None]] = []
        for i, (status, (announced, outbox, candidate)) in enumerate(
            zip(statuses, cursors, strict=True)
        ):
            # An announcement in flight: left to its writer unless presumed dead.
            if await self._in_flight(status_key(status.app_id), ANNOUNCED_FIELD, outbox, now):
                again[i] = now + STALE_OUTBOX_MS
                continue
            seg = status.at(now)
            new = _state_key(seg)
            if new == announced and candidate is None:
                continue
            event = _status_event(status, seg, announced, new, now)
            payload = json.dumps(event, sort_keys=True)
            row = SettleRow(status.app_id, announced, new, payload, status.version)
            todo.append((i, row, event, candidate))
        if not todo:
            return again
        # A writer that dies between the claim and the stream leaves the
        # outbox; this deadline makes the leader finish it.
        await self.coord.recheck_earlier(
            {
                app_deadline(row.app_id): now + STALE_OUTBOX_MS
                for _, row, _, candidate in todo
                if candidate == row.new or settle == 0
            }
        )
        codes = await self.coord.settle_statuses(
            ANNOUNCED_FIELD, [row for _, row, _, _ in todo], now, settle
        )
        claimed: list[tuple[SettleRow, dict[str, Any]]] = []
        for (i, row, event, _), (code, since) in zip(todo, codes, strict=True):
            if code == 2:
                again[i] = since + settle
            elif code == 3:
                again[i] = now + STALE_OUTBOX_MS
            elif code == 1:
                claimed.append((row, event))
        if claimed:
            await self.coord.announce_many(
                [event for _, event in claimed], keep_ms=self.config.ledger_retention_ms
            )
            await self.coord.finish_many(
                ANNOUNCED_FIELD, [(status_key(row.app_id), row.payload) for row, _ in claimed]
            )
            for _, event in claimed:
                self._announced_status(event)
        return again

    def _announced_status(self, event: dict[str, Any]) -> None:
        log.info(
            "%s: %s -> %s (%s)",
            event["app_id"],
            event["old_state"],
            event["new_state"],
            ",".join(event["reasons"]) or "OK",
            extra={
                k: event[k] for k in ("app_id", "account_id", "old_state", "new_state", "reasons")
            }
            | {"event": "status_changed", "status_version": event["version"]},
        )
        if self.metrics is not None:
            self.metrics.on_status_change()

    async def _in_flight(self, key: str, cursor: str, outbox: Outbox | None, now: Millis) -> bool:
        """Whether an announcement claimed on ``cursor`` is still in flight:
        left to its writer while recent, finished here once the writer is
        presumed dead (still in flight if another replica took it over)."""
        return outbox is not None and (
            now - outbox.at < STALE_OUTBOX_MS or not await self.flush(key, cursor, outbox, now)
        )

    async def flush(self, key: str, cursor: str, outbox: Outbox, now: Millis) -> bool:
        """Finish an announcement a writer claimed but may not have made.

        The outbox is taken over atomically first, so of several replicas
        that find it abandoned exactly one finishes it. Returns True if this
        one did."""
        if not await self.coord.take_outbox(key, cursor, outbox.payload, now, STALE_OUTBOX_MS):
            return False
        event = json.loads(outbox.payload)
        if not await self.coord.on_stream(event["announcement_id"], outbox.at - 1000):
            await self._announce(event)
        await self.coord.finish(key, cursor, outbox.payload)
        return True

    # -- the account's ledger: every other announcement, exactly once -------------

    async def _make(
        self, account_id: str, event: dict[str, Any], now: Millis, since: Millis = 0
    ) -> LedgerRecord | None:
        """Make one announcement of the account exactly once: claimed in its
        ledger, added to the stream, committed (with when, and the Redis run
        ids). A claim left by a writer presumed dead is taken over, and the
        stream is checked (from ``since``) before the announcement is added
        again. None when it is committed already or another writer holds it."""
        aid = str(event["announcement_id"])
        claim = json.dumps({"claimed_at": now, "payload": event}, sort_keys=True)
        got = await self.coord.ledger_claim(account_id, aid, claim, now, STALE_OUTBOX_MS)
        if got <= 0:
            return None
        if got == 1 or not await self.coord.on_stream(aid, since):
            await self._announce(event)
        # The time is when it is known to be on the stream: later than it may
        # have been after a take-over, so a release can only wait longer.
        _, _, record = await self._committed(event, now)
        await self.coord.ledger_commit(account_id, aid, record)
        return LedgerRecord.from_json(record)

    async def _made(
        self, account_id: str, now: Millis, loaded: AccountFacts | None = None
    ) -> tuple[dict[str, LedgerRecord], bool]:
        """The account's committed announcements by id, once every claim a
        writer presumed dead left is finished; and whether one is still in
        flight (claimed by a live writer: left to it). With the account's
        facts, the records nothing can read or make again are forgotten
        first (:meth:`_trim`)."""
        done: dict[str, LedgerRecord] = {}
        busy = False
        rows = await self.coord.ledger(account_id)
        if loaded is not None:
            await self._trim(account_id, loaded, rows, now)
        # The records just forgotten still count as made in this call: the
        # conservative side, should the judgement of one ever be wrong.
        for aid, raw in rows.items():
            record = LedgerRecord.from_json(raw)
            if record is not None:
                done[aid] = record
                continue
            try:
                claim = json.loads(raw)
                at, event = int(claim["claimed_at"]), dict(claim["payload"])
            except (ValueError, KeyError, TypeError):
                continue
            if now - at < STALE_OUTBOX_MS:
                busy = True
                continue
            finished = await self._make(account_id, event, now, since=at - 1000)
            if finished is None:
                busy = True  # another replica took it over
            else:
                done[aid] = finished
        return done, busy

    async def _trim(
        self, account_id: str, loaded: AccountFacts, rows: dict[str, str], now: Millis
    ) -> None:
        """Forget the ledger records of ``rows`` that no release can read and
        no planner make again (:func:`expired_records` says why), at most
        LEDGER_TRIM_BATCH a call; each is deleted only if it is still
        exactly the record read, so a concurrent claimer loses nothing."""
        retention = self.config.ledger_retention_ms
        if retention <= 0:
            return
        records = {
            aid: r for aid, raw in rows.items() if (r := LedgerRecord.from_json(raw)) is not None
        }
        # Whatever the open episode, nothing could go: spare the fold.
        if not expired_records(records, None, now, retention, 1):
            return
        alert = open_overdue_alert(loaded.facts, self.policy, now, loaded.recorded_at)
        expired = expired_records(
            records, alert.event_id if alert else None, now, retention, LEDGER_TRIM_BATCH
        )
        if not expired:
            return
        forgotten = await self.coord.ledger_trim(account_id, {aid: rows[aid] for aid in expired})
        log.info(
            "ledger of account %s: forgot %d expired records",
            account_id,
            forgotten,
            extra={"account_id": account_id},
        )

    async def release(self, account_id: str, app_ids: Iterable[str], now: Millis) -> bool:
        """Exactly once per app, through the account's ledger. The release
        itself is one announcement of every app the account had; an app
        registered to the account afterwards (released at once) gets one of
        its own. Returns True once every app is known announced."""
        done_records, busy = await self._made(account_id, now)
        if busy:
            return False
        legacy = await self.coord.legacy_cursor(meta_key(account_id), RELEASE_FIELD)
        # "1": announced before the cursor listed apps; nothing more is owed.
        if legacy == "1":
            return True
        done: set[str] = set(json.loads(legacy)) if legacy else set()
        for record in done_records.values():
            if record.type == "resources_released" and record.episode:
                done |= set(record.episode.split(","))
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
        return await self._make(account_id, event, now) is not None

    # -- R10's notices ------------------------------------------------------------

    async def notices_of(
        self, account_id: str, loaded: AccountFacts, now: Millis
    ) -> tuple[Notice, ...]:
        """The notices of the account's overdue episode, marked sent or not."""
        episode = overdue_notice(loaded.facts, self.policy, now, loaded.recorded_at)
        if episode is None:
            return ()
        alert, known, release_at = episode
        series = notice_episode(alert, release_at, self.policy, loaded.recorded_at)
        plan = notice_plan(known, release_at, self.config.release_reminders_ms)
        done = {
            aid
            for aid, raw in (await self.coord.ledger(account_id)).items()
            if LedgerRecord.from_json(raw) is not None
        }
        sent = await self._sent_notices(account_id, series, plan, done)
        return tuple(replace(n, sent=i in sent) for i, n in enumerate(plan))

    async def _sent_notices(
        self, account_id: str, series: str, plan: list[Notice], done: Iterable[str]
    ) -> set[int]:
        """The notices of ``plan`` made: in the ledger, or in the cursor an
        earlier version kept (``EPISODE|i,j,...``, read, never written)."""
        made = set(done)
        sent = {i for i, n in enumerate(plan) if f"notice:{account_id}:{series}:{n.kind}" in made}
        legacy = await self.coord.legacy_cursor(meta_key(account_id), NOTICE_FIELD)
        head, _, indices = legacy.rpartition("|")
        if head == series and indices:
            sent |= {int(i) for i in indices.split(",")}
        return sent

    async def release_notices(
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
            # A fact dated a little ahead (a clear of a hold, an alert) may
            # open an episode when its time comes: look again then.
            ahead = [f.occurred_at for f in loaded.facts if f.occurred_at > now]
            if ahead and statuses:
                await self.coord.schedule(member, min(ahead) + settle)
            else:
                await self.coord.unschedule(member)
            return
        alert, known, release_at = episode
        plan = notice_plan(known, release_at, self.config.release_reminders_ms)
        done, busy = await self._made(account_id, now, loaded)
        if busy:
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)
            return
        # An override that moves release_at starts a new series of notices.
        series = notice_episode(alert, release_at, self.policy, loaded.recorded_at)
        sent = await self._sent_notices(account_id, series, plan, done)
        i = due_notice(plan, sent, settle, now)
        if i is not None:
            notice = plan[i]
            event = {
                "type": "release_scheduled",
                "announcement_id": f"notice:{account_id}:{series}:{notice.kind}",
                "occurred_at": format_time(now),
                "account_id": account_id,
                "app_ids": sorted(statuses),
                "release_at": format_time(release_at),
                "notice": notice.kind,
                "overdue_alert_id": alert.event_id,
                "overdue_since": format_time(alert.occurred_at),
            }
            # A writer that dies after its claim leaves it; come back for it.
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)
            if await self._make(account_id, event, now) is None:
                return  # another replica announces it; the deadline above checks
            log.info(
                "release of account %s scheduled at %s: notice %s announced",
                account_id,
                format_time(release_at),
                notice.kind,
                extra={"event": "release_scheduled", "account_id": account_id},
            )
            sent.add(i)
        last = max(sent, default=-1)
        ahead = [n.at + settle for i, n in enumerate(plan) if i > last and n.at + settle > now]
        if ahead:
            await self.coord.schedule(member, ahead[0])
        else:
            await self.coord.unschedule(member)

    async def evidence_notice(
        self,
        account_id: str,
        loaded: AccountFacts,
        app_ids: Iterable[str],
        release_at: Millis,
        basis: Millis,
        now: Millis,
        *,
        missing: bool = True,
    ) -> LedgerRecord | None:
        """R10: a release found no notice on record that proves the customer
        was told in time (none made, one made before a store discontinuity,
        one cut short by a crash): announce one now, naming the earliest
        time the release can now happen, ``release_at`` or now + the notice
        period. Once per episode and ``basis`` (the discontinuity it answers,
        0 for none), claimed in the ledger so racing replicas make it once.
        Returns its record once it is committed. ``missing=False`` makes a
        history's first notice, as it would have been made live: no warning."""
        episode = overdue_notice(loaded.facts, self.policy, now, loaded.recorded_at)
        if episode is None:
            return None
        alert, _, computed = episode
        series = notice_episode(alert, computed, self.policy, loaded.recorded_at)
        named = max(release_at, now + self.policy.release_notice_ms)
        event: dict[str, Any] = {
            "type": RELEASE_SCHEDULED,
            "announcement_id": f"notice:{account_id}:{series}:evidence-{basis}",
            "occurred_at": format_time(now),
            "account_id": account_id,
            "app_ids": sorted(app_ids),
            "release_at": format_time(named),
            "notice": "evidence",
            "overdue_alert_id": alert.event_id,
            "overdue_since": format_time(alert.occurred_at),
        }
        record = await self._make(account_id, event, now)
        if record is None:
            return None
        if missing:
            log.warning(
                "release of account %s needs a notice on record: announced one now, the "
                "release waits until %s",
                account_id,
                format_time(named),
                extra={"event": RELEASE_SCHEDULED, "account_id": account_id},
            )
        else:
            log.info(
                "release_scheduled for account %s (release at %s)",
                account_id,
                format_time(named),
                extra={"event": RELEASE_SCHEDULED, "account_id": account_id},
            )
        return record

    async def ledger(self, account_id: str) -> list[LedgerRecord]:
        """The account's committed announcements."""
        rows = await self.coord.ledger(account_id)
        return [r for raw in rows.values() if (r := LedgerRecord.from_json(raw)) is not None]

    async def warnings(
        self, account_id: str, loaded: AccountFacts, statuses: dict[str, AppStatus], now: Millis
    ) -> None:
        """Announce ``override_applied`` once per override fact, and
        ``suspension_scheduled`` once when a suspension ahead becomes known
        and once at each reminder (``--suspension-reminders``) still ahead of
        that, then keep the next one scheduled.

        Exactly once across replicas: each is claimed in the account's
        ledger, as a release notice is. A suspension is first noted, and warned of only
        once it has stayed ahead for the settle time, so a burst of facts
        read in any order warns of nothing the complete facts do not say;
        like R10's notices, only the latest warning due is sent (a reminder
        missed while no reconciler ran is not sent late)."""
        settle = self.config.announce_settle_ms
        member = warning_deadline(account_id)
        key = meta_key(account_id)
        made, busy = await self._made(account_id, now, loaded)
        if busy:
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)
            return
        ahead = scheduled_suspensions(statuses, now) if statuses else ()
        seen = await self.coord.first_seen(key, [w.key for w in ahead], now)
        # The ids an earlier version kept in its cursor count as made too.
        legacy = await self.coord.legacy_cursor(key, WARNED_FIELD)
        done: set[str] = set(made) | (set(json.loads(legacy)) if legacy else set())
        due: list[Pending] = []
        later: list[Millis] = []
        for entry in override_log(loaded.facts, self.policy, loaded.recorded_at):
            fact = entry.fact
            event: dict[str, object] = {
                "type": "override_applied",
                "announcement_id": f"override:{fact.event_id}",
                "account_id": fact.account_id,
                "override": fact.type,
                "event_id": fact.event_id,
                "actor": fact.actor,
                "reason": fact.reason,
                "made_at": format_time(fact.occurred_at),
                "recorded_at": (
                    format_time(entry.recorded_at) if entry.recorded_at is not None else None
                ),
                "until": format_time(fact.until) if isinstance(fact, GraceExtended) else None,
                "effect": entry.effect,
            }
            if event["announcement_id"] not in done:
                due.append(Pending(str(event["announcement_id"]), now, event))
        for suspension in ahead:
            series = suspension_warnings(
                suspension, seen[suspension.key], self.config.suspension_reminders_ms
            )
            sent = [i for i, w in enumerate(series) if w.announcement_id in done]
            ready = [
                i
                for i, w in enumerate(series)
                if w.due + settle <= now and i > max(sent, default=-1)
            ]
            if ready:
                due.append(series[ready[-1]])
            last = ready[-1] if ready else max(sent, default=-1)
            later += [w.due + settle for i, w in enumerate(series) if i > last]
        for warning in due:
            event = warning.event | {"occurred_at": format_time(now)}
            # A writer that dies after its claim leaves it; come back for it.
            await self.coord.schedule(member, now + STALE_OUTBOX_MS)
            if await self._make(account_id, event, now) is None:
                return  # another replica announces it; the deadline above checks
            log.info("%s", announcement_line(warning.event), extra=announcement_fields(event))
        if later:
            await self.coord.schedule(member, min(later))
        else:
            await self.coord.unschedule(member)


def announcement_fields(event: dict[str, object]) -> dict[str, object]:
    """The fields of an announcement a log line carries (``event`` = its type)."""
    keep = ("account_id", "app_id", "app_ids", "reason", "at", "notice", "effect", "actor")
    return {"event": event["type"]} | {k: event[k] for k in keep if event.get(k) is not None}


def announcement_line(event: dict[str, object]) -> str:
    """One line saying which announcement this is, so that two differ in the
    log when they differ on the stream: ``suspension_scheduled for app-1 of
    account acct-1: PACKAGE_EXPIRED at …, notice 7d``."""
    who = f"account {event['account_id']}"
    apps = event.get("app_ids")
    if event.get("app_id"):
        who = f"{event['app_id']} of {who}"
    elif isinstance(apps, list) and apps:
        who = f"{','.join(map(str, apps))} of {who}"
    what = " ".join(
        str(part)
        for part in (
            event.get("reason") or event.get("effect"),
            f"at {event['at']}" if event.get("at") else None,
            f"(notice {event['notice']})" if event.get("notice") else None,
        )
        if part
    )
    return f"{event['type']} announced for {who}" + (f": {what}" if what else "")


@dataclass(frozen=True, slots=True)
class Pending:
    """One announcement of :meth:`Announcer.warnings`, with when it is due."""

    announcement_id: str
    due: Millis
    event: dict[str, object]


def suspension_warnings(
    warning: ScheduledSuspension, first_seen: Millis, reminders: Iterable[int]
) -> list[Pending]:
    """The ``suspension_scheduled`` of one scheduled suspension: the first
    when it became known, then one per reminder still ahead of that."""
    out = []
    for notice in notice_plan(first_seen, warning.at, reminders):
        event: dict[str, object] = {
            "type": "suspension_scheduled",
            "announcement_id": f"warn:{warning.key}:{notice.kind}",
            "account_id": warning.account_id,
            "scope": warning.scope,
            "app_id": warning.app_ids[0] if warning.scope == "app" else None,
            "app_ids": list(warning.app_ids),
            "reason": warning.reason.value,
            "at": format_time(warning.at),
            "notice": notice.kind,
        }
        out.append(Pending(str(event["announcement_id"]), notice.at, event))
    return out
