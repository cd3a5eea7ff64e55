"""Full fp32 on CUDA: exact mode must not run its matmuls or convolutions in TF32.

PyTorch runs fp32 convolutions on CUDA in TF32 by default (and matmuls too where a user or
another library enabled it): inputs rounded to 10 mantissa bits, far from the 1e-5 that
exact mode promises. Exact mode switches TF32 off around its forward passes and restores
the process's settings afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _new_flags() -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision")


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 on CUDA (no TF32) inside the block.

    Uses the ``fp32_precision`` flags where this torch has them, else the legacy
    ``allow_tf32`` flags (once a new flag is set, PyTorch refuses to read the legacy ones).
    """
    matmul = torch.backends.cuda.matmul
    if _new_flags():
        conv = torch.backends.cudnn.conv
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:
        saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_flags() -> dict[str, object]:
    """The TF32 settings of this process (the ``fp32_precision`` flags where they exist)."""
    matmul = torch.backends.cuda.matmul
    if _new_flags():
        return {
            "cuda.matmul.fp32_precision": matmul.fp32_precision,
            "cudnn.conv.fp32_precision": torch.backends.cudnn.conv.fp32_precision,
        }
    return {
        "cuda.matmul.allow_tf32": matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }
