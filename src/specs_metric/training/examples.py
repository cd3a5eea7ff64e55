"""Reading the input rows of ``specs prepare``: image/long-caption pairs from JSON, JSONL,
CSV/TSV, parquet or a ``datasets`` folder, and checking that their images exist and open.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from specs_metric.data.hf_folders import (
    choose_split,
    dataset_splits,
    is_dataset_folder,
    read_files,
    split_files,
)
from specs_metric.data.images import resolve_image_cell
from specs_metric.errors import DataError, ImageError, PrepareError, describe_parse_error, reading
from specs_metric.io.jsonio import read_jsonl
from specs_metric.io.reading import open_regular, open_text, read_parquet, read_text
from specs_metric.limits import MAX_IMAGE_BYTES, MAX_JSON_INPUT_BYTES


@dataclass
class Example:
    """One input row: its 1-based row number, its image and its caption."""

    row: int
    image: Any
    caption: Any


def read_table(path: str | Path) -> pa.Table:
    """Read a parquet file or a Hugging Face ``datasets`` directory as an Arrow table.

    A ``datasets`` directory (``save_to_disk``) is read from the Arrow files its
    ``state.json`` lists, memory-mapped, without needing the ``datasets`` package. For a
    ``DatasetDict`` directory the ``train`` split (or the only split) is used.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".parquet":
            raise PrepareError(f"{path}: expected a .parquet file or a datasets directory")
        with reading(path, PrepareError):
            return read_parquet(path, error=PrepareError)
    if not path.is_dir():
        raise PrepareError(f"{path}: no such file or directory")
    splits = dataset_splits(path)
    if splits is not None:
        return read_table(path / choose_split(splits, None, "train", path))
    if is_dataset_folder(path):
        with reading(path, PrepareError):
            return read_files(split_files(path))
    parquet_files = sorted(path.glob("*.parquet"))
    if parquet_files:
        with reading(path, PrepareError):
            return pa.concat_tables([read_parquet(p, error=PrepareError) for p in parquet_files])
    raise PrepareError(f"{path}: not a datasets directory (no state.json or dataset_dict.json)")


def _caption_of(record: dict, where: str) -> Any:
    if "caption" in record:
        return record["caption"]
    conversations = record.get("conversations")
    if isinstance(conversations, list) and conversations:
        last = conversations[-1]
        return last.get("value") if isinstance(last, dict) else None
    if conversations is not None:
        return None
    raise PrepareError(f"{where}: no 'caption' or 'conversations' field")


def _check_record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise PrepareError(f"{where}: expected an object, got {type(record).__name__}")
    if "image" not in record:
        raise PrepareError(f"{where}: no 'image' field")
    return record


def iter_examples(path: str | Path) -> Iterator[Example]:
    """Read image/caption rows from ShareGPT4V-style JSON, JSONL, CSV, parquet or a
    ``datasets`` directory.

    JSON is a list of objects with ``image`` and ``conversations`` (the caption is the value
    of the last turn) or ``caption``; JSONL and CSV rows have ``image`` and ``caption``.

    Raises:
        PrepareError: the file cannot be parsed or lacks the needed fields; the message
            names the file and the row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        table = read_table(path)
        for column in ("image", "caption"):
            if column not in table.column_names:
                raise PrepareError(f"{path}: no {column!r} column (has {table.column_names})")
        images = table.column("image").to_pylist()
        captions = table.column("caption").to_pylist()
        for row, (image, caption) in enumerate(zip(images, captions, strict=True), start=1):
            yield Example(row, image, caption)
    elif not path.is_file():
        raise PrepareError(f"{path}: no such file")
    elif suffix == ".json":
        try:
            records = json.loads(read_text(path, MAX_JSON_INPUT_BYTES, error=PrepareError))
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8, nesting
            raise PrepareError(f"{path}: invalid JSON ({describe_parse_error(exc)})") from exc
        if not isinstance(records, list):
            raise PrepareError(f"{path}: expected a JSON list of objects")
        for row, record in enumerate(records, start=1):
            record = _check_record(record, f"{path} row {row}")
            yield Example(row, record["image"], _caption_of(record, f"{path} row {row}"))
    elif suffix == ".jsonl":
        with reading(path, PrepareError):  # deep nesting, huge numbers: left to us
            for row, record in read_jsonl(path, where="{path} line {line}", error=PrepareError):
                record = _check_record(record, f"{path} line {row}")
                yield Example(row, record["image"], _caption_of(record, f"{path} line {row}"))
    elif suffix in (".csv", ".tsv"):
        fh = open_text(path, what="input file", error=PrepareError, newline="")
        with fh, reading(path, PrepareError):
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            missing = {"image", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise PrepareError(f"{path}: missing column(s) {sorted(missing)}")
            for row, record in enumerate(reader, start=1):
                yield Example(row, record["image"], record["caption"])
    else:
        raise PrepareError(
            f"{path}: unsupported input (use .json, .jsonl, .csv, .tsv, .parquet or a "
            "datasets directory)"
        )


def resolve_image(image: Any, root: Path) -> str | bytes | None:
    """A path (relative paths resolved by the one rule of :mod:`specs_metric.data.images`,
    made absolute so the training table works from any folder) or encoded bytes; None for a
    cell that names no image."""
    try:
        source = resolve_image_cell(image, root).source
    except DataError:
        return None
    return source if isinstance(source, bytes) else os.path.abspath(source)


def image_problem(image: str | bytes | None) -> str | None:
    """``"missing_image"``, ``"unreadable_image"`` or None (header check, like the reference).

    Files are opened by the bounded reader: a FIFO or a device is missing, never read."""
    if image is None:
        return "missing_image"
    try:
        fh = io.BytesIO(image) if isinstance(image, bytes) else open_regular(
            image, max_bytes=MAX_IMAGE_BYTES, what="image file", error=ImageError
        )
    except ImageError:
        return "missing_image"
    try:
        with fh, Image.open(fh) as img:
            img.size  # noqa: B018 - the header must parse
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return "unreadable_image"
    return None
