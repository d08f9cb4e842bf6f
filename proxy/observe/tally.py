"""Metric updates gathered in the process and added to prometheus-client's values in one go.

Under ``--workers`` every prometheus-client increment takes a lock, checks the process
id and writes a memory-mapped file, and one proxied call made about fourteen (its
counters, its histograms' sums and buckets, the in-flight gauge up and down): about
28 µs of a call's 200 µs of CPU with Redis on. The hot path adds to a dict instead, and
the sums reach the values ``FLUSH_AFTER`` seconds later at most, and before every
scrape this process serves: a scrape is exact for the worker that serves it and at
most ``FLUSH_AFTER`` behind for the others.

Counters and gauges are updated through prometheus-client's public ``inc()``, once per
child and flush. Histograms are the one place that goes below it: the library has no
public way to add several observations at once. Under ``--workers``, ``observe()``
cost 1.91 µs an observation (two locked writes to the memory-mapped file) and the
tally's adds to the child's ``_sum`` and ``_buckets`` 0.42 µs, flushed every 100
(``python3 -m bench.tally_cost``, 2026-12-04). A plain call observes three
histograms, five with Redis: 4.5 to 7.5 µs of a worker's CPU saved per call.
tests/observe/test_metrics.py holds what a tally writes to what ``observe()`` writes,
so a release that renames these attributes fails the suite.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from proxy.observe.flush_later import FlushLater

FLUSH_AFTER = 0.05  # seconds


# What a tally adds to: a counter's or gauge's child, or a histogram child's sum or
# bucket value (MutexValue, or MmapedValue under --workers). Each has inc(amount).
Addend = Any


class Tally:
    def __init__(self) -> None:
        self._pending: dict[Addend, float] = {}
        self._later = FlushLater(FLUSH_AFTER, self.flush)

    def add(self, addend: Addend, amount: float) -> None:
        pending = self._pending
        pending[addend] = pending.get(addend, 0.0) + amount
        self._later.request()

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for addend, amount in pending.items():
            if amount:  # a gauge's ups and downs may cancel out
                addend.inc(amount)


class TalliedCount:
    """A counter's or a gauge's child, updated through a tally."""

    __slots__ = ("_child", "_tally")

    def __init__(self, child: Counter | Gauge, tally: Tally) -> None:
        self._tally, self._child = tally, child

    def inc(self, amount: float = 1.0) -> None:
        self._tally.add(self._child, amount)

    def dec(self, amount: float = 1.0) -> None:  # gauges only
        self._tally.add(self._child, -amount)


class TalliedHistogram:
    """A histogram's child, observed through a tally."""

    __slots__ = ("_bounds", "_buckets", "_sum", "_tally")

    def __init__(self, child: Histogram, tally: Tally) -> None:
        self._tally = tally
        # Private attributes: see the module's docstring for why, and what guards them.
        self._sum, self._buckets, self._bounds = child._sum, child._buckets, child._upper_bounds

    def observe(self, amount: float) -> None:
        add = self._tally.add
        add(self._sum, amount)
        # The first bucket whose bound is >= amount, as observe() picks it (the last
        # bound is +Inf, so there is always one).
        add(self._buckets[bisect_left(self._bounds, amount)], 1.0)
