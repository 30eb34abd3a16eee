from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from lcic_guard_client._client import DEFAULT_TIMEOUT, GuardClient, TlsConfig, Watch
from lcic_guard_client._errors import GuardError
from lcic_guard_client._types import (
    ApplicationStatus,
    Check,
    Decision,
    Override,
    OverrideKind,
    Preview,
    Reason,
    Role,
    ScheduledDecisions,
    StatusUpdate,
)


@dataclass(frozen=True)
class _Known:
    version: int
    schedule: tuple[ScheduledDecisions, ...]


class CachedGuardClient:
    """A :class:`GuardClient` that answers checks of watched applications
    locally, without a network round trip.

    It watches ``app_ids`` with WatchApplicationStatus and keeps each one's
    decision schedule (computed by the sidecar, so the policy lives in one
    place). A check is answered from the schedule entry in force while the
    watch has been heard from (a change or a heartbeat) within
    ``max_staleness`` seconds; otherwise, and for applications not watched,
    the sidecar is asked. An enter-classroom check that the schedule denies
    is always asked of the sidecar, which knows whether the class is
    protected (R6).

    With ``answer_ttl`` > 0, an answer the sidecar gave is also kept and
    reused until the earlier of its ``valid_until`` (the instant it would
    next change without a new billing fact) and ``answer_ttl`` seconds, but
    only for an application this client's live watch covers (SPEC R15): an
    application not in ``app_ids``, or whose status the watch has not
    delivered since it (re)connected, is always asked. Kept: create-classroom
    and recording answers, and enter-classroom answers that do not depend on
    a class in progress; never a degraded one.

    Everything kept (schedules and answers) is dropped when the watch
    breaks, when the sidecar reports a store discontinuity (the store may
    have gone back in time: a Redis restart from an older snapshot, a
    FLUSHALL and reload), and when a status arrives with a lower version
    than the one held (the same evidence, seen by the client); a kept answer
    of an application is dropped when the watch reports a change of it.
    """

    def __init__(
        self,
        target: str,
        app_ids: Iterable[str],
        *,
        max_staleness: float = 5.0,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        tls: TlsConfig | None = None,
        bearer_token: str | None = None,
        answer_ttl: float = 0.0,
    ) -> None:
        self.remote = GuardClient(
            target, timeout=timeout, retries=retries, tls=tls, bearer_token=bearer_token
        )
        self.app_ids = sorted(set(app_ids))
        self._watched = frozenset(self.app_ids)
        self.max_staleness = max_staleness
        self.answer_ttl = answer_ttl
        self.kept_answers = 0
        self.local_answers = 0
        self.remote_answers = 0
        self.discontinuities = 0
        # (check, app_id, request fields...) -> (wall-clock expiry in s, answer)
        self._answers: dict[tuple[object, ...], tuple[float, Decision]] = {}
        # What the live watch has delivered since it (re)connected or since
        # the last discontinuity; only these apps are answered without asking.
        self._known: dict[str, _Known] = {}
        self._heard_at = 0.0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._stream: Watch | None = None
        self._thread = threading.Thread(target=self._watch, name="lcic-guard-watch", daemon=True)
        self._thread.start()

    # -- the watch ----------------------------------------------------------

    def _watch(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            try:
                stream = self.remote.watch(self.app_ids)
                self._stream = stream
                if self._closed.is_set():
                    stream.cancel()
                for update in stream:
                    self._heard(update)
                    backoff = 0.05
            except (GuardError, ValueError):
                pass  # ValueError: the channel was closed under us by close()
            with self._lock:
                # No change can reach what is kept while the watch is down, and
                # a reconnected watch sends every status again.
                self._forget()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _forget(self) -> None:
        self._heard_at = 0.0
        self._answers.clear()
        self._known.clear()

    def _heard(self, update: StatusUpdate) -> None:
        with self._lock:
            if update.discontinuity is not None:
                self.discontinuities += 1
                self._forget()
                self._heard_at = time.monotonic()
                return
            self._heard_at = time.monotonic()
            status = update.status
            if status is None:
                return
            known = self._known.get(status.app_id)
            if known is not None and status.version < known.version:
                # Versions only grow on a continuous store: this one went back
                # in time. Nothing kept can be trusted, not even this status
                # (it may be the older of two racing deliveries).
                self.discontinuities += 1
                self._forget()
                self._heard_at = time.monotonic()
                return
            self._known[status.app_id] = _Known(status.version, update.schedule)
            if known is None or status.version != known.version:
                # A new fact: an answer kept until valid_until may be wrong now.
                for key in [k for k in self._answers if k[1] == status.app_id]:
                    del self._answers[key]

    def _fresh(self) -> bool:
        return self._heard_at > 0 and time.monotonic() - self._heard_at <= self.max_staleness

    def is_fresh(self) -> bool:
        with self._lock:
            return self._fresh()

    def wait_fresh(self, timeout: float = 5.0) -> bool:
        """Wait until every watched application is known and the watch is fresh."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                ready = all(a in self._known for a in self.app_ids) and self._fresh()
            if ready:
                return True
            time.sleep(0.01)
        return False

    def _local(self, app_id: str, kind: str) -> Decision | None:
        with self._lock:
            known = self._known.get(app_id)
            if known is None or not known.schedule or not self._fresh():
                return None
            now = time.time()
            entry = known.schedule[0]
            for candidate in known.schedule:
                if candidate.starts_at is not None and candidate.starts_at.timestamp() <= now:
                    entry = candidate
            decision: Decision = getattr(entry, kind)
        return decision

    def _kept(self, key: tuple[object, ...]) -> Decision | None:
        if self.answer_ttl <= 0:
            return None
        with self._lock:
            hit = self._answers.get(key)
            if hit is None:
                return None
            if time.time() >= hit[0]:
                del self._answers[key]
                return None
        self.kept_answers += 1
        return hit[1]

    def _keep(self, key: tuple[object, ...], decision: Decision) -> Decision:
        if self.answer_ttl <= 0 or decision.degraded:
            return decision
        if decision.reason == Reason.IN_PROGRESS_PROTECTED:
            return decision  # ends with the class, which no watch reports
        if key[0] == "enter_classroom" and not decision.allowed:
            return decision  # a start reported meanwhile may protect it (R6)
        expires = time.time() + self.answer_ttl
        if decision.valid_until is not None:
            expires = min(expires, decision.valid_until.timestamp())
        with self._lock:
            # R15: only while a live watch covers the app: its status came on
            # the stream that is up now, and nothing since has voided it (a
            # break or a discontinuity empties _known).
            if key[1] not in self._watched or key[1] not in self._known:
                return decision
            if len(self._answers) >= 100_000:
                self._answers.clear()
            self._answers[key] = (expires, decision)
        return decision

    # -- checks ---------------------------------------------------------------

    def can_create_classroom(
        self,
        app_id: str,
        *,
        room_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> Decision:
        local = self._local(app_id, "create_classroom")
        if local is not None:
            self.local_answers += 1
            return local
        key = ("create_classroom", app_id, room_id, start_time, end_time)
        kept = self._kept(key)
        if kept is not None:
            return kept
        self.remote_answers += 1
        return self._keep(
            key,
            self.remote.can_create_classroom(
                app_id, room_id=room_id, start_time=start_time, end_time=end_time, timeout=timeout
            ),
        )

    def can_access_recording(
        self, app_id: str, recording_id: str, *, room_id: str = "", timeout: float | None = None
    ) -> Decision:
        local = self._local(app_id, "access_recording")
        if local is not None:
            self.local_answers += 1
            return local
        key = ("access_recording", app_id, recording_id, room_id)
        kept = self._kept(key)
        if kept is not None:
            return kept
        self.remote_answers += 1
        return self._keep(
            key,
            self.remote.can_access_recording(
                app_id, recording_id, room_id=room_id, timeout=timeout
            ),
        )

    def can_enter_classroom(
        self,
        app_id: str,
        room_id: str,
        *,
        user_id: str = "",
        role: Role = Role.UNSPECIFIED,
        timeout: float | None = None,
    ) -> Decision:
        local = self._local(app_id, "enter_classroom")
        if local is not None and local.allowed:
            self.local_answers += 1
            return local
        # A denial may be an R6 protection: ask.
        key = ("enter_classroom", app_id, room_id, user_id, int(role))
        kept = self._kept(key)
        if kept is not None:
            return kept
        self.remote_answers += 1
        return self._keep(
            key,
            self.remote.can_enter_classroom(
                app_id, room_id, user_id=user_id, role=role, timeout=timeout
            ),
        )

    def check_batch(
        self, checks: Sequence[Check], *, timeout: float | None = None
    ) -> list[Decision]:
        """Asked of the sidecar, in one call."""
        return self.remote.check_batch(checks, timeout=timeout)

    # -- the other calls, always asked of the sidecar -------------------------

    def report_classroom_started(
        self,
        app_id: str,
        room_id: str,
        started_at: datetime,
        *,
        scheduled_end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> None:
        self.remote.report_classroom_started(
            app_id, room_id, started_at, scheduled_end_time=scheduled_end_time, timeout=timeout
        )

    def report_classroom_ended(
        self, app_id: str, room_id: str, ended_at: datetime, *, timeout: float | None = None
    ) -> None:
        self.remote.report_classroom_ended(app_id, room_id, ended_at, timeout=timeout)

    def get_application_status(
        self, app_id: str, *, timeout: float | None = None
    ) -> ApplicationStatus:
        return self.remote.get_application_status(app_id, timeout=timeout)

    def preview_application(
        self, app_id: str, at: datetime, *, room_id: str = "", timeout: float | None = None
    ) -> Preview:
        return self.remote.preview_application(app_id, at, room_id=room_id, timeout=timeout)

    def apply_override(
        self,
        account_id: str,
        kind: OverrideKind,
        reason: str,
        *,
        until: datetime | None = None,
        timeout: float | None = None,
    ) -> Override:
        return self.remote.apply_override(account_id, kind, reason, until=until, timeout=timeout)

    def list_overrides(self, account_id: str, *, timeout: float | None = None) -> list[Override]:
        return self.remote.list_overrides(account_id, timeout=timeout)

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        if self._stream is not None:
            self._stream.cancel()
        self.remote.close()
        self._thread.join(timeout=2.0)

    def __enter__(self) -> CachedGuardClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
