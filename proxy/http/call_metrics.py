"""The metrics half of finishing a call: turn a CallRecord into Prometheus series.

Only proxied API calls are counted (probes, /metrics and /v1/models are not). The
labels come from the record's config-derived fields, never from what the client sent.
"""

from __future__ import annotations

from proxy.call.record import CallRecord
from proxy.observe.metrics import NO_PROVIDER, UNKNOWN_MODEL, Metrics, TokenSource


def observe_call(metrics: Metrics, record: CallRecord, elapsed: float) -> None:
    if record.api is None:
        return
    team = record.team
    model = record.route or UNKNOWN_MODEL
    provider = record.provider or NO_PROVIDER
    metrics.c_requests.get(team, model, provider, str(record.status)).inc()
    metrics.c_duration.get(team, model, provider).observe(elapsed)
    if record.first_byte is not None:
        metrics.c_ttft.get(model, provider).observe(record.first_byte - record.started)
    metrics.c_overhead.observe(max(0.0, elapsed - record.waited))
    for attempt in record.attempts:
        metrics.c_attempts.get(attempt.provider, attempt.outcome).inc()
    if record.billed is not None:
        billed = record.billed
        source: TokenSource = "estimated" if billed.estimated else "reported"
        metrics.add_tokens(team, model, billed.prompt_tokens, billed.completion_tokens, source)
    if record.cost:
        metrics.c_cost.get(team, model, provider).inc(record.cost / 1_000_000)
