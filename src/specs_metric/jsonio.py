"""Strict JSON for every file the package writes (non-finite numbers become ``null``), and
the one reader of JSON-lines data sets (:func:`read_jsonl`).

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON and which
most readers (``jq``, browsers, other languages) reject.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from specs_metric.errors import DataError


def jsonable(obj: Any) -> Any:
    """Nested data with NaN/inf as ``None`` and numpy scalars and arrays as Python values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`jsonable` ``(obj)``, refusing anything that is not JSON."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically: a temporary file in the same
    folder renamed over it, so a job killed mid-write leaves the old file or the new one,
    never a torn one that a later ``--resume`` cannot read."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dumps(obj, indent=indent) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    where: str = "{path}, line {line}",
    error: type[DataError] = DataError,
    objects: bool = False,
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSON-lines file, lazily.

    Each reader names a line its own way: ``where`` is a template with ``{path}`` and
    ``{line}`` (1-based). A line that is not UTF-8, not JSON or (with ``objects``) not a
    JSON object raises ``error``, a :class:`~specs_metric.errors.DataError`, with a
    one-line message that starts with that location.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        ...     _ = fh.write('{"a": 1}\\n\\n[2]\\n')
        >>> list(read_jsonl(fh.name))
        [(1, {'a': 1}), (3, [2])]
    """
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            here = where.format(path=path, line=line_no)
            try:
                value = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                raise error(f"{here}: not UTF-8 text") from None
            except json.JSONDecodeError as err:
                raise error(f"{here}: not valid JSON ({err.msg} at column {err.colno})") from None
            if objects and not isinstance(value, dict):
                raise error(f"{here}: expected a JSON object, got {type(value).__name__}")
            yield line_no, value
