"""Scoring (image, caption) pairs that arrive a call at a time, with per-pair errors.

The integrations (a TRL reward, the lmms-eval task, the training callbacks, the scoring
service) get pairs from another program, not from a file; a pair that cannot be scored must
cost that pair, not the call. :class:`PairScorer` does what ``specs score`` does to a row,
with the same code and so the same messages:

- each pair becomes a :class:`~specs_metric.data.rows.Row` by the data layer's checks
  (:func:`~specs_metric.data.rows.build_row`: the caption, and the image cell through the
  image-cell resolver, confined to an image root when asked);
- the caption is tokenized as the model reads it
  (:class:`~specs_metric.scoring.prepare.RowPreparer`);
- the image is read by the bounded reader and decoded in bounded memory, and embedded by
  the shared :class:`~specs_metric.scoring.image_embeddings.ImageEncoder`, whose in-memory
  cache keeps each distinct image (by content) across calls: a reward that sees the same
  prompts' images every step encodes each once;
- captions are embedded in length-sorted, padding-trimmed batches
  (:meth:`~specs_metric.scoring.scorer.Scorer.embed_token_ids`) sized by the device batch
  policy, as in ``specs score``.

Besides paths and encoded bytes, an image may be a PIL image (TRL and ``datasets`` decode
image columns). A :class:`PairScorer` is not thread-safe: give each thread its own, or
call it from one thread (the service's model thread).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from specs_metric.data.rows import Row, build_row, caption_problem, printable
from specs_metric.errors import ImageError, UsageError
from specs_metric.processing.transform import decode_pixels, preprocess
from specs_metric.runtime.policy import device_policy
from specs_metric.scoring.image_embeddings import (
    DEFAULT_MEMORY_CACHE_SIZE,
    ImageEncoder,
    content_hash,
    pil_key,
)
from specs_metric.scoring.prepare import RowPreparer, image_name, row_image_bytes
from specs_metric.scoring.scales import apply_scale, check_scale, cosine_similarity
from specs_metric.scoring.scorer import Scorer

PATHS_REFUSED = "image paths are not accepted here; send the image's bytes"

# What each pair's record holds, as in a `specs score` output row.
RESULT_FIELDS = ("score", "cosine", "tokens", "truncated", "warning", "error")


@dataclass
class PairScores:
    """The result of :meth:`PairScorer.score`: one record per pair, in order.

    Each record holds ``score``, ``cosine``, ``tokens``, ``truncated``, ``warning`` and
    ``error`` as a ``specs score`` output row does (``score`` and ``cosine`` are ``None``
    for a pair with an error, whose message starts with the pair's label).
    """

    records: list[dict] = field(default_factory=list)

    @property
    def scores(self) -> list[float | None]:
        return [r["score"] for r in self.records]

    @property
    def errors(self) -> list[str | None]:
        return [r["error"] for r in self.records]

    def mean(self) -> float | None:
        """The mean score of the scored pairs (``None`` when none was scored)."""
        values = [s for s in self.scores if s is not None]
        return sum(values) / len(values) if values else None


def _empty_record() -> dict:
    return dict.fromkeys(RESULT_FIELDS)


class PairScorer:
    """Scores 1:1 (image, caption) pairs with a :class:`Scorer`, one error per bad pair.

    Args:
        scorer: the model.
        scale: score scale (``specs``, ``clip-s``, ``cosine``, ``torchmetrics``).
        image_root: the folder relative image paths resolve against (default: the current
            folder).
        confine: image paths must stay inside ``image_root`` (symbolic links followed);
            ``~`` and absolute paths outside it are refused.
        accept_paths: ``False``: an image given as a path is an error of its pair (a
            service started without an image root takes bytes only).
        image_batch, token_budget, max_text_rows: forward-pass sizes (default: the device
            batch policy of ``specs score``).
        memory_cache_size: image embeddings kept in memory across calls.
    """

    def __init__(
        self,
        scorer: Scorer,
        scale: str = "specs",
        *,
        image_root: str | os.PathLike[str] | None = None,
        confine: bool = False,
        accept_paths: bool = True,
        image_batch: int | None = None,
        token_budget: int | None = None,
        max_text_rows: int | None = None,
        memory_cache_size: int = DEFAULT_MEMORY_CACHE_SIZE,
    ) -> None:
        policy = device_policy(scorer.device)
        self.scorer = scorer
        self.scale = check_scale(scale)
        self.image_root = Path(image_root) if image_root is not None else Path(".")
        self.confine = confine
        self.accept_paths = accept_paths
        self.token_budget = token_budget or policy.token_budget
        self.max_text_rows = max_text_rows or policy.max_text_rows
        self.encoder = ImageEncoder(
            scorer,
            image_batch or policy.image_batch,
            memory_cache_size,
            fixed_shape=policy.fixed_shape_images,
        )
        self.preparer = RowPreparer(scorer.tokenizer, scorer.context_length, scorer.long_captions)

    # --- one pair ---------------------------------------------------------------------
    def _row(self, index: int, image: object, caption: object, label: str) -> Row:
        """The pair as a checked row (an error row when it cannot be used)."""
        if isinstance(image, Image.Image):
            problem = caption_problem(caption)
            return Row(
                index, index + 1, index, "PIL image", printable(caption),
                error=f"{label}: {problem}" if problem else None, where=label,
            )  # fmt: skip
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        is_path = isinstance(image, str) or (isinstance(image, dict) and not image.get("bytes"))
        if is_path and not self.accept_paths and image:
            return Row(index, index + 1, index, None, printable(caption), where=label,
                       error=f"{label}: {PATHS_REFUSED}")  # fmt: skip
        fields = {"image": image, "caption": caption}
        return build_row(
            index, fields, self.image_root, where=label, image_cell=True, confine=self.confine,
            missing_id=index,
        )  # fmt: skip

    def _pixels(self, row: Row, image: object, pixels: dict) -> str:
        """The image's key; its pixels go into ``pixels`` unless the encoder's memory or
        this call has them. Raises :class:`ImageError`."""
        preprocessing = self.scorer.preprocessing
        if isinstance(image, Image.Image):
            key = pil_key(image)
            if key not in pixels and key not in self.encoder.memory:
                pixels[key] = preprocess(image, preprocessing)
            return key
        data = row_image_bytes(row)
        key = content_hash(data)
        if key not in pixels and key not in self.encoder.memory:
            pixels[key] = decode_pixels(data, image_name(row), preprocessing)
        return key

    # --- a call -----------------------------------------------------------------------
    def score(
        self,
        images: Sequence[object],
        captions: Sequence[object],
        labels: Sequence[str] | None = None,
    ) -> PairScores:
        """Score ``(images[i], captions[i])``.

        Args:
            images: paths, encoded bytes, HF ``{"bytes", "path"}`` structs or PIL images.
            captions: strings (anything else is an error of its pair).
            labels: how messages name each pair (default ``pair 1``, ``pair 2``, ...).

        Raises:
            UsageError: ``images`` and ``captions`` differ in length.
        """
        n = len(images)
        if len(captions) != n:
            raise UsageError(f"{n} images but {len(captions)} captions")
        labels = list(labels) if labels is not None else [f"pair {i + 1}" for i in range(n)]
        records = [_empty_record() for _ in range(n)]
        valid: list[int] = []
        tokens: list[list[int]] = []
        keys: list[str] = []
        pixels: dict = {}
        for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
            row = self._row(i, image, caption, labels[i])
            rec, ids = self.preparer.prepare(row)
            out = records[i]
            for name in ("tokens", "truncated", "warning", "error"):
                out[name] = rec[name]
            if ids is None:
                continue
            try:
                keys.append(self._pixels(row, image, pixels))
            except ImageError as exc:
                out["error"] = f"{labels[i]}: {exc}"
                continue
            valid.append(i)
            tokens.append(ids)
        if valid:
            self._embed_and_score(records, labels, valid, tokens, keys, pixels)
        return PairScores(records)

    def _embed_and_score(self, records, labels, valid, tokens, keys, pixels) -> None:
        result = self.encoder.embed_prepared(keys, pixels)
        for j, message in result.errors:
            records[valid[j]]["error"] = f"{labels[valid[j]]}: {message}"
        keep = result.ok.tolist()
        valid = [v for v, k in zip(valid, keep, strict=True) if k]
        tokens = [t for t, k in zip(tokens, keep, strict=True) if k]
        if not valid:
            return
        text = self.scorer.embed_token_ids(tokens, self.token_budget, self.max_text_rows)
        cosines = cosine_similarity(result.embeddings[result.ok], text)
        scores = apply_scale(cosines, self.scale)
        for i, c, s in zip(valid, cosines.tolist(), scores.tolist(), strict=True):
            if math.isfinite(c):
                records[i]["cosine"], records[i]["score"] = c, s
            else:
                records[i]["error"] = (
                    f"{labels[i]}: the score is not finite ({c}); the model's weights or this "
                    "pair's embeddings hold NaN or infinite values"
                )
