"""Deterministic ranks and Recall@K, shared by retrieval and zero-shot classification.

The rank (0-based) of candidate ``j`` for a query is the number of candidates with a
strictly greater similarity plus the number of candidates with an equal similarity and a
smaller index (candidates in data order), so ties never depend on the sort algorithm.
``j`` is within the top K when its rank is below K; Recall@K is the percentage of queries
that are hits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from specs_metric.scoring.scales import unit_rows

DEFAULT_KS = (1, 5, 10)


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Deterministic 0-based rank of ``targets[q]`` among the candidates of row ``q``.

    rank = #(candidates scoring strictly higher) + #(candidates scoring the same with a
    smaller index).

    Args:
        scores: (Q, M) similarities of Q queries to M candidates.
        targets: (Q,) candidate index per query.

    Example:
        >>> target_ranks(np.array([[0.5, 0.9, 0.5]]), np.array([2])).tolist()
        [2]
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    value = scores[np.arange(len(targets)), targets][:, None]
    higher = (scores > value).sum(axis=1)
    earlier_tie = ((scores == value) & (np.arange(scores.shape[1]) < targets[:, None])).sum(axis=1)
    return higher + earlier_tie


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of ranks below each K (``100 * hits / queries``)."""
    ranks = np.asarray(ranks)
    n = len(ranks)
    return {int(k): 100.0 * int(np.sum(ranks < k)) / n if n else float("nan") for k in ks}


def retrieval_ranks(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    caption_image: np.ndarray,
    chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank of each image's captions (image -> text) and rank of each caption's image.

    Embeddings are normalised here (float64); similarities are computed a block of
    queries at a time, so the full matrix never has to fit in memory.

    Returns:
        ``(i2t, t2i)``: (n_images,) rank of the best-ranked own caption of each image, and
        (n_captions,) rank of each caption's own image.
    """
    img = unit_rows(torch.as_tensor(image_emb)).numpy()
    txt = unit_rows(torch.as_tensor(text_emb)).numpy()
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_img, n_txt = len(img), len(txt)
    t2i = np.empty(n_txt, dtype=np.int64)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        t2i[start:stop] = target_ranks(txt[start:stop] @ img.T, caption_image[start:stop])
    i2t = np.full(n_img, np.iinfo(np.int64).max, dtype=np.int64)
    caption_ids = np.arange(n_txt)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        sims = img[start:stop] @ txt.T
        mine = caption_ids[(caption_image >= start) & (caption_image < stop)]
        if len(mine) == 0:
            continue
        ranks = target_ranks(sims[caption_image[mine] - start], mine)
        np.minimum.at(i2t, caption_image[mine], ranks)
    return i2t, t2i


def recall_from_similarity(
    similarity: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[int, float]]:
    """Recall@K (percent) in both directions from a full (n_images, n_captions) matrix."""
    sims = np.asarray(similarity)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    t2i = target_ranks(sims.T, caption_image)
    pair_ranks = target_ranks(sims[caption_image], np.arange(sims.shape[1]))
    i2t = np.full(sims.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(i2t, caption_image, pair_ranks)
    return {"image_to_text": recall_at(i2t, ks), "text_to_image": recall_at(t2i, ks)}
