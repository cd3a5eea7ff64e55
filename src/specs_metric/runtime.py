"""Where and in which precision models run: one vocabulary for every command.

Two precision settings exist and are named apart:

- **inference precision** (:data:`INFERENCE_PRECISIONS`, ``--precision`` of the scoring and
  benchmark commands): the dtype a :class:`~specs_metric.scorer.Scorer` keeps its matmul
  weights and activations in. ``fp32`` is the exact reference numerics;
- **training autocast** (:data:`TRAINING_AUTOCAST`, ``specs train --precision``): the
  ``torch.autocast`` dtype of the training step, with ``auto`` = fp16 on CUDA (with
  gradient scaling), fp32 on CPU. Weights stay fp32.

This module imports torch only inside its functions, so that command-line parsers can
use its names without loading torch.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")
TRAINING_AUTOCAST = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> CUDA when available, else CPU; anything else as given.

    Example:
        >>> str(resolve_device("cpu"))
        'cpu'
    """
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_training_autocast(precision: str, device: torch.device) -> str:
    """The autocast dtype name a training step uses: ``auto`` -> fp16 on CUDA, else fp32.

    Raises:
        ValueError: an unknown name, or fp16 on a non-CUDA device.
    """
    if precision not in TRAINING_AUTOCAST:
        raise ValueError(f"precision must be one of {TRAINING_AUTOCAST}, got {precision!r}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return precision


def process_group_open() -> bool:
    """Whether a default torch process group is initialised (False while torch is not even
    imported, without importing it)."""
    if "torch.distributed" not in sys.modules:
        return False
    from specs_metric.distributed import is_initialized

    return is_initialized()


def leave_process_group(*, wait: bool) -> None:
    """:func:`specs_metric.distributed.shutdown`, when a group was opened."""
    if process_group_open():
        from specs_metric.distributed import shutdown

        shutdown(wait=wait)
