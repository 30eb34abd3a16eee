"""OpenTelemetry tracing, on when the standard ``OTEL_*`` variables ask for it.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its traces-only
twin ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` is
set, unless ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. It
needs the optional extra ``lcic-guard[otel]``; the SDK reads the rest of the
standard variables itself (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and its argument, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_EXPORTER_OTLP_INSECURE``, ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``).

What is traced:

- the sidecar: one SERVER span per unary EnforcementService call, named
  ``lcic.guard.v1.EnforcementService/<Method>``, a child of the caller's span
  when the call carries trace context (W3C ``traceparent`` by default), with
  the application (``lcic.app_id``), the room and the answer
  (``lcic.allowed``, ``lcic.reason``) as attributes. Health, reflection and
  the long-lived watch streams are not traced.
- the reconciler: ``lcic_guard.ingest`` for each batch of billing events
  (the accounts and applications it touched), ``lcic_guard.recompute`` for
  each account whose statuses it recomputes (a child of the batch or of the
  release) and ``lcic_guard.release`` for each release (R10) it decides, with
  the outcome.

Off, nothing of this is installed: no hook in the gRPC server's core, and
the reconciler runs with hooks that add nothing, so the check path runs
exactly the code it runs without tracing (the A/B is in docs/benchmarks.md).
On, the span is made on the serving thread (:class:`RpcTracer`), so a check
the cache answers is still answered there (one the sampler drops costs
little more than the sampler's decision); and the runner builds the
reconciler's hooks (:class:`ReconcilerTracer`) and hands them over at
construction.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb

from lcic_guard.reconciler.hooks import ReconcilerHooks

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace import Span, Tracer

    from lcic_guard.reconciler.release import ReleasePlan
    from lcic_guard.reconciler.sources import Delivery
    from lcic_guard.reconciler.stats import IngestStats

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["EnforcementService"]
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# Status codes that mean the server failed (a bad request is the caller's).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
MAX_IDS = 100  # ids listed on one span; the count is always given
# The calls whose answer is a Decision in field 1 (a span records it).
_SINGLE_CHECKS = frozenset({"CanCreateClassroom", "CanEnterClassroom", "CanAccessRecording"})


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(exporters) or any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


class Tracing:
    """A tracer provider with its exporters, and what to instrument with it."""

    def __init__(self, provider: TracerProvider, roots: RootSampling | None = None) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("lcic_guard")
        # Set when the provider samples root spans by trace-id ratio and
        # draws its trace ids through ``roots``: see RootSampling.
        self.roots = roots

    def flush(self, timeout_ms: int = 5000) -> bool:
        return bool(self.provider.force_flush(timeout_ms))

    def shutdown(self) -> None:
        """Export what is still buffered and stop."""
        self.provider.shutdown()

    def hooks(self) -> list[RpcTracer]:
        """What the sidecar's serving core runs around each call."""
        return [RpcTracer(self.tracer, self.roots)]

    def reconciler_hooks(self, *, dry_run: bool = False) -> ReconcilerTracer:
        """Hooks for a reconciler (given at its construction) that trace its
        batches, recomputations and releases; ``dry_run`` is its
        ``--release-dry-run``, recorded on each release span."""
        return ReconcilerTracer(self.tracer, dry_run=dry_run)


class ReconcilerTracer(ReconcilerHooks):
    """A span around each batch, recomputation and release of one
    reconciler. The reconciler's code knows nothing of tracing; an untraced
    one runs the base hooks, which add nothing."""

    def __init__(self, tracer: Tracer, *, dry_run: bool = False) -> None:
        self.tracer = tracer
        self.dry_run = dry_run

    async def ingest(
        self, deliveries: Sequence[Delivery], work: Awaitable[IngestStats]
    ) -> IngestStats:
        with self.tracer.start_as_current_span("lcic_guard.ingest") as span:
            # What the batch names is known before it is applied: a batch
            # cut short (by a stop) is still traced with it.
            span.set_attribute("lcic.events", len(deliveries))
            _ids(span, "lcic.app_ids", _app_ids(deliveries))
            stats = await work
            _ids(span, "lcic.account_ids", stats.accounts)
            span.set_attributes(
                {
                    "lcic.applied": stats.applied,
                    "lcic.duplicates": stats.duplicates,
                    "lcic.dead_lettered": stats.dead_lettered,
                    "lcic.parked": stats.parked,
                }
            )
            return stats

    async def recompute(self, account_id: str, work: Awaitable[bool]) -> bool:
        with self.tracer.start_as_current_span(
            "lcic_guard.recompute", attributes={"lcic.account_id": account_id}
        ):
            return await work

    async def release(self, account_id: str, work: Awaitable[ReleasePlan]) -> ReleasePlan:
        with self.tracer.start_as_current_span(
            "lcic_guard.release", attributes={"lcic.account_id": account_id}
        ) as span:
            plan = await work
            _ids(span, "lcic.app_ids", plan.app_ids)
            span.set_attributes(
                {
                    "lcic.release.eligible": plan.eligible,
                    "lcic.release.why": plan.why,
                    "lcic.released": plan.released,
                    "lcic.release.dry_run": self.dry_run,
                }
            )
            return plan


def _ids(span: Span, name: str, ids: Any) -> None:
    listed = sorted({str(i) for i in ids if i})
    span.set_attribute(name, listed[:MAX_IDS])
    span.set_attribute(name.removesuffix("_ids") + "_count", len(listed))


def _app_ids(deliveries: Sequence[Delivery]) -> set[str]:
    """The applications a batch names (invalid events name none)."""
    out = set()
    for d in deliveries:
        try:
            event = json.loads(d.raw)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("app_id"), str):
            out.add(event["app_id"])
    return out


def setup(
    service_name: str = "lcic-guard", environ: Mapping[str, str] = os.environ
) -> Tracing | None:
    """Tracing as the environment asks for it, or None (off, or not installed)."""
    if not wanted(environ):
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.error(
            "OTEL_* variables ask for traces but OpenTelemetry is not installed "
            "(pip install 'lcic-guard[otel]'): not tracing"
        )
        return None
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    roots = RootSampling.from_environ(environ)
    # The sampler from OTEL_TRACES_SAMPLER; trace ids through ``roots``.
    # RootSampling has IdGenerator's two methods; it does not subclass it so
    # that this module imports nothing of OpenTelemetry unless tracing is on.
    provider = TracerProvider(resource=resource, id_generator=cast("IdGenerator", roots))
    exporters = [e.strip() for e in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    for name in exporters:
        if name == "otlp":
            protocol = environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
            )
            if protocol and protocol != "grpc":
                log.warning("OTLP protocol %r is not supported: exporting over grpc", protocol)
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name:
            log.warning("OTEL_TRACES_EXPORTER: unknown exporter %r ignored (otlp, console)", name)
    log.info(
        "tracing on: service %s, exporters %s",
        provider.resource.attributes.get(SERVICE_NAME),
        ",".join(exporters),
    )
    return Tracing(provider, roots if roots.bound is not None else None)


class RootSampling:
    """Trace ids for root spans, drawn before OpenTelemetry is called.

    With a trace-id ratio sampler (``traceidratio``, or the parent-based one
    for calls without a parent), whether a root span is sampled is a function
    of its trace id. So the serving core draws the id itself, and a call the
    sampler would drop costs one random number instead of a span's start
    (ids, sampler, a non-recording span: most of tracing's cost on a cache
    hit). A call it would keep starts its span with that very id, handed to
    OpenTelemetry as its id generator, and the sampler keeps it: the same
    spans, the same ratio."""

    def __init__(self, bound: int | None) -> None:
        import random
        import threading

        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self.bound = bound  # sampled when (trace id & LOW_64) < bound
        self._random = RandomIdGenerator()
        self._next = threading.local()
        self._bits = random.getrandbits

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> RootSampling:
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

        name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
        if name not in ("traceidratio", "parentbased_traceidratio"):
            return cls(None)
        try:
            rate = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            return cls(None)  # OpenTelemetry warns and uses its default
        if not 0.0 <= rate <= 1.0:
            return cls(None)
        return cls(TraceIdRatioBased.get_bound_for_rate(rate))

    def draw(self) -> bool:
        """For a call without a parent: whether its root span is sampled; if
        so, the next trace id is the one drawn (for this thread)."""
        assert self.bound is not None
        trace_id = self._bits(128) or 1
        if trace_id & _LOW_64 >= self.bound:
            return False
        self._next.trace_id = trace_id
        return True

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._next, "trace_id", None)
        if trace_id is None:
            return int(self._random.generate_trace_id())
        self._next.trace_id = None
        return trace_id

    def generate_span_id(self) -> int:
        return int(self._random.generate_span_id())

    def is_trace_id_random(self) -> bool:
        return True  # drawn from random.getrandbits, as RandomIdGenerator's

    def __getattr__(self, name: str) -> Any:
        # Anything else OpenTelemetry asks of an id generator is its random one's.
        return getattr(self._random, name)


_LOW_64: Final = (1 << 64) - 1


# ---------------------------------------------------------------------------
# The sidecar's RPCs


def _request_types() -> dict[str, Callable[[bytes], Any]]:
    return {
        f"/{SERVICE.full_name}/{m.name}": getattr(pb, m.input_type.name).FromString
        for m in SERVICE.methods
        if not m.server_streaming
    }


def _request_attributes(request: Any) -> dict[str, Any]:
    if isinstance(request, pb.CheckBatchRequest):
        apps = sorted({getattr(c, c.WhichOneof("kind") or "").app_id for c in request.checks})
        return {
            "lcic.batch_size": len(request.checks),
            "lcic.app_ids": apps[:MAX_IDS],
            "lcic.app_count": len(apps),
        }
    attrs = {}
    for fieldname in ("app_id", "room_id", "recording_id"):
        value = getattr(request, fieldname, "")
        if value:
            attrs[f"lcic.{fieldname}"] = value
    return attrs


def _response_attributes(response: Any, method: str = "") -> dict[str, Any]:
    if isinstance(response, bytes):  # a check's answer, sent as serialized
        if method.endswith("/CheckBatch"):
            return {}
        response = pb.CanCreateClassroomResponse.FromString(response)
    decision = getattr(response, "decision", None)
    if decision is None:
        return {}
    return {
        "lcic.allowed": decision.allowed,
        "lcic.reason": pb.DecisionReason.Name(decision.reason).removeprefix("DECISION_REASON_"),
        "lcic.degraded": decision.degraded,
    }


class RpcTracer:
    """A SERVER span around each unary EnforcementService call: a hook of
    the sidecar's serving core (:class:`~lcic_guard.sidecar.calls.Hook`),
    run on the serving thread, so that a traced check the cache answers
    stays on that thread. A call the sampler drops costs its decision and no
    more: the request and the answer are decoded for a recorded span only."""

    def __init__(self, tracer: Tracer, roots: RootSampling | None = None) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.tracer = tracer
        self.roots = roots
        self.parsers = _request_types()
        self._names = {
            method: (
                f"{service}/{name}",
                {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            )
            for method in self.parsers
            for service, _, name in [method.lstrip("/").rpartition("/")]
        }
        self._extract = propagate.extract
        # The metadata keys the propagators read: a call carrying none of
        # them (most) has no parent to extract.
        self._fields = frozenset(propagate.get_global_textmap().fields)
        self._attach, self._detach = context.attach, context.detach
        self._in_context = trace.set_span_in_context
        self._server = SpanKind.SERVER
        self._status, self._error = Status, StatusCode.ERROR

    def wants(self, method: str) -> bool:
        return method in self.parsers

    def enter(self, method: str, raw: bytes, context: grpc.ServicerContext) -> Any:
        fields = self._fields
        # gRPC metadata keys are lower case already, as the propagators read them.
        carrier = {
            k: v for k, v in context.invocation_metadata() if k in fields and isinstance(v, str)
        }
        if not carrier and self.roots is not None and not self.roots.draw():
            return None  # a root span the sampler would drop: not started at all
        name, attributes = self._names[method]
        span = self.tracer.start_span(
            name,
            context=self._extract(carrier) if carrier else None,
            kind=self._server,
            record_exception=False,
            set_status_on_exception=False,
        )
        if not span.is_recording():
            return None
        span.set_attributes(attributes)
        try:  # the raw request: the service parses it itself
            span.set_attributes(_request_attributes(self.parsers[method](raw)))
        except Exception:
            span.set_attribute("lcic.malformed_request", True)
        # Current while the call is served (on the event loop too, where the
        # bridge carries this thread's context).
        return span, method, self._attach(self._in_context(span))

    def leave(self, state: Any, response: bytes | None, code: grpc.StatusCode) -> None:
        if state is None:
            return
        span, method, token = state
        self._detach(token)
        if response is not None and method.rpartition("/")[2] in _SINGLE_CHECKS:
            span.set_attributes(_response_attributes(response, method))
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in SERVER_ERRORS:
            span.set_status(self._status(self._error, code.name))
        span.end()
