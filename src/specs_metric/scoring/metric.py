"""SPECS as an accumulating metric for training and evaluation loops.

:class:`SPECSScore` follows the torchmetrics protocol (``update``, ``compute``, ``reset``)
without depending on torchmetrics. Every pair is scored and clamped on its own scale
*before* averaging (the corpus score of :func:`specs_metric.scoring.scales.corpus_score`); only
the ``torchmetrics`` scale clamps the mean instead, like torchmetrics' ``CLIPScore``.
Under DDP, ``compute`` sums the state over all processes, so every rank gets the score of
the whole evaluation set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from specs_metric.data.images import ImageSource
from specs_metric.errors import UsageError
from specs_metric.scoring.scales import apply_scale, check_scale, corpus_from_mean, pair_cosines
from specs_metric.scoring.scorer import Scorer, load


def _pairwise_cosine(scorer: Scorer, images, captions: Sequence[str]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):  # already preprocessed pixels (N, 3, R, R)
        img = scorer.encode_pixels(images)
    else:
        img = scorer.embed_images(list(images))
    return pair_cosines(img, scorer.embed_texts(list(captions)))


def specs_score(
    scorer: Scorer,
    images: torch.Tensor | Sequence[ImageSource],
    captions: Sequence[str],
    scale: str = "specs",
) -> torch.Tensor:
    """Per-pair scores (float64 tensor) of 1:1 image-caption pairs.

    Args:
        scorer: a loaded :class:`~specs_metric.scoring.scorer.Scorer`.
        images: preprocessed pixels (N, 3, R, R), or paths / bytes / PIL images.
        captions: N captions.
        scale: ``specs``, ``clip-s``, ``cosine`` or ``torchmetrics``.
    """
    check_scale(scale)
    if len(images) != len(captions):
        raise UsageError(f"{len(images)} images but {len(captions)} captions")
    return apply_scale(_pairwise_cosine(scorer, images, captions), scale)


class SPECSScore:
    """Mean SPECS (or another scale) over all pairs seen since the last reset.

    Args:
        model: a :class:`~specs_metric.scoring.scorer.Scorer`, or a name/path for :func:`load`.
        scale: score scale (default ``specs``).
        sync_on_compute: all-reduce the state across processes when a process group is
            initialised.

    Example:
        >>> import torch
        >>> from specs_metric.models.factory import build_model
        >>> metric = SPECSScore(Scorer(build_model(tiny_state_dict()), device="cpu"))
        >>> metric.update(torch.zeros(2, 3, 32, 32), ["a cat", "a dog"])
        >>> 0.0 <= metric.compute() <= 1.0
        True
        >>> metric.count
        2
    """

    def __init__(self, model: Scorer | str, scale: str = "specs", sync_on_compute: bool = True):
        self.scorer = model if isinstance(model, Scorer) else load(model)
        self.scale = check_scale(scale)
        self.sync_on_compute = sync_on_compute
        self.reset()

    def reset(self) -> None:
        """Forget all pairs seen so far."""
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = 0

    def update(self, images: torch.Tensor | Sequence[ImageSource], captions: Sequence[str]) -> None:
        """Score a batch of 1:1 pairs and add them to the state."""
        scores = specs_score(self.scorer, images, captions, self.scale)
        self.total += scores.sum()
        self.count += len(scores)

    def compute(self) -> float:
        """Mean score over all pairs (of all processes under DDP); on the ``torchmetrics``
        scale the mean is clamped at 0, as torchmetrics' ``CLIPScore`` does."""
        state = torch.stack([self.total, torch.tensor(float(self.count), dtype=torch.float64)])
        if self.sync_on_compute and dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            device = (
                torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
            )
            state = state.to(device)
            dist.all_reduce(state)
            state = state.cpu()
        total, count = state.tolist()
        if count == 0:
            raise RuntimeError("SPECSScore.compute() called before any update()")
        return corpus_from_mean(total / count, self.scale)
