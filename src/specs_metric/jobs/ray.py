"""Scoring with Ray Data: ``specs score --engine ray`` and :func:`score` for a Ray Dataset.

The pipeline has two stages. CPU tasks decode and preprocess the images and tokenize the
captions (``map_batches`` with a function); a pool of actors, each loading the model once,
embeds and scores them (``map_batches`` with a callable class, ``num_gpus`` each). Ray
streams batches from one stage to the next, so decoding runs ahead of the model, and
``preserve_order`` keeps the rows in input order.

The scores are those of :func:`specs_metric.jobs.job.run_job`: the same preprocessing,
tokenization, deduplication of images by content, and text batches formed by length within
each batch of rows. Like the job's chunks, a batch's text batches depend on its rows, so a
score can differ from the single-process one in the last bits (float32 rounding, below
1e-6) where Ray cuts the batches elsewhere.

``specs score --engine ray`` (jobs, part files, resume) is :mod:`specs_metric.jobs.ray_jobs`.

Needs ``pip install 'specs-metric[ray]'``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from specs_metric.data.rows import Row, build_row
from specs_metric.errors import ImageError, UsageError
from specs_metric.processing.preprocess import PreprocessConfig
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.processing.transform import decode_pixels
from specs_metric.runtime.policy import device_policy
from specs_metric.scoring.image_embeddings import (
    DEFAULT_MEMORY_CACHE_SIZE,
    ImageEncoder,
    content_hash,
)
from specs_metric.scoring.prepare import RowPreparer, image_name, row_image_bytes
from specs_metric.scoring.scales import apply_scale, check_scale
from specs_metric.scoring.scorer import DEFAULT_TOKEN_BUDGET

if TYPE_CHECKING:
    import ray.data


_INTERNAL = ("_pixels", "_ids", "_hash")


@dataclass(frozen=True)
class RayOptions:
    """How ``--engine ray`` runs: the model, the cluster, the actors."""

    model: str = "specs-b32"
    address: str | None = None  # None: join RAY_ADDRESS or start a local cluster
    num_gpus_per_worker: float = 0.0
    workers: int = 1  # scoring actors
    precision: str = "fp32"
    reference_rounding: bool = True
    long_captions: str = "truncate"
    device: str | None = None  # actors' device; default cuda with GPUs, else cpu


def require_ray():
    """The ``ray`` module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError("the Ray engine needs Ray: pip install 'specs-metric[ray]'") from exc
    return ray


def load_scorer(options: RayOptions, device: str):
    """The model named by ``options``, loaded on ``device`` (each actor loads its own)."""
    from specs_metric.scoring.scorer import load

    return load(
        options.model,
        device=device,
        precision=options.precision,
        reference_rounding=options.reference_rounding,
        long_captions=options.long_captions,
    )


# --- stage 1: CPU tasks -----------------------------------------------------------------------


def _row_pixels(row: Row, preprocessing: int | PreprocessConfig) -> tuple[bytes, str, str | None]:
    """``(pixels as float32 bytes, content hash, error)`` of a row's image, read and decoded
    as the local job does (bounded reads, size checks before decoding)."""
    try:
        data = row_image_bytes(row)
        pixels = decode_pixels(data, image_name(row), preprocessing).numpy()
    except ImageError as exc:
        return b"", "", str(exc)
    return pixels.astype(np.float32).tobytes(), content_hash(data), None


def prepare_batch(
    table: pa.Table,
    *,
    image_column: str,
    caption_column: str,
    id_column: str,
    image_root: str | None,
    context_length: int,
    resolution: int | PreprocessConfig,
    long_captions: str,
    confine_images: bool = False,
) -> pa.Table:
    """Decode, preprocess and tokenize a batch; adds ``tokens``, ``truncated``, ``error``
    and internal columns, drops the image column. Rows are checked and prepared as every
    other command's (:func:`~specs_metric.data.rows.build_row`,
    :class:`~specs_metric.scoring.prepare.RowPreparer`). A ``label`` column, when present,
    names the rows in messages; an ``error`` column keeps errors found earlier."""
    preparer = RowPreparer(default_tokenizer(), context_length, long_captions)
    root = Path(image_root) if image_root else Path.cwd()
    n = table.num_rows
    names = table.column_names
    images = table[image_column].to_pylist()
    captions = table[caption_column].to_pylist()
    ids = table[id_column].to_pylist() if id_column in names else None
    labels = (
        table["label"].to_pylist()
        if "label" in names
        else [f"id {v!r}" for v in ids]
        if ids is not None
        else [f"row {i}" for i in range(n)]
    )
    errors = table["error"].to_pylist() if "error" in names else [None] * n
    pixels, hashes, token_ids = [b""] * n, [""] * n, [[] for _ in range(n)]
    n_tokens, truncated = [None] * n, [None] * n
    for i in range(n):
        if errors[i] is not None:  # found earlier (e.g. by the reader of --engine ray)
            continue
        fields = {"image": images[i], "caption": captions[i]}
        if ids is not None:
            fields["id"] = ids[i]
        row = build_row(
            i, fields, root, where=labels[i], image_cell=True, confine=confine_images
        )
        rec, row_ids = preparer.prepare(row)
        n_tokens[i], truncated[i], errors[i] = rec["tokens"], rec["truncated"], rec["error"]
        if row_ids is None:
            continue
        pixels[i], hashes[i], problem = _row_pixels(row, resolution)
        if problem:
            errors[i] = f"{labels[i]}: {problem}"
        else:
            token_ids[i] = row_ids
    out = table.drop_columns([c for c in (image_column, "error") if c in names])
    added = {
        "tokens": pa.array(n_tokens, pa.int64()),
        "truncated": pa.array(truncated, pa.bool_()),
        "error": pa.array(errors, pa.string()),
        "_pixels": pa.array(pixels, pa.binary()),
        "_ids": pa.array(token_ids, pa.list_(pa.int32())),
        "_hash": pa.array(hashes, pa.string()),
    }
    for name, column in added.items():
        out = out.append_column(name, column)
    return out


# --- stage 2: actors --------------------------------------------------------------------------


class ScoreActor:
    """Loads the model once; scores prepared batches (adds ``score`` and ``cosine``)."""

    def __init__(
        self,
        options: RayOptions,
        scale: str,
        batch_size: int,
        token_budget: int,
        max_text_rows: int,
        memory_cache_size: int = DEFAULT_MEMORY_CACHE_SIZE,
    ) -> None:

        device = options.device or ("cuda" if options.num_gpus_per_worker > 0 else "cpu")
        self.scorer = load_scorer(options, device)
        self.scale = scale
        self.limits = SimpleNamespace(token_budget=token_budget, max_text_rows=max_text_rows)
        fixed_shape = device_policy(self.scorer.device).fixed_shape_images
        self.images = ImageEncoder(
            self.scorer, batch_size, memory_cache_size, fixed_shape=fixed_shape
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        from specs_metric.scoring.scales import cosine_similarity

        errors = table["error"].to_pylist()
        valid = [i for i, e in enumerate(errors) if e is None]
        score = np.full(table.num_rows, np.nan)
        cosine = np.full(table.num_rows, np.nan)
        if valid:
            raw, hashes = table["_pixels"].to_pylist(), table["_hash"].to_pylist()
            ids = table["_ids"].to_pylist()
            size = self.scorer.resolution  # the crop: pixels are (3, size, size)
            pixels = {
                hashes[i]: torch.from_numpy(
                    np.frombuffer(raw[i], np.float32).reshape(3, size, size).copy()
                )
                for i in valid
            }
            img = self.images.embed_prepared([hashes[i] for i in valid], pixels).embeddings
            txt = self.scorer.embed_token_ids(
                [ids[i] for i in valid], self.limits.token_budget, self.limits.max_text_rows
            )
            cos = cosine_similarity(img, txt)
            cosine[valid] = cos
            score[valid] = apply_scale(cos, self.scale)
        mask = np.isnan(score)
        out = table.drop_columns(list(_INTERNAL))
        out = out.append_column("score", pa.array(score, pa.float64(), mask=mask))
        return out.append_column("cosine", pa.array(cosine, pa.float64(), mask=mask))


def _cpu_task_args() -> dict:
    return {"num_cpus": 1}


def score(
    dataset: ray.data.Dataset,
    model: str = "specs-b32",
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str = "id",
    image_root: str | os.PathLike[str] | None = None,
    scale: str = "specs",
    rows_per_batch: int = 512,
    batch_size: int = 64,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_text_rows: int = 512,
    workers: int = 1,
    num_gpus_per_worker: float = 0.0,
    precision: str = "fp32",
    reference_rounding: bool = True,
    long_captions: str = "truncate",
    device: str | None = None,
) -> ray.data.Dataset:
    """Score a Ray Dataset of (image, caption) rows, lazily.

    The image column holds bytes, a path (relative to ``image_root``, default the working
    folder) or an HF ``{bytes, path}`` struct. Returns the dataset without the image column,
    with ``score``, ``cosine``, ``tokens``, ``truncated`` and ``error`` columns added (a row
    that cannot be scored has a null score and an error). Sets ``preserve_order`` on the
    current Ray Data context so that rows keep their order.

    Args:
        model: name (see ``specs models``) or checkpoint path; each actor loads it once.
        rows_per_batch: rows per ``map_batches`` batch (the job's ``chunk_rows``).
        batch_size: images per forward pass of the image tower.
        workers: scoring actors; ``num_gpus_per_worker`` GPUs each.
    """
    ray = require_ray()
    check_scale(scale)
    options = RayOptions(
        model=model,
        num_gpus_per_worker=num_gpus_per_worker,
        workers=workers,
        precision=precision,
        reference_rounding=reference_rounding,
        long_captions=long_captions,
        device=device,
    )
    probe = load_scorer(options, "cpu")  # context length and resolution for the CPU stage
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    prepared = dataset.map_batches(
        prepare_batch,
        batch_size=rows_per_batch,
        batch_format="pyarrow",
        # Ray would fuse these tasks into the actors when both use CPUs only; a remote-args
        # function keeps them apart, so decoding runs in tasks of their own, ahead.
        ray_remote_args_fn=_cpu_task_args,
        fn_kwargs={
            "image_column": image_column,
            "caption_column": caption_column,
            "id_column": id_column,
            "image_root": os.fspath(image_root) if image_root is not None else None,
            "context_length": probe.context_length,
            "resolution": probe.preprocessing,
            "long_captions": long_captions,
        },
    )
    return prepared.map_batches(
        ScoreActor,
        batch_size=rows_per_batch,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "options": options,
            "scale": scale,
            "batch_size": batch_size,
            "token_budget": token_budget,
            "max_text_rows": max_text_rows,
        },
        concurrency=workers,
        num_gpus=num_gpus_per_worker or None,
    )
