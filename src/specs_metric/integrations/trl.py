"""SPECS as a reward function for TRL's trainers (``GRPOTrainer``, ``RLOOTrainer``, ...).

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=...,
**columns)``: ``columns`` holds every other column of the training set (already repeated
over the generations of each prompt) and, in TRL 1.x, ``trainer_state``, ``log_extra`` and
``log_metric``. :class:`SPECSReward` takes the image of each completion from one of those
columns and returns its SPECS, or ``None`` (TRL's "no reward for this row") where the pair
cannot be scored.

**Name the image column for your policy.** TRL treats a column named ``image`` or
``images`` as the *policy's* input (a vision-language model with a processor). A
text-only policy that writes captions from a text description needs the images in
another column, e.g. ``image_path``, and ``SPECSReward(image_column="image_path")``.
Both layouts work; see ``docs/integrations/trl.md``.

Needs nothing from TRL itself (the signature is all there is to it); ``pip install
'specs-metric[trl]'`` installs TRL for training.
"""

from __future__ import annotations

import logging
import os

from specs_metric.integrations.pairs import PairScorer
from specs_metric.integrations.rewards import (
    ReasonLog,
    RewardFunction,
)
from specs_metric.scoring.scorer import Scorer, load

logger = logging.getLogger(__name__)

class SPECSReward(RewardFunction):
    """SPECS of each completion against its image, as a TRL reward function.

    Args:
        model: a loaded :class:`~specs_metric.scoring.scorer.Scorer`, or a model name or
            path for :func:`~specs_metric.scoring.scorer.load`.
        image_column: the column holding each prompt's image: PIL images, paths, encoded
            bytes or HF ``{"bytes", "path"}`` structs (default ``image``; see the module
            docstring about naming it for a text-only policy).
        scale: score scale (default ``specs``, in [0, 1]).
        device, precision, long_captions: how :func:`load` loads ``model`` (default: CUDA
            when available, ``fp32``; ignored for a loaded Scorer).
        name: the reward's ``__name__``: TRL logs ``rewards/<name>/mean``.
        image_root: the folder relative image paths resolve against (default: the current
            folder).
        image_batch, token_budget: forward-pass sizes (default: the device batch policy of
            ``specs score``).

    Calling it returns one ``float`` per completion, or ``None`` for a completion that
    cannot be scored (no image, an unreadable image, an empty completion); each kind of
    reason is logged once, as a warning of the ``specs_metric.integrations.trl`` logger.
    """

    def __init__(
        self,
        model: Scorer | str | os.PathLike[str] = "specs-b32",
        *,
        image_column: str = "image",
        scale: str = "specs",
        device: str | None = None,
        precision: str | None = None,
        long_captions: str = "truncate",
        name: str = "specs",
        image_root: str | os.PathLike[str] | None = None,
        image_batch: int | None = None,
        token_budget: int | None = None,
    ) -> None:
        scorer = (
            model
            if isinstance(model, Scorer)
            else load(model, device=device, precision=precision or "fp32",
                      long_captions=long_captions)  # fmt: skip
        )
        self.image_column = image_column
        self.__name__ = name
        self.pairs = PairScorer(
            scorer, scale, image_root=image_root, image_batch=image_batch,
            token_budget=token_budget,
        )  # fmt: skip
        self.log_reasons = ReasonLog(logger)

    @property
    def scorer(self) -> Scorer:
        return self.pairs.scorer

    def __repr__(self) -> str:
        return (
            f"SPECSReward(model={self.scorer.name!r}, image_column={self.image_column!r}, "
            f"scale={self.pairs.scale!r})"
        )

    def rewards(
        self, images: list[object], captions: list[str]
    ) -> tuple[list[float | None], list[str | None]]:
        labels = [f"completion {i + 1}" for i in range(len(captions))]
        result = self.pairs.score(images, captions, labels)
        return result.scores, result.errors
