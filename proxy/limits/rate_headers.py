"""The x-ratelimit-* response headers, named and formatted as OpenAI's, and the words of
a refusal."""

from __future__ import annotations

from proxy.errors import retry_seconds
from proxy.limits.store import Admission, Check, LimitState

_HEADER_KINDS = (("requests", "requests_per_minute"), ("tokens", "tokens_per_minute"))


def rate_headers(admission: Admission) -> dict[str, str]:
    """For requests and tokens: the tightest of the team's and the model's limits. On a
    refusal, the refused limit's own figures, and its reset is when this call fits
    (what Retry-After says, rounded up to whole seconds), not when its bucket is full
    again: the two differ (30 s and 59.85 s for 2 requests a minute), and a client
    that read both would not know which to wait."""
    headers: dict[str, str] = {}
    refused = admission.refused
    for name, kind in _HEADER_KINDS:
        states = [s for s in admission.states if s.check.kind == kind]
        if not states:
            continue
        chosen: LimitState = min(states, key=lambda s: s.remaining)
        reset = chosen.reset
        if refused is not None and refused.kind == kind:
            chosen = next(s for s in states if s.check == refused)
            reset = admission.retry_after
        headers[f"x-ratelimit-limit-{name}"] = str(chosen.check.limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(chosen.remaining)
        headers[f"x-ratelimit-reset-{name}"] = duration_text(reset)
    return headers


def duration_text(seconds: float) -> str:
    """OpenAI's style: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(round(seconds, 3), 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:g}s"
    if minutes or hours:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


def describe_refusal(check: Check, reserved: int, retry_after: float) -> str:
    scope = "" if check.scope == "*" else f" for model '{check.scope}'"
    limit = f"{check.kind} limit of {check.limit}{scope}"
    if check.kind in ("tokens_per_minute", "tokens_per_day") and reserved > check.limit:
        return (
            f"Rate limit exceeded: this request reserves {reserved} tokens (prompt estimate "
            f"+ max_tokens), more than the team's {limit}. Lower max_tokens."
        )
    wait = duration_text(retry_seconds(retry_after))
    return f"Rate limit exceeded: the team's {limit} is used up. Retry in {wait}."
