from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard_client._client import DEFAULT_TIMEOUT, GuardClient, TlsConfig


@dataclass
class _Known:
    version: int
    schedule: list[pb.ScheduledDecisions]


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
    next change without a new billing fact) and ``answer_ttl`` seconds, and
    dropped as soon as the watch reports a change of its application, or
    breaks (no change could reach it then; none is kept until it is back). Kept:
    create-classroom and recording answers, and enter-classroom answers that
    do not depend on a class in progress; never a degraded one.
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
        self.max_staleness = max_staleness
        self.answer_ttl = answer_ttl
        self.kept_answers = 0
        # (check, app_id, request fields...) -> (wall-clock expiry in s, answer)
        self._answers: dict[tuple[object, ...], tuple[float, pb.Decision]] = {}
        self.local_answers = 0
        self.remote_answers = 0
        self._known: dict[str, _Known] = {}
        self._heard_at = 0.0
        # Set while the watch is broken: a kept answer is dropped then, since
        # no change would reach it, and none is kept until the watch is back.
        self._broken = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._watch, name="lcic-guard-watch", daemon=True)
        self._thread.start()

    # -- the watch ----------------------------------------------------------

    def _watch(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            try:
                call = self.remote.stub.WatchApplicationStatus(
                    pb.WatchApplicationStatusRequest(app_ids=self.app_ids),
                    metadata=self.remote._metadata,
                )
                self._call = call
                for resp in call:
                    self._heard(resp)
                    backoff = 0.05
            except grpc.RpcError:
                pass
            with self._lock:
                self._heard_at = 0.0  # the watch broke: nothing is fresh
                self._broken = True
                self._answers.clear()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _heard(self, resp: pb.WatchApplicationStatusResponse) -> None:
        with self._lock:
            self._heard_at = time.monotonic()
            self._broken = False
            if not resp.HasField("status"):
                return
            app_id = resp.status.app_id
            known = self._known.get(app_id)
            if known is None or resp.status.version >= known.version:
                self._known[app_id] = _Known(resp.status.version, list(resp.schedule))
            if known is None or resp.status.version != known.version:
                # A new fact: an answer kept until valid_until may be wrong now.
                for key in [k for k in self._answers if k[1] == app_id]:
                    del self._answers[key]

    def is_fresh(self) -> bool:
        with self._lock:
            return self._heard_at > 0 and time.monotonic() - self._heard_at <= self.max_staleness

    def wait_fresh(self, timeout: float = 5.0) -> bool:
        """Wait until every watched application is known and the watch is fresh."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                ready = all(a in self._known for a in self.app_ids)
            if ready and self.is_fresh():
                return True
            time.sleep(0.01)
        return False

    def _local(self, app_id: str, kind: str) -> pb.Decision | None:
        if not self.is_fresh():
            return None
        with self._lock:
            known = self._known.get(app_id)
            if known is None or not known.schedule:
                return None
            now_ms = time.time_ns() // 1_000_000
            entry = known.schedule[0]
            for candidate in known.schedule:
                if candidate.starts_at.ToMilliseconds() <= now_ms:
                    entry = candidate
            decision = pb.Decision()
            decision.CopyFrom(getattr(entry, kind))
        self.local_answers += 1
        return decision

    def _kept(self, key: tuple[object, ...]) -> pb.Decision | None:
        if self.answer_ttl <= 0:
            return None
        with self._lock:
            hit = None if self._broken else self._answers.get(key)
            if hit is None:
                return None
            if time.time() >= hit[0]:
                del self._answers[key]
                return None
            decision = pb.Decision()
            decision.CopyFrom(hit[1])
        self.kept_answers += 1
        return decision

    def _keep(self, key: tuple[object, ...], decision: pb.Decision) -> pb.Decision:
        if self.answer_ttl <= 0 or decision.degraded:
            return decision
        if decision.reason == pb.DECISION_REASON_IN_PROGRESS_PROTECTED:
            return decision  # ends with the class, which no watch reports
        if key[0] == "enter_classroom" and not decision.allowed:
            return decision  # a start reported meanwhile may protect it (R6)
        expires = time.time() + self.answer_ttl
        if decision.HasField("valid_until"):
            expires = min(expires, decision.valid_until.ToMilliseconds() / 1000)
        with self._lock:
            if self._broken:
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
    ) -> pb.Decision:
        local = self._local(app_id, "create_classroom")
        if local is not None:
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
    ) -> pb.Decision:
        local = self._local(app_id, "access_recording")
        if local is not None:
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
        role: pb.ClassroomRole.ValueType = pb.CLASSROOM_ROLE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> pb.Decision:
        local = self._local(app_id, "enter_classroom")
        if local is not None and local.allowed:
            return local
        if local is not None:
            self.local_answers -= 1  # a denial may be an R6 protection: ask
        key = ("enter_classroom", app_id, room_id, user_id, role)
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

    def check_batch(self, checks: Sequence[pb.Check]) -> list[pb.Decision]:
        return self.remote.check_batch(checks)

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()
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
