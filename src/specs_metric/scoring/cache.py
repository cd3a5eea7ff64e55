"""On-disk cache of image embeddings, shared by runs that score the same images.

An entry is keyed by the model fingerprint (checkpoint sha256, precision, weight rounding,
preprocessing) and the sha256 of the image file's bytes, so a new checkpoint never reads
another one's embeddings, while re-scoring new captions of the same images with the same
checkpoint skips the image tower. Entries are written through the safe writer (a temporary
file renamed), which makes concurrent runs and interrupted writes safe: a reader sees a whole
entry or none.

The cache is an optimisation and its folder may hold anything, so:

- an entry is read only if it is a regular file no larger than an embedding of the
  expected width can be; its ``.npy`` header is checked before any array is allocated (a
  header declaring 2^60 elements is refused unread); a damaged entry (unreadable, truncated,
  another shape or dtype, non-finite values, a FIFO or a device in its place) reads as
  missing, so the job recomputes it and writes it again;
- a cache that cannot be written (a read-only folder, a full disk) is reported once, as a
  warning, and the job goes on without writing to it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from specs_metric.errors import SpecsError
from specs_metric.io.reading import open_regular
from specs_metric.io.writing import atomic_write, write_text

# Bump when preprocessing changes in a way that alters pixels.
PREPROCESSING_VERSION = "clip-bicubic-centercrop-v1"
# An entry is a small .npy file: its header (at most a few hundred bytes) and the floats.
_HEADER_BYTES = 4096
_ANY_WIDTH = 1 << 16  # the widest embedding read when the width is not known
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def model_fingerprint(
    checkpoint_sha256: str | None, numerics: str, reference_rounding: bool, resolution: int
) -> str:
    """A string that changes whenever image embeddings of the same image could change.

    ``numerics`` is :attr:`specs_metric.scoring.scorer.Scorer.numerics` (precision, and for
    half precision the device type and kernels).
    """
    rounding = "ref-fp16-rounding" if reference_rounding else "full-precision"
    return f"{checkpoint_sha256}|{numerics}|{rounding}|{resolution}|{PREPROCESSING_VERSION}"


def _warn(message: str) -> None:
    print(f"specs: warning: {message}", file=sys.stderr)


class EmbeddingCache:
    """Image-embedding files under ``root/<fingerprint hash>/<ab>/<content hash>.npy``."""

    def __init__(
        self, root: str | os.PathLike[str], fingerprint: str, dim: int | None = None
    ) -> None:
        self.fingerprint = fingerprint
        self.dim = dim  # the embedding width entries must have (None: any 1-D width)
        tag = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.root = Path(root) / tag
        self.writable = True
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            info = self.root / "fingerprint.txt"
            if not info.exists():
                write_text(info, fingerprint + "\n")
        except (OSError, SpecsError) as exc:
            self._stop_writing(exc)

    def _stop_writing(self, exc: BaseException) -> None:
        if self.writable:
            _warn(
                f"the image-embedding cache {self.root} cannot be written ({exc}); "
                "going on without writing to it"
            )
        self.writable = False

    def _path(self, content_hash: str) -> Path:
        return self.root / content_hash[:2] / f"{content_hash}.npy"

    def get(self, content_hash: str) -> np.ndarray | None:
        """The cached embedding, or ``None`` if absent or damaged: not a regular file of the
        expected size, not a 1-D float32 array (of width ``dim`` when given), or not
        finite."""
        width = self.dim or _ANY_WIDTH
        try:
            fh = open_regular(
                self._path(content_hash),
                max_bytes=_HEADER_BYTES + 4 * width,
                what="cache entry",
                protect=False,
            )
        except (OSError, SpecsError):
            return None
        try:
            with fh:
                version = np.lib.format.read_magic(fh)
                read_header = _HEADER_READERS.get(version)
                if read_header is None:
                    return None
                shape, _, dtype = read_header(fh)
                if dtype != np.float32 or len(shape) != 1 or not 0 < shape[0] <= width:
                    return None  # checked before np.load allocates anything
                if self.dim is not None and shape[0] != self.dim:
                    return None
                fh.seek(0)
                value = np.load(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if value.shape != shape or not np.isfinite(value).all():
            return None
        return value

    def __contains__(self, content_hash: str) -> bool:
        """Whether a usable (undamaged) entry exists."""
        return self.get(content_hash) is not None

    def put(self, content_hash: str, embedding: np.ndarray) -> None:
        """Store an embedding atomically (last writer wins; all writers write the same).
        A failed write stops further writes with one warning; nothing is raised."""
        if not self.writable:
            return
        path = self._path(content_hash)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "wb") as fh:
                np.save(fh, np.asarray(embedding, dtype=np.float32), allow_pickle=False)
        except (OSError, SpecsError) as exc:
            self._stop_writing(exc)
