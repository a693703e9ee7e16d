"""Student's t distribution, the two numbers the comparison needs: a 95% interval's quantile and
Welch's two-sided p-value.

Plain Python rather than scipy: these two functions were scipy's only use here, and scipy is
16 MiB of the air-gapped GPU bundle (xz) and 0.8 s of import. Both rest on the regularized
incomplete beta function, by the continued fraction of Numerical Recipes (Press et al., 6.4)
evaluated with the modified Lentz method; tests/test_compare.py checks them against values scipy
gave, to 1e-10.
"""

from __future__ import annotations

import math
from statistics import mean, variance

_EPSILON = 1e-15
_TINY = 1e-300
_MAX_TERMS = 10_000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    fraction = d
    for m in range(1, _MAX_TERMS):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            fraction *= c * d
        if abs(c * d - 1.0) < _EPSILON:
            return fraction
    raise ArithmeticError(f"incomplete beta({a}, {b}, {x}) did not converge")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast for x below (a + 1) / (a + b + 2); above it, by symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for T with `df` degrees of freedom (df may be fractional: Welch's)."""
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def quantile(probability: float, df: float) -> float:
    """The t value below which `probability` (> 0.5) of the distribution lies, by bisection on
    the two-sided tail: 200 halvings reach the float's resolution from any bracket used here."""
    tail = 2.0 * (1.0 - probability)
    low, high = 0.0, 1.0
    while two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        low, high = (middle, high) if two_sided_p(middle, df) > tail else (low, middle)
    return (low + high) / 2.0


def welch_p_value(first: list[float], second: list[float]) -> float:
    """Welch's two-sided t-test of unequal variances: the p-value of the two means' difference.
    Needs two or more values in each and a spread in at least one."""
    v1, v2 = variance(first) / len(first), variance(second) / len(second)
    t = (mean(first) - mean(second)) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (len(first) - 1) + v2 ** 2 / (len(second) - 1))
    return two_sided_p(t, df)
