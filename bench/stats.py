"""Quantiles and summaries of samples. Pure.

A sample that never completed (the benchmark stopped waiting for it) is kept
as +inf rather than dropped: dropping the slowest samples would flatter the
tail. A quantile that lands on one is +inf, which the report prints as
"did not complete" instead of a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

INF = math.inf


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1), interpolated linearly between closest ranks.

    The same definition as numpy's default ("linear", R's type 7): for n
    samples the rank is q * (n - 1). ValueError for no samples or q outside [0, 1].
    """
    if not values:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    share = rank - low
    lower, upper = ordered[low], ordered[high]
    if share == 0.0 or lower == upper:
        return lower
    if math.isinf(upper):
        return INF
    return lower + (upper - lower) * share


@dataclass(frozen=True)
class Summary:
    """p50, p99 and max of `n` samples, `incomplete` of which never completed (+inf)."""

    n: int
    p50: float
    p99: float
    max: float
    incomplete: int = 0

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("summary of no samples")
        return cls(
            n=len(values),
            p50=quantile(values, 0.5),
            p99=quantile(values, 0.99),
            max=max(values),
            incomplete=sum(1 for v in values if math.isinf(v)),
        )

    def scaled(self, factor: float) -> Summary:
        """The same summary in another unit (e.g. seconds -> milliseconds)."""
        return Summary(self.n, self.p50 * factor, self.p99 * factor, self.max * factor, self.incomplete)


def paired_sums(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[i] + b[i] for the common length: a floor made of two measured parts per sample."""
    return [x + y for x, y in zip(a, b, strict=False)]


def rate(count: int, seconds: float) -> float | None:
    """count / seconds, or None when no time passed."""
    return count / seconds if seconds > 0 else None
