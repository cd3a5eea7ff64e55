"""Writing a scoring job's results in the output's format: JSONL, CSV or parquet, chosen by
the output's extension (any other extension is refused: :func:`output_format`).

The job appends JSON lines to part files; the final output is made from them, rows in input
order. Parquet columns are typed: ``score``/``cosine`` float64, ``tokens`` int64,
``truncated`` bool, ``image``/``caption``/``error`` strings (a caption that is not a string,
in an error row, is written as its JSON text), ``id`` int64 when every id is an integer,
else strings, and ``segments`` (``specs explain``) a list of structs ``text``, ``score``,
``delta``, ``beyond_context``. In CSV, ``segments`` (a nested column) is its JSON text.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from specs_metric.errors import UsageError
from specs_metric.io.reading import open_text
from specs_metric.io.writing import atomic_write

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")
_ROW_GROUP = 65536
_SEGMENT = pa.struct(
    [
        ("text", pa.string()),
        ("score", pa.float64()),
        ("delta", pa.float64()),
        ("beyond_context", pa.bool_()),
    ]
)
_TYPES = {
    "segments": pa.list_(_SEGMENT),
    "image": pa.string(),
    "caption": pa.string(),
    "score": pa.float64(),
    "cosine": pa.float64(),
    "tokens": pa.int64(),
    "truncated": pa.bool_(),
    "warning": pa.string(),
    "error": pa.string(),
}


def output_format(path: str | Path, option: str = "--output") -> str:
    """The format of an output of rows, by its extension: ``jsonl``, ``csv`` or ``parquet``.

    Raises:
        UsageError: any other extension (one line naming the ones there are).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        shown = f"unknown extension {suffix!r}" if suffix else "no extension"
        raise UsageError(
            f"{option} {path}: {shown}; the format follows the extension: .jsonl, .csv or "
            ".parquet"
        )
    return suffix[1:]


def _records(parts: Sequence[Path]) -> Iterator[dict]:
    for part in parts:
        with open_text(part, what="part file", protect=False) as fh:
            for line in fh:
                yield json.loads(line)


def _integer_ids(parts: Sequence[Path]) -> bool:
    return all(
        isinstance(rec["id"], int) and not isinstance(rec["id"], bool) for rec in _records(parts)
    )


def _text(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return json.dumps(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from the input: written as \ud800
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def parquet_schema(fields: Sequence[str], integer_ids: bool) -> pa.Schema:
    types = {**_TYPES, "id": pa.int64() if integer_ids else pa.string()}
    return pa.schema([(name, types[name]) for name in fields])


def _write_parquet(parts: Sequence[Path], out: IO[bytes], fields: Sequence[str]) -> None:
    integer_ids = _integer_ids(parts)
    schema = parquet_schema(fields, integer_ids)
    convert = {name: _text for name in ("image", "caption", "warning", "error")}
    if not integer_ids:
        convert["id"] = _text
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[dict] = []

        def flush() -> None:
            columns = {
                name: [convert.get(name, lambda v: v)(rec.get(name)) for rec in batch]
                for name in fields
            }
            writer.write_table(pa.table(columns, schema=schema))
            batch.clear()

        for rec in _records(parts):
            batch.append(rec)
            if len(batch) == _ROW_GROUP:
                flush()
        if batch:
            flush()


def _csv_cell(value: object) -> object:
    """A CSV cell: nested values (``segments``) as their JSON text."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    return value


def write_output(parts: Sequence[Path], target: Path, fields: Sequence[str]) -> None:
    """Concatenate the JSONL ``parts`` into ``target`` in the format of its extension
    (:func:`output_format`), through the safe writer: the target appears whole or not at
    all, and no link at its path is followed."""
    suffix = "." + output_format(target)
    if suffix == ".parquet":
        with atomic_write(target, "wb") as out:
            _write_parquet(parts, out, fields)
        return
    # CSV has no escapes: a lone surrogate from the input is written as \ud800
    errors = "backslashreplace" if suffix == ".csv" else "strict"
    with atomic_write(target, "w", errors=errors, newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields) if suffix == ".csv" else None
        if writer:
            writer.writeheader()
        for part in parts:
            with open_text(part, what="part file", protect=False) as fh:
                for line in fh:
                    if writer:
                        rec = json.loads(line)
                        writer.writerow({k: _csv_cell(rec.get(k)) for k in fields})
                    else:
                        out.write(line)
