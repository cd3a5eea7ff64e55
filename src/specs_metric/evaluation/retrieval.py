"""Image-text retrieval: Recall@K in both directions on an image-caption set.

Protocol (the usual COCO one): every image may have several captions.

* image -> text: a query image is a hit at K when *any* of its captions is among the K
  captions most similar to it;
* text -> image: a query caption is a hit at K when *its* image is among the K images most
  similar to it.

Similarity is the cosine of the raw embeddings, computed in float64. Ranks are defined
deterministically, so that ties never depend on the sort algorithm
(:mod:`specs_metric.evaluation.ranking`).

Data sources read by :func:`read_retrieval` (see ``docs/extrinsic.md``):

* a table (``.jsonl``, ``.csv``, ``.parquet``, ``.arrow``, a ``datasets`` folder or a folder
  with ``{split}.parquet``/``{split}.jsonl``; :mod:`specs_metric.data.records`) with
  ``image`` and either ``caption`` (one row per pair; rows naming the same image are
  grouped) or ``captions`` (a list);
* a COCO captions file (``captions_val2017.json``) with its image folder;
* an Urban1k folder (``image/<stem>.jpg`` and ``caption/<stem>.txt``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specs_metric.data.images import IMAGE_EXTENSIONS, ImageSource, image_key, image_source
from specs_metric.data.records import read_records
from specs_metric.errors import DataError, ImageError, UsageError, reading
from specs_metric.evaluation.embed import embed_images, embed_texts
from specs_metric.evaluation.ranking import DEFAULT_KS, recall_at, retrieval_ranks
from specs_metric.io.reading import read_text
from specs_metric.limits import MAX_JSON_INPUT_BYTES, MAX_LINE_CHARS
from specs_metric.runtime.distributed import DistInfo
from specs_metric.scoring.scorer import Scorer

CAPTION_CHOICES = ("all", "first", "last")


RetrievalDataError = DataError  # the former name of this reader's layout error


@dataclass
class RetrievalSet:
    """Images, their captions, and which image each caption belongs to.

    Attributes:
        images: one entry per distinct image (a path or encoded bytes).
        image_ids: how outputs name the images.
        captions: every caption, grouped by image in image order.
        caption_image: (n_captions,) index into ``images`` of each caption.
        source: a description of where the data came from.
    """

    images: list[ImageSource]
    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> RetrievalSet:
        """The first ``n`` images with their captions."""
        return self.subset(np.arange(len(self)) < n)

    def subset(self, keep: np.ndarray) -> RetrievalSet:
        """The images where ``keep`` (bool, per image) is true, with their captions."""
        new_index = np.cumsum(keep) - 1
        kept_caps = keep[self.caption_image]
        return RetrievalSet(
            images=[im for im, k in zip(self.images, keep, strict=True) if k],
            image_ids=[i for i, k in zip(self.image_ids, keep, strict=True) if k],
            captions=[c for c, k in zip(self.captions, kept_caps, strict=True) if k],
            caption_image=new_index[self.caption_image[kept_caps]],
            source=self.source,
        )


# --------------------------------------------------------------------------------------
# Reading data
# --------------------------------------------------------------------------------------


def _select(captions: list[str], which: str, limit: int | None) -> list[str]:
    if which == "first":
        captions = captions[:1]
    elif which == "last":
        captions = captions[-1:]
    return captions[:limit] if limit is not None else captions


class _Builder:
    """Collects (image, captions) groups in first-seen image order."""

    def __init__(self, which: str, limit: int | None) -> None:
        if which not in CAPTION_CHOICES:
            raise UsageError(f"captions must be one of {CAPTION_CHOICES}, got {which!r}")
        if limit is not None and limit < 1:
            raise UsageError(f"max captions per image must be at least 1, got {limit}")
        self.which, self.limit = which, limit
        self.index: dict[str, int] = {}
        self.images: list[ImageSource] = []
        self.ids: list[str] = []
        self.groups: list[list[str]] = []

    def add(self, image: ImageSource, image_id: str | None, captions: list[str]) -> None:
        key = image_key(image)
        if key not in self.index:
            self.index[key] = len(self.images)
            self.images.append(image)
            self.ids.append(image_id if image_id is not None else key)
            self.groups.append([])
        self.groups[self.index[key]].extend(captions)

    def build(self, source: str) -> RetrievalSet:
        captions: list[str] = []
        owner: list[int] = []
        for i, group in enumerate(self.groups):
            chosen = _select(group, self.which, self.limit)
            captions.extend(chosen)
            owner.extend([i] * len(chosen))
        if not self.images:
            raise DataError(f"{source}: no images")
        return RetrievalSet(
            self.images, self.ids, captions, np.asarray(owner, dtype=np.int64), source
        )


def _caption_list(value: object, column: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {column!r} must be a string or a list of strings")
    value = [v for v in value if v.strip()]
    if not value:
        raise DataError(f"{where}: {column!r} has no non-empty caption")
    return list(value)


def _read_caption_table(
    path: Path, split: str | None, image_root: str | Path | None, image_column: str,
    caption_column: str | None, builder: _Builder,
) -> RetrievalSet:  # fmt: skip
    """An image-caption set from a table (see :func:`read_records` for the sources)."""
    with reading(path):  # the table readers leave parser errors (UTF-8, CSV, arrow) to us
        rows, root, description = read_records(path, split, image_root)
    for where, rec in rows:
        column = caption_column or ("caption" if "caption" in rec else "captions")
        for needed in (image_column, column):
            if needed not in rec:
                raise DataError(
                    f"{where}: missing column {needed!r}; found {sorted(rec)}"
                )
        image = image_source(rec[image_column], root, where)
        row_id = rec.get("id")
        if row_id is None and isinstance(image, str):
            row_id = str(Path(image).name)
        builder.add(image, None if row_id is None else str(row_id),
                    _caption_list(rec[column], column, where))
    return builder.build(description)


def coco_image_root(annotations: Path) -> Path | None:
    """Where COCO images usually are: ``annotations/captions_val2017.json`` -> ``val2017/``."""
    split = annotations.stem.removeprefix("captions_")
    for candidate in (annotations.parent.parent / split, annotations.parent / split):
        if candidate.is_dir():
            return candidate
    return None


def read_coco(
    annotations: str | Path,
    image_root: str | Path | None = None,
    *,
    captions: str = "all",
    max_captions_per_image: int | None = None,
    document: dict | None = None,
) -> RetrievalSet:
    """COCO captions (``captions_val2017.json``): images sorted by id, captions in file order.

    Args:
        annotations: the captions JSON (keys ``images`` with ``id``/``file_name`` and
            ``annotations`` with ``image_id``/``caption``).
        image_root: the image folder (default ``val2017/`` next to ``annotations/``).
        document: the already parsed file, if at hand.
    """
    annotations = Path(annotations)
    data = document
    if data is None:
        with reading(annotations, what="cannot read COCO captions"):
            data = json.loads(read_text(annotations, MAX_JSON_INPUT_BYTES))
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) and all(isinstance(v, dict) for v in data[k])
        for k in ("images", "annotations")
    ):
        raise DataError(f"{annotations}: not a COCO captions file (lists images, annotations)")
    root = Path(image_root) if image_root is not None else coco_image_root(annotations)
    if root is None:
        raise DataError(
            f"{annotations}: cannot find the image folder; pass it with --image-root"
        )
    files = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img.get("id"), (int, str)) or not isinstance(img.get("file_name"), str):
            raise DataError(f"{annotations}, images[{i}]: needs an 'id' and a 'file_name'")
        files[img["id"]] = img["file_name"]
    by_image: dict[object, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id")
        if not isinstance(image_id, (int, str)) or image_id not in files or not isinstance(
            ann.get("caption"), str
        ):
            raise DataError(
                f"{annotations}, annotations[{i}]: needs a known 'image_id' and a 'caption'"
            )
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    builder = _Builder(captions, max_captions_per_image)
    for image_id in sorted(by_image, key=lambda k: (isinstance(k, str), k)):
        builder.add(str(root / files[image_id]), str(image_id), by_image[image_id])
    return builder.build(str(annotations))


def urban1k_root(path: Path) -> Path | None:
    """The folder holding ``image/`` and ``caption/`` (``path`` or ``path/Urban1k``)."""
    for candidate in (path, path / "Urban1k"):
        if (candidate / "image").is_dir() and (candidate / "caption").is_dir():
            return candidate
    return None


def read_urban1k(path: str | Path) -> RetrievalSet:
    """Urban1k: ``caption/<stem>.txt`` describes ``image/<stem>.jpg``; pairs sorted by stem.

    A caption file's lines are joined with spaces (Urban1k files hold one line each).
    """
    path = Path(path)
    root = urban1k_root(path)
    if root is None:
        raise DataError(f"{path}: no image/ and caption/ folders (Urban1k layout)")
    images = {
        p.stem: p for p in (root / "image").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
    }
    builder = _Builder("all", None)
    for txt in sorted((root / "caption").glob("*.txt")):
        if txt.stem not in images:
            raise DataError(f"{txt}: no image {txt.stem}.* in {root / 'image'}")
        with reading(txt):
            lines = read_text(txt, MAX_LINE_CHARS).splitlines()
            text = " ".join(line.strip() for line in lines)
        if not text.strip():
            raise DataError(f"{txt}: empty caption")
        builder.add(str(images[txt.stem]), txt.stem, [text.strip()])
    return builder.build(str(root))


def read_retrieval(
    path: str | Path,
    *,
    split: str | None = None,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    captions: str = "all",
    max_captions_per_image: int | None = None,
) -> RetrievalSet:
    """Read any supported image-caption source (the layout is recognised from ``path``):
    an Urban1k folder, COCO caption annotations, or a table (see :func:`read_records`).

    Args:
        split: the split of a ``datasets`` folder or of a folder of split files.
        image_root: folder relative image paths are joined to.
        image_column: the image column of a table (a path, bytes or an ``Image`` struct
            per cell).
        caption_column: the caption column of a table (default ``caption``, else
            ``captions``); its cells are strings or lists of strings.
        captions: ``all`` captions of an image, only the ``first`` or only the ``last``
            (e.g. the full caption of cumulative ``captions`` lists).
        max_captions_per_image: keep at most this many (the first ones) per image.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir() and urban1k_root(path) is not None:
        return read_urban1k(path)
    if path.is_file() and path.suffix.lower() == ".json":
        document = _coco_document(path)
        if document is not None:
            return read_coco(
                path,
                image_root,
                captions=captions,
                max_captions_per_image=max_captions_per_image,
                document=document,
            )
    builder = _Builder(captions, max_captions_per_image)
    return _read_caption_table(path, split, image_root, image_column, caption_column, builder)


def _coco_document(path: Path) -> dict | None:
    """The parsed file when it is one JSON object with ``annotations`` (COCO), else None."""
    try:
        data = json.loads(read_text(path, MAX_JSON_INPUT_BYTES))
    except (ValueError, RecursionError):  # e.g. JSON lines; the table reader says what is wrong
        return None
    return data if isinstance(data, dict) and "annotations" in data else None


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@dataclass
class RetrievalResult:
    """Recall@K (percent) in both directions, and what was evaluated."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    n_images: int
    n_captions: int
    skipped_images: list[str] = field(default_factory=list)
    seconds: float = 0.0
    i2t_ranks: np.ndarray | None = field(default=None, repr=False)
    t2i_ranks: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        def ranks(r: np.ndarray | None) -> dict:
            if r is None or not len(r):
                return {}
            return {"mean_rank": float(np.mean(r) + 1), "median_rank": float(np.median(r) + 1)}

        return {
            "image_to_text": {f"R@{k}": v for k, v in self.image_to_text.items()},
            "text_to_image": {f"R@{k}": v for k, v in self.text_to_image.items()},
            "image_to_text_ranks": ranks(self.i2t_ranks),
            "text_to_image_ranks": ranks(self.t2i_ranks),
            "n_images": self.n_images,
            "n_captions": self.n_captions,
            "n_skipped_images": len(self.skipped_images),
            "skipped_images": self.skipped_images,
            "seconds": self.seconds,
        }


def evaluate_retrieval(
    scorer: Scorer,
    data: RetrievalSet,
    info: DistInfo | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int | None = None,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    show_progress: bool = False,
) -> RetrievalResult | None:
    """Embed the set (sharded over torchrun ranks) and compute Recall@K on rank 0.

    Args:
        skip_bad_images: leave out images that cannot be decoded, together with their
            captions (listed in the result); otherwise raise :class:`ImageError`.

    Returns:
        The result on rank 0, ``None`` on other ranks.

    Raises:
        ImageError: (every rank) unreadable images without ``skip_bad_images``.
    """
    info = info or DistInfo()
    started = time.perf_counter()
    images = embed_images(
        scorer,
        data.images,
        info,
        batch_size=batch_size,
        num_workers=num_workers,
        show_progress=show_progress,
        skip_bad_images=skip_bad_images,
    )
    texts = embed_texts(scorer, data.captions, info)
    if not info.is_main:
        return None
    keep = images.ok.numpy()
    used = data.subset(keep) if not keep.all() else data
    if len(used) == 0:
        raise ImageError("no image could be read")
    kept_caps = keep[data.caption_image]
    i2t, t2i = retrieval_ranks(
        images.embeddings[torch.from_numpy(keep)], texts[torch.from_numpy(kept_caps)],
        used.caption_image,
    )
    return RetrievalResult(
        image_to_text=recall_at(i2t, ks),
        text_to_image=recall_at(t2i, ks),
        n_images=len(used),
        n_captions=len(used.captions),
        skipped_images=[msg for _, msg in images.errors],
        seconds=time.perf_counter() - started,
        i2t_ranks=i2t,
        t2i_ranks=t2i,
    )
