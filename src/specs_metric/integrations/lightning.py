"""SPECS as a ``torchmetrics.Metric`` for Lightning (``pip install 'specs-metric[lightning]'``).

The core :class:`~specs_metric.scoring.metric.SPECSScore` follows the torchmetrics protocol
without depending on torchmetrics, so Lightning's ``self.log`` does not take it.
:class:`SPECSMetric` is the same metric as a real ``torchmetrics.Metric``, built on the
same :func:`~specs_metric.scoring.metric.specs_score`::

    self.val_specs = SPECSMetric("specs-b32")
    ...
    def validation_step(self, batch, batch_idx):
        images = batch["images"]
        self.val_specs.update(images, self.generate_captions(images))
        self.log("val/specs", self.val_specs, on_epoch=True, batch_size=len(images))

Its state is a sum and a count (``dist_reduce_fx="sum"``), so under DDP the value at the
end of an epoch is the mean over every pair scored on every rank. The scorer is a plain
attribute, not a sub-module: its weights stay out of the LightningModule's parameters, the
optimizer, the DDP wrapper and checkpoints.

**Mind the padding of the distributed sampler.** Lightning gives validation loaders a
``DistributedSampler``, which pads the data set to a multiple of the number of ranks by
repeating pairs: with 7 pairs on 2 ranks one pair is scored twice. For the exact mean, build
the validation loader with :func:`unrepeated_sampler` and pass
``Trainer(use_distributed_sampler=False)`` (``examples/lightning_specs.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from specs_metric.data.images import ImageSource
from specs_metric.integrations import require
from specs_metric.scoring.metric import specs_score
from specs_metric.scoring.scales import check_scale, corpus_from_mean
from specs_metric.scoring.scorer import Scorer, load

torchmetrics = require("torchmetrics", "lightning", "SPECSMetric")


class SPECSMetric(torchmetrics.Metric):
    """Mean SPECS (or another scale) over the pairs seen since the last reset, on all ranks.

    Args:
        model: a loaded :class:`~specs_metric.scoring.scorer.Scorer`, or a model name or
            path for :func:`~specs_metric.scoring.scorer.load`.
        scale: ``specs`` (default), ``clip-s``, ``cosine`` or ``torchmetrics`` (the mean
            clamped at 0, as torchmetrics' ``CLIPScore``).
        device, precision: how :func:`load` loads ``model`` (default device: CUDA when
            available).
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ...).

    ``update(images, captions)`` takes preprocessed pixels (N, 3, R, R) or paths, encoded
    bytes or PIL images, like :func:`~specs_metric.scoring.metric.specs_score`; an image
    that cannot be read raises :class:`~specs_metric.errors.ImageError`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        model: Scorer | str | os.PathLike[str] = "specs-b32",
        scale: str = "specs",
        *,
        device: str | None = None,
        precision: str = "fp32",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.scale = check_scale(scale)
        self.scorer = model if isinstance(model, Scorer) else load(model, device, precision)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, images: torch.Tensor | Sequence[ImageSource], captions: Sequence[str]
    ) -> None:
        scores = specs_score(self.scorer, images, list(captions), self.scale)
        self.total += scores.sum().to(self.total.device)
        self.count += len(scores)

    def compute(self) -> torch.Tensor:
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        mean = float(self.total) / int(self.count)
        return torch.tensor(corpus_from_mean(mean, self.scale), dtype=torch.float64)


def unrepeated_sampler(dataset, trainer, shuffle: bool = False):
    """A sampler that gives each rank its share of ``dataset`` without the padding of
    ``DistributedSampler`` (every pair scored exactly once over all ranks). Use it with
    ``Trainer(use_distributed_sampler=False)``, in ``val_dataloader``."""
    require("lightning", "lightning", "unrepeated_sampler")
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=shuffle
    )
