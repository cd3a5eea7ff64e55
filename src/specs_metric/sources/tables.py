"""Tables: parquet files, arrow files and HF ``datasets`` ``save_to_disk`` folders.

The image column (``image`` by default) holds image bytes, an image path (relative paths
resolve against the image root, default the table's folder), or an HF ``datasets`` image
struct ``{"bytes": ..., "path": ...}`` (the bytes when present, else the path). The caption
column defaults to ``caption``; the id column to ``id`` and, when the table has none, the
0-based row number is the id.

An HF ``save_to_disk`` folder holds ``state.json`` listing its arrow files (the arrow IPC
stream format); a ``DatasetDict`` folder holds one such folder per split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from specs_metric.rows import Row, check_row, resolve_image
from specs_metric.sources import SourceOptions, local_root, open_binary

_BATCH_ROWS = 256  # rows decoded from the table at a time


def dataset_folder_files(folder: str) -> list[str]:
    """The arrow files of an HF ``save_to_disk`` folder, in order.

    Raises:
        ValueError: the folder is not a saved dataset (or holds several splits).
    """
    root = Path(folder)
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(
            f"{folder}: a DatasetDict with splits {splits}; give one split's folder, "
            f"e.g. {root / (splits[0] if splits else 'train')}"
        )
    state = root / "state.json"
    if not state.is_file():
        raise ValueError(
            f"{folder}: not an HF datasets folder (no state.json); give files or a pattern"
        )
    try:
        files = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{state}: unreadable dataset state ({exc})") from exc
    return [str(root / name) for name in files]


def _batches(name: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of a parquet or arrow (IPC stream or file) table."""
    with open_binary(name) as fh:
        if Path(name).suffix.lower() == ".parquet":
            try:
                table = pq.ParquetFile(fh)
            except pa.ArrowException as exc:
                raise ValueError(f"{name}: not a readable parquet file ({exc})") from exc
            yield from table.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
            return
        data = fh.read()
    try:
        reader = pa.ipc.open_stream(data)
        yield from reader
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_file(data)
        except pa.ArrowException as exc:
            raise ValueError(f"{name}: not a readable arrow file ({exc})") from exc
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _schema_names(name: str) -> list[str]:
    with open_binary(name) as fh:
        if Path(name).suffix.lower() == ".parquet":
            try:
                return pq.ParquetFile(fh).schema_arrow.names
            except pa.ArrowException as exc:
                raise ValueError(f"{name}: not a readable parquet file ({exc})") from exc
    for batch in _batches(name):
        return batch.schema.names
    return []


def _image_value(value: object, root: Path) -> tuple[str | None, Path | None, bytes | None]:
    """``(image as shown in the output, resolved path, bytes)`` of one image cell."""
    if isinstance(value, dict):  # HF datasets Image struct
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return path, None, bytes(data)
        value = path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None, None, bytes(value)
    if isinstance(value, str):
        return value, resolve_image(value, root), None
    return None, None, None


def table_rows(
    name: str,
    image_root: str | os.PathLike[str] | None,
    options: SourceOptions,
    label: str | None = None,
    first: int = 0,
) -> Iterator[Row]:
    """One :class:`Row` per table row of ``name``; ``first`` numbers the rows of the table
    after a previous table of the same dataset."""
    names = _schema_names(name)
    missing = [c for c in (options.image_column, options.caption_column) if c not in names]
    if missing:
        raise ValueError(
            f"{name}: no column(s) {missing} (columns: {names}); "
            "choose with --image-column / --caption-column"
        )
    columns = [options.image_column, options.caption_column]
    has_id = options.id_column in names
    if has_id:
        columns.append(options.id_column)
    root = local_root(name, image_root)
    label = label or Path(name).name
    index = first
    for batch in _batches(name, columns):
        cells = {c: batch.column(c).to_pylist() for c in columns}
        for k in range(batch.num_rows):
            image, path, data = _image_value(cells[options.image_column][k], root)
            where = f"{label}: row {index}"
            row = Row(
                index,
                index + 1,
                cells[options.id_column][k] if has_id else index,
                image,
                cells[options.caption_column][k],
                path,
                None,
                data,
                where,
            )
            index += 1
            yield check_row(row)


def dataset_folder_rows(
    folder: str, image_root: str | os.PathLike[str] | None, options: SourceOptions
) -> Iterator[Row]:
    """The rows of an HF ``save_to_disk`` folder: its arrow files in order, numbered as one
    table."""
    count = 0
    label = Path(folder).name
    for name in dataset_folder_files(folder):
        for row in table_rows(name, image_root or folder, options, label=label, first=count):
            count += 1
            yield row
