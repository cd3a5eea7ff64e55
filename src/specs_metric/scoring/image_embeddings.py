"""The image encoder: every place that embeds images goes through :class:`ImageEncoder`.

An image is keyed by the sha256 of its encoded bytes (:func:`content_hash`, also the key
of the disk cache in :mod:`specs_metric.scoring.cache`), so one picture under two paths is encoded
once and a file rewritten at the same path is not mistaken for its old content. A PIL image
given without its file is keyed by its pixel data (:func:`pil_key`).

The encoder keeps embeddings in an in-memory LRU over the optional disk cache (whose
damaged entries read as missing), encodes what neither holds in batches of ``batch_size``
and counts the images that went through the image tower (``encoded``). Images that cannot
be read or decoded come back as per-item errors of an :class:`ImageEmbeddings`, never as
exceptions; callers that want one raise it from the result.

It serves two callers:

- :meth:`ImageEncoder.embed` takes images (paths, encoded bytes or PIL images), reads,
  hashes and decodes them in this process;
- :meth:`ImageEncoder.embed_prepared` takes images that worker processes already read,
  hashed and decoded (the scoring job, Ray, the benchmarks' DataLoader): content hashes,
  their pixels, and embeddings a worker found in the disk cache.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from specs_metric.data.images import ImageSource
from specs_metric.errors import ImageError, UsageError
from specs_metric.io.reading import read_image_bytes
from specs_metric.processing.preprocess import PreprocessConfig
from specs_metric.processing.transform import decode_pixels, describe_image, preprocess
from specs_metric.scoring.cache import EmbeddingCache


class ImageTower(Protocol):
    """What :class:`ImageEncoder` needs of a model (a :class:`~specs_metric.scoring.scorer.
    Scorer` is one): its embedding width, its preprocessing, and a forward pass that leaves
    the embeddings on the device."""

    @property
    def embed_dim(self) -> int: ...

    @property
    def preprocessing(self) -> int | PreprocessConfig: ...

    def encode_pixels_on_device(self, pixels: torch.Tensor) -> torch.Tensor: ...

# Image embeddings kept in memory by default (about 40 MB at width 512).
DEFAULT_MEMORY_CACHE_SIZE = 20000


def content_hash(data: bytes) -> str:
    """The key of an encoded image: the sha256 (hex) of its bytes."""
    return hashlib.sha256(data).hexdigest()


def pil_key(image: Image.Image) -> str:
    """The key of a PIL image given without its file: the sha256 of its mode, size,
    palette, transparency and pixel bytes, prefixed ``pil-``.

    The prefix keeps it apart from file keys: decoding a file need not give the PIL image a
    caller holds (an edited copy, another mode), so the two never share an embedding.
    """
    digest = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
    if image.mode in ("P", "PA"):
        digest.update(bytes(image.getpalette() or []))
    digest.update(repr(image.info.get("transparency")).encode())
    digest.update(image.tobytes())
    return "pil-" + digest.hexdigest()


def read_image(source: ImageSource) -> tuple[str, bytes | Image.Image, str]:
    """``(key, encoded bytes or the PIL image, name for messages)`` of one image.

    Raises:
        ImageError: a file :func:`~specs_metric.processing.transform.read_image_bytes` refuses.
    """
    if isinstance(source, Image.Image):
        return pil_key(source), source, "PIL image"
    name = describe_image(source)
    data = source if isinstance(source, bytes) else read_image_bytes(source)
    return content_hash(data), data, name


def decode_image(
    data: bytes | Image.Image, name: str, preprocessing: int | PreprocessConfig
) -> torch.Tensor:
    """The model pixels (3, R, R) of what :func:`read_image` returned.

    Raises:
        ImageError: undecodable data, or an image too large to decode or preprocess.
    """
    if isinstance(data, Image.Image):
        return preprocess(data, preprocessing)
    return decode_pixels(data, name, preprocessing)


def prepare_image(
    source: ImageSource, preprocessing: int | PreprocessConfig
) -> tuple[str, torch.Tensor]:
    """``(key, pixels)`` of one image, for a worker process feeding
    :meth:`ImageEncoder.embed_prepared`. Raises :class:`ImageError`."""
    key, data, name = read_image(source)
    return key, decode_image(data, name, preprocessing)


@dataclass
class ImageEmbeddings:
    """Embeddings of a list of images, with the images that could not be used.

    Attributes:
        embeddings: (N, D) raw float32 embeddings; rows of failed images are zero.
        ok: (N,) bool, False for failed images.
        errors: ``(index, message)`` of each failed image, in input order.
    """

    embeddings: torch.Tensor
    ok: torch.Tensor
    errors: list[tuple[int, str]]

    def raise_first_error(self) -> None:
        """Raise :class:`ImageError` naming the first failed image, if any."""
        if self.errors:
            raise ImageError(self.errors[0][1])


class ImageEncoder:
    """Image embeddings by content hash: an in-memory LRU over the optional disk cache.

    Args:
        scorer: the model (an :class:`ImageTower`, e.g. a ``Scorer``).
        batch_size: images per forward pass.
        capacity: embeddings kept in memory across calls (least recently used dropped).
        disk: the disk cache, read by :meth:`embed` and written by both entry points
            (finite embeddings only).
        fixed_shape: pad every forward batch with zero images to ``batch_size`` rows and
            drop the pad rows, so that a row's embedding does not depend on how many rows
            share its batch (kernels chosen by batch shape, e.g. on a GPU).
    """

    def __init__(
        self,
        scorer: ImageTower,
        batch_size: int = 64,
        capacity: int = DEFAULT_MEMORY_CACHE_SIZE,
        disk: EmbeddingCache | None = None,
        *,
        fixed_shape: bool = False,
    ) -> None:
        if batch_size < 1 or capacity < 1:
            raise UsageError(f"batch_size and capacity must be >= 1, got {batch_size}, {capacity}")
        self.scorer, self.batch_size, self.capacity, self.disk = scorer, batch_size, capacity, disk
        self.fixed_shape = fixed_shape
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.encoded = 0  # images that went through the image tower

    # --- memory -----------------------------------------------------------------------
    def _remember(self, key: str, value: np.ndarray) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.capacity:
            self.memory.popitem(last=False)

    def _recall(self, key: str) -> np.ndarray | None:
        value = self.memory.get(key)
        if value is not None:
            self.memory.move_to_end(key)
        return value

    # --- the image tower --------------------------------------------------------------
    def _encode(
        self, keys: list[str], pixels: Mapping[str, torch.Tensor], found: dict[str, np.ndarray]
    ) -> None:
        """Encode ``keys`` in batches, in order, into ``found``, memory and the disk."""
        if not keys:
            return
        on_device = []  # copied back once: a copy per batch would wait for each batch
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start : start + self.batch_size]
            stacked = torch.stack([pixels[k] for k in batch])
            pad = self.batch_size - len(batch) if self.fixed_shape else 0
            if pad:
                stacked = torch.cat([stacked, stacked.new_zeros((pad, *stacked.shape[1:]))])
            on_device.append(self.scorer.encode_pixels_on_device(stacked)[: len(batch)])
        emb = torch.cat(on_device).cpu().numpy()
        self.encoded += len(keys)
        for key, value in zip(keys, emb, strict=True):
            found[key] = value
            self._remember(key, value)
            if self.disk is not None and np.isfinite(value).all():
                self.disk.put(key, value)

    def _result(
        self, keys: Sequence[str | None], found: dict[str, np.ndarray], errors: dict[int, str]
    ) -> ImageEmbeddings:
        out = np.zeros((len(keys), self.scorer.embed_dim), np.float32)
        ok = np.zeros(len(keys), bool)
        for i, key in enumerate(keys):
            if i not in errors:
                out[i] = found[key]
                ok[i] = True
        return ImageEmbeddings(
            torch.from_numpy(out), torch.from_numpy(ok), sorted(errors.items())
        )

    # --- entry points -----------------------------------------------------------------
    def embed(self, images: Sequence[ImageSource]) -> ImageEmbeddings:
        """Embeddings of ``images`` (paths, encoded bytes or PIL images), in order.

        Each distinct image is read and hashed, looked up in memory and on disk, and
        otherwise decoded and encoded once, in order of first appearance. An image that
        cannot be read or decoded is a per-item error.
        """
        keys: list[str | None] = []
        errors: dict[int, str] = {}
        found: dict[str, np.ndarray] = {}
        pending: dict[str, torch.Tensor] = {}  # decoded, waiting for a full batch
        for i, source in enumerate(images):
            try:
                key, data, name = read_image(source)
            except ImageError as exc:
                keys.append(None)
                errors[i] = str(exc)
                continue
            keys.append(key)
            if key in found or key in pending:
                continue
            value = self._recall(key)
            if value is None and self.disk is not None:
                value = self.disk.get(key)  # None when absent or damaged
                if value is not None:
                    self._remember(key, value)
            if value is not None:
                found[key] = value
                continue
            try:
                pending[key] = decode_image(data, name, self.scorer.preprocessing)
            except ImageError as exc:  # a later copy is decoded again, for its own name
                errors[i] = str(exc)
                continue
            if len(pending) == self.batch_size:
                self._encode(list(pending), pending, found)
                pending = {}
        self._encode(list(pending), pending, found)
        return self._result(keys, found, errors)

    def embed_prepared(
        self,
        hashes: Sequence[str],
        pixels: Mapping[str, torch.Tensor],
        cached: Mapping[str, np.ndarray] | None = None,
        sent_before: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> ImageEmbeddings:
        """Embeddings of ``hashes`` (one per row), from memory, ``cached`` (embeddings a
        worker read from the disk cache), or encoded from ``pixels`` (hash -> pixels) in
        batches, in order of first appearance.

        ``sent_before`` names the files of images whose pixels came earlier: one the
        memory has dropped since is read and decoded again here; if its content has
        changed meanwhile, its rows are errors.
        """
        found: dict[str, np.ndarray] = {}  # this call's embeddings, whatever the LRU drops
        failed: dict[str, str] = {}
        todo: list[str] = []
        for key in dict.fromkeys(hashes):
            value = self._recall(key)
            if value is not None:
                found[key] = value
            elif cached and key in cached:
                found[key] = cached[key]
                self._remember(key, cached[key])
            elif key in pixels:
                todo.append(key)
            elif sent_before and key in sent_before:
                try:
                    pixels = {**pixels, key: self._read_again(sent_before[key], key)}
                    todo.append(key)
                except ImageError as exc:
                    failed[key] = str(exc)
            else:  # a worker sends pixels for every image it found no embedding of
                raise RuntimeError(f"image {key}: neither pixels nor an embedding arrived")
        self._encode(todo, pixels, found)
        errors = {i: failed[key] for i, key in enumerate(hashes) if key in failed}
        return self._result(hashes, found, errors)

    def _read_again(self, path: str | os.PathLike[str], key: str) -> torch.Tensor:
        read, data, name = read_image(path)
        if read != key:
            raise ImageError(f"{name}: the file changed while it was being scored")
        return decode_image(data, name, self.scorer.preprocessing)
