"""Score scales and the one cosine they are computed from (README "Score scales").

- ``specs`` (default): ``max(0, (cos + 1) / 2)``, in [0, 1];
- ``clip-s``: ``2.5 * max(cos, 0)`` (CLIPScore, Hessel et al. 2021);
- ``cosine``: the raw cosine;
- ``torchmetrics``: ``100 * cos`` per pair; torchmetrics' CLIPScore clamps at 0 only after
  averaging, see :func:`corpus_score`.

Every cosine of the project goes through :func:`unit_rows` (float64, unit L2 rows).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from specs_metric.errors import UsageError

SCALES = ("specs", "clip-s", "cosine", "torchmetrics")

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def check_scale(scale: str) -> str:
    """Return ``scale`` if known, else raise ``UsageError`` listing the choices."""
    if scale not in SCALES:
        raise UsageError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return scale


def apply_scale(cosine: Array, scale: str = "specs") -> Array:
    """Map cosine similarities to a score scale, element-wise.

    Example:
        >>> import numpy as np
        >>> apply_scale(np.array([-1.0, 0.0, 0.5]), "specs").tolist()
        [0.0, 0.5, 0.75]
        >>> apply_scale(np.array([-0.2, 0.4]), "clip-s").tolist()
        [0.0, 1.0]
    """
    check_scale(scale)
    if scale == "cosine":
        return cosine
    if scale == "torchmetrics":
        return 100 * cosine
    if scale == "specs":
        shifted = (cosine + 1) / 2
    else:
        shifted = 2.5 * cosine
    if isinstance(shifted, torch.Tensor):
        return shifted.clamp_min(0)
    return np.maximum(shifted, 0)


def corpus_from_mean(mean_score: float, scale: str = "specs") -> float:
    """Corpus score from the mean of per-pair scores: the mean itself, except that
    torchmetrics clamps at 0 after averaging."""
    return max(mean_score, 0.0) if scale == "torchmetrics" else mean_score


def corpus_score(cosine: np.ndarray, scale: str = "specs") -> float:
    """Corpus-level score: the mean of per-pair scores (torchmetrics: clamp after the mean).

    Example:
        >>> cos = np.array([-0.5, 0.1])
        >>> corpus_score(cos, "clip-s"), corpus_score(cos, "torchmetrics")
        (0.125, 0.0)
    """
    per_pair = apply_scale(np.asarray(cosine, dtype=np.float64), scale)
    return corpus_from_mean(float(per_pair.mean()), scale)


def unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float64: the one normalisation behind every cosine
    of the project (its device is kept)."""
    x = embeddings.double()
    return x / x.norm(dim=-1, keepdim=True)


def pair_cosines(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of paired embeddings (N, D) x (N, D) -> float64 CPU tensor (N,)."""
    return (unit_rows(images.detach().cpu()) * unit_rows(texts.detach().cpu())).sum(-1)


def cosine_similarity(images: torch.Tensor, texts: torch.Tensor) -> np.ndarray:
    """Row-wise cosine of paired embeddings (N, D) x (N, D) -> float64 (N,)."""
    return pair_cosines(images, texts).numpy()


def cosine_matrix(images: torch.Tensor, texts: torch.Tensor) -> np.ndarray:
    """All-pairs cosine (N_images, N_texts) in float64."""
    return (unit_rows(images.detach().cpu()) @ unit_rows(texts.detach().cpu()).T).numpy()
