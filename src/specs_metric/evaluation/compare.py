"""Paired comparison of two ``specs score`` outputs (``specs compare``).

Two uses:

- **two scoring models** on the same captions: rows are matched by ``id`` and carry the same
  ``image`` and ``caption``; each row is one paired unit;
- **two captioners** (say, two checkpoints of a captioning model) describing the same
  images: captions differ. Rows are matched by ``id`` (``pair_by="id"``) or by ``image``
  (``pair_by="image"``), and the unit is the image: when a side has several captions of an
  image (sampling), their scores are averaged per image before the test.

Rows with an error are skipped and counted (by ``id``, a pair is dropped when either side
failed). The statistics are on the per-unit differences d = B − A:

- mean difference with a paired percentile bootstrap CI (units resampled with replacement);
- two-sided p-value of a paired sign-flip permutation test of the mean: under "no
  difference" every d_i is as likely to be −d_i, so p = (1 + #{|mean(s·d)| >= |mean(d)|}) /
  (1 + n_perm) over random signs s (exact zeros make p = 1);
- win/tie/loss counts of B against A (tie: |d| <= tie_tolerance) and the units with the
  largest |d|, with both sides' captions (and their segments when the files are
  ``specs explain`` outputs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specs_metric.data.scorefiles import read_score_rows, read_summary
from specs_metric.errors import (
    CompareError,
    SpecsError,
    UsageError,
    describe_parse_error,
    parse_errors,
)
from specs_metric.evaluation.stats import paired_bootstrap_ci, sign_flip_p_value

PAIR_BY = ("id", "image")



@dataclass
class Comparison:
    """Result of :func:`compare_files`.

    ``unit`` is ``"row"`` (same captions on both sides: two scoring models) or ``"image"``
    (captions differ: per-image means). ``n_used`` counts the units in the test;
    ``captions_a`` / ``captions_b`` the rows that went into them on each side.
    """

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
    pair_by: str = "id"
    unit: str = "row"
    n_images: int = 0
    captions_a: int = 0
    captions_b: int = 0
    top_changes: list[dict] = field(default_factory=list)
    scores_a: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    scores_b: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def significant(self) -> bool:
        """Whether the difference is significant at level 1 − ``level`` (CI excludes 0)."""
        alpha = 1.0 - self.level
        return bool(self.p_value < alpha and not self.ci_low <= 0.0 <= self.ci_high)

    @property
    def averaged(self) -> bool:
        """Whether some unit averages several captions of one image on a side."""
        return self.unit == "image" and max(self.captions_a, self.captions_b) > self.n_used

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("scores_a", "scores_b")}
        out["significant"] = self.significant
        out["averaged_per_image"] = self.averaged
        return out


@dataclass
class PairedTest:
    """Paired statistics of B − A over matched units (see the module docstring)."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    wins: int
    ties: int
    losses: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _summary(path: Path) -> dict:
    return read_summary(path) or {}


def read_scores(path: str | os.PathLike[str]) -> dict[str, dict]:
    """The rows of a ``specs score`` (or ``specs explain``) output by ``id``, in file order.

    Raises:
        CompareError: the file is missing, is not a score file, or repeats an id.
    """
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"{path}: no such file")
    rows: dict[str, dict] = {}
    try:
        for n, rec in enumerate(read_score_rows(path), 1):
            if not isinstance(rec, dict):
                raise CompareError(f"{path}: row {n} is not a JSON object")
            missing = {"id", "image", "caption", "score"} - set(rec)
            if missing:
                raise CompareError(
                    f"{path}: row {n} lacks {', '.join(sorted(missing))}; "
                    "expected the output of `specs score`"
                )
            if rec["id"] is None and rec.get("error"):
                continue  # an error row whose id could not be kept: nothing to pair
            key = str(rec["id"])
            if key in rows:
                raise CompareError(
                    f"{path}: id {key!r} appears twice (row {n}); ids must be unique"
                )
            rows[key] = rec
    except (KeyError, *parse_errors()) as err:  # not a score file
        if isinstance(err, SpecsError):  # names the file and row already
            raise
        problem = describe_parse_error(err)
        raise CompareError(f"{path}: cannot read as a `specs score` output ({problem})") from None
    return rows


def _is_bad(rec: dict) -> bool:
    score = rec.get("score")
    return bool(rec.get("error")) or score is None or not math.isfinite(float(score))


def paired_test(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 10000,
    n_perm: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    tie_tolerance: float = 0.0,
) -> PairedTest:
    """Bootstrap CI, sign-flip p-value and win/tie/loss of B − A over paired units."""
    if n_boot < 1 or n_perm < 1:
        raise UsageError("n_boot and n_perm must be at least 1")
    if not 0 < level < 1:
        raise UsageError(f"level must be in (0, 1), got {level}")
    if a.size == 0 or a.size != b.size:
        raise ValueError("paired_test needs two non-empty arrays of the same length")
    diff = b - a
    rng = np.random.default_rng(seed)
    ci_low, ci_high = paired_bootstrap_ci(diff, n_boot, level, rng)
    p_value = sign_flip_p_value(diff, n_perm, rng)
    return PairedTest(
        n=int(a.size),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(diff.mean()),
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=p_value,
        wins=int((diff > tie_tolerance).sum()),
        ties=int((np.abs(diff) <= tie_tolerance).sum()),
        losses=int((diff < -tie_tolerance).sum()),
    )


@dataclass
class _Unit:
    """One paired unit: a row (same captions) or an image with its rows on each side."""

    key: str
    image: object
    rows_a: list[dict]
    rows_b: list[dict]

    def score(self, side: str) -> float:
        rows = self.rows_a if side == "a" else self.rows_b
        return float(np.mean([float(r["score"]) for r in rows]))


# Two captioners' files of the same images rarely share ids: say how to pair them.
_BY_IMAGE_HINT = (
    "to compare two captioners' files of the same images, pair them by image (--pair-by image)"
)


def _check_same_ids(rows_a: dict, rows_b: dict, a_path: Path, b_path: Path) -> None:
    for key in rows_a:
        if key not in rows_b:
            raise CompareError(
                f"different rows: id {key!r} is in {a_path} but not in {b_path}; "
                + _BY_IMAGE_HINT
            )
    for key in rows_b:
        if key not in rows_a:
            raise CompareError(
                f"different rows: id {key!r} is in {b_path} but not in {a_path}; "
                + _BY_IMAGE_HINT
            )


def _units_by_id(
    rows_a: dict, rows_b: dict, a_path: Path, b_path: Path
) -> tuple[list[_Unit], int, str]:
    _check_same_ids(rows_a, rows_b, a_path, b_path)
    same_captions = True
    for key, ra in rows_a.items():
        rb = rows_b[key]
        if str(ra.get("image")) != str(rb.get("image")):
            raise CompareError(
                f"id {key!r}: image differs between {a_path} ({ra.get('image')!r}) "
                f"and {b_path} ({rb.get('image')!r}); use --pair-by image to match rows "
                "by image"
            )
        same_captions = same_captions and str(ra.get("caption")) == str(rb.get("caption"))
    pairs = [(k, ra, rows_b[k]) for k, ra in rows_a.items()]
    skipped = sum(_is_bad(ra) or _is_bad(rb) for _, ra, rb in pairs)
    good = [(k, ra, rb) for k, ra, rb in pairs if not (_is_bad(ra) or _is_bad(rb))]
    if same_captions:  # two scoring models: each row is a paired measurement
        return [_Unit(k, ra["image"], [ra], [rb]) for k, ra, rb in good], skipped, "row"
    by_image: dict[str, _Unit] = {}
    for _, ra, rb in good:
        unit = by_image.setdefault(str(ra["image"]), _Unit(str(ra["image"]), ra["image"], [], []))
        unit.rows_a.append(ra)
        unit.rows_b.append(rb)
    return list(by_image.values()), skipped, "image"


def _group_by_image(rows: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for rec in rows.values():
        groups.setdefault(str(rec["image"]), []).append(rec)
    return groups


def _units_by_image(
    rows_a: dict, rows_b: dict, a_path: Path, b_path: Path
) -> tuple[list[_Unit], int, str]:
    groups_a, groups_b = _group_by_image(rows_a), _group_by_image(rows_b)
    for img in groups_a:
        if img not in groups_b:
            raise CompareError(f"different images: {img!r} is in {a_path} but not in {b_path}")
    for img in groups_b:
        if img not in groups_a:
            raise CompareError(f"different images: {img!r} is in {b_path} but not in {a_path}")
    units, skipped = [], 0
    for img, recs_a in groups_a.items():
        good_a = [r for r in recs_a if not _is_bad(r)]
        good_b = [r for r in groups_b[img] if not _is_bad(r)]
        if not good_a or not good_b:
            skipped += 1
            continue
        units.append(_Unit(img, recs_a[0]["image"], good_a, good_b))
    return units, skipped, "image"


def _brief(rec: dict) -> dict:
    out = {"id": rec.get("id"), "caption": rec.get("caption"), "score": float(rec["score"])}
    if rec.get("segments"):
        out["segments"] = rec["segments"]
    return out


def _common_scale(sum_a: dict, sum_b: dict, a_path: Path, b_path: Path) -> str | None:
    """The scale both files were scored on (as their summaries say); differing ones fail."""
    scale_a, scale_b = sum_a.get("scale"), sum_b.get("scale")
    if scale_a and scale_b and scale_a != scale_b:
        raise CompareError(
            f"scales differ: {a_path} was scored on {scale_a!r}, {b_path} on {scale_b!r}; "
            "score both with the same --scale"
        )
    return scale_a or scale_b


def _top_changes(
    units: list[_Unit], a: np.ndarray, b: np.ndarray, unit_kind: str, top: int
) -> list[dict]:
    """The ``top`` units with the largest |B - A| (unchanged ones left out)."""
    diff = b - a
    out = []
    for i in np.argsort(-np.abs(diff), kind="stable")[:top]:
        if diff[i] == 0:
            continue
        u = units[i]
        out.append(
            {
                "id": u.key if unit_kind == "row" else str(u.rows_a[0]["id"]),
                "image": u.image,
                "caption": u.rows_a[0]["caption"],
                "caption_b": u.rows_b[0]["caption"],
                "score_a": float(a[i]),
                "score_b": float(b[i]),
                "diff": float(diff[i]),
                "rows_a": [_brief(r) for r in u.rows_a],
                "rows_b": [_brief(r) for r in u.rows_b],
            }
        )
    return out


def compare_files(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    pair_by: str = "id",
    n_boot: int = 10000,
    n_perm: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    top: int = 10,
    tie_tolerance: float = 0.0,
) -> Comparison:
    """Compare two ``specs score`` outputs (B − A), paired by ``id`` or by ``image``.

    By ``id``, rows with the same id must show the same image; when every pair also has
    the same caption, each row is a unit (two scoring models), otherwise the unit is the
    image and each side's captions of an image are averaged. By ``image``, each side's
    scored captions of an image are averaged and the images are the units.

    Raises:
        CompareError: when the files hold different ids (images, by image), repeat an id,
            disagree on a row's image, or were scored on different scales.
    """
    if pair_by not in PAIR_BY:
        raise UsageError(f"pair_by must be one of {', '.join(PAIR_BY)}, got {pair_by!r}")
    a_path, b_path = Path(path_a), Path(path_b)
    sum_a, sum_b = _summary(a_path), _summary(b_path)
    scale = _common_scale(sum_a, sum_b, a_path, b_path)
    rows_a, rows_b = read_scores(a_path), read_scores(b_path)
    make_units = _units_by_id if pair_by == "id" else _units_by_image
    units, skipped, unit_kind = make_units(rows_a, rows_b, a_path, b_path)
    if not units:
        raise CompareError(f"no {unit_kind} is scored in both {a_path} and {b_path}")
    a = np.array([u.score("a") for u in units])
    b = np.array([u.score("b") for u in units])
    stats = paired_test(
        a, b, n_boot=n_boot, n_perm=n_perm, level=level, seed=seed, tie_tolerance=tie_tolerance
    ).as_dict()
    return Comparison(
        file_a=str(a_path),
        file_b=str(b_path),
        model_a=sum_a.get("model"),
        model_b=sum_b.get("model"),
        scale=scale,
        n_rows=len(rows_a),
        n_used=stats.pop("n"),
        n_skipped=skipped,
        **stats,
        level=level,
        test="paired sign-flip permutation",
        n_boot=n_boot,
        n_perm=n_perm,
        seed=seed,
        pair_by=pair_by,
        unit=unit_kind,
        n_images=len({str(u.image) for u in units}),
        captions_a=sum(len(u.rows_a) for u in units),
        captions_b=sum(len(u.rows_b) for u in units),
        top_changes=_top_changes(units, a, b, unit_kind, top),
        scores_a=a,
        scores_b=b,
    )
