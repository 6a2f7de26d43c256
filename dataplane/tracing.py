"""OpenTelemetry spans for proxied requests: one span per finished request.

Only built when the bootstrap file has a ``tracing`` section; without it the worker holds
``None`` and pays one attribute check per request. The span is made after the request has
finished, from what the exchange recorded (start, end, route, status), and continues the
request's incoming W3C ``traceparent`` / ``tracestate``. The forwarded request is never
touched: the app's own span is a sibling of turnout's under the caller's span, and baggage
and trace context reach the app byte for byte as they arrived.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dataplane.config import OTLP_EXPORTER_MODULE, OTLP_EXPORTER_PACKAGE, Tracing

if TYPE_CHECKING:
    from dataplane.message import Request
    from filters import Address, Decision

_TRACE_HEADERS = (b"traceparent", b"tracestate")


class FinishedRequest(Protocol):
    """What a span is made of: a finished exchange, as the router records it."""

    request: Request
    started_at: float  # time.perf_counter() when it arrived
    service: str
    route_kind: str  # baseline, sandbox or mirror
    decision: Decision
    destination: Address  # where it was sent last (baseline after a fallback)
    status: int
    fallback_cause: str  # why the sandbox's answer came from baseline, when it did

    @property
    def listener_mode(self) -> str:
        """``inbound`` or ``outbound``."""


def _json_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


class RequestTracer:
    """Turns finished exchanges into spans and hands them to the configured exporter."""

    def __init__(self, config: Tracing, instance: str) -> None:
        self.config = config
        self._out: IO[str] | None = None
        self.exporter = self._exporter(config)
        resource = Resource.create({"service.name": config.service_name, "service.instance.id": instance})
        self.provider = TracerProvider(sampler=TraceIdRatioBased(config.sampling_ratio), resource=resource)
        # The memory exporter is read by tests right after a request; every other exporter
        # does its I/O on the batch processor's thread, never on the event loop.
        processor = (SimpleSpanProcessor(self.exporter) if config.exporter == "memory"
                     else BatchSpanProcessor(self.exporter))
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("turnout")
        self._propagator = TraceContextTextMapPropagator()
        # exchange.started_at is time.perf_counter(); spans need wall-clock nanoseconds.
        self._wall_offset_ns = time.time_ns() - time.perf_counter_ns()

    def _exporter(self, config: Tracing) -> SpanExporter:
        if config.exporter == "memory":
            return InMemorySpanExporter()
        if config.exporter == "console":
            self._out = sys.stdout if config.path == "-" else open(config.path, "a", encoding="utf-8")  # noqa: SIM115
            return ConsoleSpanExporter(out=self._out, formatter=_json_line)
        try:
            module: Any = importlib.import_module(OTLP_EXPORTER_MODULE)
        except ImportError:  # config validation refuses this; a package removed since is still named
            raise RuntimeError(f"tracing exporter otlp needs the package {OTLP_EXPORTER_PACKAGE}") from None
        exporter: SpanExporter = module.OTLPSpanExporter(endpoint=config.endpoint)
        return exporter

    def finished(self, exchange: FinishedRequest, ended_at: float) -> None:
        """Record one finished request; ``ended_at`` is on the ``time.perf_counter()`` clock."""
        carrier: dict[str, str] = {}
        request = exchange.request
        for name, value in request.fields:
            if name in _TRACE_HEADERS:
                key = name.decode("latin-1")
                # Repeated lines combine as one list (RFC 9110), which is what tracestate means.
                carrier[key] = carrier[key] + "," + value.decode("latin-1") if key in carrier \
                    else value.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        method = request.method.decode("latin-1")
        # A sidecar's inbound listener serves the request (SERVER); a node's outbound
        # listener makes it on the app's behalf (CLIENT), as Envoy reports them.
        kind = SpanKind.CLIENT if exchange.listener_mode == "outbound" else SpanKind.SERVER
        span = self._tracer.start_span(
            method, context=parent, kind=kind,
            start_time=int(exchange.started_at * 1e9) + self._wall_offset_ns,
        )
        if span.is_recording():
            decision = exchange.decision
            target = request.target.decode("latin-1")
            # Only the path: query strings carry tokens, and share links carry routing keys.
            span.set_attributes({
                "http.request.method": method,
                "url.path": target.partition("?")[0],
                "http.response.status_code": exchange.status,
                "turnout.route": exchange.route_kind,
                "turnout.service": exchange.service,
                "turnout.destination": str(exchange.destination),
                "turnout.fallback": bool(exchange.fallback_cause),
            })
            if exchange.fallback_cause:
                span.set_attribute("turnout.fallback_cause", exchange.fallback_cause)
            if decision.session_id:
                span.set_attribute("turnout.session", decision.session_id)
            if exchange.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=int(ended_at * 1e9) + self._wall_offset_ns)

    def finished_spans(self) -> tuple[ReadableSpan, ...]:
        """The spans kept by the memory exporter (tests)."""
        if not isinstance(self.exporter, InMemorySpanExporter):
            raise RuntimeError("finished_spans() needs exporter: memory")
        return tuple(self.exporter.get_finished_spans())

    def shutdown(self) -> None:
        """Export what is pending and release the exporter (config reload, exit)."""
        self.provider.shutdown()
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
