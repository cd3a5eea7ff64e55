"""Strict JSON for every file the package writes: non-finite numbers become ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON and which
most readers (``jq``, browsers, other languages) reject.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


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
