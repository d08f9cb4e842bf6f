"""routes.yaml's ``telemetry:`` block: OpenTelemetry traces, off unless it is there.

Read at start, like ``redis.url``: a reload that changes it takes a restart. The
OpenTelemetry packages are an extra (``llm-routing-proxy[otel]``); a file that asks for
traces without them installed is refused here, by ``check`` and at start alike, and
nothing is imported from them when the block is absent.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from proxy.config.fields import FieldReader

TELEMETRY_KEYS = {"otlp_endpoint", "service_name", "sample_ratio"}
# What the proxy imports once traces are on (proxy/observe/spans.py).
_NEEDED = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")
MISSING_PACKAGES = (
    "needs the OpenTelemetry SDK and its OTLP/HTTP exporter, which are not installed: "
    "pip install 'llm-routing-proxy[otel]'"
)


@dataclass(frozen=True)
class Telemetry:
    # The collector's OTLP/HTTP root (OTEL_EXPORTER_OTLP_ENDPOINT's meaning): spans are
    # posted to <root>/v1/traces, or to the URL as given when it already ends so.
    otlp_endpoint: str
    service_name: str = "llm-routing-proxy"
    # Of the calls that come without a trace, the share traced; a client's traceparent
    # decides for its own calls (a parent-based sampler).
    sample_ratio: float = 1.0

    @property
    def traces_url(self) -> str:
        root = self.otlp_endpoint.rstrip("/")
        return root if root.endswith("/v1/traces") else root + "/v1/traces"


def read_telemetry(reader: FieldReader, raw: Any) -> Telemetry | None:
    if raw is None:
        return None
    node = reader.mapping(raw, "telemetry", TELEMETRY_KEYS)
    endpoint = reader.url(node.get("otlp_endpoint"), "telemetry.otlp_endpoint")
    name = reader.string(node.get("service_name", Telemetry.service_name), "telemetry.service_name")
    ratio = _ratio(reader, node.get("sample_ratio", Telemetry.sample_ratio))
    if not otel_installed():
        reader.error("telemetry", MISSING_PACKAGES)
        return None
    if endpoint is None or name is None or ratio is None:
        return None
    return Telemetry(endpoint, name, ratio)


def _ratio(reader: FieldReader, raw: Any) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
        reader.error("telemetry.sample_ratio", f"must be a number from 0 to 1, got {raw!r}")
        return None
    return float(raw)


def otel_installed() -> bool:
    """Found without importing them (only their parent package, to look)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in _NEEDED)
    except ModuleNotFoundError:  # a parent package is missing
        return False
