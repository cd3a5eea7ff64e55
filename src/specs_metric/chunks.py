"""Preparing the job's chunks of rows, in DataLoader workers, ahead of the model.

A :class:`ChunkStream` reads the rows of one shard, cuts them into chunks at absolute
multiples of ``chunk_rows`` (see :mod:`specs_metric.job` for why), and turns each chunk into
a :class:`Chunk`: the output records so far, the token ids of the rows that can be scored,
and for each distinct image its content hash with either its pixels, a sound embedding from
the disk cache, or (for a file this worker already sent) only the hash. Worker ``w`` of
``W`` prepares every ``w``-th chunk; the DataLoader hands them to the main process in order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from specs_metric.cache import EmbeddingCache
from specs_metric.config import PreprocessConfig
from specs_metric.image_embeddings import content_hash
from specs_metric.rows import Row, read_rows
from specs_metric.tokenizer import Tokenizer, literal_special_warning, truncate_ids
from specs_metric.transform import ImageError, decode_pixels, image_bytes

if TYPE_CHECKING:
    from specs_metric.job import JobConfig


@dataclass
class Chunk:
    """A chunk of rows, prepared by a worker: tokens and pixels ready for the model."""

    rows: list[dict]
    tokens: list[list[int]] = field(default_factory=list)  # per valid row, untrimmed
    valid: list[int] = field(default_factory=list)  # positions in rows with a caption+image
    image_hash: list[str] = field(default_factory=list)  # per valid row
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # hash -> pixels to encode
    packed: torch.Tensor | None = None  # the pixels stacked, while the chunk crosses a pipe
    cached: dict[str, np.ndarray] = field(default_factory=dict)  # hash -> embedding from disk
    # hash -> image file, for images whose pixels this worker sent with an earlier chunk
    sent_before: dict[str, Path] = field(default_factory=dict)


@dataclass
class FittedCaption:
    """A caption's ids as the model reads them, with what the output reports about it."""

    ids: list[int] | None  # None when the caption cannot be scored (see error)
    tokens: int  # SOT and EOT counted, before truncation
    truncated: bool
    warning: str | None
    error: str | None


def fit_caption(
    tokenizer: Tokenizer, caption: str, context_length: int, long_captions: str, label: str
) -> FittedCaption:
    """Tokenize one caption for scoring: truncated with EOT last, or an error for an
    over-long caption under ``long_captions="error"``; literal special tokens warned about."""
    ids = tokenizer.token_ids(caption)
    truncated = len(ids) > context_length
    error = None
    if truncated and long_captions == "error":
        error = (
            f"{label}: caption has {len(ids)} tokens, more than the context length "
            f"{context_length}"
        )
    return FittedCaption(
        None if error else truncate_ids(ids, context_length),
        len(ids),
        truncated,
        literal_special_warning(ids),
        error,
    )


class ChunkStream(IterableDataset):
    """Yields prepared chunks of the rows ``[start, stop)``; worker ``w`` prepares every
    ``w``-th chunk, and the DataLoader returns them in order."""

    def __init__(
        self,
        config: JobConfig,
        start: int,
        stop: int,
        context_length: int,
        resolution: int | PreprocessConfig,
        long_captions: str,
        cache: EmbeddingCache | None,
        tokenizer: Tokenizer,
    ) -> None:
        self.config = config
        self.start, self.stop = start, stop
        self.context_length = context_length
        self.resolution = resolution
        self.long_captions = long_captions
        self.cache = cache
        self.tokenizer = tokenizer
        # Files whose pixels this process already sent (path -> (size, mtime, hash)): the
        # main process keeps their embeddings, so later chunks send only the hash. Each
        # DataLoader worker has its own copy of this stream, hence its own record.
        self._sent: OrderedDict[Path, tuple[int, int, str]] = OrderedDict()
        self._sent_capacity = max(1, config.memory_cache_size // max(1, config.num_workers))

    def _chunks(self) -> Iterator[list[Row]]:
        chunk: list[Row] = []
        for row in read_rows(self.config.input, self.config.image_root, self.config.source):
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

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for number, rows in enumerate(self._chunks()):
            if number % workers == worker:
                yield self._prepare(rows)

    def _prepare(self, rows: list[Row]) -> Chunk:
        out = Chunk(rows=[])
        images: dict[object, tuple[str | None, str | None]] = {}  # path -> (hash, error)
        for row in rows:
            rec = {
                "index": row.index,
                "line": row.line,
                "id": row.id,
                "image": row.image,
                "caption": row.caption,
                "tokens": None,
                "truncated": None,
                "warning": None,
                "error": row.error,
            }
            if rec["error"] is None:
                fitted = fit_caption(
                    self.tokenizer, row.caption, self.context_length, self.long_captions, row.label
                )
                ids = fitted.ids
                rec["tokens"], rec["truncated"] = fitted.tokens, fitted.truncated
                rec["warning"], rec["error"] = fitted.warning, fitted.error
            if rec["error"] is None:
                key = row.path if row.data is None else ("row", row.index)  # bytes: per row
                if key not in images:
                    images[key] = self._load_image(row.path, out, row.data, row.image)
                content_hash, error = images[key]
                if error is not None:
                    rec["error"] = f"{row.label}: {error}"
                else:
                    out.valid.append(len(out.rows))
                    out.tokens.append(ids)
                    out.image_hash.append(content_hash)
            out.rows.append(rec)
        return out

    def _load_image(
        self, path: Path | None, chunk: Chunk, data: bytes | None = None, name: str | None = None
    ) -> tuple[str | None, str | None]:
        from_file = data is None
        if from_file:
            sent = self._sent_hash(path)
            if sent is not None:
                chunk.sent_before[sent] = path
                return sent, None
        shown = str(path) if from_file else (name or "image bytes")
        try:
            data = image_bytes(path, data, name)
        except ImageError as exc:
            return None, str(exc)
        digest = content_hash(data)
        if self._known(digest, chunk):
            return digest, None
        try:
            chunk.pixels[digest] = decode_pixels(data, shown, self.resolution)
        except ImageError as exc:
            return None, str(exc)
        if from_file:
            self._remember_sent(path, digest)
        return digest, None

    def _sent_hash(self, path: Path | None) -> str | None:
        """The content hash of a file this process sent pixels of, if it is unchanged."""
        known = self._sent.get(path) if path is not None else None
        if known is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return None  # read it again: the reader gives the message
        if (stat.st_size, stat.st_mtime_ns) != known[:2]:
            return None
        self._sent.move_to_end(path)
        return known[2]

    def _remember_sent(self, path: Path, content_hash: str) -> None:
        try:
            stat = path.stat()
        except OSError:
            return
        self._sent[path] = (stat.st_size, stat.st_mtime_ns, content_hash)
        while len(self._sent) > self._sent_capacity:
            self._sent.popitem(last=False)

    def _known(self, content_hash: str, chunk: Chunk) -> bool:
        """Whether this chunk already has the image's pixels or a sound cached embedding."""
        if content_hash in chunk.pixels or content_hash in chunk.cached:
            return True
        value = self.cache.get(content_hash) if self.cache is not None else None
        if value is not None:
            chunk.cached[content_hash] = value
        return value is not None


def pack_chunk(chunk: Chunk) -> Chunk:
    """In the worker: stack the chunk's pixels into one tensor, so the chunk crosses to the
    main process as one shared-memory block (one per image would hold a file descriptor
    each, thousands per chunk of distinct images)."""
    if len(chunk.pixels) > 1:
        chunk.packed = torch.stack(list(chunk.pixels.values()))
        chunk.pixels = dict.fromkeys(chunk.pixels)  # the hashes, in the packed order
    return chunk


def unpack_chunk(chunk: Chunk) -> Chunk:
    """In the main process: the pixels by hash again (views of the packed tensor)."""
    if chunk.packed is not None:
        chunk.pixels = dict(zip(chunk.pixels, chunk.packed, strict=True))
        chunk.packed = None
    return chunk
