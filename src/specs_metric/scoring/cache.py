"""On-disk cache of image embeddings, shared by runs that score the same images.

An entry is keyed by the model fingerprint (checkpoint sha256, precision, weight rounding,
preprocessing) and the sha256 of the image file's bytes, so a new checkpoint never reads
another one's embeddings, while re-scoring new captions of the same images with the same
checkpoint skips the image tower. Entries are written to a temporary file and renamed,
which makes concurrent runs and interrupted writes safe: a reader sees a whole entry or
none. A damaged entry (unreadable, truncated, another shape or dtype, non-finite values) is
treated as missing, so the job recomputes it and writes it again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

# Bump when preprocessing changes in a way that alters pixels.
PREPROCESSING_VERSION = "clip-bicubic-centercrop-v1"


def model_fingerprint(
    checkpoint_sha256: str | None, numerics: str, reference_rounding: bool, resolution: int
) -> str:
    """A string that changes whenever image embeddings of the same image could change.

    ``numerics`` is :attr:`specs_metric.scoring.scorer.Scorer.numerics` (precision, and for half
    precision the device type and kernels).
    """
    rounding = "ref-fp16-rounding" if reference_rounding else "full-precision"
    return f"{checkpoint_sha256}|{numerics}|{rounding}|{resolution}|{PREPROCESSING_VERSION}"


class EmbeddingCache:
    """Image-embedding files under ``root/<fingerprint hash>/<ab>/<content hash>.npy``."""

    def __init__(
        self, root: str | os.PathLike[str], fingerprint: str, dim: int | None = None
    ) -> None:
        self.fingerprint = fingerprint
        self.dim = dim  # the embedding width entries must have (None: any 1-D width)
        tag = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.root = Path(root) / tag
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "fingerprint.txt"
        if not info.exists():
            info.write_text(fingerprint + "\n")

    def _path(self, content_hash: str) -> Path:
        return self.root / content_hash[:2] / f"{content_hash}.npy"

    def get(self, content_hash: str) -> np.ndarray | None:
        """The cached embedding, or ``None`` if absent or damaged: unreadable, not a 1-D
        float32 array (of width ``dim`` when given), or not finite."""
        path = self._path(content_hash)
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if value.dtype != np.float32 or value.ndim != 1 or value.size == 0:
            return None
        if self.dim is not None and value.shape[0] != self.dim:
            return None
        if not np.isfinite(value).all():
            return None
        return value

    def __contains__(self, content_hash: str) -> bool:
        """Whether a usable (undamaged) entry exists."""
        return self.get(content_hash) is not None

    def put(self, content_hash: str, embedding: np.ndarray) -> None:
        """Store an embedding atomically (last writer wins; all writers write the same)."""
        path = self._path(content_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.asarray(embedding, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
