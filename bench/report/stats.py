"""Small statistics shared by the tables, the plots and the comparisons."""

from __future__ import annotations

import math


def ci95_halfwidth(std: float, n: int) -> float:
    """Half-width of the 95 % confidence interval of a mean of ``n`` values with sample std ``std``: t·s/√n with
    t the 0.975 quantile of Student's t with n − 1 degrees of freedom (NaN for n < 2)."""
    if n < 2 or std != std:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * std / math.sqrt(n))
