"""A recording gateway guarded by lcic-guard: a worked integration.

A small HTTP file server (standard library only, plus the lcic-guard client)
that serves recording files stored as ``{root}/{app_id}/{recording_id}`` at

    GET /apps/{app_id}/recordings/{recording_id}[?room_id=ROOM]

Before it opens a file it asks ``CanAccessRecording`` (rule R5), answered
locally by :class:`~lcic_guard_client.CachedGuardClient` for the watched
applications:

- allowed: ``200`` with the file (``404`` if there is no such file);
  ``Cache-Control: private, no-store`` so that no shared cache keeps serving
  it after a suspension; in the overdue grace period the decision's warning
  is in the ``X-Lcic-Guard-Warning`` header;
- denied while suspended, banned or unknown: ``403`` with the decision's
  message (what the customer can do) as the body and the reason in the
  ``X-Lcic-Guard-Reason`` header;
- resources released (R10): ``410 Gone``, same body and header: the files
  are deleted and will not come back;
- the sidecar unreachable: ``503``.

Run it next to ``scripts/run`` (see ``examples/README.md``)::

    .venv/bin/python examples/recording_gateway.py --dir /tmp/recordings
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lcic_guard_client import (
    DEFAULT_TIMEOUT,
    CachedGuardClient,
    Decision,
    GuardError,
    Reason,
)

log = logging.getLogger("recording_gateway")

SAMPLE_APPS = (
    "app-active,app-payg,app-renewing,app-expiring,app-grace,app-overdue,"
    "app-quota,app-expired,app-settled,app-banned,app-released"
)
ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
REASON_HEADER = "X-Lcic-Guard-Reason"
WARNING_HEADER = "X-Lcic-Guard-Warning"
DEGRADED_HEADER = "X-Lcic-Guard-Degraded"


def header_text(text: str) -> str:
    """A header value must be one line of Latin-1."""
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")


@dataclass
class Response:
    """What to answer: a status, headers, and a text body or a file."""

    status: HTTPStatus
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""
    file: Path | None = None


def _plain(status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, headers or {}, text if text.endswith("\n") else text + "\n")


def _valid_id(value: str) -> bool:
    # "." and ".." match the id alphabet but must never reach the file system.
    return bool(ID.fullmatch(value)) and value not in (".", "..")


class RecordingGateway:
    """The gateway's logic, without HTTP."""

    def __init__(self, guard: CachedGuardClient, root: Path) -> None:
        self.guard = guard
        self.root = root.resolve()

    def _guard_headers(self, d: Decision) -> dict[str, str]:
        headers = {REASON_HEADER: d.reason.name}
        if d.degraded:
            headers[DEGRADED_HEADER] = "true"
        return headers

    def recording(self, app_id: str, recording_id: str, room_id: str = "") -> Response:
        """Serve one recording if the billing policy allows it (R5, R10)."""
        for name, value in (("app_id", app_id), ("recording_id", recording_id)):
            if not _valid_id(value):
                return _plain(HTTPStatus.BAD_REQUEST, f"{name}: 1-64 characters [A-Za-z0-9._:-]")
        if room_id and not _valid_id(room_id):
            return _plain(HTTPStatus.BAD_REQUEST, "room_id: 1-64 characters [A-Za-z0-9._:-]")
        try:
            d = self.guard.can_access_recording(app_id, recording_id, room_id=room_id)
        except GuardError as exc:
            log.warning("lcic-guard sidecar call failed: %s", exc.code)
            return _plain(
                HTTPStatus.SERVICE_UNAVAILABLE, "Billing checks are unavailable; retry shortly."
            )
        headers = self._guard_headers(d)
        if not d.allowed:
            released = d.reason == Reason.RESOURCES_RELEASED
            status = HTTPStatus.GONE if released else HTTPStatus.FORBIDDEN
            return _plain(status, d.message, headers)
        if d.reason == Reason.OVERDUE_GRACE:
            headers[WARNING_HEADER] = header_text(d.message)
        path = (self.root / app_id / recording_id).resolve()
        if path.parent.parent != self.root or not path.is_file():
            return _plain(HTTPStatus.NOT_FOUND, f"no recording {recording_id}", headers)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers |= {
            "Content-Type": content_type,
            "Cache-Control": "private, no-store",
        }
        return Response(HTTPStatus.OK, headers, file=path)

    def health(self) -> Response:
        stats = {
            "guard_fresh": self.guard.is_fresh(),
            "local_answers": self.guard.local_answers,
            "remote_answers": self.guard.remote_answers,
        }
        return _plain(HTTPStatus.OK, json.dumps(stats), {"Content-Type": "application/json"})

    def route(self, target: str) -> Response:
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")
        match parts:
            case ["healthz"]:
                return self.health()
            case ["apps", app_id, "recordings", recording_id]:
                room_id = parse_qs(url.query).get("room_id", [""])[0]
                return self.recording(app_id, recording_id, room_id)
        return _plain(HTTPStatus.NOT_FOUND, "not found")


def handler_for(gateway: RecordingGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "recording-gateway/1"

        def _answer(self, with_body: bool) -> None:
            resp = gateway.route(self.path)
            self.send_response(resp.status)
            headers = {"Content-Type": "text/plain; charset=utf-8", **resp.headers}
            if resp.file is not None:
                with resp.file.open("rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    self._headers(headers, size)
                    if with_body:
                        shutil.copyfileobj(fh, self.wfile, 1 << 16)
                return
            data = resp.text.encode()
            self._headers(headers, len(data))
            if with_body:
                self.wfile.write(data)

        def _headers(self, headers: dict[str, str], length: int) -> None:
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

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
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port (port 0: any)")
    parser.add_argument(
        "--dir", type=Path, required=True, help="root directory: DIR/APP_ID/RECORDING_ID"
    )
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
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not a directory")

    guard = CachedGuardClient(
        args.guard, [a for a in args.apps.split(",") if a], timeout=args.timeout
    )
    if not guard.wait_fresh(args.wait_fresh):
        log.warning("the decision cache is not fresh yet: checks go to %s meanwhile", args.guard)
    try:
        server = ThreadingHTTPServer(
            parse_listen(args.listen), handler_for(RecordingGateway(guard, args.dir))
        )
    except OSError as exc:
        guard.close()
        parser.exit(
            2, f"cannot listen on {args.listen} ({exc.strerror}); choose another --listen\n"
        )
    host, port = server.server_address[:2]
    print(f"recording gateway listening on http://{host!s}:{port}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
