"""OpenTelemetry's side of traces: the provider, the exporter, and a call's spans.

Imported only when routes.yaml has ``telemetry:`` (``tracing.open_tracing``). One span
per proxied call, SERVER kind (the proxy serves the client's call), with the GenAI
semantic conventions' attributes; one CLIENT child per attempt sent to an upstream. A
client's W3C ``traceparent`` is the call span's parent, and each attempt sends its own
span's ``traceparent`` upstream. Nothing here uses OpenTelemetry's global state (its
global tracer provider, propagator or current span): the ``Tracing`` lives on the app's
services, and each span's parent is passed explicitly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.config.telemetry import Telemetry
from proxy.observe.access_log import logged_model
from proxy.observe.span_facts import OPERATIONS, CallEnd
from proxy.observe.worker_metrics import WORKER_ENV


class Tracing:
    """One process's tracer: what ``telemetry:`` configured, for the app's lifetime."""

    def __init__(self, settings: Telemetry, version: str) -> None:
        # Each worker exports its own spans: its pid and its index (the metrics' "worker"
        # label) tell them apart in a trace store, as service.instance.id is meant to.
        worker = os.environ.get(WORKER_ENV, "0")
        resource = Resource.create(
            {
                "service.name": settings.service_name,
                "service.version": version,
                "service.instance.id": f"{socket.gethostname()}/{worker}/{os.getpid()}",
                "process.pid": os.getpid(),
                "proxy.worker": worker,
            }
        )
        # Parent-based: a client's traceparent decides for its call (sampled or not), so
        # a trace is never cut in the middle; sample_ratio decides for calls without one.
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self.provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
        # Batched, exported from the processor's own thread: never on the loop. Its delay,
        # queue and the exporter's headers and timeout follow the standard OTEL_BSP_* and
        # OTEL_EXPORTER_OTLP_* variables.
        exporter = OTLPSpanExporter(endpoint=settings.traces_url)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("llm-routing-proxy", version)
        self.propagator = TraceContextTextMapPropagator()

    def call(self, headers: Mapping[str, str], api: str) -> CallTrace:
        """The span of a call that starts now, a child of the client's traceparent if any."""
        operation = OPERATIONS.get(api, api)
        span = self.tracer.start_span(
            operation,
            context=self.propagator.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "http.request.method": "POST"},
        )
        return CallTrace(self, span, operation)

    def shutdown(self) -> None:
        """Export what is left and stop (blocking: see ``tracing.close_tracing``)."""
        self.provider.shutdown()


class CallTrace:
    """One call's span, and the start of its attempts' spans."""

    __slots__ = ("operation", "recording", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self.tracing, self.span, self.operation = tracing, span, operation
        self.recording = span.is_recording()  # False: sampled out, only propagated

    def attempt(self, provider: str, url: str) -> AttemptTrace:
        parts = urlsplit(url)
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.provider.name": provider,
            "http.request.method": "POST",
            "url.full": url,  # routes.yaml refuses credentials in a URL
            "server.address": parts.hostname or "",
        }
        if parts.port is not None:
            attributes["server.port"] = parts.port
        span = self.tracing.tracer.start_span(
            f"{self.operation} {provider}",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        return AttemptTrace(self.tracing, span)

    def end(self, call: CallEnd) -> None:
        span = self.span
        if not self.recording:
            span.end()
            return
        if call.route:
            span.update_name(f"{self.operation} {call.route}")
        attributes = {
            "gen_ai.request.model": logged_model(call.model),
            "gen_ai.response.model": call.response_model,
            "gen_ai.provider.name": call.provider,
            "gen_ai.usage.input_tokens": call.input_tokens,
            "gen_ai.usage.output_tokens": call.output_tokens,
            "http.response.status_code": call.status,
            "proxy.request_id": call.request_id,
            "proxy.team": call.team,
            "proxy.route": call.route,
        }
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if call.input_tokens is not None:
            span.set_attribute("proxy.tokens_estimated", call.tokens_estimated)
        if call.error is not None:  # a 4xx's code too, though it is no failure of the span
            span.set_attribute("error.type", call.error)
        # A server span fails with the server (5xx) or a stream broken after its first
        # byte; a 4xx is the client's (OpenTelemetry's HTTP conventions).
        if call.status >= 500 or call.stream_error is not None:
            kind = call.error or ("stream_error" if call.stream_error else str(call.status))
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, call.stream_error or kind))
        span.end()


class AttemptTrace:
    """One attempt's span, and the headers that carry it upstream."""

    __slots__ = ("span", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing, self.span = tracing, span

    def headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        """``extra`` with this span's traceparent (and the tracestate, if any): they take
        the place of the client's own, which named the client's span."""
        out = dict(extra)
        self.tracing.propagator.inject(out, context=trace.set_span_in_context(self.span))
        return out

    def end(self, status: int | None, error: str | None) -> None:
        span = self.span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400 and error is None:  # a client span's 4xx is an error too
                error = str(status)
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
