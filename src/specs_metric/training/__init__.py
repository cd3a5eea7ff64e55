"""Training SPECS: data preparation, the specificity objective and the trainer.

- :mod:`~specs_metric.processing.segmentation`: cutting captions into detail segments.
- :mod:`~specs_metric.training.examples`: reading the input rows of ``specs prepare``.
- :mod:`~specs_metric.training.prepare`: building cumulative captions and negatives.
- :mod:`~specs_metric.training.loss`: :class:`SpecificityLoss` (docs/training.md, "Objective"),
  the CLIP loss and the grounding loss of the demo pre-training.
- :mod:`~specs_metric.training.data`: the training dataset, decoded in DataLoader workers.
- :mod:`~specs_metric.training.recipe`: :class:`TrainConfig` and the learning-rate schedule.
- :mod:`~specs_metric.training.trainer`: :func:`train` for a :class:`TrainConfig`.

The trainer is imported lazily so that ``specs prepare`` does not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from specs_metric.training.loss import LossOutput, SpecificityLoss, clip_loss, grounding_loss

if TYPE_CHECKING:
    from specs_metric.training.trainer import TrainConfig, TrainResult, train

__all__ = [
    "LossOutput",
    "SpecificityLoss",
    "TrainConfig",
    "TrainResult",
    "clip_loss",
    "grounding_loss",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig", "TrainResult", "train"):
        from specs_metric.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'specs_metric.training' has no attribute {name!r}")
