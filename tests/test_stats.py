"""Statistics against scipy, brute-force loops and cases worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from specs_metric.evaluation import stats

scipy_stats = pytest.importorskip("scipy.stats")


def _same(a: float, b: float, tol: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _brute_kendall(x, y):
    """Kendall tau-b and tau-c from an explicit loop over pairs (textbook definitions)."""
    n = len(x)
    s = tx = ty = 0
    for i, j in itertools.combinations(range(n), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        s += dx * dy
        tx += dx == 0
        ty += dy == 0
    n0 = n * (n - 1) / 2
    tau_b = s / math.sqrt((n0 - tx) * (n0 - ty))
    m = min(len(set(x)), len(set(y)))
    tau_c = 2 * s / (n**2 * (m - 1) / m)
    return tau_b, tau_c


def test_kendall_hand_computed():
    # one discordant pair of six
    assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4], "b") == pytest.approx(2 / 3)
    assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4], "c") == pytest.approx(2 / 3)
    # ties: S = 4, one pair tied in x, one in y -> tau-b = 4/5; m = 3 -> tau-c = 8/(16*2/3)
    x, y = [1, 1, 2, 3], [1, 2, 2, 3]
    assert stats.kendall_tau(x, y, "b") == pytest.approx(0.8)
    assert stats.kendall_tau(x, y, "c") == pytest.approx(0.75)
    assert stats.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_spearman_hand_computed():
    assert stats.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # ranks of x with a tie: 1, 2.5, 2.5, 4
    np.testing.assert_allclose(stats.rankdata([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
    assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_undefined_cases_are_nan():
    assert math.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3], "c"))
    assert math.isnan(stats.pearson([2, 2], [1, 3]))
    assert math.isnan(stats.spearman([1], [1]))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        stats.pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        stats.kendall_tau([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="variant"):
        stats.kendall_tau([1, 2], [1, 2], "a")
    with pytest.raises(ValueError, match="unknown statistic"):
        stats.correlation([1, 2], [1, 2], "kendall")


@pytest.mark.parametrize("n", [2, 3, 7, 60, 399, 401, 1000, 3001])
def test_against_scipy_with_ties(n):
    rng = np.random.default_rng(n)
    cases = [
        (rng.integers(0, 5, n).astype(float), rng.integers(0, 4, n).astype(float)),
        (rng.normal(size=n), rng.normal(size=n)),
    ]
    x = rng.integers(0, 6, n).astype(float)
    cases.append((x, x * 0.5 + rng.integers(0, 3, n)))  # correlated, many ties
    for x, y in cases:
        for variant in ("b", "c"):
            ref = scipy_stats.kendalltau(x, y, variant=variant).statistic
            assert _same(stats.kendall_tau(x, y, variant), float(ref), 1e-10)
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            assert _same(stats.spearman(x, y), float(scipy_stats.spearmanr(x, y).statistic))
            if n > 2:
                assert _same(stats.pearson(x, y), float(scipy_stats.pearsonr(x, y).statistic))
        np.testing.assert_allclose(stats.rankdata(x), scipy_stats.rankdata(x))


def test_kendall_large_path_matches_brute_force():
    # above the pair-table limit the count comes from merge-sort inversions
    rng = np.random.default_rng(3)
    x = rng.integers(0, 9, 450).astype(float)
    y = np.round(x + rng.normal(size=450), 1)
    tau_b, tau_c = _brute_kendall(x, y)
    assert stats.kendall_tau(x, y, "b") == pytest.approx(tau_b, abs=1e-12)
    assert stats.kendall_tau(x, y, "c") == pytest.approx(tau_c, abs=1e-12)


def test_inversion_count_against_loop():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 17, 64, 100):
        seq = rng.integers(0, 6, n)
        expected = sum(seq[i] > seq[j] for i, j in itertools.combinations(range(n), 2))
        assert stats._inversions(seq) == expected


def test_correlations_agree_with_single_calls():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=50), rng.integers(0, 3, 50)
    both = stats.correlations(x, y)
    assert list(both) == list(stats.STATISTICS)
    for name, value in both.items():
        assert value == stats.correlation(x, y, name)


def test_pairwise_accuracy_hand_computed():
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    human = [1, 2, 3, 1, 1, 0, 1]
    metric = [0.1, 0.3, 0.2, 0.9, 0.1, 0.5, 0.5]
    # a: 2 of 3 pairs agree; b: human tie, left out; c: metric tie counts 1/2
    assert stats.pairwise_accuracy(metric, human, groups) == pytest.approx(2.5 / 4)
    assert math.isnan(stats.pairwise_accuracy([1, 2], [1, 1], [0, 0]))


def test_pairwise_accuracy_against_loop():
    rng = np.random.default_rng(9)
    groups = rng.integers(0, 20, 200)
    human = rng.integers(0, 4, 200)
    metric = rng.integers(0, 5, 200) + 0.5 * human
    agree = pairs = 0.0
    for i, j in itertools.combinations(range(200), 2):
        if groups[i] != groups[j] or human[i] == human[j]:
            continue
        pairs += 1
        prod = np.sign(human[i] - human[j]) * np.sign(metric[i] - metric[j])
        agree += 1.0 if prod > 0 else 0.5 if prod == 0 else 0.0
    assert stats.pairwise_accuracy(metric, human, groups) == pytest.approx(agree / pairs)
    est = stats.pairwise_accuracy_ci(metric, human, groups, n_boot=200, seed=1)
    assert est.low <= est.value <= est.high


def test_group_resamples_take_whole_groups():
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    rng = np.random.default_rng(0)
    for idx in stats.group_resamples(groups, 50, rng):
        drawn = np.bincount(idx, minlength=groups.size)
        for g in np.unique(groups):
            rows = drawn[groups == g]
            assert (rows == rows[0]).all()  # a group's rows appear equally often
        draws_per_group = [drawn[groups == g][0] for g in np.unique(groups)]
        assert sum(draws_per_group) == 4  # as many draws as groups


def test_bootstrap_is_seeded_and_brackets_value():
    rng = np.random.default_rng(2)
    x = rng.normal(size=120)
    y = x + rng.normal(size=120)
    groups = np.repeat(np.arange(40), 3)
    a = stats.correlations_ci(x, y, groups=groups, n_boot=300, seed=4)
    b = stats.correlations_ci(x, y, groups=groups, n_boot=300, seed=4)
    assert a == b
    for est in a.values():
        assert est.low < est.value < est.high
    with pytest.raises(ValueError, match="groups"):
        stats.correlations_ci(x, y, groups=groups[:10])


def test_bootstrap_ci_coverage_on_simulated_data():
    """95% intervals cover the population tau-b and Pearson rho about 95% of the time."""
    rho = 0.6
    true = {"kendall_b": 2 / math.pi * math.asin(rho), "pearson": rho}
    rng = np.random.default_rng(20240601)
    cov = np.array([[1.0, rho], [rho, 1.0]])
    replicates, hits = 150, {k: 0 for k in true}
    for r in range(replicates):
        x, y = rng.multivariate_normal([0, 0], cov, size=80).T
        ests = stats.correlations_ci(x, y, statistics=tuple(true), n_boot=250, seed=r)
        for k, est in ests.items():
            hits[k] += est.low <= true[k] <= est.high
    for k in true:
        assert 0.90 <= hits[k] / replicates <= 0.99, (k, hits[k] / replicates)
