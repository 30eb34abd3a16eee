"""WatchApplicationStatus, served on the stream's own thread.

The stream's thread only sends: it opens a subscription with the watchers
(:mod:`lcic_guard.sidecar.watchers`), reads the current statuses of the
applications it names (on the event loop, through the bridge: a Redis read
when the stream opens), hands them to the watch thread, and then sends what
the watch thread grants it, or a heartbeat every ``heartbeat_s`` while the
sidecar's view is current and nothing waits to be sent. Nothing here renders
a change or touches another stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.domain.policy import AppStatus
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.bridge import Bridge, parsed
from lcic_guard.sidecar.errors import Refused
from lcic_guard.sidecar.service import EnforcementServicer
from lcic_guard.sidecar.watchers import CANCELLED, HEARTBEAT, WatchCut

METHOD = "WatchApplicationStatus"


class WatchStream:
    """The body of WatchApplicationStatus for
    :class:`~lcic_guard.sidecar.calls.Entry` (raw request in, messages out)."""

    def __init__(self, servicer: EnforcementServicer, bridge: Bridge) -> None:
        self.servicer = servicer
        self.bridge = bridge

    def _current(self, ids: list[str], context: grpc.ServicerContext) -> list[AppStatus]:
        servicer = self.servicer
        reads = [(a, None) for a in ids]
        try:
            rows = self.bridge.run(
                asyncio.wait_for(servicer.store.read_rows(reads), servicer.store_timeout),
                context,
                pooled=False,
            )
        except Exception:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "status store unavailable") from None
        return [r[0] for r in rows if not isinstance(r, Exception) and r[0] is not None]

    def __call__(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        ids = wire.watch_ids(parsed(raw, pb.WatchApplicationStatusRequest.FromString))
        watchers = self.servicer.watchers
        if watchers is None:
            raise Refused(
                grpc.StatusCode.UNIMPLEMENTED, "this sidecar does not follow the change feed"
            )
        try:
            sub = watchers.subscribe(ids, context)
        except WatchCut as cut:
            raise Refused(cut.code, cut.message) from None
        context.add_callback(lambda: sub.end(CANCELLED))  # the client went: stop waiting
        try:
            if ids:
                watchers.first(sub, self._current(ids, context), self.servicer.clock())
            while True:
                try:
                    batch = sub.next(watchers.heartbeat_s)
                except WatchCut as cut:
                    raise Refused(cut.code, cut.message) from None
                if batch is None:
                    if watchers.feed_healthy:
                        yield HEARTBEAT
                    continue
                yield from batch
                # gRPC asks for the next message once the last one is sent.
                watchers.sent(sub)
        finally:
            watchers.unsubscribe(sub)
