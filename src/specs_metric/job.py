"""The streaming scoring job behind ``specs score``.

Rows are read lazily and processed in chunks. Background DataLoader workers decode images
and tokenize captions for upcoming chunks while the main process runs the model. Each
distinct image (by content hash) is encoded once per run; with a cache directory, once per
checkpoint across runs. Results are appended to a part file and flushed after every chunk,
so a crash loses at most one chunk and ``resume=True`` continues where it stopped. Under
torchrun every rank scores a contiguous block of rows into its own part file and rank 0
concatenates them in input order.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from specs_metric import __version__
from specs_metric.cache import EmbeddingCache, model_fingerprint
from specs_metric.distributed import DistInfo, barrier, shard_range
from specs_metric.rows import Row, count_rows, read_rows
from specs_metric.scorer import DEFAULT_TOKEN_BUDGET, Scorer, length_batches
from specs_metric.scores import apply_scale, check_scale, corpus_from_mean
from specs_metric.tokenizer import EOT_ID, default_tokenizer
from specs_metric.transform import ImageError, open_image, preprocess, read_image_bytes

OUTPUT_FIELDS = ("id", "image", "caption", "score", "cosine", "tokens", "truncated", "error")


@dataclass
class JobConfig:
    """Settings of one scoring job (the ``specs score`` flags)."""

    input: Path
    output: Path
    image_root: Path | None = None
    scale: str = "specs"
    batch_size: int = 64  # images per image batch
    token_budget: int = DEFAULT_TOKEN_BUDGET  # rows x trimmed length per text batch
    max_text_rows: int = 512  # most captions per text batch
    chunk_rows: int = 512  # rows prepared and written together
    num_workers: int = 1
    cache_dir: Path | None = None
    resume: bool = False
    memory_cache_size: int = 20000  # image embeddings kept in memory (LRU)
    show_progress: bool = True


@dataclass
class _Chunk:
    """A chunk of rows, prepared by a worker: tokens and pixels ready for the model."""

    rows: list[dict]
    tokens: list[list[int]] = field(default_factory=list)  # per valid row, untrimmed
    valid: list[int] = field(default_factory=list)  # positions in rows with a caption+image
    image_hash: list[str] = field(default_factory=list)  # per valid row
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # hash -> pixels to encode


class _ChunkStream(IterableDataset):
    """Yields prepared chunks of the rows ``[start, stop)``; worker ``w`` prepares every
    ``w``-th chunk, and the DataLoader returns them in order."""

    def __init__(
        self,
        config: JobConfig,
        start: int,
        stop: int,
        context_length: int,
        resolution: int,
        long_captions: str,
        cache: EmbeddingCache | None,
    ) -> None:
        self.config = config
        self.start, self.stop = start, stop
        self.context_length = context_length
        self.resolution = resolution
        self.long_captions = long_captions
        self.cache = cache

    def _chunks(self) -> Iterator[list[Row]]:
        chunk: list[Row] = []
        for row in read_rows(self.config.input, self.config.image_root):
            if row.index < self.start:
                continue
            if row.index >= self.stop:
                break
            chunk.append(row)
            if len(chunk) == self.config.chunk_rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __iter__(self) -> Iterator[_Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for number, rows in enumerate(self._chunks()):
            if number % workers == worker:
                yield self._prepare(rows)

    def _prepare(self, rows: list[Row]) -> _Chunk:
        tokenizer = default_tokenizer()
        out = _Chunk(rows=[])
        images: dict[Path, tuple[str | None, str | None]] = {}  # path -> (hash, error)
        for row in rows:
            rec = {
                "index": row.index,
                "id": row.id,
                "image": row.image,
                "caption": row.caption,
                "tokens": None,
                "truncated": None,
                "error": row.error,
            }
            if rec["error"] is None:
                ids = tokenizer.token_ids(row.caption)
                rec["tokens"] = len(ids)
                rec["truncated"] = len(ids) > self.context_length
                if rec["truncated"]:
                    if self.long_captions == "error":
                        rec["error"] = (
                            f"line {row.line}: caption has {len(ids)} tokens, more "
                            f"than the context length {self.context_length}"
                        )
                    ids = ids[: self.context_length - 1] + [EOT_ID]
            if rec["error"] is None:
                if row.path not in images:
                    images[row.path] = self._load_image(row.path, out)
                content_hash, error = images[row.path]
                if error is not None:
                    rec["error"] = f"line {row.line}: {error}"
                else:
                    out.valid.append(len(out.rows))
                    out.tokens.append(ids)
                    out.image_hash.append(content_hash)
            out.rows.append(rec)
        return out

    def _load_image(self, path: Path, chunk: _Chunk) -> tuple[str | None, str | None]:
        try:
            data = read_image_bytes(path)
        except ImageError as exc:
            return None, str(exc)
        content_hash = hashlib.sha256(data).hexdigest()
        if content_hash in chunk.pixels or (self.cache is not None and content_hash in self.cache):
            return content_hash, None
        try:
            image = open_image(data, name=str(path), resolution=self.resolution)
            chunk.pixels[content_hash] = preprocess(image, self.resolution)
        except ImageError as exc:
            return None, str(exc)
        return content_hash, None


def _collate(chunk: _Chunk) -> _Chunk:
    return chunk


class _ImageEmbeddings:
    """Image embeddings by content hash: an in-memory LRU over the optional disk cache."""

    def __init__(
        self, scorer: Scorer, batch_size: int, capacity: int, disk: EmbeddingCache | None
    ) -> None:
        self.scorer, self.batch_size, self.capacity, self.disk = scorer, batch_size, capacity, disk
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.encoded = 0  # images that went through the image tower

    def _remember(self, key: str, value: np.ndarray) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.capacity:
            self.memory.popitem(last=False)

    def lookup(self, hashes: list[str], pixels: dict[str, torch.Tensor]) -> np.ndarray:
        todo = [h for h in dict.fromkeys(hashes) if h not in self.memory and h in pixels]
        for start in range(0, len(todo), self.batch_size):
            keys = todo[start : start + self.batch_size]
            emb = self.scorer.encode_pixels(torch.stack([pixels[k] for k in keys])).numpy()
            self.encoded += len(keys)
            for key, value in zip(keys, emb, strict=True):
                self._remember(key, value)
                if self.disk is not None:
                    self.disk.put(key, value)
        out = []
        for key in hashes:
            value = self.memory.get(key)
            if value is None:
                value = self.disk.get(key) if self.disk is not None else None
                if value is None:
                    raise RuntimeError(f"image embedding {key} vanished from the cache")
                self._remember(key, value)
            else:
                self.memory.move_to_end(key)
            out.append(value)
        return np.stack(out) if out else np.zeros((0, self.scorer.embed_dim), np.float32)


def _text_embeddings(scorer: Scorer, tokens: list[list[int]], config: JobConfig) -> np.ndarray:
    out = np.zeros((len(tokens), scorer.embed_dim), dtype=np.float32)
    lengths = [len(t) for t in tokens]
    for rows in length_batches(lengths, config.token_budget, config.max_text_rows):
        batch = torch.zeros(len(rows), max(lengths[i] for i in rows), dtype=torch.long)
        for j, i in enumerate(rows):
            batch[j, : lengths[i]] = torch.tensor(tokens[i])
        out[rows] = scorer.encode_tokens(batch).numpy()
    return out


def _cosines(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    a = image_emb.astype(np.float64)
    b = text_emb.astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _json_line(rec: dict) -> str:
    out = {k: rec.get(k) for k in OUTPUT_FIELDS}
    return json.dumps(out, ensure_ascii=False) + "\n"


# --- part files and resume --------------------------------------------------------------------


def part_path(output: Path, rank: int, world_size: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}-of-{world_size}.jsonl")


def _job_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.job.json")


def _complete_lines(path: Path) -> int:
    """Count complete JSON lines and cut off a partial last line (from a crash)."""
    if not path.exists():
        return 0
    good_end, count = 0, 0
    with open(path, "rb") as fh:
        offset = 0
        for line in fh:
            offset += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            good_end, count = offset, count + 1
    with open(path, "r+b") as fh:
        fh.truncate(good_end)
    return count


def _job_identity(config: JobConfig, scorer: Scorer, world_size: int) -> dict:
    stat = config.input.stat()
    return {
        "input": str(config.input.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "image_root": str(config.image_root) if config.image_root else None,
        "checkpoint_sha256": scorer.checkpoint_sha256,
        "scale": config.scale,
        "precision": scorer.precision,
        "numerics": scorer.numerics,
        "long_captions": scorer.long_captions,
        "world_size": world_size,
    }


# --- output -----------------------------------------------------------------------------------


def _write_final(config: JobConfig, world_size: int) -> None:
    """Concatenate the part files (input order) into the output, in its format."""
    parts = [part_path(config.output, r, world_size) for r in range(world_size)]
    tmp = config.output.with_name(config.output.name + ".tmp")
    as_csv = config.output.suffix.lower() == ".csv"
    with open(tmp, "w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=OUTPUT_FIELDS) if as_csv else None
        if writer:
            writer.writeheader()
        for part in parts:
            with open(part, encoding="utf-8") as fh:
                for line in fh:
                    if writer:
                        writer.writerow(json.loads(line))
                    else:
                        out.write(line)
    os.replace(tmp, config.output)
    for part in parts:
        part.unlink()


def read_output(path: str | os.PathLike[str]) -> Iterator[dict]:
    """Stream the rows of a ``specs score`` output (JSONL or CSV), typed as in JSONL."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
        return
    with open(path, encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            for key in ("score", "cosine"):
                rec[key] = float(rec[key]) if rec[key] not in ("", None) else None
            rec["tokens"] = int(rec["tokens"]) if rec["tokens"] not in ("", None) else None
            rec["truncated"] = {"True": True, "False": False}.get(rec["truncated"])
            rec["error"] = rec["error"] or None
            yield rec


def summarize(path: Path) -> dict:
    """Counts, mean and std of the scores of an output file (one streaming pass)."""
    n = n_err = n_trunc = 0
    total = total_sq = 0.0
    for rec in read_output(path):
        if rec["error"]:
            n_err += 1
            continue
        n += 1
        total += rec["score"]
        total_sq += rec["score"] ** 2
        n_trunc += bool(rec["truncated"])
    mean = total / n if n else math.nan
    var = max(total_sq / n - mean * mean, 0.0) if n else math.nan
    return {
        "n_rows": n + n_err,
        "n_scored": n,
        "n_errors": n_err,
        "n_truncated": n_trunc,
        "mean": mean,
        "std": math.sqrt(var) if n else math.nan,
    }


def run_job(config: JobConfig, scorer: Scorer, dist_info: DistInfo | None = None) -> dict:
    """Score every row of ``config.input`` into ``config.output``.

    Returns:
        The summary (also written to ``<output>.summary.json`` by rank 0).
    """
    check_scale(config.scale)
    info = dist_info or DistInfo()
    started = time.perf_counter()
    config.output.parent.mkdir(parents=True, exist_ok=True)
    identity = _job_identity(config, scorer, info.world_size)
    job_file = _job_path(config.output)
    my_part = part_path(config.output, info.rank, info.world_size)
    previous = json.loads(job_file.read_text()) if job_file.exists() else None
    if config.resume and previous is not None:
        settings = {k: v for k, v in previous.items() if k != "complete"}
        if settings != identity:
            changed = sorted(k for k in identity if settings.get(k) != identity[k])
            raise ValueError(
                f"--resume: the output {config.output} was made with other settings "
                f"({', '.join(changed)}); remove it or run without --resume"
            )
    finished = (
        config.resume
        and previous is not None
        and previous.get("complete", False)
        and config.output.exists()
    )
    encoded = 0
    if not finished:
        barrier(info)
        if info.is_main:
            job_file.write_text(json.dumps({**identity, "complete": False}, indent=1))
        done = _complete_lines(my_part) if config.resume else 0
        if not config.resume:
            my_part.unlink(missing_ok=True)
        total = count_rows(config.input, config.image_root)
        shard = shard_range(total, info.rank, info.world_size)
        disk = None
        if config.cache_dir is not None:
            disk = EmbeddingCache(
                config.cache_dir,
                model_fingerprint(
                    scorer.checkpoint_sha256,
                    scorer.numerics,
                    scorer.reference_rounding,
                    scorer.resolution,
                ),
            )
        stream = _ChunkStream(
            config,
            shard.start + done,
            shard.stop,
            scorer.context_length,
            scorer.resolution,
            scorer.long_captions,
            disk,
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            collate_fn=_collate,
            num_workers=config.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if config.num_workers else None,
        )
        images = _ImageEmbeddings(scorer, config.batch_size, config.memory_cache_size, disk)
        bar = tqdm(
            total=len(shard),
            initial=done,
            unit="row",
            file=sys.stderr,
            disable=not (config.show_progress and info.is_main),
            desc="scoring",
        )
        with open(my_part, "a", encoding="utf-8") as out:
            for chunk in loader:
                if chunk.valid:
                    img = images.lookup(chunk.image_hash, chunk.pixels)
                    txt = _text_embeddings(scorer, chunk.tokens, config)
                    cos = _cosines(img, txt)
                    scores = apply_scale(cos, config.scale)
                    for pos, c, s in zip(chunk.valid, cos.tolist(), scores.tolist(), strict=True):
                        chunk.rows[pos]["cosine"] = c
                        chunk.rows[pos]["score"] = s
                out.write("".join(_json_line(rec) for rec in chunk.rows))
                out.flush()
                bar.update(len(chunk.rows))
        bar.close()
        encoded = images.encoded
        barrier(info)
        if info.is_main:
            _write_final(config, info.world_size)
            job_file.write_text(json.dumps({**identity, "complete": True}, indent=1))
    summary = {}
    if info.is_main:
        summary = summarize(config.output)
        summary.update(
            {
                "corpus_score": corpus_from_mean(summary["mean"], config.scale),
                "scale": config.scale,
                "model": scorer.name,
                "checkpoint_sha256": scorer.checkpoint_sha256,
                "version": __version__,
                "precision": scorer.precision,
                "device": str(scorer.device),
                "world_size": info.world_size,
                "images_encoded_rank0": encoded,
                "seconds": round(time.perf_counter() - started, 3),
                "output": str(config.output),
            }
        )
        summary_path = config.output.with_name(config.output.name + ".summary.json")
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    barrier(info)
    return summary
