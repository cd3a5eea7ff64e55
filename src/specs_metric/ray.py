"""Scoring with Ray Data: ``specs score --engine ray`` and :func:`score` for a Ray Dataset.

The pipeline has two stages. CPU tasks decode and preprocess the images and tokenize the
captions (``map_batches`` with a function); a pool of actors, each loading the model once,
embeds and scores them (``map_batches`` with a callable class, ``num_gpus`` each). Ray
streams batches from one stage to the next, so decoding runs ahead of the model, and
``preserve_order`` keeps the rows in input order.

The scores are those of :func:`specs_metric.job.run_job`: the same preprocessing,
tokenization, deduplication of images by content, and text batches formed by length within
each batch of rows. Like the job's chunks, a batch's text batches depend on its rows, so a
score can differ from the single-process one in the last bits (float32 rounding, below
1e-6) where Ray cuts the batches elsewhere.

Needs ``pip install 'specs-metric[ray]'``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from specs_metric import results
from specs_metric.config import PreprocessConfig
from specs_metric.image_embeddings import DEFAULT_MEMORY_CACHE_SIZE, ImageEncoder
from specs_metric.jsonio import write_json
from specs_metric.rows import count_rows, read_rows
from specs_metric.runtime import device_policy
from specs_metric.scales import apply_scale, check_scale, corpus_from_mean
from specs_metric.scorer import DEFAULT_TOKEN_BUDGET

if TYPE_CHECKING:
    import ray.data

    from specs_metric.job import JobConfig

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


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ValueError("the Ray engine needs Ray: pip install 'specs-metric[ray]'") from exc
    return ray


def _load(options: RayOptions, device: str):
    from specs_metric.scorer import load

    return load(
        options.model,
        device=device,
        precision=options.precision,
        reference_rounding=options.reference_rounding,
        long_captions=options.long_captions,
    )


# --- stage 1: CPU tasks -----------------------------------------------------------------------


def _caption_error(caption: object) -> str | None:
    if not isinstance(caption, str):
        return f"caption is not a string (got {type(caption).__name__})"
    if not caption.strip():
        return "caption is empty"
    return None


def _pixels(
    value: object, root: Path, preprocessing: int | PreprocessConfig
) -> tuple[bytes, str, str | None]:
    """``(pixels as float32 bytes, content hash, error)`` of one image cell, read and
    decoded as the local job does (bounded reads, size checks before decoding)."""
    from specs_metric.image_embeddings import content_hash
    from specs_metric.sources.tables import _image_value
    from specs_metric.transform import ImageError, decode_pixels, image_bytes

    shown, path, data = _image_value(value, root)
    name = str(path) if data is None else str(shown or "image bytes")
    try:
        data = image_bytes(path, data, name)
        pixels = decode_pixels(data, name, preprocessing).numpy().astype(np.float32)
    except ImageError as exc:
        return b"", "", str(exc)
    return pixels.tobytes(), content_hash(data), None


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
) -> pa.Table:
    """Decode, preprocess and tokenize a batch; adds ``tokens``, ``truncated``, ``error``
    and internal columns, drops the image column. A ``label`` column, when present, names
    the rows in messages; an ``error`` column keeps errors found earlier."""
    from specs_metric.chunks import fit_caption
    from specs_metric.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    root = Path(image_root) if image_root else Path.cwd()
    n = table.num_rows
    images = table[image_column].to_pylist()
    captions = table[caption_column].to_pylist()
    names = table.column_names
    labels = (
        table["label"].to_pylist()
        if "label" in names
        else [f"id {v!r}" for v in table[id_column].to_pylist()]
        if id_column in names
        else [f"row {i}" for i in range(n)]
    )
    errors = table["error"].to_pylist() if "error" in names else [None] * n
    pixels, hashes, ids = [b""] * n, [""] * n, [[] for _ in range(n)]
    n_tokens, truncated = [None] * n, [None] * n
    for i in range(n):
        if errors[i] is None:
            problem = _caption_error(captions[i])
            errors[i] = f"{labels[i]}: {problem}" if problem else None
        if errors[i] is not None:
            continue
        fitted = fit_caption(tokenizer, captions[i], context_length, long_captions, labels[i])
        n_tokens[i], truncated[i] = fitted.tokens, fitted.truncated
        if fitted.error:
            errors[i] = fitted.error
            continue
        row_ids = fitted.ids
        pixels[i], hashes[i], problem = _pixels(images[i], root, resolution)
        if problem:
            errors[i] = f"{labels[i]}: {problem}"
        else:
            ids[i] = row_ids
    out = table.drop_columns([c for c in (image_column, "error") if c in names])
    added = {
        "tokens": pa.array(n_tokens, pa.int64()),
        "truncated": pa.array(truncated, pa.bool_()),
        "error": pa.array(errors, pa.string()),
        "_pixels": pa.array(pixels, pa.binary()),
        "_ids": pa.array(ids, pa.list_(pa.int32())),
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
        self.scorer = _load(options, device)
        self.scale = scale
        self.limits = SimpleNamespace(token_budget=token_budget, max_text_rows=max_text_rows)
        fixed_shape = device_policy(self.scorer.device).fixed_shape_images
        self.images = ImageEncoder(
            self.scorer, batch_size, memory_cache_size, fixed_shape=fixed_shape
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        from specs_metric.scales import cosine_similarity

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
    ray = _ray()
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
    probe = _load(options, "cpu")  # context length and resolution for the CPU stage
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


# --- specs score --engine ray ----------------------------------------------------------------


def _file_rows(item: dict[str, Any], image_root: str | None, source: dict) -> list[dict]:
    """The rows of one input file from its row ``skip`` on, as Ray rows (ids and captions as
    JSON text)."""
    from specs_metric.sources import SourceOptions

    out = []
    rows = read_rows(item["file"], image_root, SourceOptions(**source))
    for row in itertools.islice(rows, item.get("skip", 0), None):  # skip: kept on resume
        out.append(
            {
                "job": item["job"],
                "id_json": json.dumps(row.id),
                "image": {"bytes": row.data, "path": str(row.path) if row.path else None},
                "image_json": json.dumps(row.image),
                "caption": row.caption if isinstance(row.caption, str) else None,
                "caption_json": json.dumps(row.caption),
                "error": row.error,
                "label": row.label,
            }
        )
    return out


def run_ray_job(config: JobConfig, options: RayOptions) -> dict:
    """:func:`specs_metric.job.run_job` on Ray: same output, summary and ``.job.json``."""
    return run_ray_jobs([config], options)[0]


def _job_items(config: JobConfig, number: int, done: int) -> list[dict]:
    """The input files of job ``number`` as pipeline items, without its first ``done`` rows
    (kept from an interrupted run): files wholly done are left out, and the file where that
    run stopped starts at its first missing row (``skip``)."""
    from specs_metric.sources import expand, is_plain_file

    spec = config.input
    files = [os.fspath(spec)] if is_plain_file(spec) else expand(spec)
    items = []
    for file in files:
        if done and len(files) > 1:
            rows = count_rows(file, config.image_root, config.source)
            if rows <= done:
                done -= rows
                continue
        items.append({"file": file, "job": number, "skip": done})
        done = 0
    return items


def run_ray_jobs(configs: list[JobConfig], options: RayOptions) -> list[dict]:
    """Several jobs (e.g. one per shard) through one Ray pipeline; returns their summaries.

    The rows stream back in input order, job after job, and are appended to each job's part
    file (flushed after every batch); a job's output is finished as soon as its last row is
    in. With ``resume``, as in the local job: a complete output with the same settings is
    kept and its input not read again; an unfinished one keeps the whole chunks of its part
    file and only the rows after them are scored; a partial output made with other settings
    is refused.
    """
    started = time.perf_counter()
    check_scale(configs[0].scale)
    probe = _load(options, "cpu")
    jobs = _RayJobs(configs, probe)
    pending = iter(jobs.todo)  # jobs whose rows are still to come, in order
    if jobs.items:  # none when every unfinished job has all its rows already
        current, handle = None, None
        for batch in _scored_rows(jobs.items, configs[0], options):
            for rec in batch.to_pylist():
                while rec["job"] != current:  # this job's rows are in; so are empty ones'
                    if handle is not None:
                        jobs.finish(current, handle)
                    current = next(pending)
                    handle = jobs.append(current)
                for key in ("id", "image", "caption"):
                    rec[key] = json.loads(rec[f"{key}_json"])
                handle.write(results.json_line(rec))
            if handle is not None:
                handle.flush()  # a killed run keeps what it scored, for --resume
        if handle is not None:
            jobs.finish(current, handle)
    for number in pending:  # jobs after the last row: empty or wholly resumed inputs
        jobs.finish(number, jobs.append(number))
    return [_summary(config, probe, started) for config in configs]


class _RayJobs:
    """The jobs of one Ray run: which are still to do, from which row, and their records."""

    def __init__(self, configs: list[JobConfig], probe) -> None:
        from specs_metric.job import _job_identity

        self.configs = configs
        self.identities: list[dict] = []
        self.todo: list[int] = []  # job numbers with rows still to write
        self.items: list[dict] = []  # the files (and first rows) Ray reads
        self.totals: dict[int, int] = {}  # rows of the jobs counted already (to resume them)
        for number, config in enumerate(configs):
            config.output.parent.mkdir(parents=True, exist_ok=True)
            identity = {**_job_identity(config, probe, 1), "engine": "ray"}
            self.identities.append(identity)
            done = self._resume_point(number, identity)
            if done is None:
                continue  # complete, with the same settings
            write_json(results.job_path(config.output), {**identity, "complete": False}, indent=1)
            if not done:
                results.part_path(config.output, 0, 1).write_bytes(b"")
            self.todo.append(number)
            self.items.extend(_job_items(config, number, done))

    def _resume_point(self, number: int, identity: dict) -> int | None:
        """Rows of job ``number`` kept from an earlier run (None: the job is complete)."""
        config = self.configs[number]
        if not config.resume:
            return 0
        previous = results.read_job_record(results.job_path(config.output))
        if previous is None:
            return 0
        results.check_resumable(previous, identity, config.output)
        if previous.get("complete", False) and config.output.exists():
            return None
        part = results.part_path(config.output, 0, 1)
        if not part.exists():
            return 0
        self.totals[number] = self._total(number)
        return results.resume_point(part, config.chunk_rows, self.totals[number])

    def _total(self, number: int) -> int:
        if number not in self.totals:
            config = self.configs[number]
            self.totals[number] = count_rows(config.input, config.image_root, config.source)
        return self.totals[number]

    def append(self, number: int):
        return open(results.part_path(self.configs[number].output, 0, 1), "a", encoding="utf-8")

    def finish(self, number: int, handle) -> None:
        handle.close()
        output = self.configs[number].output
        # the output appears only with one row per input row, as in the local job
        results.write_final(output, 1, self._total(number))
        write_json(results.job_path(output), {**self.identities[number], "complete": True}, 1)


def _scored_rows(items: list[dict], first: JobConfig, options: RayOptions):
    """Ray's scored rows of ``items`` (files and first rows), as pyarrow batches in order."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    rows = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _file_rows,
        fn_kwargs={
            "image_root": os.fspath(first.image_root) if first.image_root else None,
            "source": first.source.as_dict(),
        },
    )
    scored = score(
        rows,
        options.model,
        image_column="image",
        id_column="id_json",
        scale=first.scale,
        rows_per_batch=first.chunk_rows,
        batch_size=first.batch_size,
        token_budget=first.token_budget,
        max_text_rows=first.max_text_rows,
        workers=options.workers,
        num_gpus_per_worker=options.num_gpus_per_worker,
        precision=options.precision,
        reference_rounding=options.reference_rounding,
        long_captions=options.long_captions,
        device=options.device,
    )
    return scored.iter_batches(batch_format="pyarrow", batch_size=None)


def _summary(config: JobConfig, probe, started: float) -> dict:

    summary = results.summarize(config.output)
    summary.update(
        {
            "corpus_score": corpus_from_mean(summary["mean"], config.scale),
            "scale": config.scale,
            "model": probe.name,
            "checkpoint_sha256": probe.checkpoint_sha256,
            "precision": probe.precision,
            "engine": "ray",
            "seconds": round(time.perf_counter() - started, 3),
            "output": str(config.output),
        }
    )
    summary_path = config.output.with_name(config.output.name + ".summary.json")
    write_json(summary_path, summary)
    return summary
