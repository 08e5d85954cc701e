"""Statistics over seeds: mean, sample standard deviation and a Student-t 95% confidence interval.

Every number the study reports is a mean over independent seeds with its spread, so that a
difference can be read against the seed-to-seed noise of these small runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as scipy_stats


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std" (n-1), "ci95" (half-width), "n", "min", "max"} of finite per-seed values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed_stats needs at least one value, got none")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"seed_stats got non-finite values {bad} among {values}")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    # One seed has no spread to speak of: its interval is reported as 0, not as infinite.
    ci95 = float(scipy_stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": ci95, "n": n, "min": min(values), "max": max(values)}


def difference_stats(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of `a - b` over paired seeds (same seed index, same data), with its 95% CI: pairing
    removes the variation the two arms share (the data draw of a seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired seeds differ in number: {len(a)} vs {len(b)}")
    return seed_stats([x - y for x, y in zip(a, b)])


def format_stats(s: dict[str, float], digits: int = 3) -> str:
    """'mean ± std' for tables."""
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
