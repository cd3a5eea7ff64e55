"""Zero-shot classification with prompt-template ensembling.

Every class name is put into every template (``"a photo of a {}."``); each prompt is
embedded and L2-normalised, the prompts of a class are averaged and the mean normalised
again: that is the class's embedding. An image is assigned the classes whose embeddings
have the highest cosine with its own. Top-K accuracy is the percentage of images whose true
class is within the K best, with the deterministic ranks of
:func:`specs_metric.evaluation.ranking.target_ranks` (ties go to the class listed first).

Data (see ``docs/extrinsic.md``): an ImageFolder-style directory ``root/<class>/<image>``,
or a table (JSONL, CSV, parquet, ``datasets`` folder) with ``image`` and a label column;
labels are class keys (strings) or 0-based class indices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specs_metric.data.images import IMAGE_EXTENSIONS, ImageSource, image_source
from specs_metric.data.records import read_records
from specs_metric.errors import DataError, ImageError, reading
from specs_metric.evaluation.embed import embed_images, embed_texts
from specs_metric.evaluation.ranking import recall_at, target_ranks
from specs_metric.evaluation.templates import get_classes
from specs_metric.runtime.distributed import DistInfo
from specs_metric.scoring.scales import unit_rows
from specs_metric.scoring.scorer import Scorer

DEFAULT_KS = (1, 5)


LabelledDataError = DataError  # the former name of this reader's layout error


@dataclass
class LabelledSet:
    """Images with one class each.

    Attributes:
        images: paths or encoded bytes.
        labels: (N,) class index of each image.
        class_keys: what the data calls each class (folder name, label string).
        class_names: what the prompts call each class.
        image_ids: how outputs name the images.
        source: where the data came from.
    """

    images: list[ImageSource]
    labels: np.ndarray
    class_keys: list[str]
    class_names: list[str]
    image_ids: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> LabelledSet:
        """The first ``n`` images (the class list is kept)."""
        return LabelledSet(
            self.images[:n],
            self.labels[:n],
            self.class_keys,
            self.class_names,
            self.image_ids[:n],
            self.source,
        )


# --------------------------------------------------------------------------------------
# Reading data
# --------------------------------------------------------------------------------------


def _is_image_folder(path: Path) -> bool:
    table_markers = ("dataset_dict.json", "state.json")
    if any((path / m).is_file() for m in table_markers):
        return False
    if any(path.glob("*.parquet")) or any(path.glob("*.arrow")) or any(path.glob("*.jsonl")):
        return False
    return any(p.is_dir() for p in path.iterdir())


def _class_index(
    found: Sequence[str], classes: tuple[list[str], list[str]] | None, where: str
) -> tuple[dict[str, int], list[str], list[str]]:
    """Map the label keys found in the data to class indices.

    With no class list the classes are the sorted keys found. With one, keys must be
    class keys; for folders only, when none of them is and their number equals the number
    of classes, sorted folders pair with the listed classes in order (e.g. ImageNet folder
    ids with a list of 1000 names).
    """
    found = sorted(set(found))
    if classes is None:
        return {k: i for i, k in enumerate(found)}, found, [k.replace("_", " ") for k in found]
    keys, names = classes
    index = {k: i for i, k in enumerate(keys)}
    unknown = [k for k in found if k not in index]
    if not unknown:
        return index, keys, names
    if where == "folders" and len(unknown) == len(found) == len(keys):
        return {k: i for i, k in enumerate(found)}, keys, names
    shown = ", ".join(repr(k) for k in unknown[:5])
    raise DataError(
        f"{len(unknown)} label(s) in the {where} are not in the class list: {shown}"
        + (" ..." if len(unknown) > 5 else "")
    )


def read_image_folder(
    root: str | Path, classes: tuple[list[str], list[str]] | None = None
) -> LabelledSet:
    """``root/<class>/**/<image>`` (image files by extension, sorted)."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    files: list[tuple[str, Path]] = []
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((folder.name, file))
    if not files:
        raise DataError(f"{root}: no images in class folders (root/<class>/<image>)")
    index, keys, names = _class_index([f.name for f in folders], classes, "folders")
    return LabelledSet(
        images=[str(f) for _, f in files],
        labels=np.asarray([index[c] for c, _ in files], dtype=np.int64),
        class_keys=list(keys),
        class_names=list(names),
        image_ids=[str(f.relative_to(root)) for _, f in files],
        source=str(root),
    )


def field_value(record: dict, column: str, where: str) -> object:
    """``record[column]``; a dotted column (``scene.background``, ``scene.objects.0.shape``)
    walks into nested objects, lists (by index) and JSON-encoded strings."""
    value: object = record
    for part in column.split("."):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):  # a plain string
                pass
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(
            part
        ) < len(value):
            value = value[int(part)]
        else:
            raise DataError(f"{where}: no field {column!r} (stopped at {part!r})")
    return value


def read_labelled_table(
    path: str | Path,
    classes: tuple[list[str], list[str]] | None = None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    split: str | None = None,
    image_root: str | Path | None = None,
) -> LabelledSet:
    """Images with labels from a table (sources as in
    :func:`specs_metric.data.records.read_records`).

    Labels are strings (class keys) or integers (0-based indices into ``classes``, which
    are then required).
    """
    with reading(path):  # the table readers leave parser errors (UTF-8, CSV, arrow) to us
        rows, root, description = read_records(path, split, image_root)
    images, raw, ids = [], [], []
    for where, rec in rows:
        if image_column not in rec:
            raise DataError(
                f"{where}: missing column {image_column!r}; found {sorted(rec)}"
            )
        label = field_value(rec, label_column, where)
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where}: label must be a string or an integer, got {label!r}")
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            if classes is None or label.strip() not in classes[0]:
                label = int(label)  # CSV cells are strings
        images.append(image_source(rec[image_column], root, where))
        raw.append((label, where))
        row_id = rec.get("id")
        ids.append(str(row_id) if row_id is not None else where)
    if not images:
        raise DataError(f"{description}: no rows")
    if any(isinstance(label, int) for label, _ in raw):
        if classes is None:
            raise DataError(f"{description}: integer labels need a class list (--classes)")
        keys, names = classes
        labels = []
        for label, where in raw:
            if isinstance(label, int):
                if not 0 <= label < len(keys):
                    raise DataError(
                        f"{where}: label {label} is not a class index (0..{len(keys) - 1})"
                    )
                labels.append(label)
            else:
                if label not in keys:
                    raise DataError(f"{where}: label {label!r} is not in the class list")
                labels.append(keys.index(label))
    else:
        index, keys, names = _class_index([label for label, _ in raw], classes, "labels")
        labels = [index[label] for label, _ in raw]
    return LabelledSet(
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        class_keys=list(keys),
        class_names=list(names),
        image_ids=ids,
        source=description,
    )


def read_labelled(
    path: str | Path,
    classes: str | None = None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    split: str | None = None,
    image_root: str | Path | None = None,
) -> LabelledSet:
    """An ImageFolder directory or a labelled table; ``classes`` as for
    :func:`specs_metric.evaluation.templates.get_classes` (default: the labels found)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    class_list = get_classes(classes) if classes is not None else None
    if path.is_dir() and _is_image_folder(path):
        return read_image_folder(path, class_list)
    return read_labelled_table(
        path,
        class_list,
        image_column=image_column,
        label_column=label_column,
        split=split,
        image_root=image_root,
    )


# --------------------------------------------------------------------------------------
# Classifier and accuracy
# --------------------------------------------------------------------------------------


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major (C x T)."""
    return [t.replace("{}", name) for name in class_names for t in templates]


def class_embeddings(
    scorer: Scorer,
    class_names: Sequence[str],
    templates: Sequence[str],
    info: DistInfo | None = None,
) -> torch.Tensor:
    """(C, D) float64 unit-norm class embeddings: the normalised mean of the normalised
    embeddings of a class's prompts."""
    emb = embed_texts(scorer, prompts(class_names, templates), info)
    per_prompt = unit_rows(emb).view(len(class_names), len(templates), -1)
    return unit_rows(per_prompt.mean(dim=1))


def topk_accuracy(
    scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[int, float]:
    """Top-K accuracy (percent) of (N, C) class scores with deterministic tie-breaking."""
    return recall_at(target_ranks(scores, labels), ks)


def per_class_accuracy(ranks: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Top-1 accuracy (percent) of each class; NaN for classes without images."""
    out = np.full(n_classes, np.nan)
    for c in np.unique(labels):
        out[c] = 100.0 * float(np.mean(ranks[labels == c] < 1))
    return out


@dataclass
class ZeroShotResult:
    """Accuracy of zero-shot classification, and what was evaluated."""

    accuracy: dict[int, float]
    mean_per_class: float
    per_class: dict[str, float]
    n_images: int
    n_classes: int
    n_templates: int
    skipped_images: list[str] = field(default_factory=list)
    seconds: float = 0.0
    predictions: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "accuracy": {f"top{k}": v for k, v in self.accuracy.items()},
            "mean_per_class_top1": self.mean_per_class,
            "per_class_top1": self.per_class,
            "n_images": self.n_images,
            "n_classes": self.n_classes,
            "n_templates": self.n_templates,
            "n_skipped_images": len(self.skipped_images),
            "skipped_images": self.skipped_images,
            "seconds": self.seconds,
        }


def evaluate_zeroshot(
    scorer: Scorer,
    data: LabelledSet,
    templates: Sequence[str],
    info: DistInfo | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int | None = None,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    show_progress: bool = False,
) -> ZeroShotResult | None:
    """Classify every image (embedding sharded over torchrun ranks); metrics on rank 0.

    Args:
        skip_bad_images: leave out images that cannot be decoded (listed in the result);
            otherwise raise :class:`ImageError`.

    Returns:
        The result on rank 0, ``None`` on other ranks.
    """
    info = info or DistInfo()
    started = time.perf_counter()
    weights = class_embeddings(scorer, data.class_names, templates, info)
    images = embed_images(
        scorer,
        data.images,
        info,
        batch_size=batch_size,
        num_workers=num_workers,
        show_progress=show_progress,
        skip_bad_images=skip_bad_images,
    )
    if not info.is_main:
        return None
    keep = images.ok
    if not bool(keep.any()):
        raise ImageError("no image could be read")
    scores = (unit_rows(images.embeddings[keep]) @ weights.T).numpy()
    labels = data.labels[keep.numpy()]
    ranks = target_ranks(scores, labels)
    per_class = per_class_accuracy(ranks, labels, len(data.class_names))
    present = ~np.isnan(per_class)
    return ZeroShotResult(
        accuracy=recall_at(ranks, ks),
        mean_per_class=float(np.mean(per_class[present])),
        per_class={
            data.class_keys[c]: float(per_class[c]) for c in range(len(per_class)) if present[c]
        },
        n_images=int(keep.sum()),
        n_classes=len(data.class_names),
        n_templates=len(templates),
        skipped_images=[msg for _, msg in images.errors],
        seconds=time.perf_counter() - started,
        predictions=np.argmax(scores, axis=1),
    )
