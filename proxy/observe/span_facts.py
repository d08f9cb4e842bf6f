"""What the call path hands a call's span: plain data, free of OpenTelemetry, so that
the call path can build it without importing it (proxy/observe/tracing.py)."""

from __future__ import annotations

from dataclasses import dataclass

# The proxied API → gen_ai.operation.name (the GenAI semantic conventions' values).
OPERATIONS = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}


@dataclass(frozen=True)
class CallEnd:
    """What a finished call tells its span."""

    status: int
    request_id: str
    team: str
    model: str | None  # as the client sent it
    route: str | None  # the routes.yaml model id it was routed to
    provider: str | None  # the one that answered, or was tried last
    response_model: str | None  # what the upstream's answer says it is
    input_tokens: int | None  # what the ledger booked
    output_tokens: int | None
    tokens_estimated: bool
    error: str | None = None  # the proxy's error code, or why the call stopped
    stream_error: str | None = None  # a stream that broke after its first byte
