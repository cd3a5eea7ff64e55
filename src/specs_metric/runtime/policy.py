"""Where and in which precision models run: one vocabulary for every command.

Two precision settings exist and are named apart:

- **inference precision** (:data:`INFERENCE_PRECISIONS`, ``--precision`` of the scoring and
  benchmark commands): the dtype a :class:`~specs_metric.scoring.scorer.Scorer` keeps its matmul
  weights and activations in. ``fp32`` is the exact reference numerics;
- **training autocast** (:data:`TRAINING_AUTOCAST`, ``specs train --precision``): the
  ``torch.autocast`` dtype of the training step, with ``auto`` = fp16 on CUDA (with
  gradient scaling), fp32 on CPU. Weights stay fp32.

It also holds the **device batch policy** (:func:`device_policy`): how ``specs score``
batches and feeds a device when its options are left at "by device". On a CPU the batches
stay small enough for the caches and each image is encoded alone (byte-identical resume);
on CUDA batches are large, preparation spreads over the host's cores, host tensors are
pinned for asynchronous copies and image batches are padded to one fixed shape.

This module imports torch only inside its functions, so that command-line parsers can
use its names without loading torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from specs_metric.errors import UsageError
from specs_metric.limits import WORKER_MEMORY_BYTES

if TYPE_CHECKING:
    import torch

INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")
TRAINING_AUTOCAST = ("auto", "fp32", "fp16", "bf16")

# Rows x trimmed length per text batch on a CPU. Small batches stay in the CPU caches: on 2
# cores (B/32 shapes) 2048 ran about 2x faster than 16384 in fp32.
DEFAULT_TOKEN_BUDGET = 2048
# CUDA: a text batch of 256 full-length (248-token) captions; B/32 activations of such a
# batch are a few hundred MB in fp16, small for a data-centre GPU, and large enough that
# kernel launches and Python per batch stop mattering.
CUDA_TOKEN_BUDGET = 65536
CUDA_MAX_WORKERS = 16  # preparation workers on CUDA: beyond this the main process is the limit


@dataclass(frozen=True)
class DevicePolicy:
    """How a scoring job batches and feeds one device (the "by device" defaults).

    Attributes:
        image_batch: images per forward pass of the image tower.
        token_budget: rows x trimmed length per text batch.
        max_text_rows: most captions per text batch.
        chunk_rows: rows prepared, scored and written together (text batches are formed
            per chunk, so this bounds them too).
        workers: preparation (tokenizing, decoding) worker processes.
        prefetch_chunks: chunks each worker prepares ahead of the model.
        pin_memory: copy host tensors to the device from pinned memory, asynchronously.
        fixed_shape_images: pad every image batch to ``image_batch`` rows, so the device
            runs one shape (and each row's kernels do not depend on the batch's size).
    """

    image_batch: int
    token_budget: int
    max_text_rows: int
    chunk_rows: int
    workers: int
    prefetch_chunks: int = 2
    pin_memory: bool = False
    fixed_shape_images: bool = False


CPU_POLICY = DevicePolicy(
    image_batch=1,  # each embedding independent of its batch mates: byte-identical resume
    token_budget=DEFAULT_TOKEN_BUDGET,
    max_text_rows=512,
    chunk_rows=512,
    workers=1,
)


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask where known), shared among the
    torchrun ranks of this host (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, cores // ranks)


def memory_bytes() -> int | None:
    """Physical memory of this machine, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_policy(
    device: str | torch.device, cpus: int | None = None, memory: int | None = None
) -> DevicePolicy:
    """The batch policy for a resolved device (see :class:`DevicePolicy`).

    ``cpu`` (and any other non-CUDA device) -> :data:`CPU_POLICY`, the defaults the
    scoring job always had. ``cuda`` -> 256-image and 65,536-token batches in chunks of
    2,048 rows, one preparation worker per core but one (the main process feeds the GPU),
    at most :data:`CUDA_MAX_WORKERS` and at most one per
    :data:`~specs_metric.limits.WORKER_MEMORY_BYTES` of the machine's memory (less one for
    the main process: a worker decoding the largest image PIL accepts holds about that
    much), pinned memory and fixed-shape image batches. ``cpus`` defaults to
    :func:`available_cpus`, ``memory`` to :func:`memory_bytes`.

    Example:
        >>> device_policy("cpu").image_batch
        1
        >>> device_policy("cuda", cpus=16).workers
        15
        >>> device_policy("cuda", cpus=16, memory=8 * WORKER_MEMORY_BYTES).workers
        7
    """
    if _device_type(device) != "cuda":
        return CPU_POLICY
    cpus = available_cpus() if cpus is None else max(1, cpus)
    memory = memory_bytes() if memory is None else memory
    by_memory = CUDA_MAX_WORKERS if memory is None else memory // WORKER_MEMORY_BYTES - 1
    return DevicePolicy(
        image_batch=256,
        token_budget=CUDA_TOKEN_BUDGET,
        max_text_rows=2048,
        chunk_rows=2048,
        workers=max(1, min(cpus - 1, CUDA_MAX_WORKERS, by_memory)),
        prefetch_chunks=2,
        pin_memory=True,
        fixed_shape_images=True,
    )


def _device_type(device: str | torch.device) -> str:
    """``"cuda"`` for ``cuda``, ``cuda:1`` or a torch CUDA device, without importing torch."""
    return str(device).split(":", 1)[0]


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
        UsageError: an unknown name, or fp16 on a non-CUDA device.
    """
    if precision not in TRAINING_AUTOCAST:
        raise UsageError(f"precision must be one of {TRAINING_AUTOCAST}, got {precision!r}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return precision


def process_group_open() -> bool:
    """Whether a default torch process group is initialised (False while torch is not even
    imported, without importing it)."""
    if "torch.distributed" not in sys.modules:
        return False
    from specs_metric.runtime.distributed import is_initialized

    return is_initialized()


def leave_process_group(*, wait: bool) -> None:
    """:func:`specs_metric.runtime.distributed.shutdown`, when a group was opened."""
    if process_group_open():
        from specs_metric.runtime.distributed import shutdown

        shutdown(wait=wait)
