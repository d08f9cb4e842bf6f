"""Step 6 of a call, the metrics half: turn a finished CallRecord into Prometheus series.

Only proxied API calls are counted (probes, /metrics and /v1/models are not). The
labels come from the record's config-derived fields, never from what the client sent.
"""

from __future__ import annotations

from aiohttp import web

from proxy.metrics import NO_PROVIDER, UNKNOWN_MODEL, Metrics
from proxy.record import CallRecord
from proxy.usage import find_usage


def note_usage(record: CallRecord, response: web.StreamResponse) -> None:
    """Plain answers: read the reported usage from the body the proxy already holds."""
    if record.usage is not None or record.endpoint is None or response.status != 200:
        return
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        record.usage = find_usage(response.body)


def observe_call(metrics: Metrics, record: CallRecord, elapsed: float) -> None:
    if record.endpoint is None:
        return
    team = record.team
    model = record.route or UNKNOWN_MODEL
    provider = record.provider or NO_PROVIDER
    metrics.c_requests.get(team, model, provider, str(record.status)).inc()
    metrics.c_duration.get(team, model, provider).observe(elapsed)
    if record.first_byte is not None:
        metrics.c_ttft.get(model, provider).observe(record.first_byte - record.started)
    metrics.overhead.observe(max(0.0, elapsed - record.waited))
    for name, outcome in record.outcomes:
        metrics.c_attempts.get(name, outcome).inc()
    if record.usage is not None:
        usage = record.usage
        metrics.add_tokens(team, model, usage.prompt, usage.completion, "reported")
