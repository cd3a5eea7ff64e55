"""torchrun support: process-group setup from the environment, row sharding, and the
differentiable all-gather of the training loss (:func:`gather_with_grad`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str | torch.device | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun.

    Uses nccl when the job runs on CUDA and gloo otherwise. Without ``WORLD_SIZE > 1`` in
    the environment this does nothing and returns rank 0 of 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or "cuda" in str(device))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank, backend)


def local_device(info: DistInfo, device: str | torch.device | None) -> torch.device | None:
    """The device of this rank: ``cuda:<local_rank>`` for CUDA jobs, else ``device``."""
    if info.enabled and info.backend == "nccl":
        return torch.device("cuda", info.local_rank)
    return torch.device(device) if device is not None else None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def is_initialized() -> bool:
    """Whether this process is in a default process group."""
    return dist.is_available() and dist.is_initialized()


def shutdown(*, wait: bool = True) -> None:
    """Leave the default process group, if one was started.

    A rank that reaches interpreter exit with its gloo group still open can abort while the
    group's threads are torn down (``terminate called without an active exception``), so
    every rank first waits for the others (``wait=True``, after success) and then destroys
    the group. After an error the ranks may stand in different collectives, so the group is
    destroyed without waiting.
    """
    if not is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int, align: int = 1) -> range:
    """Contiguous block of ``range(n)`` for ``rank``.

    Blocks start at multiples of ``align`` (the last one ends at ``n``) and hold numbers of
    ``align``-sized units that differ by at most one; ``align=1`` splits rows evenly.

    Example:
        >>> [list(shard_range(5, r, 2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
        >>> [list(shard_range(10, r, 2, align=4)) for r in range(2)]
        [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    """
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    units = -(-n // align)
    base, extra = divmod(units, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return range(min(start * align, n), min(stop * align, n))


def all_ranks_agree(info: DistInfo, ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (a collective: every rank must call it)."""
    if not info.enabled:
        return ok
    device = torch.device("cuda", info.local_rank) if info.backend == "nccl" else None
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate a tensor over ranks (sizes may differ); the gradient flows back to each
    rank's own rows, summed over the identical loss every rank computes."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        longest = max(counts)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        rank = dist.get_rank()
        ctx.offset, ctx.count = sum(counts[:rank]), counts[rank]
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.offset : ctx.offset + ctx.count]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of ``tensor`` (in rank order), differentiable w.r.t. the local ones."""
    return _GatherWithGrad.apply(tensor)
