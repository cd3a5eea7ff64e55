"""Preparing the job's chunks of rows, in DataLoader workers, ahead of the model.

A :class:`ChunkStream` reads the rows of one shard, cuts them into chunks at absolute
multiples of ``chunk_rows`` (see :mod:`specs_metric.jobs.job` for why), and turns each chunk into
a :class:`Chunk`: the output records so far and the token ids of the rows that can be
scored (both from :class:`~specs_metric.scoring.prepare.RowPreparer`, as every command
prepares rows), and for each distinct image its content hash with either its pixels, a
sound embedding from
the disk cache, or (for a file this worker already sent) only the hash. Worker ``w`` of
``W`` prepares every ``w``-th chunk; the DataLoader hands them to the main process in order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from specs_metric.data.rows import Row
from specs_metric.errors import ImageError
from specs_metric.processing.preprocess import PreprocessConfig
from specs_metric.processing.transform import decode_pixels
from specs_metric.scoring.cache import EmbeddingCache
from specs_metric.scoring.image_embeddings import content_hash
from specs_metric.scoring.prepare import RowPreparer, image_name, row_image_bytes


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


class ChunkStream(IterableDataset):
    """Yields prepared chunks of the rows ``[start, stop)``; worker ``w`` prepares every
    ``w``-th chunk, and the DataLoader returns them in order.

    Args:
        read: returns a fresh iterator over the input's rows (called once per worker).
        start, stop: the rows this stream prepares.
        chunk_rows: rows per chunk; chunks start at multiples of it, counted from row 0.
        preparer: turns rows into records and token ids.
        preprocessing: the model's image pipeline.
        cache: the disk cache of image embeddings (images found there are not decoded).
        sent_capacity: files remembered per worker as already sent (their hashes only).
    """

    def __init__(
        self,
        read: Callable[[], Iterator[Row]],
        start: int,
        stop: int,
        chunk_rows: int,
        preparer: RowPreparer,
        preprocessing: int | PreprocessConfig,
        cache: EmbeddingCache | None,
        sent_capacity: int,
    ) -> None:
        self.read = read
        self.start, self.stop = start, stop
        self.chunk_rows = chunk_rows
        self.preparer = preparer
        self.preprocessing = preprocessing
        self.cache = cache
        # Files whose pixels this process already sent (path -> (size, mtime, hash)): the
        # main process keeps their embeddings, so later chunks send only the hash. Each
        # DataLoader worker has its own copy of this stream, hence its own record.
        self._sent: OrderedDict[Path, tuple[int, int, str]] = OrderedDict()
        self._sent_capacity = max(1, sent_capacity)

    def _chunks(self) -> Iterator[list[Row]]:
        chunk: list[Row] = []
        for row in self.read():
            if row.index < self.start:
                continue
            if row.index >= self.stop:
                break
            chunk.append(row)
            if len(chunk) == self.chunk_rows:
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
            rec, ids = self.preparer.prepare(row)
            if ids is not None:
                key = row.path if row.data is None else ("row", row.index)  # bytes: per row
                if key not in images:
                    images[key] = self._load_image(row, out)
                content_hash, error = images[key]
                if error is not None:
                    rec["error"] = f"{row.label}: {error}"
                else:
                    out.valid.append(len(out.rows))
                    out.tokens.append(ids)
                    out.image_hash.append(content_hash)
            out.rows.append(rec)
        return out

    def _load_image(self, row: Row, chunk: Chunk) -> tuple[str | None, str | None]:
        """``(content hash, error)`` of a row's image; its pixels go into ``chunk`` unless
        the chunk, the disk cache or (for a file) an earlier chunk has it already."""
        from_file = row.data is None
        if from_file:
            sent = self._sent_hash(row.path)
            if sent is not None:
                chunk.sent_before[sent] = row.path
                return sent, None
        try:
            data = row_image_bytes(row)
        except ImageError as exc:
            return None, str(exc)
        digest = content_hash(data)
        if self._known(digest, chunk):
            return digest, None
        try:
            chunk.pixels[digest] = decode_pixels(data, image_name(row), self.preprocessing)
        except ImageError as exc:
            return None, str(exc)
        if from_file:
            self._remember_sent(row.path, digest)
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
