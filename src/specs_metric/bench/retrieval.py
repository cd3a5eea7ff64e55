"""Image-text retrieval: Recall@K in both directions on an image-caption set.

Protocol (the usual COCO one): every image may have several captions.

* image -> text: a query image is a hit at K when *any* of its captions is among the K
  captions most similar to it;
* text -> image: a query caption is a hit at K when *its* image is among the K images most
  similar to it.

Similarity is the cosine of the raw embeddings, computed in float64. Ranks are defined
deterministically, so that ties never depend on the sort algorithm: the rank (0-based) of
candidate ``j`` for a query is the number of candidates with a strictly greater
similarity plus the number of candidates with an equal similarity and a smaller index
(candidates in data order). ``j`` is within the top K when its rank is below K. Recall@K
is the percentage of queries that are hits.

Data sources read by :func:`read_retrieval` (see ``docs/extrinsic.md``):

* a table (``.jsonl``, ``.csv``, ``.parquet``, ``.arrow``, a ``datasets`` folder or a folder
  with ``{split}.parquet``/``{split}.jsonl``) with ``image`` and either ``caption`` (one row
  per pair; rows naming the same image are grouped) or ``captions`` (a list);
* a COCO captions file (``captions_val2017.json``) with its image folder;
* an Urban1k folder (``image/<stem>.jpg`` and ``caption/<stem>.txt``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from specs_metric.bench.embed import embed_images, embed_texts
from specs_metric.distributed import DistInfo
from specs_metric.rows import IMAGE_EXTENSIONS
from specs_metric.scorer import Scorer
from specs_metric.scores import unit_rows
from specs_metric.transform import ImageError, ImageSource

DEFAULT_KS = (1, 5, 10)
CAPTION_CHOICES = ("all", "first", "last")


class RetrievalDataError(ValueError):
    """The data cannot be read as an image-caption set (the message names file and row)."""


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


def _csv_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise RetrievalDataError(f"{path}: empty CSV file")
        records = []
        for rec in reader:
            if None in rec:
                raise RetrievalDataError(
                    f"{path}, line {reader.line_num}: malformed CSV row (too many fields)"
                )
            records.append(rec)
        return records


def _jsonl_records(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise RetrievalDataError(f"{path}, line {line_no}: invalid JSON ({exc})") from exc
    return records


def _arrow_table(path: Path) -> pa.Table:
    """An Arrow IPC file: the stream format (``datasets``) or the file format."""
    for open_ipc in (pa.ipc.open_stream, pa.ipc.open_file):
        with pa.memory_map(str(path), "r") as source:
            try:
                return open_ipc(source).read_all()
            except pa.ArrowInvalid:
                continue
    raise RetrievalDataError(f"{path}: not an Arrow IPC file")


def _file_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _jsonl_records(path)
    if suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if suffix == ".arrow":
        return _arrow_table(path).to_pylist()
    raise RetrievalDataError(
        f"{path}: unsupported file type (use .jsonl, .csv, .parquet or .arrow)"
    )


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` folder, in the order ``state.json`` records."""
    state = folder / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        if names:
            return [folder / n for n in names]
    return sorted(folder.glob("*.arrow"))


def _pick_split(available: list[str], split: str | None, where: Path) -> str:
    if split is not None:
        if split not in available:
            raise RetrievalDataError(f"{where}: no split {split!r}; available: {available}")
        return split
    if "test" in available:
        return "test"
    if len(available) == 1:
        return available[0]
    raise RetrievalDataError(f"{where}: several splits {available}; choose one with --split")


def source_files(path: Path, split: str | None = None) -> tuple[list[Path], str]:
    """The files of a table source, and how messages describe it."""
    if path.is_file():
        return [path], str(path)
    if not path.is_dir():
        raise RetrievalDataError(f"{path}: no such file or directory")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        chosen = _pick_split(list(splits), split, path)
        return _arrow_files(path / chosen), f"{path} [{chosen}]"
    if (path / "state.json").is_file() or any(path.glob("*.arrow")):
        return _arrow_files(path), str(path)
    suffixes = (".parquet", ".jsonl", ".csv")
    by_split = {p.stem: p for s in reversed(suffixes) for p in path.glob(f"*{s}")}
    if not by_split:
        raise RetrievalDataError(
            f"{path}: no datasets folder (dataset_dict.json, state.json, *.arrow) and no "
            "{split}.parquet / .jsonl / .csv file"
        )
    chosen = _pick_split(sorted(by_split), split, path)
    return [by_split[chosen]], str(by_split[chosen])


def read_records(
    path: str | Path, split: str | None = None, image_root: str | Path | None = None
) -> tuple[list[tuple[str, dict]], Path, str]:
    """Rows of a table source, each with a ``"file, row i"`` label for messages.

    Sources: a ``.csv``, ``.jsonl`` (or ``.json`` with JSON lines), ``.parquet`` or
    ``.arrow`` file; a ``datasets`` folder written by ``save_to_disk`` (read with pyarrow,
    the ``datasets`` package is not needed); or a folder holding ``{split}.parquet``,
    ``{split}.jsonl`` or ``{split}.csv``. ``split`` defaults to ``test`` where there are
    several.

    Returns:
        ``(labelled rows, image root, description)``; the image root is ``image_root`` or
        else the folder given, or the folder of the file given.
    """
    path = Path(path)
    files, description = source_files(path, split)
    rows: list[tuple[str, dict]] = []
    for file in files:
        for i, rec in enumerate(_file_records(file)):
            if not isinstance(rec, dict):
                raise RetrievalDataError(f"{file}, row {i}: not an object")
            rows.append((f"{file}, row {i}", rec))
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    return rows, root, description


def image_source(value: object, root: Path, where: str) -> ImageSource:
    """An ``image`` cell -> a path (relative ones resolved against ``root``) or bytes.

    Cells may hold a path, encoded bytes, or a Hugging Face ``Image`` struct
    (``{"bytes": ..., "path": ...}``).
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else root / p)
    raise RetrievalDataError(f"{where}: an image must be a path, bytes or an Image struct")


def image_key(source: ImageSource) -> str:
    """Identity of an image for grouping rows: its path, or a hash of its bytes."""
    if isinstance(source, bytes):
        return "sha1:" + hashlib.sha1(source).hexdigest()
    return str(source)


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
            raise ValueError(f"captions must be one of {CAPTION_CHOICES}, got {which!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"max captions per image must be at least 1, got {limit}")
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
            raise RetrievalDataError(f"{source}: no images")
        return RetrievalSet(
            self.images, self.ids, captions, np.asarray(owner, dtype=np.int64), source
        )


def _caption_list(value: object, column: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RetrievalDataError(f"{where}: {column!r} must be a string or a list of strings")
    value = [v for v in value if v.strip()]
    if not value:
        raise RetrievalDataError(f"{where}: {column!r} has no non-empty caption")
    return list(value)


def read_table(
    path: str | Path,
    *,
    split: str | None = None,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    captions: str = "all",
    max_captions_per_image: int | None = None,
) -> RetrievalSet:
    """An image-caption set from a table (see :func:`read_records` for the sources).

    Args:
        image_column: the image column (a path, bytes or an ``Image`` struct per cell).
        caption_column: the caption column (default ``caption``, else ``captions``); its
            cells are strings or lists of strings.
        captions: ``all`` captions of an image, only the ``first`` or only the ``last``
            (e.g. the full caption of cumulative ``captions`` lists).
        max_captions_per_image: keep at most this many (the first ones) per image.
    """
    rows, root, description = read_records(path, split, image_root)
    builder = _Builder(captions, max_captions_per_image)
    for where, rec in rows:
        column = caption_column or ("caption" if "caption" in rec else "captions")
        for needed in (image_column, column):
            if needed not in rec:
                raise RetrievalDataError(
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
        try:
            data = json.loads(annotations.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RetrievalDataError(f"{annotations}: cannot read COCO captions ({exc})") from exc
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise RetrievalDataError(f"{annotations}: not a COCO captions file (images, annotations)")
    root = Path(image_root) if image_root is not None else coco_image_root(annotations)
    if root is None:
        raise RetrievalDataError(
            f"{annotations}: cannot find the image folder; pass it with --image-root"
        )
    files = {}
    for i, img in enumerate(data["images"]):
        if "id" not in img or "file_name" not in img:
            raise RetrievalDataError(f"{annotations}, images[{i}]: needs 'id' and 'file_name'")
        files[img["id"]] = img["file_name"]
    by_image: dict[object, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if ann.get("image_id") not in files or not isinstance(ann.get("caption"), str):
            raise RetrievalDataError(
                f"{annotations}, annotations[{i}]: needs a known 'image_id' and a 'caption'"
            )
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    builder = _Builder(captions, max_captions_per_image)
    for image_id in sorted(by_image):
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
        raise RetrievalDataError(f"{path}: no image/ and caption/ folders (Urban1k layout)")
    images = {
        p.stem: p for p in (root / "image").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
    }
    builder = _Builder("all", None)
    for txt in sorted((root / "caption").glob("*.txt")):
        if txt.stem not in images:
            raise RetrievalDataError(f"{txt}: no image {txt.stem}.* in {root / 'image'}")
        text = " ".join(line.strip() for line in txt.read_text(encoding="utf-8").splitlines())
        if not text.strip():
            raise RetrievalDataError(f"{txt}: empty caption")
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
    """Read any supported image-caption source (the layout is recognised from ``path``)."""
    path = Path(path)
    if not path.exists():
        raise RetrievalDataError(f"{path}: no such file or directory")
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
    return read_table(
        path,
        split=split,
        image_root=image_root,
        image_column=image_column,
        caption_column=caption_column,
        captions=captions,
        max_captions_per_image=max_captions_per_image,
    )


def _coco_document(path: Path) -> dict | None:
    """The parsed file when it is one JSON object with ``annotations`` (COCO), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # e.g. JSON lines
        return None
    return data if isinstance(data, dict) and "annotations" in data else None


# --------------------------------------------------------------------------------------
# Ranks and recall
# --------------------------------------------------------------------------------------


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Deterministic 0-based rank of ``targets[q]`` among the candidates of row ``q``.

    rank = #(candidates scoring strictly higher) + #(candidates scoring the same with a
    smaller index).

    Args:
        scores: (Q, M) similarities of Q queries to M candidates.
        targets: (Q,) candidate index per query.

    Example:
        >>> target_ranks(np.array([[0.5, 0.9, 0.5]]), np.array([2])).tolist()
        [2]
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    value = scores[np.arange(len(targets)), targets][:, None]
    higher = (scores > value).sum(axis=1)
    earlier_tie = ((scores == value) & (np.arange(scores.shape[1]) < targets[:, None])).sum(axis=1)
    return higher + earlier_tie


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of ranks below each K (``100 * hits / queries``)."""
    ranks = np.asarray(ranks)
    n = len(ranks)
    return {int(k): 100.0 * int(np.sum(ranks < k)) / n if n else float("nan") for k in ks}


def retrieval_ranks(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    caption_image: np.ndarray,
    chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank of each image's captions (image -> text) and rank of each caption's image.

    Embeddings are normalised here (float64); similarities are computed a block of
    queries at a time, so the full matrix never has to fit in memory.

    Returns:
        ``(i2t, t2i)``: (n_images,) rank of the best-ranked own caption of each image, and
        (n_captions,) rank of each caption's own image.
    """
    img = unit_rows(torch.as_tensor(image_emb)).numpy()
    txt = unit_rows(torch.as_tensor(text_emb)).numpy()
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_img, n_txt = len(img), len(txt)
    t2i = np.empty(n_txt, dtype=np.int64)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        t2i[start:stop] = target_ranks(txt[start:stop] @ img.T, caption_image[start:stop])
    i2t = np.full(n_img, np.iinfo(np.int64).max, dtype=np.int64)
    caption_ids = np.arange(n_txt)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        sims = img[start:stop] @ txt.T
        mine = caption_ids[(caption_image >= start) & (caption_image < stop)]
        if len(mine) == 0:
            continue
        ranks = target_ranks(sims[caption_image[mine] - start], mine)
        np.minimum.at(i2t, caption_image[mine], ranks)
    return i2t, t2i


def recall_from_similarity(
    similarity: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[int, float]]:
    """Recall@K (percent) in both directions from a full (n_images, n_captions) matrix."""
    sims = np.asarray(similarity)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    t2i = target_ranks(sims.T, caption_image)
    pair_ranks = target_ranks(sims[caption_image], np.arange(sims.shape[1]))
    i2t = np.full(sims.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(i2t, caption_image, pair_ranks)
    return {"image_to_text": recall_at(i2t, ks), "text_to_image": recall_at(t2i, ks)}


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


def bad_image_error(errors: list[tuple[int, str]], total: int) -> ImageError:
    """One error for the images that failed, naming the first few."""
    shown = "; ".join(msg for _, msg in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ImageError(
        f"{len(errors)} of {total} images cannot be read: {shown}{more}. "
        "Use --skip-bad-images to leave them out."
    )


def evaluate_retrieval(
    scorer: Scorer,
    data: RetrievalSet,
    info: DistInfo | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
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
    )
    if images.errors and not skip_bad_images:
        raise bad_image_error(images.errors, len(data))
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
