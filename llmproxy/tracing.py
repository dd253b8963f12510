"""OpenTelemetry traces: the spans of requests, sampled, and exported by OTLP/HTTP in batches off the request path.

Imported only when `tracing.enabled` (services.py): with tracing off the proxy never imports opentelemetry.
It knows nothing of requests: spans.py says what a span is called and holds (the GenAI semantic conventions),
this module makes, samples, times and exports it.

- Sampling is parent-based: a client's `traceparent` carries its decision, which is followed (its trace is
  never cut in two); a trace the proxy starts is kept with probability `sample_ratio`, decided on the trace
  id. At ratio 0 such a request gets no span at all, not even a non-recording one: no ids are drawn.
- Times are the proxy's own (perf_counter readings it takes anyway), turned into Unix nanoseconds when the
  span starts and ends: tracing adds no clock reading to the relay.
- Export: a BatchSpanProcessor queues each ended span (one lock, one append) and its own thread sends them
  in batches; when its queue is full a span is dropped, never a request delayed. `shutdown` flushes it.
"""

from __future__ import annotations

import os
from time import perf_counter, time_ns
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmproxy import __version__
from llmproxy.config.model import TracingConfig

TRACEPARENT, TRACESTATE = b"traceparent", b"tracestate"
NOT_TRACED: Span = INVALID_SPAN  # a request without a span: records nothing, propagates nothing


class Tracing:
    """One process's tracer provider, sampler and batch exporter."""

    __slots__ = ("_propagator", "_provider", "_roots", "_tracer")

    def __init__(self, config: TracingConfig) -> None:
        # process.pid: with server.workers > 1 each worker is a process with a provider and exporter of its own
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__,
                                    "process.pid": os.getpid()})
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers),
                                    timeout=config.export_timeout)
        self._provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=config.max_queue_size, max_export_batch_size=config.max_batch_size,
            schedule_delay_millis=config.export_interval * 1000.0,
            export_timeout_millis=config.export_timeout * 1000.0))
        self._tracer = self._provider.get_tracer("llmproxy", __version__)
        self._roots = config.sample_ratio > 0.0  # at 0 a trace the proxy would start is never kept
        self._propagator = TraceContextTextMapPropagator()

    def start(self, name: str, headers: list[tuple[bytes, bytes]], started: float) -> Span:
        """The span of a request whose head is `headers`, begun at perf_counter time `started`: a child of the
        client's traceparent when it sent a valid one. NOT_TRACED when no trace would keep it."""
        parent = None
        carrier = _trace_headers(headers)
        if carrier:
            parent = self._propagator.extract(carrier)
        elif not self._roots:
            return NOT_TRACED
        return self._tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, start_time=unix_ns(started))

    @staticmethod
    def recording(span: Span) -> bool:
        """Whether `span` was sampled: only then is it worth describing."""
        return span.is_recording()

    @staticmethod
    def traceparent_line(span: Span) -> bytes:
        """The `traceparent` header line that makes `span` the parent of the upstream request (b"" for
        NOT_TRACED). An unsampled span has one too: the backend learns the trace was not kept."""
        context = span.get_span_context()
        if not context.is_valid:
            return b""
        return b"traceparent: 00-%032x-%016x-%02x\r\n" % (context.trace_id, context.span_id, context.trace_flags)

    @staticmethod
    def end(span: Span, attributes: dict[str, Any], ended: float, first_token: float | None = None,
            first_token_attributes: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Describe a recording `span` and end it at perf_counter time `ended`: its `attributes`, an event
        "first_token" at `first_token`, an error status with `error` as its description."""
        offset = time_ns() - int(perf_counter() * 1e9)
        span.set_attributes(attributes)
        if first_token is not None:
            span.add_event("first_token", first_token_attributes, timestamp=int(first_token * 1e9) + offset)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=int(ended * 1e9) + offset)

    def shutdown(self) -> None:
        """Export what is queued (up to export_timeout) and stop the exporter's thread. Blocking."""
        self._provider.shutdown()


def unix_ns(perf: float) -> int:
    """A perf_counter reading as Unix time in nanoseconds."""
    return time_ns() - int((perf_counter() - perf) * 1e9)


def _trace_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """The client's traceparent (and tracestate) as a propagator carrier, or None when it sent none."""
    carrier = None
    for name, value in headers:
        if name in (TRACEPARENT, TRACESTATE):
            if carrier is None:
                carrier = {}
            carrier[name.decode()] = value.decode("latin-1")
    return carrier if carrier is not None and "traceparent" in carrier else None
