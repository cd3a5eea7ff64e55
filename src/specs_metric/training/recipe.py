"""What a training run is asked to do: :class:`TrainConfig` (its defaults are the released
SPECS recipe) and the learning-rate schedule (:func:`lr_factor`).

Learning rate of optimizer update ``k`` (1-based): ``lr * (k + 1) / warmup`` for
``k < warmup``, else ``lr * (1 + cos(pi * (k - warmup) / (total - warmup))) / 2``, as the
reference's rank 0 applies it. The trainer (:mod:`specs_metric.training.trainer`) and the
demo pre-training (:mod:`specs_metric.demo.grounding`) both follow it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from specs_metric.errors import TrainError
from specs_metric.runtime.policy import TRAINING_AUTOCAST

OBJECTIVES = ("specs", "clip")
PRECISIONS = TRAINING_AUTOCAST  # training autocast, not the scorer's inference precision



@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the released SPECS recipe.

    Attributes:
        init: initial checkpoint: LongCLIP or OpenAI CLIP (stretched to 248 positions),
            a file path, registry name, ``hf:`` spec or HF ``save_pretrained`` folder.
        data: prepared training set (parquet file or ``datasets`` directory).
        output: output directory (log, config, checkpoints).
        objective: ``specs`` (the specificity objective) or ``clip`` (symmetric CLIP
            contrastive loss on image/full caption, for pre-training).
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: optimizer updates to run (and the length of the cosine schedule).
        batch_size: micro-batch size per process.
        grad_accum: micro-batches per optimizer update.
        lr, weight_decay, warmup_steps: AdamW and schedule.
        lambda_contrast, lambda_detail, lambda_neg: loss weights (``lambda_detail =
            lambda_neg = 0`` gives contrastive-only fine-tuning).
        margin: fixed hinge margin; 0 = adaptive (released).
        save_every: checkpoint every N updates (and always at the end); 0 = only at the end.
        precision: ``auto`` (fp16 autocast + gradient scaling on CUDA, fp32 on CPU),
            ``fp32``, ``fp16`` (CUDA only) or ``bf16`` (autocast, CPU or CUDA).
        seed: seed of shuffling, the per-row index draw and the RNGs.
        resume: checkpoint directory to resume from, or ``latest`` (newest in ``output``).
        image_root: directory relative image paths are joined to.
        workers: DataLoader worker processes decoding images.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: CUDA when available).
        gather: gather embeddings across processes (global-batch loss).
        freeze_positional: freeze ``positional_embedding``; None = only for CLIP inits.
        deterministic: ``torch.use_deterministic_algorithms(True)``.
        progress: show a progress bar (rank 0).
        tensorboard: also log to TensorBoard when it is installed.
        arch: architecture name or JSON for an ``init`` file that is not the OpenAI
            convention (see ``specs models --archs``).
    """

    init: str
    data: str
    output: str
    objective: str = "specs"
    epochs: int = 6
    max_steps: int | None = None
    batch_size: int = 100
    grad_accum: int = 4
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 40
    lambda_contrast: float = 1.0
    lambda_detail: float = 8.0
    lambda_neg: float = 0.8
    margin: float = 0.0
    save_every: int = 1000
    precision: str = "auto"
    seed: int = 42
    resume: str | None = None
    image_root: str | None = None
    workers: int = 4
    device: str | None = None
    gather: bool = True
    freeze_positional: bool | None = None
    deterministic: bool = False
    progress: bool = True
    tensorboard: bool = True
    arch: str | None = None

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise TrainError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is None and self.epochs < 1:
            raise TrainError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.margin < 0:
            raise TrainError(f"margin must be >= 0 (0 = adaptive), got {self.margin}")
        if min(self.warmup_steps, self.save_every, self.workers) < 0:
            raise TrainError("warmup_steps, save_every and workers must be >= 0")


def lr_factor(update: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimizer update ``update`` (1-based); see module doc.

    Example:
        >>> [round(lr_factor(k, 2, 4), 3) for k in (1, 2, 3, 4)]
        [1.0, 1.0, 0.5, 0.0]
    """
    if update < warmup:
        return (update + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (update - warmup) / span))
