"""Percentiles without numpy: nearest rank on sorted samples."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], p: float) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[min(rank, len(ordered) - 1)]
