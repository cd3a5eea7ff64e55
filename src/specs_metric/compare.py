"""Paired comparison of two ``specs score`` outputs on the same rows (``specs compare``).

Typical use: the same captions scored by two checkpoints. Rows are matched by ``id`` and
must agree on ``image`` and ``caption``; rows with an error in either file are skipped and
counted. The statistics are on the per-row differences d = B − A:

- mean difference with a paired percentile bootstrap CI (rows resampled with replacement);
- two-sided p-value of a paired sign-flip permutation test of the mean: under "no
  difference" every d_i is as likely to be −d_i, so p = (1 + #{|mean(s·d)| >= |mean(d)|}) /
  (1 + n_perm) over random signs s (exact zeros make p = 1);
- win/tie/loss counts of B against A (tie: |d| <= tie_tolerance) and the rows with the
  largest |d|.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specs_metric.job import read_output


class CompareError(ValueError):
    """The two files cannot be compared (names the file and the first offending id)."""


@dataclass
class Comparison:
    """Result of :func:`compare_files`."""

    file_a: str
    file_b: str
    model_a: str | None
    model_b: str | None
    scale: str | None
    n_rows: int
    n_used: int
    n_skipped: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    test: str
    n_boot: int
    n_perm: int
    seed: int
    wins: int
    ties: int
    losses: int
    top_changes: list[dict] = field(default_factory=list)
    scores_a: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    scores_b: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def significant(self) -> bool:
        """Whether the difference is significant at level 1 − ``level`` (CI excludes 0)."""
        alpha = 1.0 - self.level
        return bool(self.p_value < alpha and not self.ci_low <= 0.0 <= self.ci_high)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("scores_a", "scores_b")}
        out["significant"] = self.significant
        return out


def _summary(path: Path) -> dict:
    summary = path.with_name(path.name + ".summary.json")
    if not summary.is_file():
        return {}
    try:
        return json.loads(summary.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise CompareError(f"{summary}: not valid JSON ({err.msg})") from None


def _rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise CompareError(f"{path}: no such file")
    rows: dict[str, dict] = {}
    try:
        for n, rec in enumerate(read_output(path), 1):
            missing = {"id", "image", "caption", "score"} - set(rec)
            if missing:
                raise CompareError(
                    f"{path}: row {n} lacks {', '.join(sorted(missing))}; "
                    "expected the output of `specs score`"
                )
            key = str(rec["id"])
            if key in rows:
                raise CompareError(f"{path}: id {key!r} appears twice")
            rows[key] = rec
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        if isinstance(err, CompareError):
            raise
        raise CompareError(f"{path}: cannot read as a `specs score` output ({err})") from None
    return rows


def _is_bad(rec: dict) -> bool:
    score = rec.get("score")
    return bool(rec.get("error")) or score is None or not math.isfinite(float(score))


def paired_bootstrap_ci(
    diff: np.ndarray, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile CI of the mean of ``diff``, resampling rows (vectorised, in chunks)."""
    n = diff.size
    means = np.empty(n_boot)
    step = max(1, 4_000_000 // max(n, 1))  # bound the index matrix to ~32 MB
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        means[start : start + k] = diff[rng.integers(0, n, (k, n))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


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


def compare_files(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    n_boot: int = 10000,
    n_perm: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    top: int = 10,
    tie_tolerance: float = 0.0,
) -> Comparison:
    """Compare two ``specs score`` outputs row by row (B − A).

    Raises:
        CompareError: when the files hold different ids, disagree on a row's image or
            caption, or were scored on different scales.
    """
    a_path, b_path = Path(path_a), Path(path_b)
    if n_boot < 1 or n_perm < 1:
        raise ValueError("n_boot and n_perm must be at least 1")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    sum_a, sum_b = _summary(a_path), _summary(b_path)
    scale_a, scale_b = sum_a.get("scale"), sum_b.get("scale")
    if scale_a and scale_b and scale_a != scale_b:
        raise CompareError(
            f"scales differ: {a_path} was scored on {scale_a!r}, {b_path} on {scale_b!r}; "
            "score both with the same --scale"
        )
    rows_a, rows_b = _rows(a_path), _rows(b_path)
    for key in rows_a:
        if key not in rows_b:
            raise CompareError(f"different rows: id {key!r} is in {a_path} but not in {b_path}")
    for key in rows_b:
        if key not in rows_a:
            raise CompareError(f"different rows: id {key!r} is in {b_path} but not in {a_path}")
    ids, a_scores, b_scores, skipped = [], [], [], 0
    for key, ra in rows_a.items():
        rb = rows_b[key]
        for col in ("image", "caption"):
            if str(ra.get(col)) != str(rb.get(col)):
                raise CompareError(
                    f"id {key!r}: {col} differs between {a_path} ({ra.get(col)!r}) "
                    f"and {b_path} ({rb.get(col)!r})"
                )
        if _is_bad(ra) or _is_bad(rb):
            skipped += 1
            continue
        ids.append(key)
        a_scores.append(float(ra["score"]))
        b_scores.append(float(rb["score"]))
    a = np.array(a_scores)
    b = np.array(b_scores)
    if a.size == 0:
        raise CompareError(f"no row is scored in both {a_path} and {b_path}")
    diff = b - a
    rng = np.random.default_rng(seed)
    ci_low, ci_high = paired_bootstrap_ci(diff, n_boot, level, rng)
    p_value = sign_flip_p_value(diff, n_perm, rng)
    order = np.argsort(-np.abs(diff), kind="stable")[:top]
    top_changes = [
        {
            "id": ids[i],
            "image": rows_a[ids[i]]["image"],
            "caption": rows_a[ids[i]]["caption"],
            "score_a": float(a[i]),
            "score_b": float(b[i]),
            "diff": float(diff[i]),
        }
        for i in order
        if diff[i] != 0
    ]
    return Comparison(
        file_a=str(a_path),
        file_b=str(b_path),
        model_a=sum_a.get("model"),
        model_b=sum_b.get("model"),
        scale=scale_a or scale_b,
        n_rows=len(rows_a),
        n_used=int(a.size),
        n_skipped=skipped,
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(diff.mean()),
        ci_low=ci_low,
        ci_high=ci_high,
        level=level,
        p_value=p_value,
        test="paired sign-flip permutation",
        n_boot=n_boot,
        n_perm=n_perm,
        seed=seed,
        wins=int((diff > tie_tolerance).sum()),
        ties=int((np.abs(diff) <= tie_tolerance).sum()),
        losses=int((diff < -tie_tolerance).sum()),
        top_changes=top_changes,
        scores_a=a,
        scores_b=b,
    )
