"""The report's statistics: mean ± sample std (ddof = 1) and Student-t 95 % confidence intervals
of paired differences (no SciPy: the two-sided 97.5 % quantiles are tabulated)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from zofast.experiments import mean_std

# t_{0.975, df} for df = 1..30 (two-sided 95 %); above 30 the 40, 60, 120 and normal values.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (above 30: the value at
    the next tabulated df below, 40 / 60 / 120, or the normal 1.960; slightly wide, never narrow).

    Example:
        >>> t975(14)
        2.145
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= 30:
        return _T975[df - 1]
    for limit, value in ((40, 2.042), (60, 2.021), (120, 2.000)):
        if df < limit:
            return value
    return 1.980 if df < 1000 else 1.960


def paired(diffs: Sequence[float]) -> dict:
    """Mean, sample std (ddof = 1), 95 % t interval and wins / ties of paired differences.

    Args:
        diffs: one difference per pair (e.g. LOZO − MeZO test accuracy of one task and seed).

    Returns:
        ``{"mean", "std", "n", "ci": [low, high] or None (one pair), "wins", "ties"}``.

    Example:
        >>> paired([1.0, 3.0])["ci"]
        [-10.706, 14.706]
    """
    mean, std = mean_std(diffs)
    n = len(diffs)
    ci = None
    if n > 1:
        half = t975(n - 1) * std / math.sqrt(n)
        ci = [round(mean - half, 9), round(mean + half, 9)]
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "ci": ci,
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
    }
