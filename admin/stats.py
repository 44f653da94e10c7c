"""Experiment statistics for the report: intervals, p-values, and the sample-ratio check.

Pure functions over counts and per-user arrays, with math and numpy only: scipy is a heavy
dependency the admin tool does not otherwise need, so the two special functions the tests
need (the regularized incomplete beta and gamma functions, for Student's t and chi-square)
are implemented here and checked against scipy in the tests.

Choices, stated once:
- a proportion's interval is the Wilson score interval (sane near 0 and 1, unlike the normal
  approximation, which matters for conversion rates of a few percent);
- rates are compared with the pooled two-proportion z-test, two-sided; the difference's interval
  is Newcombe's hybrid score interval (from the two Wilson intervals: the Wald interval of a
  difference has no width when both rates are 0 or both 1, and poor coverage near them);
- per-user money is compared with Welch's t-test (unequal variances), two-sided, and its
  interval is Welch's interval for the difference of means;
- sample ratio mismatch is Pearson's chi-square goodness of fit against the variant weights;
  where a variant expects fewer than 5 users, the chi-square distribution is far from the
  statistic's, and its p-value is simulated instead (as R's chisq.test(simulate.p.value=TRUE)).

Where a quantity is undefined (no users, fewer than two values, no variance on either side)
the result is NaN, never a made-up number; callers show it as "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

_NAN = float("nan")
_EPS = 1e-15
_MAX_ITERATIONS = 100_000
# Cochran's rule: below this many expected users in a variant, chi-square p-values are too
# small by orders of magnitude (a 1% canary with 5 of 100 users: 0.00006 where it is 0.0034).
MIN_EXPECTED = 5
SRM_DRAWS = 100_000


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """A two-sided test of a difference: the difference (a − b) with its interval, the test
    statistic and the p-value. ``df`` is the Welch degrees of freedom (NaN for the z-test)."""

    difference: Estimate
    statistic: float
    p_value: float
    df: float = _NAN


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")


def _check_counts(successes: int, trials: int) -> None:
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def proportion(successes: int, trials: int, confidence: float = 0.95) -> Estimate:
    """A rate with its Wilson score interval; NaN when there are no trials."""
    _check_confidence(confidence)
    _check_counts(successes, trials)
    if trials == 0:
        return Estimate(_NAN, _NAN, _NAN)
    p = successes / trials
    z = _z(confidence)
    z2n = z * z / trials
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    # At 0 and 1 the bounds are exactly 0 and 1; computing them leaves rounding dust.
    low = 0.0 if successes == 0 else center - half
    high = 1.0 if successes == trials else center + half
    return Estimate(p, low, high)


def two_proportion_ztest(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, confidence: float = 0.95
) -> Comparison:
    """Pooled two-proportion z-test of rate a − rate b, with Newcombe's hybrid score interval
    of the difference (his method 10). NaN when a side has no trials; p = 1 when both rates are
    0 or both 1."""
    _check_confidence(confidence)
    _check_counts(successes_a, trials_a)
    _check_counts(successes_b, trials_b)
    if trials_a == 0 or trials_b == 0:
        return Comparison(Estimate(_NAN, _NAN, _NAN), _NAN, _NAN)
    a = proportion(successes_a, trials_a, confidence)
    b = proportion(successes_b, trials_b, confidence)
    diff = a.value - b.value
    interval = Estimate(
        diff,
        diff - math.hypot(a.value - a.low, b.high - b.value),
        diff + math.hypot(a.high - a.value, b.value - b.low),
    )
    pooled = (successes_a + successes_b) / (trials_a + trials_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / trials_a + 1 / trials_b))
    if se == 0:
        # Every user converted, or none did, on both sides: no difference to detect.
        return Comparison(interval, 0.0, 1.0)
    z = diff / se
    return Comparison(interval, z, math.erfc(abs(z) / math.sqrt(2)))


def _values(
    values: Sequence[float] | npt.NDArray[np.floating], what: str
) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite numbers")
    return array


def mean(values: Sequence[float] | npt.NDArray[np.floating], confidence: float = 0.95) -> Estimate:
    """A mean with its Student-t interval; NaN interval with fewer than two values or none of
    their variance (every user spent the same, e.g. nobody bought): a zero-width interval there
    would claim a certainty the sample cannot give. scipy's t.interval gives NaN too."""
    _check_confidence(confidence)
    x = _values(values, "values")
    if x.size == 0:
        return Estimate(_NAN, _NAN, _NAN)
    m = float(x.mean())
    # Equal values, not var() == 0: the mean of [0.1] * 3 leaves rounding dust in the variance.
    if x.size < 2 or np.all(x == x[0]):
        return Estimate(m, _NAN, _NAN)
    half = t_quantile(confidence, x.size - 1) * math.sqrt(float(x.var(ddof=1)) / x.size)
    return Estimate(m, m - half, m + half)


def welch_ttest(
    a: Sequence[float] | npt.NDArray[np.floating],
    b: Sequence[float] | npt.NDArray[np.floating],
    confidence: float = 0.95,
) -> Comparison:
    """Welch's t-test of mean(a) − mean(b), two-sided, with Welch's interval.

    NaN with fewer than two values on a side, or with no variance on either side. scipy gives
    an infinite statistic and p = 0 when the means differ there, but twenty users who each spent
    10.00 against twenty who each spent 8.00 do not make the difference certain: as for mean(),
    the sample cannot say how much it varies, so nothing is claimed.
    """
    _check_confidence(confidence)
    x, y = _values(a, "a"), _values(b, "b")
    if x.size < 2 or y.size < 2:
        return Comparison(Estimate(_NAN, _NAN, _NAN), _NAN, _NAN)
    diff = float(x.mean() - y.mean())
    # Equal values, as in mean(): three users who each spent 0.10 leave rounding dust in the
    # variance, which would make any difference look certain (p = 1e-32).
    if np.all(x == x[0]) and np.all(y == y[0]):
        return Comparison(Estimate(diff, _NAN, _NAN), _NAN, _NAN)
    vx, vy = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size
    se2 = vx + vy
    df = se2 * se2 / (vx * vx / (x.size - 1) + vy * vy / (y.size - 1))
    se = math.sqrt(se2)
    t = diff / se
    half = t_quantile(confidence, df) * se
    return Comparison(Estimate(diff, diff - half, diff + half), t, t_two_sided_p(t, df), df)


def srm_p_value(observed: Sequence[int], weights: Sequence[float]) -> float:
    """Sample-ratio-mismatch check: Pearson chi-square p-value of the observed users per variant
    against the shares their weights promise. A tiny p-value (below 0.001) means assignment or
    logging is broken and the experiment's comparisons cannot be trusted.

    Where a variant expects fewer than MIN_EXPECTED users, the p-value is the share of
    SRM_DRAWS multinomial samples under the weights (seeded: the same counts give the same
    answer) whose statistic is at least the observed one, 1e-5 at the smallest.

    Variants with weight 0 and no users are left out; users in a variant of weight 0 give p = 0.
    NaN when there are no users or fewer than two variants to compare.
    """
    if len(observed) != len(weights):
        raise ValueError(f"{len(observed)} observed counts for {len(weights)} weights")
    if any(n < 0 for n in observed) or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError("counts and weights must be >= 0")
    if any(n > 0 and w == 0 for n, w in zip(observed, weights, strict=True)):
        return 0.0
    pairs = [(n, w) for n, w in zip(observed, weights, strict=True) if w > 0]
    total, weight_sum = sum(n for n, _ in pairs), sum(w for _, w in pairs)
    if total == 0 or len(pairs) < 2:
        return _NAN
    counts = np.array([n for n, _ in pairs], dtype=np.float64)
    shares = np.array([w for _, w in pairs], dtype=np.float64) / weight_sum
    expected = total * shares
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    if expected.min() >= MIN_EXPECTED:
        return chi2_survival(chi2, len(pairs) - 1)
    rng = np.random.default_rng(0)
    as_large = 0
    for _ in range(10):  # in blocks: a hundred variants' draws at once would take 160 MB
        draws = rng.multinomial(total, shares, size=SRM_DRAWS // 10)
        simulated = ((draws - expected) ** 2 / expected).sum(axis=1)
        # R's tolerance: draws as far out as the observed counts must not lose to rounding.
        as_large += int(np.count_nonzero(simulated >= chi2 * (1 - 64 * np.finfo(float).eps)))
    return (1 + as_large) / (1 + SRM_DRAWS)


# --- special functions -------------------------------------------------------------------


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, _MAX_ITERATIONS):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The fraction converges fast only on one side of the mean; use the symmetry on the other.
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (df may be fractional)."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_quantile(confidence: float, df: float) -> float:
    """The t with P(|T| <= t) = confidence, by bisection on the two-sided tail."""
    target = 1 - confidence
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        low, high = high, high * 2
    for _ in range(200):
        middle = (low + high) / 2
        if t_two_sided_p(middle, df) > target:
            low = middle
        else:
            high = middle
        if high - low <= 1e-14 * high:
            break
    return (low + high) / 2


def _lower_gamma_series(a: float, x: float) -> float:
    term = total = 1.0 / a
    for n in range(1, _MAX_ITERATIONS):
        term *= x / (a + n)
        total += term
        if abs(term) < abs(total) * _EPS:
            return total * math.exp(-x + a * math.log(x) - math.lgamma(a))
    raise ArithmeticError(f"incomplete gamma series did not converge for a={a}, x={x}")


def _upper_gamma_fraction(a: float, x: float) -> float:
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for n in range(1, _MAX_ITERATIONS):
        numerator = -n * (n - a)
        b += 2
        d = numerator * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + numerator / c
        c = c if abs(c) > tiny else tiny
        delta = c * d
        h *= delta
        if abs(delta - 1) < _EPS:
            return h * math.exp(-x + a * math.log(x) - math.lgamma(a))
    raise ArithmeticError(f"incomplete gamma fraction did not converge for a={a}, x={x}")


def chi2_survival(statistic: float, df: int) -> float:
    """P(X >= statistic) for chi-square with ``df`` degrees of freedom: Q(df/2, statistic/2)."""
    a, x = df / 2, statistic / 2
    if x <= 0:
        return 1.0
    # The series converges fast below the mean, the continued fraction above it.
    if x < a + 1:
        return 1.0 - _lower_gamma_series(a, x)
    return _upper_gamma_fraction(a, x)
