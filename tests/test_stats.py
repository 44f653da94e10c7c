"""Experiment statistics agree with scipy (a dev-only dependency) on random and edge cases."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from admin.stats import (
    MIN_EXPECTED,
    chi2_survival,
    incomplete_beta,
    mean,
    proportion,
    srm_p_value,
    t_quantile,
    two_proportion_ztest,
    welch_ttest,
)

REL = 1e-7


def close(ours: float, theirs: float, rel: float = REL) -> bool:
    return math.isclose(ours, theirs, rel_tol=rel, abs_tol=1e-12)


@st.composite
def counts(draw: st.DrawFn, max_trials: int = 1_000_000) -> tuple[int, int]:
    trials = draw(st.integers(min_value=1, max_value=max_trials))
    return draw(st.integers(min_value=0, max_value=trials)), trials


@given(counts(), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_proportion_is_the_wilson_interval_of_scipy(case: tuple[int, int], level: float) -> None:
    successes, trials = case
    ours = proportion(successes, trials, level)
    theirs = scipy.stats.binomtest(successes, trials).proportion_ci(level, method="wilson")
    assert ours.value == successes / trials
    assert close(ours.low, theirs.low) and close(ours.high, theirs.high)
    assert 0 <= ours.low <= ours.value <= ours.high <= 1


@given(counts(), counts())
def test_two_proportion_ztest_matches_the_uncorrected_chi_square_of_scipy(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    (xa, na), (xb, nb) = a, b
    ours = two_proportion_ztest(xa, na, xb, nb)
    table = np.array([[xa, na - xa], [xb, nb - xb]])
    if (xa + xb) in (0, na + nb):
        # A column of zeros: scipy refuses; identical rates give p = 1.
        assert ours.p_value == 1.0
        return
    # For a 2×2 table, chi-square without continuity correction is exactly z squared.
    chi2, p, _, _ = scipy.stats.chi2_contingency(table, correction=False)
    assert close(ours.statistic**2, chi2, 1e-6)
    assert close(ours.p_value, p, 1e-6)
    assert ours.difference.value == pytest.approx(xa / na - xb / nb)
    assert ours.difference.low <= ours.difference.value <= ours.difference.high


@given(counts(10_000), counts(10_000), st.sampled_from([0.9, 0.95, 0.99]))
def test_difference_interval_is_newcombes_from_scipys_wilson_intervals(
    a: tuple[int, int], b: tuple[int, int], level: float
) -> None:
    (xa, na), (xb, nb) = a, b
    wa = scipy.stats.binomtest(xa, na).proportion_ci(level, method="wilson")
    wb = scipy.stats.binomtest(xb, nb).proportion_ci(level, method="wilson")
    pa, pb = xa / na, xb / nb
    low = pa - pb - math.sqrt((pa - wa.low) ** 2 + (wb.high - pb) ** 2)
    high = pa - pb + math.sqrt((wa.high - pa) ** 2 + (pb - wb.low) ** 2)
    ours = two_proportion_ztest(xa, na, xb, nb, level).difference
    assert close(ours.low, low, 1e-6) and close(ours.high, high, 1e-6)
    assert -1 <= ours.low <= ours.value <= ours.high <= 1
    assert ours.low < ours.high  # never a zero-width interval, even at 0 % or 100 %


@pytest.mark.parametrize(
    ("xa", "na", "xb", "nb", "low", "high"),
    [
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (6, 7, 2, 7, 0.0582, 0.8062),
        (5, 56, 0, 29, -0.0381, 0.1926),
        (0, 10, 0, 20, -0.1611, 0.2775),
        (0, 10, 0, 10, -0.2775, 0.2775),
        (10, 10, 0, 20, 0.6791, 1.0),
        (10, 10, 0, 10, 0.6075, 1.0),
    ],
)
def test_difference_interval_matches_newcombes_published_table(
    xa: int, na: int, xb: int, nb: int, low: float, high: float
) -> None:
    # Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10.
    ours = two_proportion_ztest(xa, na, xb, nb).difference
    assert (round(ours.low, 4), round(ours.high, 4)) == (low, high)


@st.composite
def samples(draw: st.DrawFn) -> np.ndarray:
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    size = draw(st.integers(min_value=2, max_value=400))
    rng = np.random.default_rng(seed)
    # Per-user revenue: mostly zeros, a long tail, sometimes a shift.
    buyers = rng.random(size) < draw(st.floats(min_value=0.05, max_value=1))
    scale = draw(st.floats(min_value=0.01, max_value=500))
    values = np.where(buyers, rng.lognormal(0, 1, size) * scale, 0.0)
    if values.var() == 0:
        values[0] += 1.0
    return values


@given(samples(), samples(), st.sampled_from([0.9, 0.95, 0.99]))
def test_welch_ttest_matches_scipy(a: np.ndarray, b: np.ndarray, level: float) -> None:
    ours = welch_ttest(a, b, level)
    theirs = scipy.stats.ttest_ind(a, b, equal_var=False)
    ci = theirs.confidence_interval(level)
    assert close(ours.statistic, float(theirs.statistic))
    assert close(ours.p_value, float(theirs.pvalue), 1e-6)
    assert close(ours.df, float(theirs.df))
    assert close(ours.difference.low, float(ci.low), 1e-6)
    assert close(ours.difference.high, float(ci.high), 1e-6)


@given(samples(), st.sampled_from([0.9, 0.95, 0.99]))
def test_mean_interval_matches_scipy(values: np.ndarray, level: float) -> None:
    ours = mean(values, level)
    low, high = scipy.stats.t.interval(
        level, values.size - 1, loc=values.mean(), scale=scipy.stats.sem(values)
    )
    assert close(ours.value, float(values.mean()))
    assert close(ours.low, float(low), 1e-6) and close(ours.high, float(high), 1e-6)


@settings(max_examples=200)
@given(
    st.lists(st.integers(min_value=0, max_value=100_000), min_size=2, max_size=6).filter(
        lambda c: sum(c) > 0
    ),
    st.data(),
)
def test_srm_matches_scipy_chisquare(observed: list[int], data: st.DataObject) -> None:
    weights = data.draw(
        st.lists(
            st.integers(min_value=1, max_value=100), min_size=len(observed), max_size=len(observed)
        )
    )
    expected = np.array(weights) / sum(weights) * sum(observed)
    assume(expected.min() >= MIN_EXPECTED)  # below it the p-value is simulated (next test)
    theirs = scipy.stats.chisquare(observed, expected)
    assert close(srm_p_value(observed, weights), float(theirs.pvalue), 1e-6)


def _exact_pearson_p(observed: list[int], weights: list[int]) -> float:
    """By enumeration: the probability, under the weights, of every split of the users whose
    Pearson statistic is at least the observed one."""
    total, shares = sum(observed), np.array(weights) / sum(weights)
    expected = total * shares

    def statistic(counts: tuple[int, ...]) -> float:
        return float(((np.array(counts) - expected) ** 2 / expected).sum())

    splits = [
        (*head, total - sum(head))
        for head in itertools.product(range(total + 1), repeat=len(weights) - 1)
        if sum(head) <= total
    ]
    seen = statistic(tuple(observed))
    return sum(
        float(scipy.stats.multinomial.pmf(split, total, shares))
        for split in splits
        if statistic(split) >= seen - 1e-9
    )


@pytest.mark.parametrize(
    ("observed", "weights"),
    [
        ([95, 5], [99, 1]),  # a 1% canary: chi-square says 0.00006
        ([97, 3], [99, 1]),
        ([18, 2], [90, 10]),
        ([40, 3, 0], [80, 15, 5]),
        ([10, 1, 9], [45, 10, 45]),
    ],
)
def test_srm_with_few_expected_users_is_the_exact_p_value(
    observed: list[int], weights: list[int]
) -> None:
    exact = _exact_pearson_p(observed, weights)
    # 100,000 draws: the simulated p-value's standard error is sqrt(p(1-p) / 100,000).
    assert abs(srm_p_value(observed, weights) - exact) <= 4 * math.sqrt(exact / 100_000) + 1e-5
    assert srm_p_value(observed, weights) == srm_p_value(observed, weights)  # seeded


def test_srm_with_few_expected_users_still_finds_a_broken_split() -> None:
    # 10 of 100 users in a 1% canary: exactly p = 8e-8; no draw in 100,000 comes this far.
    assert srm_p_value([90, 10], [99, 1]) == pytest.approx(1e-5, rel=1e-3)


@given(
    st.floats(min_value=0.5, max_value=1e6),
    st.floats(min_value=0.5, max_value=1e4),
    st.floats(min_value=0, max_value=1),
)
def test_incomplete_beta_matches_scipy(a: float, b: float, x: float) -> None:
    assert close(incomplete_beta(a, b, x), float(scipy.special.betainc(a, b, x)), 1e-8)


@given(st.floats(min_value=0, max_value=1e5), st.integers(min_value=1, max_value=200))
def test_chi2_survival_matches_scipy(statistic: float, df: int) -> None:
    theirs = float(scipy.stats.chi2.sf(statistic, df))
    assert close(chi2_survival(statistic, df), theirs, 1e-8) or theirs < 1e-300


@pytest.mark.parametrize("df", [1, 2, 3.5, 10, 29.7, 1000, 1e6])
def test_t_quantile_matches_scipy(df: float) -> None:
    # lgamma of ~df/2 loses digits to cancellation at huge df; 1e-8 is still far beyond need.
    for level in (0.9, 0.95, 0.99):
        assert close(t_quantile(level, df), float(scipy.stats.t.ppf(0.5 + level / 2, df)), 1e-8)


def test_a_known_case_by_hand() -> None:
    # 120/1000 vs 100/1000: pooled p = 0.11, se = sqrt(0.11·0.89·0.002) = 0.013993, z = 1.4293.
    result = two_proportion_ztest(120, 1000, 100, 1000)
    assert result.statistic == pytest.approx(1.4293, abs=1e-4)
    assert result.p_value == pytest.approx(0.15291, abs=1e-4)
    # 5,000 vs 5,300 on a 50/50 split: chi² = 2·150²/5150 = 8.7379 = 2.9560², so p is the
    # two-sided normal tail at 2.9560, 0.0031167: a sample ratio mismatch.
    assert srm_p_value([5000, 5300], [50, 50]) == pytest.approx(0.0031167, rel=1e-4)


def test_undefined_quantities_are_nan_not_made_up() -> None:
    assert all(math.isnan(v) for v in vars(proportion(0, 0)).values())
    assert math.isnan(two_proportion_ztest(0, 0, 5, 10).p_value)
    assert math.isnan(welch_ttest([1.0], [1.0, 2.0]).p_value)
    assert math.isnan(mean([3.0]).low) and mean([3.0]).value == 3.0
    assert math.isnan(mean([]).value)
    # No variance: the t interval is undefined (scipy's t.interval says NaN), not [m, m].
    for values in ([0.0] * 50, [0.1] * 3):
        assert mean(values).value == pytest.approx(values[0])
        assert math.isnan(mean(values).low) and math.isnan(mean(values).high)
    assert math.isnan(srm_p_value([0, 0], [50, 50]))
    assert math.isnan(srm_p_value([10], [100]))


def test_degenerate_cases_claim_nothing_the_sample_cannot_say() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shifted = scipy.stats.ttest_ind([1.0, 1.0], [2.0, 2.0], equal_var=False)
        same = scipy.stats.ttest_ind([1.0, 1.0], [1.0, 1.0], equal_var=False)
    assert math.isnan(welch_ttest([1.0, 1.0], [1.0, 1.0]).p_value) and math.isnan(same.pvalue)
    # scipy says t = -inf, p = 0 when neither side varies but the means differ; nothing here.
    assert (float(shifted.statistic), float(shifted.pvalue)) == (-math.inf, 0.0)
    ours = welch_ttest([10.0] * 20, [8.0] * 20)
    assert ours.difference.value == 2.0
    assert all(math.isnan(x) for x in (ours.difference.low, ours.difference.high, ours.p_value))
    assert two_proportion_ztest(0, 50, 0, 70).p_value == 1.0
    assert two_proportion_ztest(50, 50, 70, 70).p_value == 1.0


def test_srm_handles_zero_weights() -> None:
    assert srm_p_value([100, 0, 110], [50, 0, 50]) == srm_p_value([100, 110], [50, 50])
    assert srm_p_value([100, 1, 110], [50, 0, 50]) == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: proportion(5, 3), "0 <= successes <= trials"),
        (lambda: proportion(-1, 3), "0 <= successes <= trials"),
        (lambda: proportion(1, 3, 1.5), "confidence must be between 0 and 1"),
        (lambda: welch_ttest([1.0, math.nan], [1.0, 2.0]), "a must be finite"),
        (lambda: mean([math.inf, 1.0]), "values must be finite"),
        (lambda: srm_p_value([1, 2], [1.0]), "2 observed counts for 1 weights"),
        (lambda: srm_p_value([1, -2], [1.0, 1.0]), "counts and weights must be >= 0"),
    ],
)
def test_bad_input_is_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_welch_sees_no_variance_in_equal_values_left_with_rounding_dust() -> None:
    spent = np.array([0.1] * 3)
    assert spent.var(ddof=1) > 0  # the dust: the mean of 0.1s is not 0.1
    ours = welch_ttest(spent, [0.0] * 3)
    assert ours.difference.value == pytest.approx(0.1)
    assert all(math.isnan(x) for x in (ours.difference.low, ours.p_value, ours.statistic))
