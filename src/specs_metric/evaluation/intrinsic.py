"""Intrinsic specificity benchmark (docs/intrinsic.md) with
prefix-sharing text encoding.

For each image with cumulative captions ``c_1..c_n`` and negatives ``n_2..n_n``
(``n_k = c_{k-1} + a segment that is wrong for the image``) and ``s`` the cosine of image
and text embeddings:

* positive rate = fraction of ``k in 1..n-1`` with ``s(c_{k+1}) > s(c_k)``;
* negative rate = fraction of ``k in 2..n`` with ``s(c_k) > s(n_k)``;

images with fewer than two increments (``n < 3``) are skipped for both rates, and the
benchmark reports the mean over images in percent and the average of the two means.
Comparisons are strict: a tie counts as a failure.

Cumulative captions share prefixes, so each image's captions and negatives are one chain
for :func:`~specs_metric.models.prefix.encode_chains`: the longest caption runs once and
every other one computes only its tokens after the shared prefix (for ``c_k`` just its
EOT; for ``n_k`` the wrong segment and its EOT).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from specs_metric.errors import DataError, UsageError
from specs_metric.evaluation.sdci import SdciRow, load_image_source
from specs_metric.models.prefix import DEFAULT_MAX_SUFFIX, encode_chains, encode_plain
from specs_metric.scoring.scales import cosine_similarity
from specs_metric.scoring.scorer import Scorer

# --------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------


@dataclass
class ImageRates:
    """Rates of one image (``None`` when the image is skipped)."""

    positive: float | None
    negative: float | None


def image_rates(caption_scores: Sequence[float], neg_scores: Sequence[float]) -> ImageRates:
    """Positive and negative rate (fractions) of one image.

    Args:
        caption_scores: scores of ``c_1..c_n``.
        neg_scores: scores of ``n_2..n_n``; ``neg_scores[j]`` pairs with
            ``caption_scores[j + 1]``.
    """
    c = np.asarray(caption_scores, dtype=np.float64)
    n = np.asarray(neg_scores, dtype=np.float64)
    if len(n) != max(len(c) - 1, 0):
        raise ValueError(f"{len(c)} captions need {max(len(c) - 1, 0)} negatives, got {len(n)}")
    if len(c) - 1 < 2:
        return ImageRates(None, None)
    return ImageRates(float(np.mean(c[1:] > c[:-1])), float(np.mean(c[1:] > n)))


@dataclass
class IntrinsicResult:
    """Benchmark result: means over the images that were not skipped, in percent."""

    positive: float
    negative: float
    average: float
    n_images: int
    n_skipped: int
    per_image: list[ImageRates] = field(repr=False)


def intrinsic_rates(
    caption_scores: Sequence[Sequence[float]], neg_scores: Sequence[Sequence[float]]
) -> IntrinsicResult:
    """The intrinsic benchmark's rates over images from per-image caption and negative scores."""
    if len(caption_scores) != len(neg_scores):
        raise ValueError(f"{len(caption_scores)} caption lists but {len(neg_scores)} negatives")
    per_image = [image_rates(c, n) for c, n in zip(caption_scores, neg_scores, strict=True)]
    kept = [r for r in per_image if r.positive is not None]
    if not kept:
        raise DataError("no image has at least 3 cumulative captions; nothing to score")
    positive = 100.0 * float(np.mean([r.positive for r in kept]))
    negative = 100.0 * float(np.mean([r.negative for r in kept]))
    return IntrinsicResult(
        positive=positive,
        negative=negative,
        average=(positive + negative) / 2.0,
        n_images=len(kept),
        n_skipped=len(per_image) - len(kept),
        per_image=per_image,
    )


# --------------------------------------------------------------------------------------
# Running the benchmark
# --------------------------------------------------------------------------------------


def embed_row_images(
    scorer: Scorer, rows: Sequence[SdciRow], batch_size: int = 64
) -> torch.Tensor:
    """Raw image embeddings (N, D) of the rows' images."""
    return scorer.embed_images([load_image_source(r.image) for r in rows], batch_size=batch_size)


def _token_lists(scorer: Scorer, texts: Sequence[str]) -> list[list[int]]:
    """The scorer's token ids (truncation policy applied), cut after each row's EOT."""
    ids = scorer.tokenize(list(texts))
    ends = (ids.argmax(dim=1) + 1).tolist()
    return [row[:end] for row, end in zip(ids.tolist(), ends, strict=True)]


def embed_chain_texts(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    prefix_reuse: bool = True,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> list[torch.Tensor]:
    """Raw fp32 CPU embeddings of each row's ``captions + neg_captions``.

    With ``prefix_reuse`` the rows are encoded by :func:`encode_chains`, otherwise every
    caption goes through ``model.encode_text`` on its own.
    """
    chains = [_token_lists(scorer, r.captions + r.neg_captions) for r in rows]
    with torch.inference_mode(), scorer.forward_context():
        if prefix_reuse:
            out = encode_chains(scorer.model, chains, max_suffix)
        else:
            flat = encode_plain(scorer.model, [s for ch in chains for s in ch])
            sizes = [len(ch) for ch in chains]
            out = list(torch.split(flat, sizes))
    return [o.float().cpu() for o in out]


@dataclass
class ChainScores:
    """Cosines of one image with its captions and negatives."""

    captions: list[float]
    negatives: list[float]


def score_rows(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    image_embeddings: torch.Tensor,
    prefix_reuse: bool = True,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> list[ChainScores]:
    """Cosine of each row's image embedding with its captions and negatives."""
    texts = embed_chain_texts(scorer, rows, prefix_reuse, max_suffix)
    out = []
    for row, img, emb in zip(rows, image_embeddings, texts, strict=True):
        cos = cosine_similarity(img.expand(len(emb), -1), emb)
        n = len(row.captions)
        out.append(ChainScores(cos[:n].tolist(), cos[n:].tolist()))
    return out


@dataclass
class Timing:
    """Prefix reuse against plain encoding on the same chains."""

    chains: int
    captions: int
    prefix_seconds: float
    plain_seconds: float
    max_abs_diff: float  # largest |cosine difference| between the two encodings

    @property
    def speedup(self) -> float:
        return self.plain_seconds / max(self.prefix_seconds, 1e-12)


def time_prefix_reuse(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    image_embeddings: torch.Tensor,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> Timing:
    """Encode ``rows`` both ways (after a warm-up) and compare time and cosines."""
    score_rows(scorer, rows[:1], image_embeddings[:1], True, max_suffix)  # warm-up
    start = time.perf_counter()
    shared = score_rows(scorer, rows, image_embeddings, True, max_suffix)
    middle = time.perf_counter()
    plain = score_rows(scorer, rows, image_embeddings, False, max_suffix)
    end = time.perf_counter()
    diff = max(
        (
            float(np.max(np.abs(np.subtract(a.captions + a.negatives, b.captions + b.negatives))))
            for a, b in zip(shared, plain, strict=True)
        ),
        default=0.0,
    )
    return Timing(
        chains=len(rows),
        captions=sum(len(r.captions) + len(r.neg_captions) for r in rows),
        prefix_seconds=middle - start,
        plain_seconds=end - middle,
        max_abs_diff=diff,
    )


def run_intrinsic(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    *,
    prefix_reuse: bool = True,
    chains_per_batch: int = 16,
    image_batch_size: int = 64,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
    on_progress: Callable[[int, list[ChainScores]], None] | None = None,
) -> tuple[IntrinsicResult, list[ChainScores]]:
    """Score every row and compute the positive, negative and average rates.

    Args:
        scorer: the model to evaluate.
        rows: the data (see :func:`~specs_metric.evaluation.sdci.read_sdci`).
        prefix_reuse: share cumulative prefixes (exact; faster).
        chains_per_batch: rows encoded together.
        image_batch_size: images per image batch.
        max_suffix: see :func:`encode_chains`.
        on_progress: called after each batch with the number of rows done and the scores
            so far (for writing partial results).

    Returns:
        The rates and the per-row cosines.
    """
    if chains_per_batch < 1:
        raise UsageError(f"chains_per_batch must be >= 1, got {chains_per_batch}")
    scores: list[ChainScores] = []
    for start in range(0, len(rows), chains_per_batch):
        batch = rows[start : start + chains_per_batch]
        images = embed_row_images(scorer, batch, image_batch_size)
        scores += score_rows(scorer, batch, images, prefix_reuse, max_suffix)
        if on_progress is not None:
            on_progress(len(scores), scores)
    result = intrinsic_rates([s.captions for s in scores], [s.negatives for s in scores])
    return result, scores
