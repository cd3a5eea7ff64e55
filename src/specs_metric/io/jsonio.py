"""Strict JSON for every file the package writes (non-finite numbers become ``null``), the
one reader of JSON-lines data sets (:func:`read_jsonl`), and JSON documents read element by
element in bounded memory (:func:`iter_json_document`).

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON and which
most readers (``jq``, browsers, other languages) reject.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from specs_metric.errors import DataError
from specs_metric.io.reading import open_regular
from specs_metric.io.writing import write_text
from specs_metric.limits import MAX_LINE_CHARS


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
    never a torn one that a later ``--resume`` cannot read (:mod:`specs_metric.io.writing`)."""
    text = dumps(obj, indent=indent) + "\n"  # before the file is touched: nothing torn
    write_text(path, text)


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
    with open_regular(path, what="JSON-lines file", error=error) as fh:
        line_no = 0
        while raw := fh.readline(MAX_LINE_CHARS + 1):
            line_no += 1
            here = where.format(path=path, line=line_no)
            if len(raw) > MAX_LINE_CHARS and not raw.endswith(b"\n"):
                raise error(f"{here}: line longer than {MAX_LINE_CHARS} bytes")
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                raise error(f"{here}: not UTF-8 text") from None
            except json.JSONDecodeError as err:
                raise error(f"{here}: not valid JSON ({err.msg} at column {err.colno})") from None
            except (ValueError, RecursionError) as err:  # too deep, or too many digits
                kind = "nested too deeply" if isinstance(err, RecursionError) else str(err)
                raise error(f"{here}: not valid JSON ({kind})") from None
            if objects and not isinstance(value, dict):
                raise error(f"{here}: expected a JSON object, got {type(value).__name__}")
            yield line_no, value


class _DocumentStream:
    """A JSON text read in chunks, one top-level element at a time (see
    :func:`iter_json_document`)."""

    _CHUNK = 1 << 16
    _LOOKAHEAD = 64  # characters after a value that show it has ended

    def __init__(self, fh: IO[str], name: str, error: type[DataError], max_chars: int) -> None:
        self.fh, self.name, self.error, self.max_chars = fh, name, error, max_chars
        self.buf, self.pos = "", 0
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        chunk = self.fh.read(self._CHUNK)
        if not chunk:
            return False
        self.buf = self.buf[self.pos :] + chunk  # what is consumed is dropped: bounded
        self.pos = 0
        return True

    def peek(self) -> str | None:
        """The next character that is not whitespace (not consumed), or None at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return None

    def expect(self, chars: str) -> str:
        found = self.peek()
        if found is None or found not in chars:
            shown = "the end of the file" if found is None else repr(found)
            raise self.error(f"{self.name}: not valid JSON (expected {chars!r}, got {shown})")
        self.pos += 1
        return found

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self.error(f"{self.name}: not valid JSON (nested too deeply)") from None
            except json.JSONDecodeError as exc:
                if len(self.buf) - self.pos > self.max_chars:
                    raise self.error(
                        f"{self.name}: a JSON value longer than {self.max_chars} characters"
                    ) from None
                if not self._more():
                    raise self.error(f"{self.name}: not valid JSON ({exc.msg})") from None
                continue
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                raise self.error(f"{self.name}: not valid JSON ({exc})") from None
            if len(self.buf) - end < self._LOOKAHEAD and self._more():
                continue  # a number may go on in the next chunk: decode it again, whole
            self.pos = end
            return obj


def iter_json_document(
    fh: IO[str],
    name: str,
    *,
    error: type[DataError] = DataError,
    max_value_chars: int = MAX_LINE_CHARS,
) -> tuple[str, Iterator[Any]]:
    """A JSON document whose top level is a list or an object, read element by element in
    bounded memory (one element of at most ``max_value_chars`` at a time), unlike
    ``json.load``, which holds the whole document and its objects at once.

    Returns:
        ``("list", values)`` or ``("object", (key, value) pairs)``; the iterator raises
        ``error`` where the document is malformed (and for text after its end).

    Example:
        >>> import io
        >>> kind, items = iter_json_document(io.StringIO('{"a": 1, "b": [2]}'), "x.json")
        >>> kind, list(items)
        ('object', [('a', 1), ('b', [2])])
    """
    stream = _DocumentStream(fh, name, error, max_value_chars)
    opening = stream.peek()
    if opening not in ("[", "{"):
        shown = "an empty file" if opening is None else repr(opening)
        raise error(f"{name}: expected a JSON list or object, got {shown}")
    stream.pos += 1

    def items() -> Iterator[Any]:
        closing = "]" if opening == "[" else "}"
        if stream.peek() == closing:
            stream.pos += 1
        else:
            while True:
                if opening == "[":
                    yield stream.value()
                else:
                    key = stream.value()
                    if not isinstance(key, str):
                        raise error(f"{name}: not valid JSON (an object key must be a string)")
                    stream.expect(":")
                    yield key, stream.value()
                if stream.expect("," + closing) == closing:
                    break
        if stream.peek() is not None:
            raise error(f"{name}: not valid JSON (text after the end of the document)")

    return ("list" if opening == "[" else "object"), items()
