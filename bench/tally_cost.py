"""What a histogram observation costs a worker under ``--workers``: prometheus-client's
own ``observe()`` against the summed adds of proxy/observe/tally.py (why the tally goes
below the library's public API for histograms, and only for them).

    python3 -m bench.tally_cost
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

PER_FLUSH = 100  # observations a tally sums between two flushes, as under load


def main(n: int = 200_000) -> None:
    with tempfile.TemporaryDirectory() as directory:
        # Before prometheus-client is imported: it picks its memory-mapped values then.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        from prometheus_client import CollectorRegistry, Histogram

        from proxy.observe.tally import TalliedHistogram, Tally

        child = Histogram("x_seconds", "x", ["a"], registry=CollectorRegistry()).labels("a")
        start = time.perf_counter()
        for _ in range(n):
            child.observe(0.0123)
        public = (time.perf_counter() - start) / n * 1e6

        async def tallied_observations() -> float:
            tally = Tally()  # in a loop, as in the proxy: the flush is scheduled, not run
            tallied = TalliedHistogram(child, tally)
            start = time.perf_counter()
            for i in range(n):
                tallied.observe(0.0123)
                if i % PER_FLUSH == PER_FLUSH - 1:
                    tally.flush()
            return (time.perf_counter() - start) / n * 1e6

        summed = asyncio.run(tallied_observations())
    print(f"observe(): {public:.2f} µs an observation")
    print(f"tally, flushed every {PER_FLUSH}: {summed:.2f} µs an observation")


if __name__ == "__main__":
    main()
