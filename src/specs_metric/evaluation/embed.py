"""Embedding whole data sets for the extrinsic benchmarks, sharded over torchrun ranks.

Every rank embeds a contiguous block of the images (or texts) given by
:func:`~specs_metric.runtime.distributed.shard_range`; the blocks are then gathered so that every
rank holds all embeddings in input order (only rank 0 uses them). Without torchrun the
single process embeds everything. Images are read, hashed and decoded by DataLoader
workers while the model runs, and encoded by the image encoder
(:class:`~specs_metric.scoring.image_embeddings.ImageEncoder`: each distinct content once); texts go
through the scorer's length-sorted, padding-trimmed batches, so the embeddings equal those
of :meth:`Scorer.embed_images` and :meth:`Scorer.embed_texts`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from specs_metric.data.images import ImageSource
from specs_metric.errors import DataError, ImageError, SpecsError
from specs_metric.processing.preprocess import PreprocessConfig
from specs_metric.runtime.distributed import DistInfo, shard_range
from specs_metric.runtime.policy import device_policy
from specs_metric.scoring.image_embeddings import ImageEmbeddings, ImageEncoder, prepare_image
from specs_metric.scoring.scorer import Scorer


class _Images(Dataset):
    """Content hashes and pixels of one shard's images; a failure is returned, not raised."""

    def __init__(
        self, images: Sequence[ImageSource], offset: int, resolution: int | PreprocessConfig
    ) -> None:
        self.images, self.offset, self.resolution = images, offset, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, str | None, torch.Tensor | None, str | None]:
        try:
            key, pixels = prepare_image(self.images[i], self.resolution)
        except ImageError as exc:
            return i + self.offset, None, None, str(exc)
        return i + self.offset, key, pixels, None


def _collate(items: list) -> list:
    return items


def gather_rows(local: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's block of rows (blocks from :func:`shard_range`) in rank order.

    Returns the full (total, ...) tensor on CPU on every rank. nccl needs CUDA tensors, so
    the blocks travel through the rank's GPU there; gloo gathers CPU tensors.
    """
    if not info.enabled:
        return local
    sizes = [len(shard_range(total, r, info.world_size)) for r in range(info.world_size)]
    on_gpu = info.backend == "nccl"
    device = torch.device("cuda", info.local_rank) if on_gpu else torch.device("cpu")
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, sizes, strict=True)])


def _gather_objects(obj: list, info: DistInfo) -> list:
    if not info.enabled:
        return obj
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return [item for part in out for item in part]


_DECODE_GROUP = 64  # images a decoding worker hands over together


def embed_images(
    scorer: Scorer,
    images: Sequence[ImageSource],
    info: DistInfo | None = None,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    show_progress: bool = False,
    skip_bad_images: bool = True,
) -> ImageEmbeddings:
    """Raw embeddings of ``images`` (paths, encoded bytes or PIL images), sharded over ranks.

    Each distinct image (by content) of a rank is encoded once. Images that cannot be
    decoded get a zero row and are listed in ``errors``; nothing is
    raised before the errors of all ranks are gathered, so no rank is left waiting in a
    collective call while another one has failed.

    Args:
        scorer: the model.
        images: the images, in order.
        info: the torchrun position (default: a single process).
        batch_size: images per forward pass (None: by device, as ``specs score``: 1 on a
            CPU, 256 on CUDA); images are decoded in groups of at least 64.
        num_workers: DataLoader processes decoding images (0: decode in this process).
        show_progress: show a progress bar on rank 0.
        skip_bad_images: keep going past undecodable images (the caller decides what to
            do with them); False raises :func:`bad_image_error` on every rank instead.
    """
    info = info or DistInfo()
    batch_size = batch_size or device_policy(scorer.device).image_batch
    shard = shard_range(len(images), info.rank, info.world_size)
    local = torch.zeros(len(shard), scorer.embed_dim)
    local_ok = torch.zeros(len(shard), dtype=torch.uint8)
    errors: list[tuple[int, str]] = []
    loader = DataLoader(
        _Images(images[shard.start : shard.stop], shard.start, scorer.preprocessing),
        batch_size=max(batch_size, _DECODE_GROUP),
        num_workers=num_workers,
        collate_fn=_collate,
    )
    bar = tqdm(
        total=len(shard),
        unit="img",
        desc="images",
        file=sys.stderr,
        disable=not (show_progress and info.is_main),
    )
    encoder = ImageEncoder(scorer, batch_size)
    for items in loader:
        good = [(index, key, pixels) for index, key, pixels, _ in items if key is not None]
        errors.extend((index, msg) for index, key, _, msg in items if key is None)
        if good:
            rows = torch.tensor([index - shard.start for index, _, _ in good])
            pixels = {key: p for _, key, p in good}
            local[rows] = encoder.embed_prepared([key for _, key, _ in good], pixels).embeddings
            local_ok[rows] = 1
        bar.update(len(items))
    bar.close()
    result = ImageEmbeddings(
        embeddings=gather_rows(local, len(images), info),
        ok=gather_rows(local_ok, len(images), info).bool(),
        errors=sorted(_gather_objects(errors, info)),
    )
    if result.errors and not skip_bad_images:
        raise bad_image_error(result.errors, len(images))
    return result


def embed_texts(scorer: Scorer, texts: Sequence[str], info: DistInfo | None = None) -> torch.Tensor:
    """Raw embeddings (N, D) of ``texts`` (length-sorted, trimmed batches), sharded over ranks.

    Captions longer than the context follow the scorer's ``long_captions`` policy
    (``truncate``: keep the first tokens and end with EOT; ``error``: raise).
    """
    info = info or DistInfo()
    shard = shard_range(len(texts), info.rank, info.world_size)
    mine = list(texts[shard.start : shard.stop])
    local = torch.zeros(len(mine), scorer.embed_dim)
    failure: list[tuple[str, bool]] = []
    try:
        if mine:
            local = scorer.embed_texts(mine)
    except Exception as exc:  # e.g. a caption over the context with long_captions="error"
        if not info.enabled:
            raise
        failure.append((f"rank {info.rank}: {exc}", isinstance(exc, SpecsError)))
    # Every rank learns about a failure anywhere before the gather, so none waits forever.
    failures = _gather_objects(failure, info)
    if failures:
        message = "; ".join(text for text, _ in failures)
        # The user's problem (SpecsError) on every failing rank is one; else a bug.
        raise (DataError if all(user for _, user in failures) else RuntimeError)(message)
    return gather_rows(local, len(texts), info)


def bad_image_error(errors: list[tuple[int, str]], total: int) -> ImageError:
    """One error for the images that failed, naming the first few."""
    shown = "; ".join(msg for _, msg in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ImageError(
        f"{len(errors)} of {total} images cannot be read: {shown}{more}. "
        "Use --skip-bad-images to leave them out."
    )
