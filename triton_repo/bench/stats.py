"""Latency statistics: percentiles (numpy's default "linear" method, written out so the result schema does not
depend on numpy's version) and the per-concurrency summary of a benchmark level."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy.percentile's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: Iterable[float], *, scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, min, max and p50/p90/p99 of ``values`` times ``scale`` (None when there are no values)."""
    data = [v * scale for v in values]
    out: dict[str, float | int | None] = {"count": len(data)}
    if not data:
        out.update({"mean": None, "min": None, "max": None, **{f"p{q}": None for q in PERCENTILES}})
        return out
    out.update({"mean": sum(data) / len(data), "min": min(data), "max": max(data),
                **{f"p{q}": percentile(data, q) for q in PERCENTILES}})
    return out
