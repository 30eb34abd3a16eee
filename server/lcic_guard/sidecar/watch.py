"""WatchApplicationStatus: opening a stream.

The call's thread opens a subscription with the watchers
(:mod:`lcic_guard.sidecar.watchers`), reads the current statuses of the
applications it names (on the event loop, through the bridge: a Redis read
when the stream opens), hands them to the watch thread, and returns: gRPC
serves the method as a non-blocking stream (``experimental_non_blocking``),
so an open stream holds no thread. The watchers' sender threads send what
the watch thread grants and the heartbeats, and end the call. Nothing here
renders a change or touches another stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.domain.policy import AppStatus
from lcic_guard.sidecar import wire
from lcic_guard.sidecar.bridge import Bridge, parsed
from lcic_guard.sidecar.errors import Refused
from lcic_guard.sidecar.service import EnforcementServicer
from lcic_guard.sidecar.watchers import CANCELLED, Send, WatchCut

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

    def __call__(
        self,
        raw: bytes,
        context: grpc.ServicerContext,
        send: Send,
        done: Callable[[grpc.StatusCode], None],
    ) -> None:
        """Open the stream and return: from then on the sender threads send
        on it (``send``), and the one that ends it calls ``done`` with the
        status it ended with."""
        ids = wire.watch_ids(parsed(raw, pb.WatchApplicationStatusRequest.FromString))
        watchers = self.servicer.watchers
        if watchers is None:
            raise Refused(
                grpc.StatusCode.UNIMPLEMENTED, "this sidecar does not follow the change feed"
            )

        def finish(cut: WatchCut) -> None:
            if cut is not CANCELLED:
                context.set_code(cut.code)
                context.set_details(cut.message)
                send(None)  # the status (nothing is sent if the call is gone)
            done(cut.code)

        try:
            sub = watchers.subscribe(ids, context, send, finish)
        except WatchCut as cut:
            raise Refused(cut.code, cut.message) from None
        if not context.add_callback(lambda: watchers.cancelled(sub)):  # the client went
            watchers.cancelled(sub)
            return
        if ids:
            try:
                current = self._current(ids, context)
            except Exception:
                watchers.abandon(sub)  # the call ends here, with what failed
                raise
            watchers.first(sub, current, self.servicer.clock())
