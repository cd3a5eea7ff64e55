"""Score files read back: the outputs of ``specs score`` and ``specs explain`` (JSONL, CSV or
parquet; explain's ``segments`` column is JSON text in CSV), as ``specs compare``,
``specs sweep`` and the jobs' own summaries read them.

A score file may come from anywhere, so every row is checked as it is read: it must be an
object whose fields have the types ``specs score`` writes (``score`` and ``cosine`` numbers
or null, ``tokens`` an integer or null, ``truncated`` a boolean or null, ``error`` and
``warning`` strings or null, ``id`` a string, number or null). Anything else is one
:class:`~specs_metric.errors.DataError` naming the file and the row; lines are read
bounded (:data:`~specs_metric.limits.MAX_LINE_CHARS`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from specs_metric.errors import DataError, reading
from specs_metric.io.reading import open_regular, open_text, parquet_file, printable
from specs_metric.limits import MAX_LINE_CHARS

SCORE_FIELDS = (
    "id", "image", "caption", "score", "cosine", "tokens", "truncated", "warning", "error"
)  # fmt: skip
_BATCH_ROWS = 65536

_NUMBER = (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "score": (_NUMBER, "a number"),
    "cosine": (_NUMBER, "a number"),
    "tokens": ((int,), "an integer"),
    "truncated": ((bool,), "a boolean"),
    "error": ((str,), "a string"),
    "warning": ((str,), "a string"),
    "id": ((str, int, float), "a string or a number"),
    "segments": ((list,), "a list"),  # `specs explain` outputs
}


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def check_score_row(rec: object, where: str) -> dict:
    """``rec`` if it is a row ``specs score`` could have written, else a DataError."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: not a score row (a JSON object), got {_type_name(rec)}")
    for key, (types, what) in _TYPES.items():
        value = rec.get(key)
        if value is None:
            continue
        bad_bool = isinstance(value, bool) and bool not in types
        if bad_bool or not isinstance(value, types):
            raise DataError(f"{where}: {key} must be {what} or null, got {_type_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{where}: {key} is not a finite number ({value})")
    return rec


def _jsonl(path: Path, name: str, protect: bool) -> Iterator[dict]:
    with open_regular(path, what="score file", protect=protect) as fh:
        line = 0
        while raw := fh.readline(MAX_LINE_CHARS + 1):
            line += 1
            where = f"{name}, line {line}"
            if len(raw) > MAX_LINE_CHARS and not raw.endswith(b"\n"):
                raise DataError(f"{where}: line longer than {MAX_LINE_CHARS} bytes")
            if not raw.strip():
                continue
            with reading(where, DataError, "not a score row"):
                rec = json.loads(raw.decode("utf-8"))
            yield check_score_row(rec, where)


def _number(text: str | None, where: str, key: str, kind: type) -> object:
    if text in ("", None):
        return None
    try:
        return kind(text)
    except ValueError:
        raise DataError(f"{where}: {key} is not a number ({text[:40]!r})") from None


def _csv(path: Path, name: str, protect: bool) -> Iterator[dict]:
    fh = open_text(path, what="score file", newline="", protect=protect)
    with fh, reading(name, DataError):
        reader = csv.DictReader(fh)
        for rec in reader:
            where = f"{name}, line {reader.line_num}"
            for key in ("score", "cosine"):
                rec[key] = _number(rec.get(key), where, key, float)
            rec["tokens"] = _number(rec.get("tokens"), where, "tokens", int)
            rec["truncated"] = {"True": True, "False": False}.get(rec.get("truncated"))
            rec["error"] = rec.get("error") or None
            rec["warning"] = rec.get("warning") or None
            if "segments" in rec:  # `specs explain`: the nested column is JSON text
                rec["segments"] = json.loads(rec["segments"]) if rec["segments"] else None
            yield check_score_row(rec, where)


def _parquet(path: Path, name: str, protect: bool) -> Iterator[dict]:
    table = parquet_file(path, protect=protect)
    with reading(name, DataError):
        for batch in table.iter_batches(batch_size=_BATCH_ROWS):
            for k, rec in enumerate(batch.to_pylist()):
                yield check_score_row(rec, f"{name}, row {k}")


def read_score_rows(path: str | os.PathLike[str], protect: bool = True) -> Iterator[dict]:
    """Stream the rows of a score file (JSONL, CSV or parquet by suffix), typed as in JSONL.
    With ``protect`` the file is an input that this command may not overwrite (not for a
    job reading back its own output).

    Raises:
        DataError: naming the file and row, for a row ``specs score`` could not have written.
    """
    path = Path(path)
    name = printable(str(path))
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path, name, protect)
    if suffix == ".csv":
        return _csv(path, name, protect)
    return _jsonl(path, name, protect)


def read_summary(path: str | os.PathLike[str]) -> dict | None:
    """The ``<output>.summary.json`` of a score file, or None when there is none."""
    from specs_metric.io.reading import read_json
    from specs_metric.limits import MAX_METADATA_BYTES

    summary = Path(path).with_name(Path(path).name + ".summary.json")
    if not summary.exists():
        return None
    data = read_json(summary, MAX_METADATA_BYTES, what="summary")
    if not isinstance(data, dict):
        raise DataError(f"{summary}: not a summary (a JSON object), got {_type_name(data)}")
    return data
