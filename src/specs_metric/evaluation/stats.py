"""Correlation statistics for meta-evaluation: Kendall tau-b/tau-c, Pearson, Spearman,
pairwise accuracy, and percentile bootstrap confidence intervals that resample images.

Everything here is plain numpy (no scipy needed); the tests check each statistic against
``scipy.stats`` and against small cases worked out by hand, ties included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Below this many items Kendall's tau is computed from the full pair table (fast for the
# small samples of the bootstrap); above it, from a sort-based inversion count (O(n log^2 n)).
_PAIRWISE_LIMIT = 400

STATISTICS = ("kendall_b", "kendall_c", "pearson", "spearman")


def _as_pair(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray):
    """Validate two equally long 1-D float arrays without NaNs."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in length: {a.size} != {b.size}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("x and y must not contain NaN; drop failed rows first")
    return a, b


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Mask of positions that start a run of equal values in a sorted array."""
    starts = np.empty(sorted_values.size, dtype=bool)
    starts[:1] = True
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    return starts


def _pairs_within_runs(starts: np.ndarray) -> int:
    """Sum over runs of t(t-1)/2: the pairs of equal items."""
    lengths = np.diff(np.append(np.flatnonzero(starts), starts.size))
    return int((lengths * (lengths - 1) // 2).sum())


def _inversions(codes: np.ndarray) -> int:
    """Pairs i < j with codes[i] > codes[j] (non-negative integers), by a bottom-up merge sort.

    Before the level of width w the array is sorted within blocks of w items. Merging each
    pair of neighbouring blocks is a stable sort by (merged block, value): on equal values the
    left item stays first, so a right-half item is inverted with exactly the left-half items
    that end up after it. Each pair of indices is counted at the one level where they first
    share a merged block. Stable sorting of pre-sorted runs keeps every level near O(n).
    """
    n = codes.size
    cur = codes.astype(np.int64)
    n_values = int(cur.max()) + 1 if n else 1
    pos = np.arange(n)
    total = 0
    width = 1
    while width < n:
        start = pos - pos % (2 * width)  # first position of the merged block
        is_left = pos - start < width
        order = np.argsort(start * n_values + cur, kind="stable")
        left_sorted = is_left[order]
        cs = np.concatenate(([0], np.cumsum(left_sorted)))
        left_up_to = cs[1:] - cs[start]  # left items at or before each sorted position
        left_size = np.minimum(width, n - start)
        right = ~left_sorted
        total += int((left_size[right] - left_up_to[right]).sum())
        cur = cur[order]
        width *= 2
    return total


def _concordance(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int, int]:
    """(concordant - discordant, pairs tied in a, pairs tied in b, distinct a, distinct b)."""
    n = a.size
    if n <= _PAIRWISE_LIMIT:
        sa = np.sign(a[:, None] - a[None, :])
        sb = np.sign(b[:, None] - b[None, :])
        s = int((sa * sb).sum()) // 2
        eq_a, eq_b = sa == 0, sb == 0  # the diagonal is always tied
        # an item repeats an earlier value when it ties with an item above it
        repeat_a = np.triu(eq_a, 1).any(axis=0).sum()
        repeat_b = np.triu(eq_b, 1).any(axis=0).sum()
        return (
            s,
            int(eq_a.sum() - n) // 2,
            int(eq_b.sum() - n) // 2,
            int(n - repeat_a),
            int(n - repeat_b),
        )
    # Knight's method: sort by (a, b); discordant pairs are the inversions of b in that order.
    order = np.lexsort((b, a))
    a_s, b_s = a[order], b[order]
    a_runs = _run_starts(a_s)
    ab_runs = a_runs | _run_starts(b_s)
    b_sorted = np.sort(b)
    b_runs = _run_starts(b_sorted)
    n1 = _pairs_within_runs(a_runs)
    n2 = _pairs_within_runs(b_runs)
    n3 = _pairs_within_runs(ab_runs)  # tied in both
    discordant = _inversions(np.searchsorted(b_sorted[b_runs], b_s))
    concordant = n * (n - 1) // 2 - n1 - n2 + n3 - discordant
    return concordant - discordant, n1, n2, int(a_runs.sum()), int(b_runs.sum())


def kendall_tau(x, y, variant: str = "b") -> float:
    """Kendall's rank correlation with tie correction.

    tau-b = (C - D) / sqrt((n0 - n1) (n0 - n2)), with n0 = n(n-1)/2 pairs and n1, n2 the
    pairs tied in x and in y. tau-c (Stuart) = 2 (C - D) / (n^2 (m - 1) / m) with m the
    smaller number of distinct values of x and y. Both equal ``scipy.stats.kendalltau``.

    Args:
        x: First variable (e.g. metric scores).
        y: Second variable (e.g. human judgments).
        variant: ``"b"`` or ``"c"``.

    Returns:
        The coefficient, or NaN when undefined (fewer than 2 items, or a constant variable).
    """
    if variant not in ("b", "c"):
        raise ValueError(f"variant must be 'b' or 'c', got {variant!r}")
    a, b = _as_pair(x, y)
    tau_b, tau_c = _kendall_bc(a, b)
    return tau_b if variant == "b" else tau_c


def _kendall_bc(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(tau-b, tau-c) from one concordance count."""
    n = a.size
    if n < 2:
        return float("nan"), float("nan")
    s, n1, n2, distinct_a, distinct_b = _concordance(a, b)
    n0 = n * (n - 1) // 2
    denom = np.sqrt(float(n0 - n1) * float(n0 - n2))
    tau_b = float(s / denom) if denom > 0 else float("nan")
    m = min(distinct_a, distinct_b)
    tau_c = float(2.0 * s / (n * n * (m - 1) / m)) if m >= 2 else float("nan")
    return tau_b, tau_c


def pearson(x, y) -> float:
    """Pearson's product-moment correlation (NaN for a constant variable)."""
    a, b = _as_pair(x, y)
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = np.sqrt((da * da).sum() * (db * db).sum())
    if denom == 0:
        return float("nan")
    return float(np.clip((da * db).sum() / denom, -1.0, 1.0))


def rankdata(values) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's ``method="average"``)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    new_group = np.empty(v.size, dtype=bool)
    new_group[:1] = True
    new_group[1:] = sorted_v[1:] != sorted_v[:-1]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], v.size)  # exclusive
    avg = (starts + 1 + ends) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(v.size)
    ranks[order] = avg[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the average ranks."""
    a, b = _as_pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def correlations(x, y, statistics: Sequence[str] = STATISTICS) -> dict[str, float]:
    """Several of :data:`STATISTICS` at once (both Kendall variants share one pair count)."""
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown statistic {unknown[0]!r}; choose from {', '.join(STATISTICS)}")
    a, b = _as_pair(x, y)
    out: dict[str, float] = {}
    if "kendall_b" in statistics or "kendall_c" in statistics:
        out["kendall_b"], out["kendall_c"] = _kendall_bc(a, b)
    if "pearson" in statistics:
        out["pearson"] = pearson(a, b)
    if "spearman" in statistics:
        out["spearman"] = spearman(a, b)
    return {s: out[s] for s in statistics}


def correlation(x, y, statistic: str) -> float:
    """One of :data:`STATISTICS` by name."""
    return correlations(x, y, (statistic,))[statistic]


def _pair_agreement(metric: np.ndarray, human: np.ndarray, groups) -> tuple[np.ndarray, ...]:
    """Per group: metric agreements (ties count 1/2) and pairs with distinct human scores."""
    g = np.asarray(groups).ravel()
    if g.size != metric.size:
        raise ValueError(f"groups has {g.size} entries for {metric.size} scores")
    _, codes = np.unique(g, return_inverse=True)
    n_groups = int(codes.max()) + 1 if g.size else 0
    order = np.argsort(codes, kind="stable")
    agree = np.zeros(n_groups)
    pairs = np.zeros(n_groups)
    for k, idx in enumerate(np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)):
        if idx.size < 2:
            continue
        dh = np.sign(human[idx][:, None] - human[idx][None, :])
        dm = np.sign(metric[idx][:, None] - metric[idx][None, :])
        upper = np.triu(dh != 0, k=1)
        prod = (dh * dm)[upper]
        pairs[k] = upper.sum()
        agree[k] = (prod > 0).sum() + 0.5 * (prod == 0).sum()
    return agree, pairs


def pairwise_accuracy(metric, human, groups) -> float:
    """Fraction of within-group caption pairs that the metric orders like the humans.

    Every pair of rows in the same group (e.g. two captions of one image) whose human scores
    differ counts once; the metric agrees when it ranks the pair the same way, and a metric
    tie counts as half an agreement. Pairs tied by the humans are left out.

    Returns:
        Accuracy in [0, 1], or NaN when no group holds a pair with distinct human scores.
    """
    m, h = _as_pair(metric, human)
    agree, pairs = _pair_agreement(m, h, groups)
    total = pairs.sum()
    return float(agree.sum() / total) if total else float("nan")


@dataclass(frozen=True)
class Estimate:
    """A statistic with its percentile bootstrap confidence interval."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def _percentile_estimate(value: float, reps: np.ndarray, level: float, n_boot: int) -> Estimate:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Estimate(value, float("nan"), float("nan"), level, n_boot)
    return Estimate(value, *_percentiles(reps, level), level, n_boot)


def group_resamples(groups, n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of ``n_boot`` bootstrap samples drawn by resampling whole groups.

    Groups (images) are drawn with replacement, as many as there are; every row of a drawn
    group enters the sample, once per draw. Rows of one image are correlated (same picture,
    often the same references), so resampling rows would understate the uncertainty.
    """
    g = np.asarray(groups).ravel()
    _, codes = np.unique(g, return_inverse=True)
    n_groups = int(codes.max()) + 1 if g.size else 0
    rows = np.arange(g.size)
    samples = []
    for _ in range(n_boot):
        draws = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        samples.append(np.repeat(rows, draws[codes]))
    return samples


def bootstrap(
    statistic: Callable[..., float],
    *arrays,
    groups=None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap CI of ``statistic(*arrays)``, resampling groups of rows.

    Args:
        statistic: Function of the arrays (all indexed by row), returning a float.
        *arrays: Equally long arrays, one entry per row.
        groups: Group label per row (e.g. image id); defaults to one group per row.
        n_boot: Number of bootstrap samples.
        level: Coverage of the interval, e.g. 0.95.
        seed: Seed of the resampling.

    Returns:
        The statistic on the full data with the (1-level)/2 and (1+level)/2 quantiles of its
        bootstrap distribution (samples where the statistic is undefined are dropped).
    """
    if not arrays:
        raise ValueError("bootstrap needs at least one array")
    arrs = [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise ValueError("all arrays passed to bootstrap must have the same length")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    value = float(statistic(*arrs))
    if groups is None:
        groups = np.arange(n)
    rng = np.random.default_rng(seed)
    reps = np.array(
        [statistic(*(a[idx] for a in arrs)) for idx in group_resamples(groups, n_boot, rng)],
        dtype=np.float64,
    )
    return _percentile_estimate(value, reps, level, n_boot)


def correlations_ci(
    metric,
    human,
    *,
    statistics: Sequence[str] = STATISTICS,
    groups=None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """:func:`correlations` with bootstrap CIs; every statistic sees the same resamples.

    Args:
        metric: Metric score per row.
        human: Human judgment per row.
        statistics: Names from :data:`STATISTICS`.
        groups: Image (or other cluster) label per row; whole groups are resampled.
        n_boot: Number of bootstrap samples.
        level: Coverage of the intervals.
        seed: Seed of the resampling.
    """
    a, b = _as_pair(metric, human)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if groups is not None and len(groups) != a.size:
        raise ValueError(f"groups has {len(groups)} entries for {a.size} scores")
    stats = tuple(statistics)
    values = correlations(a, b, stats)
    rng = np.random.default_rng(seed)
    samples = group_resamples(np.arange(a.size) if groups is None else groups, n_boot, rng)
    reps = np.array([list(correlations(a[i], b[i], stats).values()) for i in samples])
    reps = reps.reshape(len(samples), len(stats))
    return {
        s: _percentile_estimate(values[s], reps[:, k], level, n_boot) for k, s in enumerate(stats)
    }


def correlation_ci(metric, human, statistic: str, **kwargs) -> Estimate:
    """:func:`correlation` with a bootstrap CI (keyword arguments of :func:`correlations_ci`)."""
    return correlations_ci(metric, human, statistics=(statistic,), **kwargs)[statistic]


def pairwise_accuracy_ci(
    metric, human, groups, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """:func:`pairwise_accuracy` with a bootstrap CI that resamples groups.

    A group drawn twice contributes its pairs twice; pairs are never formed across copies.
    """
    m, h = _as_pair(metric, human)
    agree, pairs = _pair_agreement(m, h, groups)
    value = float(agree.sum() / pairs.sum()) if pairs.sum() else float("nan")
    n_groups = agree.size
    rng = np.random.default_rng(seed)
    # A resample is a count per group, so its accuracy is a ratio of weighted sums.
    draws = rng.integers(0, n_groups, (n_boot, n_groups))
    weights = np.stack([np.bincount(d, minlength=n_groups) for d in draws])
    tot_pairs = weights @ pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (weights @ agree) / tot_pairs
    return _percentile_estimate(value, reps, level, n_boot)


# --- paired tests of means (specs compare, specs sweep), vectorised ----------------------


def _resampled_means(
    n: int, n_boot: int, rng: np.random.Generator, stat: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """``stat`` of ``n_boot`` resamples of ``n`` units (index matrices in chunks of ~32 MB)."""
    means = np.empty(n_boot)
    step = max(1, 4_000_000 // max(n, 1))
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        means[start : start + k] = stat(rng.integers(0, n, (k, n)))
    return means


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap replicates."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap_ci(
    diff: np.ndarray, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile CI of the mean of ``diff``, resampling its entries with replacement."""
    means = _resampled_means(diff.size, n_boot, rng, lambda idx: diff[idx].mean(axis=1))
    return _percentiles(means, level)


def cluster_bootstrap_ci(
    sums: np.ndarray, counts: np.ndarray, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile CI of a row mean, resampling clusters (images) with replacement.

    Cluster i holds ``counts[i]`` rows whose scores add up to ``sums[i]``; each resample's
    statistic is sum(sums) / sum(counts) over the drawn clusters, so the point estimate is
    the plain mean over rows and the CI accounts for rows of one image being alike.
    """
    means = _resampled_means(
        sums.size, n_boot, rng, lambda idx: sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    )
    return _percentiles(means, level)


def sign_flip_p_value(diff: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided paired permutation p-value of mean(diff) = 0 by random sign flips."""
    n = diff.size
    observed = abs(diff.mean())
    # compare with a relative tolerance so that float rounding in the sums cannot
    # turn an exactly equal permuted mean into a "smaller" one
    tol = 1e-12 * max(1.0, float(np.abs(diff).max()))
    hits = 0
    step = max(1, 4_000_000 // max(n, 1))
    for start in range(0, n_perm, step):
        k = min(step, n_perm - start)
        signs = rng.integers(0, 2, (k, n)) * 2 - 1
        hits += int((np.abs((signs * diff).mean(axis=1)) >= observed - tol).sum())
    return (1 + hits) / (1 + n_perm)
