"""A real OTLP/HTTP trace receiver: an aiohttp app that takes ``POST /v1/traces`` in
protobuf, as a collector does, and decodes each export with OpenTelemetry's own
protobuf classes (opentelemetry-proto), independent of the SDK that encoded it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

# opentelemetry.proto.trace.v1.Span.SpanKind and Status.StatusCode, by value.
SERVER, CLIENT = 2, 3
UNSET, OK, ERROR = 0, 1, 2


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    start: int  # Unix nanoseconds
    name: str
    kind: int
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class OtlpReceiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)  # each export's header

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        return app

    async def traces(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        self.authorizations.append(request.headers.get("Authorization", ""))
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            start=span.start_time_unix_nano,
                            name=span.name,
                            kind=span.kind,
                            status_code=span.status.code,
                            status_message=span.status.message,
                            attributes=_attributes(span.attributes),
                            resource=resource,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def of_kind(self, kind: int) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.kind == kind]

    def children(self, parent: ReceivedSpan) -> list[ReceivedSpan]:
        """In the order they started."""
        found = [
            s
            for s in self.spans
            if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id
        ]
        return sorted(found, key=lambda s: s.start)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None
