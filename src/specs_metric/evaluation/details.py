"""Which details are wrong: per-sentence attribution on the synthetic world, where every
sentence's truth is known.

The graded candidates of a world made by ``specs synth`` (``graded_{split}.jsonl``) are
captions of one-fact sentences, each true or false of its scene: every sentence is parsed
with :func:`specs_metric.synth.parse_segment` and decided by
:func:`specs_metric.synth.truth` against the scene graph of ``{split}.parquet``
(sentences the scene does not settle are left out). Each caption is explained sentence by
sentence (:mod:`specs_metric.scoring.explain`) and the benchmark reports the AUROC of ``-delta``
for false against true sentences: the probability that a random false sentence gets a
lower delta than a random true one (ties count half). 0.5 is chance.

The raw prefix delta drifts with the sentence's position, because the score saturates as
the caption grows, so several calibrations of a delta ``d`` of sentence ``k`` of a caption
are reported:

* ``raw``: ``d``;
* ``caption z``: within-caption standardisation, ``(d - mean) / std`` over the caption's
  sentences (0 for a caption whose deltas are all equal);
* ``position (train)``: ``d`` minus the mean delta at position ``k`` over the graded
  captions of the train split (the last position with at least
  :data:`MIN_POSITION_COUNT` train sentences pools every later one);
* ``position (same data)``: ``d`` minus the mean delta at position ``k`` over the
  evaluated captions themselves (transductive; uses the test data's own statistics).

With the ``neutral`` attribution the delta is taken against a neutral sentence at the same
place (see :mod:`specs_metric.scoring.explain`), another remedy for the drift.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from specs_metric.errors import DataError, reading
from specs_metric.evaluation.stats import bootstrap, rankdata
from specs_metric.io.jsonio import read_jsonl
from specs_metric.io.reading import read_parquet
from specs_metric.processing.segmentation import sentence_segments
from specs_metric.scoring.explain import NEUTRAL_SENTENCE, explain_embedded, plan_caption
from specs_metric.synth import Scene, parse_segment, truth

ATTRIBUTIONS = ("prefix", "leave-one-out", "neutral")
CALIBRATIONS = ("raw", "caption z", "position (train)", "position (same data)")
MIN_POSITION_COUNT = 10


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` against the rest.

    The Mann-Whitney rank formula with average ranks for ties:
    ``(R+ - n+(n+ + 1)/2) / (n+ n-)`` with ``R+`` the rank sum of the positives. NaN when
    either class is empty.

    Example:
        >>> auroc([0.9, 0.1, 0.5, 0.5], [True, False, True, False])
        0.875
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class GradedCaption:
    """A graded candidate with its image, scene and the truth of each sentence."""

    group: str
    image: Path
    caption: str
    sentences: list[str]
    truth: list[bool | None]


def label_sentences(caption: str, scene: Scene) -> tuple[list[str], list[bool | None]]:
    """The caption's sentences and each one's truth for ``scene``.

    Raises:
        DataError: a sentence outside the world's grammar.
    """
    sentences = sentence_segments(caption)
    return sentences, [truth(parse_segment(s), scene) for s in sentences]


def read_graded(data: Path, split: str, limit: int | None = None) -> list[GradedCaption]:
    """The first ``limit`` graded candidates of ``split`` in a ``specs synth`` folder."""
    graded = data / f"graded_{split}.jsonl"
    table = data / f"{split}.parquet"
    for path in (graded, table):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --data must be a `specs synth` folder")
    with reading(table):
        columns = read_parquet(table, columns=["id", "scene"]).to_pydict()
        try:
            scenes = {
                sid: Scene.from_dict(json.loads(js))
                for sid, js in zip(columns["id"], columns["scene"], strict=True)
            }
        except (KeyError, TypeError) as exc:
            raise DataError(f"{table}: a scene is not a `specs synth` scene ({exc!r})") from exc
    with reading(graded):  # deep nesting, huge numbers: what read_jsonl leaves to us
        records = list(read_jsonl(graded, where="{path}:{line}", objects=True))
    out = []
    for line_no, rec in records:
        if limit is not None and len(out) >= limit:
            break
        where = f"{graded}:{line_no}"
        if not all(isinstance(rec.get(k), str) for k in ("group", "caption", "image")):
            raise DataError(f"{where}: 'group', 'caption' and 'image' must be strings")
        if rec["group"] not in scenes:
            raise DataError(f"{where}: scene {rec['group']!r} not in {table}")
        try:
            sentences, labels = label_sentences(rec["caption"], scenes[rec["group"]])
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
        out.append(
            GradedCaption(rec["group"], data / rec["image"], rec["caption"], sentences, labels)
        )
    return out


# --------------------------------------------------------------------------------------
# Deltas
# --------------------------------------------------------------------------------------


def sentence_deltas(
    scorer,
    captions: Sequence[GradedCaption],
    attribution: str,
    neutral: str = NEUTRAL_SENTENCE,
    batch: int = 32,
    bar: tqdm | None = None,
) -> list[np.ndarray]:
    """Per caption, the delta of each sentence (sentence segmenter, specs scale)."""
    emb = scorer.embed_images([c.image for c in captions])  # each distinct image once
    out: list[np.ndarray] = []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        plans = [
            plan_caption(
                c.caption,
                sentence_segments,
                attribution,
                scorer.tokenizer,
                scorer.context_length,
                neutral=neutral,
            )
            for c in chunk
        ]
        images = emb[start : start + len(chunk)]
        for c, ex in zip(chunk, explain_embedded(scorer, images, plans), strict=True):
            if [s.text for s in ex.segments] != c.sentences:
                raise AssertionError("explain's sentences differ from the labelled ones")
            out.append(np.array([np.nan if s.delta is None else s.delta for s in ex.segments]))
        if bar is not None:
            bar.update(len(chunk))
    return out


# --------------------------------------------------------------------------------------
# Calibrations
# --------------------------------------------------------------------------------------


def position_means(deltas: Sequence[np.ndarray], min_count: int = MIN_POSITION_COUNT) -> np.ndarray:
    """Mean delta at each position; the last position with at least ``min_count``
    sentences pools every later one (the last entry applies to all later positions)."""
    longest = max((len(d) for d in deltas), default=0)
    counts = np.zeros(longest, dtype=int)
    for d in deltas:
        counts[: len(d)] += np.isfinite(d)
    cap = next((k for k in range(longest) if counts[k] < min_count), longest)
    cap = max(cap, 1)
    sums = np.zeros(cap)
    n = np.zeros(cap)
    for d in deltas:
        pos = np.minimum(np.arange(len(d)), cap - 1)
        ok = np.isfinite(d)
        np.add.at(sums, pos[ok], d[ok])
        np.add.at(n, pos[ok], 1)
    return sums / np.maximum(n, 1)


def _minus_positions(deltas: Sequence[np.ndarray], means: np.ndarray) -> list[np.ndarray]:
    return [d - means[np.minimum(np.arange(len(d)), len(means) - 1)] for d in deltas]


def caption_z(deltas: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Within-caption standardisation (0 where a caption's deltas do not vary)."""
    out = []
    for d in deltas:
        std = np.nanstd(d) if np.isfinite(d).any() else 0.0
        out.append((d - np.nanmean(d)) / std if std > 0 else np.zeros_like(d))
    return out


def calibrate(
    deltas: Sequence[np.ndarray], train_deltas: Sequence[np.ndarray] | None
) -> dict[str, list[np.ndarray]]:
    """Every calibration of :data:`CALIBRATIONS` (``position (train)`` needs train deltas)."""
    out = {
        "raw": list(deltas),
        "caption z": caption_z(deltas),
        "position (same data)": _minus_positions(deltas, position_means(deltas)),
    }
    if train_deltas is not None:
        out["position (train)"] = _minus_positions(deltas, position_means(train_deltas))
    return {name: out[name] for name in CALIBRATIONS if name in out}


@dataclass
class DetailResult:
    """AUROC (with a bootstrap CI over scenes) of one model, attribution and calibration."""

    model: str
    attribution: str
    calibration: str
    auroc: float
    ci_low: float
    ci_high: float
    n_true: int
    n_false: int


def evaluate(
    captions: Sequence[GradedCaption],
    calibrated: Sequence[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float, int, int]:
    """AUROC of ``-calibrated`` for false sentences, its CI (scenes resampled), counts."""
    scores, labels, groups = [], [], []
    for c, d in zip(captions, calibrated, strict=True):
        for value, t in zip(d, c.truth, strict=True):
            if t is None or not np.isfinite(value):
                continue
            scores.append(-value)
            labels.append(not t)
            groups.append(c.group)
    s, y = np.array(scores), np.array(labels, dtype=bool)
    est = bootstrap(auroc, s, y, groups=np.array(groups), n_boot=n_boot, seed=seed)
    return est.value, est.low, est.high, int((~y).sum()), int(y.sum())


def run_details(
    scorers: dict,
    test: Sequence[GradedCaption],
    train: Sequence[GradedCaption] | None,
    attributions: Sequence[str] = ATTRIBUTIONS,
    neutral: str = NEUTRAL_SENTENCE,
    n_boot: int = 1000,
    show_progress: bool = True,
) -> list[DetailResult]:
    """Every model x attribution x calibration on ``test`` (train: position baselines)."""
    total = len(scorers) * len(attributions) * (len(test) + (len(train) if train else 0))
    bar = tqdm(
        total=total, unit="caption", file=sys.stderr, disable=not show_progress, desc="details"
    )
    results = []
    for name, scorer in scorers.items():
        for attribution in attributions:
            deltas = sentence_deltas(scorer, test, attribution, neutral, bar=bar)
            train_deltas = (
                sentence_deltas(scorer, train, attribution, neutral, bar=bar) if train else None
            )
            for calibration, values in calibrate(deltas, train_deltas).items():
                value, low, high, n_true, n_false = evaluate(test, values, n_boot)
                results.append(
                    DetailResult(name, attribution, calibration, value, low, high, n_true, n_false)
                )
    bar.close()
    return results


def markdown_table(results: Sequence[DetailResult]) -> str:
    """Rows attribution x calibration, one column per model: ``AUROC [CI]``."""
    models = list(dict.fromkeys(r.model for r in results))
    cells = {(r.attribution, r.calibration, r.model): r for r in results}
    keys = list(dict.fromkeys((r.attribution, r.calibration) for r in results))
    lines = [
        "| attribution | calibration | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for attribution, calibration in keys:
        row = []
        for m in models:
            r = cells.get((attribution, calibration, m))
            row.append("" if r is None else f"{r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
        lines.append(f"| {attribution} | {calibration} | " + " | ".join(row) + " |")
    return "\n".join(lines)
