"""Benchmark tables read as labelled records (their image cells are resolved by
:func:`specs_metric.data.images.image_source`).

Sources: a ``.csv``, ``.jsonl`` (or ``.json`` with JSON lines), ``.parquet`` or ``.arrow``
file; a Hugging Face ``datasets`` folder (:mod:`specs_metric.data.hf_folders`); or a folder
holding ``{split}.parquet``, ``{split}.jsonl`` or ``{split}.csv``. Used by the retrieval
and zero-shot readers. Every problem raises :class:`~specs_metric.errors.DataError` naming
the file and row.
"""

from __future__ import annotations

import csv
from pathlib import Path

from specs_metric.data import hf_folders
from specs_metric.data.hf_folders import read_arrow
from specs_metric.errors import DataError, reading
from specs_metric.io.jsonio import read_jsonl
from specs_metric.io.reading import open_text, read_parquet


def _csv_records(path: Path) -> list[dict]:
    with open_text(path, what="data file", newline="") as fh, reading(path):
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file")
        records = []
        for rec in reader:
            if None in rec:
                raise DataError(
                    f"{path}, line {reader.line_num}: malformed CSV row (too many fields)"
                )
            records.append(rec)
        return records


def _file_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return [rec for _, rec in read_jsonl(path)]
    if suffix == ".parquet":
        return read_parquet(path).to_pylist()
    if suffix == ".arrow":
        return read_arrow(path).to_pylist()
    raise DataError(
        f"{path}: unsupported file type (use .jsonl, .csv, .parquet or .arrow)"
    )


def source_files(path: Path, split: str | None = None) -> tuple[list[Path], str]:
    """The files of a table source, and how messages describe it."""
    return hf_folders.source_files(path, split, (".parquet", ".jsonl", ".csv"))


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
                raise DataError(f"{file}, row {i}: not an object")
            rows.append((f"{file}, row {i}", rec))
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    return rows, root, description
