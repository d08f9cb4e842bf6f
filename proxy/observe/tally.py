"""Metric updates gathered in the process and added to prometheus-client's values in one go.

Under ``--workers`` every prometheus-client increment takes a lock, checks the process
id and writes a memory-mapped file, and one proxied call made about fourteen (its
counters, its histograms' sums and buckets, the in-flight gauge up and down): about
28 µs of a call's 200 µs of CPU with Redis on. The hot path adds to a dict instead, and
the sums reach the values ``FLUSH_AFTER`` seconds later at most, and before every
scrape this process serves: a scrape is exact for the worker that serves it and at
most ``FLUSH_AFTER`` behind for the others.

Adding up a histogram's observations needs its children's value objects (``_sum``,
``_buckets``, ``_upper_bounds``): prometheus-client has no public way to add many
observations at once. test_metrics holds what a tally writes to what the library's
own ``observe()`` writes.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from proxy.observe.flush_later import FlushLater

FLUSH_AFTER = 0.05  # seconds

# A prometheus-client value (MutexValue, or MmapedValue under --workers): it has inc().
Value = Any


class Tally:
    def __init__(self) -> None:
        self._pending: dict[Value, float] = {}
        self._later = FlushLater(FLUSH_AFTER, self.flush)

    def add(self, value: Value, amount: float) -> None:
        pending = self._pending
        pending[value] = pending.get(value, 0.0) + amount
        self._later.request()

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for value, amount in pending.items():
            value.inc(amount)


class TalliedCount:
    """A counter's or a gauge's child, updated through a tally."""

    __slots__ = ("_tally", "_value")

    def __init__(self, child: Counter | Gauge, tally: Tally) -> None:
        self._tally, self._value = tally, child._value

    def inc(self, amount: float = 1.0) -> None:
        self._tally.add(self._value, amount)

    def dec(self, amount: float = 1.0) -> None:  # gauges only
        self._tally.add(self._value, -amount)


class TalliedHistogram:
    """A histogram's child, observed through a tally."""

    __slots__ = ("_bounds", "_buckets", "_sum", "_tally")

    def __init__(self, child: Histogram, tally: Tally) -> None:
        self._tally = tally
        self._sum, self._buckets, self._bounds = child._sum, child._buckets, child._upper_bounds

    def observe(self, amount: float) -> None:
        add = self._tally.add
        add(self._sum, amount)
        # The first bucket whose bound is >= amount, as observe() picks it (the last
        # bound is +Inf, so there is always one).
        add(self._buckets[bisect_left(self._bounds, amount)], 1.0)
