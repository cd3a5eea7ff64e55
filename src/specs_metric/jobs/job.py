"""The streaming scoring job behind ``specs score``.

Rows are read lazily and processed in chunks. Background DataLoader workers decode images
and tokenize captions for upcoming chunks while the main process runs the model. Each
distinct image (by content hash) is encoded once per run; with a cache directory, once per
checkpoint across runs. Results are appended to a part file and flushed after every chunk,
so a crash loses at most one chunk and ``resume=True`` continues where it stopped. Under
torchrun every rank scores a contiguous block of rows into its own part file and rank 0
concatenates them in input order.

The output is a function of the input and the settings alone, so that a resumed or
torchrun job writes the same bytes as one uninterrupted process (with the same number of
threads, which changes the rounding of matrix products):

- chunks start at absolute multiples of ``chunk_rows`` (ranks get whole chunks, and a
  resumed part file is cut back to its last whole chunk), so text batches, formed per chunk,
  never depend on where a run started;
- with ``batch_size=1`` (the CPU default) each image is encoded alone: on CPU an embedding
  changes in its last bits with its batch mates and its place in the batch, and the images
  that meet in a batch depend on what an earlier run or the cache already encoded.

Settings left at ``None`` follow the device (:func:`specs_metric.runtime.policy.device_policy`):
:meth:`JobConfig.for_device` fills them in before anything runs, and the resume identity
records the values used, so the CPU defaults (those the job always had) resume outputs made
with the same values given explicitly.

Preparation overlaps with the model: with ``num_workers >= 1`` the DataLoader keeps up to
``workers x prefetch_chunks`` chunks being prepared or ready (worker ``w`` prepares every
``w``-th chunk), so while the main process runs the model on one chunk the workers tokenize
and decode the next ones. On CUDA the kernels of a chunk are queued asynchronously (inputs
from pinned memory, non-blocking copies) and the text embeddings come back in one copy per
chunk. A worker sends its chunk's pixels as one stacked tensor (one shared-memory block per
chunk, not one per image).

The chunks are prepared in :mod:`specs_metric.jobs.chunks`, the result files (part files, resume
points, the final output) are in :mod:`specs_metric.jobs.results`, the image embeddings (by
content hash, over the disk cache) in :class:`~specs_metric.scoring.image_embeddings.ImageEncoder`.
What stays here is the pipeline that joins them: configuring, scoring chunks in order,
locking and resuming a run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from specs_metric.data.rows import SourceOptions
from specs_metric.data.sources import count_rows, input_identity, protect_inputs, read_rows
from specs_metric.errors import InterruptedJobError, JobError
from specs_metric.io.jsonio import write_json
from specs_metric.io.locking import OutputLock
from specs_metric.io.writing import check_not_input, create_empty, open_append
from specs_metric.jobs.chunks import Chunk, ChunkStream, pack_chunk, unpack_chunk
from specs_metric.jobs.outputs import output_format
from specs_metric.jobs.results import (
    check_resumable,
    job_path,
    job_summary,
    json_line,
    part_path,
    read_job_record,
    resume_point,
    write_final,
)
from specs_metric.runtime.distributed import DistInfo, all_ranks_agree, barrier, shard_range
from specs_metric.runtime.policy import device_policy
from specs_metric.runtime.workers import die_with_parent
from specs_metric.scoring.cache import EmbeddingCache, model_fingerprint
from specs_metric.scoring.image_embeddings import DEFAULT_MEMORY_CACHE_SIZE, ImageEncoder
from specs_metric.scoring.prepare import RowPreparer
from specs_metric.scoring.scales import apply_scale, check_scale, cosine_similarity
from specs_metric.scoring.scorer import Scorer


@dataclass
class JobConfig:
    """Settings of one scoring job (the ``specs score`` flags).

    ``None`` in the batching fields means "by device": :meth:`for_device` takes the value
    of :func:`~specs_metric.runtime.policy.device_policy` (on a CPU: image batch 1, token budget
    2048, 512 text rows, 512-row chunks, one worker).
    """

    input: Path | str  # a file, or a spec of shards/tables/URLs (see specs_metric.data.sources)
    output: Path
    image_root: Path | None = None
    source: SourceOptions = field(default_factory=SourceOptions)  # columns, caption key...
    scale: str = "specs"
    batch_size: int | None = None  # images per forward pass; 1 keeps them batch-independent
    token_budget: int | None = None  # rows x trimmed length per text batch
    max_text_rows: int | None = None  # most captions per text batch
    chunk_rows: int | None = None  # rows prepared and written together
    num_workers: int | None = None  # preparation worker processes
    fixed_shape_images: bool | None = None  # pad image batches to batch_size rows
    cache_dir: Path | None = None
    resume: bool = False
    memory_cache_size: int = DEFAULT_MEMORY_CACHE_SIZE  # image embeddings kept in memory (LRU)
    show_progress: bool = True

    def for_device(self, device: str | torch.device) -> JobConfig:
        """This config with every "by device" (``None``) setting taken from the device's
        policy; settings already given stay."""
        policy = device_policy(device)
        given = {
            "batch_size": (self.batch_size, policy.image_batch),
            "token_budget": (self.token_budget, policy.token_budget),
            "max_text_rows": (self.max_text_rows, policy.max_text_rows),
            "chunk_rows": (self.chunk_rows, policy.chunk_rows),
            "num_workers": (self.num_workers, policy.workers),
            "fixed_shape_images": (self.fixed_shape_images, policy.fixed_shape_images),
        }
        return replace(
            self, **{k: default if v is None else v for k, (v, default) in given.items()}
        )


def _warn(message: str) -> None:
    print(f"specs score: warning: {message}", file=sys.stderr)


def job_identity(config: JobConfig, scorer: Scorer, world_size: int) -> dict:
    """What a partial output must have been made with to be resumed: the input and every
    setting that changes a score, down to its last bits."""
    identity = {
        **input_identity(config.input, config.source),
        "image_root": str(config.image_root) if config.image_root else None,
        "checkpoint_sha256": scorer.checkpoint_sha256,
        "scale": config.scale,
        "precision": scorer.precision,
        "numerics": scorer.numerics,
        "long_captions": scorer.long_captions,
        "world_size": world_size,
        # these decide how rows meet in batches, and so the last bits of the scores
        "chunk_rows": config.chunk_rows,
        "batch_size": config.batch_size,
        "token_budget": config.token_budget,
        "max_text_rows": config.max_text_rows,
        "threads": torch.get_num_threads(),
    }
    if config.fixed_shape_images:  # absent otherwise: older partial outputs resume
        identity["fixed_shape_images"] = True
    pipeline = scorer.pipeline_fingerprint
    if pipeline != str(scorer.resolution):  # absent otherwise: older partial outputs resume
        identity["pipeline"] = pipeline
    return identity


def _mark_non_finite(chunk: Chunk, cos: np.ndarray) -> int:
    """Turn rows whose cosine is NaN or infinite into row errors; returns how many."""
    bad = 0
    for pos, c in zip(chunk.valid, cos.tolist(), strict=True):
        if not math.isfinite(c):
            rec = chunk.rows[pos]
            rec["score"] = rec["cosine"] = None
            rec["error"] = (
                f"line {rec['line']}: the score is not finite ({c}); the model's weights "
                "or this row's embeddings hold NaN or infinite values"
            )
            bad += 1
    return bad


def _image_embeddings(images: ImageEncoder, chunk: Chunk) -> torch.Tensor:
    """Embeddings of the chunk's valid rows. A row whose image could not be read again
    (see :meth:`ImageEncoder.embed_prepared`) becomes a row error and leaves ``valid``."""
    result = images.embed_prepared(
        chunk.image_hash, chunk.pixels, chunk.cached, chunk.sent_before
    )
    if not result.errors:
        return result.embeddings
    for i, message in result.errors:
        rec = chunk.rows[chunk.valid[i]]
        rec["error"] = f"line {rec['line']}: {message}"
    keep = result.ok.tolist()
    chunk.valid = [v for v, k in zip(chunk.valid, keep, strict=True) if k]
    chunk.tokens = [t for t, k in zip(chunk.tokens, keep, strict=True) if k]
    return result.embeddings[result.ok]


def _disk_cache(config: JobConfig, scorer: Scorer) -> EmbeddingCache | None:
    if config.cache_dir is None:
        return None
    fingerprint = model_fingerprint(
        scorer.checkpoint_sha256,
        scorer.numerics,
        scorer.reference_rounding,
        scorer.pipeline_fingerprint,
    )
    return EmbeddingCache(config.cache_dir, fingerprint, dim=scorer.embed_dim)


def _score_shard(
    config: JobConfig, scorer: Scorer, info: DistInfo, total: int, done: int, part: Path
) -> tuple[int, int]:
    """Score this rank's rows from ``done`` on, appending to ``part``.

    Returns:
        (images encoded, rows whose score was not finite)
    """
    shard = shard_range(total, info.rank, info.world_size, align=config.chunk_rows)
    disk = _disk_cache(config, scorer)
    stream = ChunkStream(
        partial(read_rows, config.input, config.image_root, config.source),
        shard.start + done,
        shard.stop,
        config.chunk_rows,
        RowPreparer(scorer.tokenizer, scorer.context_length, scorer.long_captions),
        scorer.preprocessing,
        disk,
        sent_capacity=config.memory_cache_size // max(1, config.num_workers),
    )
    prefetch = device_policy(scorer.device).prefetch_chunks
    loader = DataLoader(
        stream,
        batch_size=None,
        collate_fn=pack_chunk,
        num_workers=config.num_workers,
        persistent_workers=False,
        # chunks each worker prepares ahead of the model (preparation overlaps compute)
        prefetch_factor=prefetch if config.num_workers else None,
        worker_init_fn=die_with_parent if config.num_workers else None,
    )
    images = ImageEncoder(
        scorer,
        config.batch_size,
        config.memory_cache_size,
        disk,
        fixed_shape=config.fixed_shape_images,
    )
    bar = tqdm(
        total=len(shard),
        initial=done,
        unit="row",
        file=sys.stderr,
        disable=not (config.show_progress and info.is_main),
        desc="scoring",
    )
    non_finite = 0
    with _dead_worker_is_one_line(part), open_append(part) as out:
        for chunk in map(unpack_chunk, loader):
            img = _image_embeddings(images, chunk) if chunk.valid else None
            if chunk.valid:
                txt = scorer.embed_token_ids(
                    chunk.tokens, config.token_budget, config.max_text_rows
                )
                cos = cosine_similarity(img, txt)
                scores = apply_scale(cos, config.scale)
                for pos, c, sc in zip(chunk.valid, cos.tolist(), scores.tolist(), strict=True):
                    chunk.rows[pos]["cosine"] = c
                    chunk.rows[pos]["score"] = sc
                non_finite += _mark_non_finite(chunk, cos)
            out.write("".join(json_line(rec) for rec in chunk.rows))
            out.flush()
            bar.update(len(chunk.rows))
    bar.close()
    return images.encoded, non_finite


@contextmanager
def _dead_worker_is_one_line(part: Path) -> Iterator[None]:
    """A decoding worker that died (killed by the kernel's out-of-memory killer, or any
    signal) ends the job with one line, its rows so far kept for ``--resume``. torch reports
    the death from its SIGCHLD handler, wherever the main process is at that moment."""
    try:
        yield
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
        raise InterruptedJobError(
            f"a decoding worker died ({' '.join(str(exc).split())}): most likely the machine "
            "ran out of memory (large images with many --workers; try fewer); the rows "
            f"scored so far are kept in {part}"
        ) from None


def _lock_output(config: JobConfig, info: DistInfo) -> OutputLock | None:
    """Rank 0 locks the output for the whole job; every rank learns whether it could."""
    lock = OutputLock(config.output) if info.is_main else None
    error: ValueError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except ValueError as exc:
            error = exc
    if not all_ranks_agree(info, error is None):
        if lock is not None:
            lock.release()
        raise error or JobError(f"another job is writing {config.output} (rank 0 was refused)")
    return lock


def run_job(config: JobConfig, scorer: Scorer, dist_info: DistInfo | None = None) -> dict:
    """Score every row of ``config.input`` into ``config.output``.

    Raises:
        JobError: another job holds the output's lock, or the output would not hold one
            row per input row.

    Returns:
        The summary (also written to ``<output>.summary.json`` by rank 0).
    """
    check_scale(config.scale)
    output_format(config.output)  # before any work: the format follows the extension
    config = config.for_device(scorer.device)
    if config.chunk_rows < 1 or config.batch_size < 1:
        raise JobError(
            f"chunk_rows and batch_size must be >= 1, got {config.chunk_rows} and "
            f"{config.batch_size}"
        )
    info = dist_info or DistInfo()
    started = time.perf_counter()
    config.output.parent.mkdir(parents=True, exist_ok=True)
    protect_inputs(config.input)
    check_not_input(config.output, "--output")
    lock = _lock_output(config, info)
    try:
        return _run_locked(config, scorer, info, started)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(config: JobConfig, scorer: Scorer, info: DistInfo, started: float) -> dict:
    identity = job_identity(config, scorer, info.world_size)
    job_file = job_path(config.output)
    my_part = part_path(config.output, info.rank, info.world_size)
    previous = read_job_record(job_file) if config.resume else None
    if previous is not None:
        check_resumable(previous, identity, config.output)
    finished = (
        config.resume
        and previous is not None
        and previous.get("complete", False)
        and config.output.exists()
    )
    encoded = non_finite = 0
    if not finished:
        barrier(info)
        if info.is_main:
            write_json(job_file, {**identity, "complete": False}, indent=1)
        total = count_rows(config.input, config.image_root, config.source)
        shard = shard_range(total, info.rank, info.world_size, align=config.chunk_rows)
        if config.resume:
            done = resume_point(my_part, config.chunk_rows, len(shard))
        else:
            done = 0
            create_empty(my_part)
        encoded, non_finite = _score_shard(config, scorer, info, total, done, my_part)
        barrier(info)
        if info.is_main:
            write_final(config.output, info.world_size, total)
            write_json(job_file, {**identity, "complete": True}, indent=1)
    summary = {}
    if info.is_main:
        if non_finite:
            _warn(
                f"{non_finite} row(s) got a non-finite score (NaN or infinite weights or "
                "embeddings); they are row errors with a null score"
            )
        run = {
            **scorer.summary_fields(),
            "engine": "local",
            "world_size": info.world_size,
            "images_encoded_rank0": encoded,
            "seconds": round(time.perf_counter() - started, 3),
            "output": str(config.output),
        }
        summary = job_summary(config.output, config.scale, run, _warn)
    barrier(info)
    return summary
