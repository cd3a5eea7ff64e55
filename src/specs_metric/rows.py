"""Reading the rows of a scoring job: JSONL, CSV, or a clipscore-style JSON mapping.

Every input row becomes exactly one :class:`Row`; a row that cannot be used carries an
``error`` naming the line and the problem instead of stopping the job.

Formats:

- ``.jsonl``: one JSON object per line with ``image``, ``caption`` and optionally ``id``;
- ``.csv``: a header with ``image``, ``caption`` and optionally ``id``;
- ``.json``: ``{"image_id": "caption", ...}`` (clipscore's format); the image is the file
  ``<image_id>.<ext>`` in the image root (ext one of :data:`IMAGE_EXTENSIONS`); or a COCO
  results list ``[{"image_id": 42, "caption": "..."}]`` (see :mod:`specs_metric.sources.coco`);
- webdataset shards, parquet, arrow and HF ``datasets`` folders, globs, brace ranges and
  fsspec URLs: see :mod:`specs_metric.sources`.

Relative image paths are resolved against ``image_root`` (default: the input file's folder).
A row without ``id`` gets its 0-based row number as id.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specs_metric.sources import SourceOptions

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Row:
    """One input row of a scoring job."""

    index: int  # 0-based position in the input
    line: int  # 1-based line number in the input file (for messages)
    id: object
    image: str | None  # as given in the input
    caption: object
    path: Path | None = None  # resolved image file
    error: str | None = None
    data: bytes | None = None  # the image itself, when the input holds it (shards, tables)
    where: str | None = None  # position for messages when not a line (shard member, table row)

    @property
    def label(self) -> str:
        """Where the row is, for messages: ``line N`` or e.g. ``shard.tar: sample 'k'``."""
        return self.where or f"line {self.line}"


def _check(row: Row) -> Row:
    if row.error:
        return row
    if row.data is None and (not isinstance(row.image, str) or not row.image.strip()):
        row.error = f"{row.label}: row has no image"
    elif not isinstance(row.caption, str):
        row.error = f"{row.label}: caption is not a string (got {type(row.caption).__name__})"
    elif not row.caption.strip():
        row.error = f"{row.label}: caption is empty"
    return row


def _resolve(image: object, root: Path) -> Path | None:
    if not isinstance(image, str) or not image.strip():
        return None
    path = Path(image).expanduser()
    return path if path.is_absolute() else root / path


def _jsonl_rows(path: Path, root: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        index = 0
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                yield Row(
                    index,
                    line_no,
                    index,
                    None,
                    None,
                    None,
                    f"line {line_no}: malformed JSON line ({exc})",
                )
            else:
                image = obj.get("image")
                yield _check(
                    Row(
                        index,
                        line_no,
                        obj.get("id", index),
                        image,
                        obj.get("caption"),
                        _resolve(image, root),
                    )
                )
            index += 1


def _csv_rows(path: Path, root: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: CSV header lacks column(s) {sorted(missing)}")
        for index, rec in enumerate(reader):
            line_no = reader.line_num
            if None in rec:  # more fields than the header
                yield Row(
                    index,
                    line_no,
                    rec.get("id") or index,
                    None,
                    None,
                    None,
                    f"line {line_no}: malformed CSV row (too many fields)",
                )
                continue
            image = rec.get("image")
            row = Row(
                index,
                line_no,
                rec.get("id") or index,
                image,
                rec.get("caption"),
                _resolve(image, root),
            )
            yield _check(row)


def _find_image(root: Path, image_id: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        candidate = root / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    direct = root / image_id
    return direct


def _mapping_rows(path: Path, root: Path, options: SourceOptions) -> Iterator[Row]:
    with open(path, encoding="utf-8") as fh:
        try:
            mapping = json.load(fh)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(mapping, list):  # a COCO results file
        from specs_metric.sources.coco import coco_rows

        yield from coco_rows(mapping, path, root, options)
        return
    if not isinstance(mapping, dict):
        raise ValueError(
            f"{path}: expected a JSON object {{image_id: caption}} or a COCO results list"
        )
    for index, (image_id, caption) in enumerate(mapping.items()):
        found = _find_image(root, image_id)
        yield _check(Row(index, index + 1, image_id, found.name, caption, found))


def read_rows(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
) -> Iterator[Row]:
    """Stream the rows of a scoring input: a file, or shards/tables/URLs (see
    :mod:`specs_metric.sources`).

    Raises:
        ValueError: unsupported extension or an unreadable header/document (not per-row).
        FileNotFoundError: the input does not exist.
    """
    from specs_metric.sources import SourceOptions, is_plain_file, read_source

    options = options or SourceOptions()
    if not is_plain_file(path):
        return read_source(path, image_root, options)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path, root)
    if suffix == ".csv":
        return _csv_rows(path, root)
    if suffix == ".json":
        return _mapping_rows(path, root, options)
    raise ValueError(f"{path}: unsupported input format {suffix!r} (use .jsonl, .csv or .json)")


def count_rows(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
) -> int:
    """Number of rows :func:`read_rows` yields (one streaming pass)."""
    return sum(1 for _ in read_rows(path, image_root, options))

