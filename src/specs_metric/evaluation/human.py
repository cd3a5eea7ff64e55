"""Agreement of caption metrics with human judgments (``specs bench human``).

The readers of :mod:`specs_metric.evaluation.human_readers` turn each data set into
:class:`JudgmentSet` objects; :func:`run_metrics` scores every row with each requested
metric and times it, and :func:`evaluate` computes the correlations with bootstrap CIs
that resample images. Each distinct image is embedded once per model, and each distinct
(image, caption) pair is scored once.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from specs_metric.errors import UsageError
from specs_metric.evaluation import stats
from specs_metric.evaluation.human_readers import (
    FORMATS,
    DataFormatError,
    ImageRef,
    Judgment,
    JudgmentSet,
    read_judgments,
)
from specs_metric.evaluation.text_metrics import TEXT_METRICS, text_metric
from specs_metric.scoring.scales import SCALES

# The readers' names stay importable from here, the command's entry module.
__all__ = [
    "DEFAULT_MODEL", "FORMATS", "MODEL_SCALES", "DataFormatError", "Judgment", "JudgmentSet",
    "MetricAgreement", "MetricScores", "MetricSpec", "SetReport", "evaluate",
    "iter_score_rows", "model_cosines", "parse_metrics", "read_judgments", "run_metrics",
    "text_scores",
]  # fmt: skip

MODEL_SCALES = SCALES  # model metrics are named by their score scale
DEFAULT_MODEL = "specs-b32"


# --------------------------------------------------------------------------------------
# metrics


@dataclass(frozen=True)
class MetricSpec:
    """A metric to run: a text metric, or a model checkpoint with a score scale."""

    label: str
    name: str  # one of MODEL_SCALES or TEXT_METRICS
    model: str | None = None  # checkpoint name or path (model metrics only)

    @property
    def is_model(self) -> bool:
        return self.name in MODEL_SCALES


def parse_metrics(text: str, default_model: str = DEFAULT_MODEL) -> list[MetricSpec]:
    """Parse ``[LABEL=]NAME[@MODEL],...``, e.g. ``specs,clip-s@openai.pt,twin=specs@twin.pt``.

    ``NAME`` is a model score scale (:data:`MODEL_SCALES`, using ``MODEL`` or
    ``default_model``) or a text metric (:data:`TEXT_METRICS`).
    """
    specs: list[MetricSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        label, _, body = item.partition("=") if "=" in item else ("", "", item)
        name, _, model = body.partition("@")
        name = name.strip().lower()
        if name in TEXT_METRICS:
            if model:
                raise UsageError(f"--metrics {item!r}: {name} takes no model")
            specs.append(MetricSpec(label or name, name))
        elif name in MODEL_SCALES:
            model = model.strip() or default_model
            specs.append(MetricSpec(label or (name if "@" not in body else body), name, model))
        else:
            choices = ", ".join(MODEL_SCALES + TEXT_METRICS)
            raise UsageError(f"--metrics: unknown metric {name!r} in {item!r}; use {choices}")
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UsageError(f"--metrics: label {dupes[0]!r} used twice; name them LABEL=NAME@MODEL")
    if not specs:
        raise UsageError("--metrics: no metric given")
    return specs


@dataclass
class MetricScores:
    """One metric's scores for every row of a judgment set, and what they cost."""

    spec: MetricSpec
    scores: np.ndarray  # per row; NaN where the row could not be scored
    seconds: float  # scoring time (model loading excluded)
    n_scored: int  # distinct (image, caption) pairs scored
    checkpoint_sha256: str | None = None
    load_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the metric was not run on this set

    @property
    def seconds_per_1000(self) -> float:
        return 1000.0 * self.seconds / self.n_scored if self.n_scored else float("nan")


@dataclass
class _Unique:
    """Distinct scoring units of a set: pairs, images and the row -> pair map."""

    pair_of_row: np.ndarray
    pairs: list[Judgment]  # first row of each distinct pair
    image_keys: list[str]
    image_of_pair: np.ndarray


def _unique(rows: Sequence[Judgment], with_references: bool) -> _Unique:
    pair_ids: dict[tuple, int] = {}
    pairs: list[Judgment] = []
    pair_of_row = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        key = (r.image_key, r.caption, r.references if with_references else ())
        if key not in pair_ids:
            pair_ids[key] = len(pairs)
            pairs.append(r)
        pair_of_row[i] = pair_ids[key]
    image_ids: dict[str, int] = {}
    image_of_pair = np.empty(len(pairs), dtype=np.int64)
    for j, r in enumerate(pairs):
        image_of_pair[j] = image_ids.setdefault(r.image_key, len(image_ids))
    return _Unique(pair_of_row, pairs, list(image_ids), image_of_pair)


def model_cosines(
    scorer, rows: Sequence[Judgment], batch_size: int | None = None
) -> tuple[np.ndarray, float, int, list[str]]:
    """Cosine per row from a loaded :class:`~specs_metric.scoring.scorer.Scorer`.

    Returns:
        (cosine per row, NaN where the image failed; seconds; distinct pairs; image errors).
    """
    from specs_metric.evaluation.embed import embed_images
    from specs_metric.scoring.scales import cosine_similarity

    uniq = _unique(rows, with_references=False)
    first_row_of_image: dict[str, ImageRef] = {}
    for r in uniq.pairs:
        first_row_of_image.setdefault(r.image_key, r.image)
    started = time.perf_counter()
    images = [first_row_of_image[k] for k in uniq.image_keys]
    embedded = embed_images(scorer, images, batch_size=batch_size)
    image_emb = embedded.embeddings.masked_fill(~embedded.ok[:, None], float("nan"))
    errors = [f"image {uniq.image_keys[i]}: {msg}" for i, msg in embedded.errors]
    text_emb = scorer.embed_texts([r.caption for r in uniq.pairs])
    cos = cosine_similarity(image_emb[uniq.image_of_pair], text_emb)
    seconds = time.perf_counter() - started
    return np.asarray(cos, dtype=np.float64)[uniq.pair_of_row], seconds, len(uniq.pairs), errors


def text_scores(name: str, rows: Sequence[Judgment]) -> tuple[np.ndarray, float, int]:
    """(per-row scores, seconds, distinct pairs) of a reference-based text metric."""
    uniq = _unique(rows, with_references=True)
    started = time.perf_counter()
    scores = text_metric(
        name,
        [r.caption for r in uniq.pairs],
        [list(r.references) for r in uniq.pairs],
        documents=[r.image_key for r in uniq.pairs],
    )
    return scores[uniq.pair_of_row], time.perf_counter() - started, len(uniq.pairs)


Loader = Callable[[str], object]


def _default_loader(device: str | None, precision: str) -> Loader:
    def load(model: str):
        from specs_metric.scoring.scorer import load as load_scorer

        return load_scorer(model, device=device, precision=precision)

    return load


def run_metrics(
    sets: Sequence[JudgmentSet],
    metrics: Sequence[MetricSpec],
    *,
    loader: Loader | None = None,
    device: str | None = None,
    precision: str = "fp32",
    batch_size: int | None = None,
    on_result: Callable[[JudgmentSet, MetricScores], None] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, MetricScores]]:
    """Score every set with every metric: ``{set name: {metric label: MetricScores}}``.

    Each checkpoint is loaded once and run once per set; its scales share the cosines (and
    so the timing). ``on_result`` is called after each metric, so results can be written as
    they come. ``progress`` shows a bar of (checkpoint or text metric, set) steps.
    """
    from tqdm import tqdm

    from specs_metric.scoring.scales import apply_scale

    load = loader or _default_loader(device, precision)
    out: dict[str, dict[str, MetricScores]] = {s.name: {} for s in sets}
    models = sorted({m.model for m in metrics if m.is_model})
    texts = [m for m in metrics if not m.is_model]
    bar = tqdm(
        total=(len(models) + len(texts)) * len(sets),
        unit="step",
        desc="metrics",
        file=sys.stderr,
        disable=not progress,
    )
    for model in models:
        started = time.perf_counter()
        scorer = load(model)
        load_seconds = time.perf_counter() - started
        for jset in sets:
            cos, seconds, n_pairs, errors = model_cosines(scorer, jset.rows, batch_size)
            for spec in (m for m in metrics if m.model == model):
                scores = np.full(cos.shape, np.nan)
                ok = np.isfinite(cos)
                scores[ok] = apply_scale(cos[ok], spec.name)
                res = MetricScores(
                    spec,
                    scores,
                    seconds,
                    n_pairs,
                    getattr(scorer, "checkpoint_sha256", None),
                    load_seconds,
                    errors,
                )
                out[jset.name][spec.label] = res
                if on_result:
                    on_result(jset, res)
            bar.update(1)
        del scorer
    for spec in texts:
        for jset in sets:
            if not jset.has_references:
                res = MetricScores(
                    spec,
                    np.full(len(jset.rows), np.nan),
                    0.0,
                    0,
                    skipped="needs references for every row",
                )
            else:
                scores, seconds, n_pairs = text_scores(spec.name, jset.rows)
                res = MetricScores(spec, scores, seconds, n_pairs)
            out[jset.name][spec.label] = res
            if on_result:
                on_result(jset, res)
            bar.update(1)
    bar.close()
    # keep the order the metrics were asked for
    return {k: {m.label: v[m.label] for m in metrics} for k, v in out.items()}


# --------------------------------------------------------------------------------------
# correlations


@dataclass
class MetricAgreement:
    """Correlations of one metric with the human scores of one set."""

    label: str
    name: str
    model: str | None
    checkpoint_sha256: str | None
    n_rows: int  # rows used (scored)
    n_failed: int  # rows without a score (e.g. undecodable image)
    correlations: dict[str, stats.Estimate]
    pairwise_accuracy: stats.Estimate | None
    seconds: float
    seconds_per_1000: float
    n_scored: int
    load_seconds: float = 0.0
    skipped: str | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class SetReport:
    """All metrics on one judgment set."""

    name: str
    n_rows: int
    n_images: int
    n_groups: int
    metrics: list[MetricAgreement]
    human: np.ndarray
    scores: dict[str, np.ndarray]
    image_keys: list[str]


def evaluate(
    jset: JudgmentSet,
    results: dict[str, MetricScores],
    *,
    statistics: Sequence[str] = stats.STATISTICS,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> SetReport:
    """Correlations (bootstrap CIs resampling images) and pairwise accuracy per metric."""
    human = np.array([r.human_score for r in jset.rows])
    images = np.array([r.image_key for r in jset.rows], dtype=object)
    groups = [r.group for r in jset.rows]
    agreements = []
    for label, res in results.items():
        ok = np.isfinite(res.scores)
        corr: dict[str, stats.Estimate] = {}
        pacc = None
        if res.skipped is None and ok.sum() >= 2:
            corr = stats.correlations_ci(
                res.scores[ok],
                human[ok],
                statistics=statistics,
                groups=images[ok],
                n_boot=n_boot,
                level=level,
                seed=seed,
            )
            if jset.has_groups:
                # a row without a group is compared with no other row
                labels = [f"g:{x}" if x is not None else f"row:{i}" for i, x in enumerate(groups)]
                g = np.array(labels, dtype=object)[ok]
                pacc = stats.pairwise_accuracy_ci(
                    res.scores[ok], human[ok], g, n_boot=n_boot, level=level, seed=seed
                )
        agreements.append(
            MetricAgreement(
                label=label,
                name=res.spec.name,
                model=res.spec.model,
                checkpoint_sha256=res.checkpoint_sha256,
                n_rows=int(ok.sum()),
                n_failed=int((~ok).sum()) if res.skipped is None else 0,
                correlations=corr,
                pairwise_accuracy=pacc,
                seconds=res.seconds,
                seconds_per_1000=res.seconds_per_1000,
                n_scored=res.n_scored,
                load_seconds=res.load_seconds,
                skipped=res.skipped,
                errors=res.errors,
            )
        )
    return SetReport(
        name=jset.name,
        n_rows=len(jset.rows),
        n_images=len(set(images.tolist())),
        n_groups=len({g for g in groups if g is not None}),
        metrics=agreements,
        human=human,
        scores={k: v.scores for k, v in results.items()},
        image_keys=images.tolist(),
    )


def iter_score_rows(jset: JudgmentSet, results: dict[str, MetricScores]) -> Iterable[dict]:
    """Per-row records (id, image key, caption, human score, each metric's score)."""
    for i, r in enumerate(jset.rows):
        rec: dict = {
            "set": jset.name,
            "id": r.id,
            "image": r.image_key,
            "caption": r.caption,
            "human_score": r.human_score,
        }
        for label, res in results.items():
            v = float(res.scores[i])
            rec[label] = v if math.isfinite(v) else None
        yield rec
