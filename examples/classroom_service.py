"""A classroom-creation service guarded by lcic-guard: a worked integration.

A small HTTP JSON service, standard library only (plus the lcic-guard client).
It stands in for the platform's room service: rooms live in memory; where a
real service would call the classroom platform's room API, this one only
records the room. What it shows is *where* the billing checks go:

- ``POST /apps/{app}/classrooms`` creates a room: ``CanCreateClassroom``
  (answered locally from the cache);
- ``POST /apps/{app}/classrooms/{room}/start`` starts it: ``CanEnterClassroom``
  for the teacher, then ``ReportClassroomStarted``;
- ``POST /apps/{app}/classrooms/{room}/join`` lets a user in:
  ``CanEnterClassroom`` (a local allow, or the sidecar, which knows which
  classes are protected);
- ``POST /apps/{app}/classrooms/{room}/end`` ends it: ``ReportClassroomEnded``;
- ``GET /apps/{app}/classrooms/{room}`` shows the room, ``GET /healthz`` the
  local cache's freshness and counters.

Checks go through :class:`~lcic_guard_client.CachedGuardClient`, which keeps
the decision schedule of the watched applications and answers without a
network round trip; reports go through a plain
:class:`~lcic_guard_client.GuardClient`, because a report must reach the
sidecar to protect a class in progress (rule R6).

A denial is answered ``402 Payment Required`` when the customer can pay to
restore service (overdue account, expired package, quota used up) and
``403 Forbidden`` otherwise (banned, released, unknown application); the
body carries the decision's ``message``, which tells the customer what to
do. If the sidecar cannot be reached at all the answer is ``503``.

Run it next to ``scripts/run`` (see ``examples/README.md``)::

    .venv/bin/python examples/classroom_service.py --guard 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from lcic_guard_client import (
    DEFAULT_TIMEOUT,
    CachedGuardClient,
    Decision,
    GuardClient,
    GuardError,
    InvalidRequest,
    NotFound,
    Reason,
    Role,
)

log = logging.getLogger("classroom_service")

SAMPLE_APPS = (
    "app-active,app-payg,app-renewing,app-expiring,app-grace,app-overdue,"
    "app-quota,app-expired,app-settled,app-banned,app-released"
)
ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Suspensions the customer can end by paying: 402 Payment Required.
PAYABLE = frozenset(
    {
        Reason.ACCOUNT_OVERDUE,
        Reason.PACKAGE_EXPIRED,
        Reason.PACKAGE_QUOTA_EXHAUSTED,
    }
)
ROLES: dict[str, Role] = {
    "student": Role.STUDENT,
    "teacher": Role.TEACHER,
    "assistant": Role.ASSISTANT,
    "supervisor": Role.SUPERVISOR,
}
JsonBody = dict[str, Any]


# -- decisions as JSON ---------------------------------------------------------


def decision_json(d: Decision) -> JsonBody:
    """The parts of a decision a caller of this service may show or log."""
    out: JsonBody = {
        "allowed": d.allowed,
        "reason": d.reason.name,
        "reasons": [r.name for r in d.reasons],
        "state": d.state.name,
        "message": d.message,
    }
    for name in ("grace_ends_at", "suspended_at", "release_at", "protected_until"):
        at: datetime | None = getattr(d, name)
        if at is not None:
            out[name] = at.isoformat()
    if d.degraded:
        out["degraded"] = True
    return out


def denial_status(d: Decision) -> HTTPStatus:
    """402 when paying restores service, 403 when nothing the customer pays will."""
    return HTTPStatus.PAYMENT_REQUIRED if d.reason in PAYABLE else HTTPStatus.FORBIDDEN


# -- the service ---------------------------------------------------------------


@dataclass
class Reply:
    status: HTTPStatus
    body: JsonBody


class BadRequest(ValueError):
    pass


@dataclass
class Room:
    app_id: str
    room_id: str
    state: str = "scheduled"  # scheduled -> live -> ended
    start_time: datetime | None = None
    end_time: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    def to_json(self) -> JsonBody:
        out: JsonBody = {"app_id": self.app_id, "room_id": self.room_id, "state": self.state}
        for name in ("start_time", "end_time", "started_at", "ended_at"):
            value: datetime | None = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat()
        return out


def _id(value: object, name: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise BadRequest(f"{name}: 1-64 characters from [A-Za-z0-9._:-]")
    return value


def _time(body: JsonBody, name: str) -> datetime | None:
    value = body.get(name)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise BadRequest(f"{name}: not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        raise BadRequest(f"{name}: needs a time zone (e.g. Z or +08:00)")
    return parsed.astimezone(UTC)


def _denied(d: Decision) -> Reply:
    return Reply(
        denial_status(d),
        {
            "error": "denied",
            "reason": d.reason.name,
            "message": d.message,
            "decision": decision_json(d),
        },
    )


def _rpc_failure(exc: GuardError) -> Reply:
    if isinstance(exc, InvalidRequest):
        return Reply(HTTPStatus.BAD_REQUEST, {"error": "bad_request", "message": exc.details})
    if isinstance(exc, NotFound):
        return Reply(HTTPStatus.NOT_FOUND, {"error": "unknown_application", "message": exc.details})
    # The sidecar is down or too slow (SidecarUnavailable), or refused us:
    # this service's own failure mode is to refuse and ask the caller to
    # retry (the sidecar's R13 covers Redis).
    log.warning("lcic-guard sidecar call failed: %s %s", exc.code, exc.details)
    return Reply(
        HTTPStatus.SERVICE_UNAVAILABLE,
        {"error": "guard_unavailable", "message": "Billing checks are unavailable; retry shortly."},
    )


class ClassroomService:
    """The service's logic, without HTTP: each method returns a :class:`Reply`."""

    def __init__(
        self,
        checks: CachedGuardClient,
        reports: GuardClient,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.checks = checks
        self.reports = reports
        self.now = now
        self._rooms: dict[tuple[str, str], Room] = {}
        self._lock = threading.Lock()

    def _room(self, app_id: str, room_id: str) -> Room | None:
        with self._lock:
            return self._rooms.get((app_id, room_id))

    def create(self, app_id: str, body: JsonBody) -> Reply:
        """Create a classroom if the billing policy allows it (R4)."""
        app_id = _id(app_id, "app_id")
        room_id = _id(body.get("room_id") or f"room-{uuid.uuid4().hex[:12]}", "room_id")
        start, end = _time(body, "start_time"), _time(body, "end_time")
        if start and end and end < start:
            raise BadRequest("end_time: must not be before start_time")
        if self._room(app_id, room_id) is not None:
            return Reply(HTTPStatus.CONFLICT, {"error": "exists", "message": "room exists"})
        decision = self.checks.can_create_classroom(
            app_id, room_id=room_id, start_time=start, end_time=end
        )
        if not decision.allowed:
            return _denied(decision)
        room = Room(app_id, room_id, start_time=start, end_time=end)
        with self._lock:
            self._rooms[(app_id, room_id)] = room
        out = room.to_json()
        if decision.reason == Reason.OVERDUE_GRACE:
            out["warning"] = decision.message  # allowed, but tell the customer
        return Reply(HTTPStatus.CREATED, out)

    def start(self, app_id: str, room_id: str) -> Reply:
        """Start a classroom: the teacher enters, then the start is reported,
        so that a later suspension does not cut the class off (R6)."""
        room = self._room(app_id, room_id)
        if room is None:
            return Reply(HTTPStatus.NOT_FOUND, {"error": "no_such_room", "message": room_id})
        if room.state != "scheduled":
            return Reply(HTTPStatus.CONFLICT, {"error": "not_scheduled", "message": room.state})
        # A room not started before a suspension cannot start during it.
        decision = self.checks.can_enter_classroom(app_id, room_id, role=Role.TEACHER)
        if not decision.allowed:
            return _denied(decision)
        started = self.now()
        end = room.end_time if room.end_time and room.end_time > started else None
        # Not started unless reported: an unreported class would be cut off
        # by a suspension. If the report fails the caller gets 503 and retries.
        self.reports.report_classroom_started(app_id, room_id, started, scheduled_end_time=end)
        with self._lock:
            room.state, room.started_at = "live", started
        return Reply(HTTPStatus.OK, room.to_json())

    def join(self, app_id: str, room_id: str, body: JsonBody) -> Reply:
        """A user enters a live classroom (R6: a class in progress is never cut off)."""
        room = self._room(app_id, room_id)
        if room is None:
            return Reply(HTTPStatus.NOT_FOUND, {"error": "no_such_room", "message": room_id})
        if room.state != "live":
            return Reply(HTTPStatus.CONFLICT, {"error": "not_live", "message": room.state})
        user_id = _id(body.get("user_id", "anonymous"), "user_id")
        role = ROLES.get(str(body.get("role", "student")))
        if role is None:
            raise BadRequest(f"role: one of {', '.join(ROLES)}")
        decision = self.checks.can_enter_classroom(app_id, room_id, user_id=user_id, role=role)
        if not decision.allowed:
            return _denied(decision)
        return Reply(
            HTTPStatus.OK,
            {"joined": True, "room": room.to_json(), "decision": decision_json(decision)},
        )

    def end(self, app_id: str, room_id: str) -> Reply:
        """End a classroom and report it, which ends its protection (R6)."""
        room = self._room(app_id, room_id)
        if room is None:
            return Reply(HTTPStatus.NOT_FOUND, {"error": "no_such_room", "message": room_id})
        if room.state != "live":
            return Reply(HTTPStatus.CONFLICT, {"error": "not_live", "message": room.state})
        ended = self.now()
        with self._lock:
            room.state, room.ended_at = "ended", ended
        out = room.to_json()
        try:
            self.reports.report_classroom_ended(app_id, room_id, ended)
        except GuardError as exc:
            # The class is over whatever the sidecar heard; unreported, its
            # protection lapses by itself at protected_until.
            log.warning("could not report the end of %s/%s: %s", app_id, room_id, exc.code)
            out["guard_report"] = "failed"
        return Reply(HTTPStatus.OK, out)

    def get(self, app_id: str, room_id: str) -> Reply:
        room = self._room(app_id, room_id)
        if room is None:
            return Reply(HTTPStatus.NOT_FOUND, {"error": "no_such_room", "message": room_id})
        return Reply(HTTPStatus.OK, room.to_json())

    def health(self) -> Reply:
        with self._lock:
            rooms = len(self._rooms)
        return Reply(
            HTTPStatus.OK,
            {
                "guard_fresh": self.checks.is_fresh(),
                "local_answers": self.checks.local_answers,
                "remote_answers": self.checks.remote_answers,
                "rooms": rooms,
            },
        )

    def route(self, method: str, path: str, body: JsonBody) -> Reply:
        """Dispatch one request; a bad request or an unreachable sidecar
        becomes an answer, never an exception."""
        parts = path.split("?", 1)[0].strip("/").split("/")
        try:
            match method, parts:
                case "GET", ["healthz"]:
                    return self.health()
                case "POST", ["apps", app_id, "classrooms"]:
                    return self.create(app_id, body)
                case "GET", ["apps", app_id, "classrooms", room_id]:
                    return self.get(app_id, room_id)
                case "POST", ["apps", app_id, "classrooms", room_id, "start"]:
                    return self.start(app_id, room_id)
                case "POST", ["apps", app_id, "classrooms", room_id, "join"]:
                    return self.join(app_id, room_id, body)
                case "POST", ["apps", app_id, "classrooms", room_id, "end"]:
                    return self.end(app_id, room_id)
        except BadRequest as exc:
            return Reply(HTTPStatus.BAD_REQUEST, {"error": "bad_request", "message": str(exc)})
        except GuardError as exc:
            return _rpc_failure(exc)
        return Reply(HTTPStatus.NOT_FOUND, {"error": "not_found", "message": path})


# -- HTTP ----------------------------------------------------------------------


def handler_for(service: ClassroomService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "classroom-service/1"

        def _handle(self, method: str) -> None:
            body: JsonBody = {}
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length:
                try:
                    parsed = json.loads(self.rfile.read(length)) if length > 0 else None
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    self._send(
                        Reply(
                            HTTPStatus.BAD_REQUEST,
                            {"error": "bad_request", "message": "body: a JSON object"},
                        )
                    )
                    return
                body = parsed
            self._send(service.route(method, self.path, body))

        def _send(self, reply: Reply) -> None:
            data = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--guard",
        default=os.environ.get("LCIC_GUARD_TARGET", "127.0.0.1:50051"),
        help="the lcic-guard sidecar, host:port (env LCIC_GUARD_TARGET; default %(default)s)",
    )
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port (port 0: any)")
    parser.add_argument(
        "--apps",
        default=SAMPLE_APPS,
        help="comma-separated applications whose decisions are cached locally; "
        "others are asked of the sidecar (default: the embedded default's sample apps)",
    )
    parser.add_argument(
        "--wait-fresh", type=float, default=5.0, help="seconds to wait for the cache at start"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds a call to the sidecar may take (default %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    apps = [a for a in args.apps.split(",") if a]
    checks = CachedGuardClient(args.guard, apps, timeout=args.timeout)
    if not checks.wait_fresh(args.wait_fresh):
        log.warning("the decision cache is not fresh yet: checks go to %s meanwhile", args.guard)
    service = ClassroomService(checks, checks.remote)  # reports share the cache's channel
    try:
        server = ThreadingHTTPServer(parse_listen(args.listen), handler_for(service))
    except OSError as exc:
        checks.close()
        parser.exit(
            2, f"cannot listen on {args.listen} ({exc.strerror}); choose another --listen\n"
        )
    host, port = server.server_address[:2]
    print(f"classroom service listening on http://{host!s}:{port}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        checks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
