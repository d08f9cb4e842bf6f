"""The issue's targets, checked against one run's figures."""

from __future__ import annotations

from bench.scenario import Figures


def _by_name(proxied: list[Figures], name: str) -> Figures | None:
    return next((f for f in proxied if f.name == name), None)


def check(direct: Figures, proxied: list[Figures]) -> list[str]:
    """One line per target: met or not, with the figure it was judged on."""
    lines: list[str] = []

    def verdict(what: str, value: float, ok: bool, unit: str) -> None:
        lines.append(f"- {'met' if ok else '**not met**'}: {what} (measured {value:.3g} {unit})")

    one = _by_name(proxied, "1 worker")
    if one is not None:
        p50 = one.latency.p50_ms - direct.latency.p50_ms
        p99 = one.latency.p99_ms - direct.latency.p99_ms
        verdict("added latency at c=1, p50 ≤ 0.15 ms", p50, p50 <= 0.15, "ms")
        verdict("added latency at c=1, p99 ≤ 0.5 ms", p99, p99 <= 0.5, "ms")
    for name, floor in (("2 workers", 50.0), ("2 workers + Redis", 40.0)):
        f = _by_name(proxied, name)
        if f is not None:
            ratio = 100 * f.throughput.rps / direct.throughput.rps
            verdict(f"c=64 throughput, {name}, ≥ {floor:.0f} % of direct", ratio,
                    ratio >= floor, "%")  # fmt: skip
    for f in proxied:
        # Judged once all the streams run: "at 500 concurrent streams". The gaps of the
        # ramp-up (connections and first requests still arriving) are in the table too.
        gap = f.streams.steady_gap_p99_ms - direct.streams.steady_gap_p99_ms
        verdict(f"{f.name}: added chunk gap p99 ≤ 1 ms at {f.streams.streams} concurrent "
                "streams", gap, gap <= 1.0, "ms")  # fmt: skip
        growth = f.rss_mb["after"] - f.rss_mb["warm"]
        verdict(f"{f.name}: RSS grows < 5 MB over {f.memory_requests:,} requests", growth,
                growth < 5.0, "MB")  # fmt: skip
        if f.redis is not None:
            trips = f.redis.evalsha_per_request
            verdict(f"{f.name}: ≤ 2 Redis round trips per request", trips, trips <= 2.0, "")
    return lines
