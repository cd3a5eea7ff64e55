"""Text inputs of a scoring job: JSONL, CSV, and clipscore-style JSON.

- ``.jsonl``: one JSON object per line with ``image``, ``caption`` and optionally ``id``;
  blank lines are skipped;
- ``.csv``: a header with ``image``, ``caption`` and optionally ``id``;
- ``.json``: ``{"image_id": "caption", ...}`` (clipscore's format); the image is the file
  ``<image_id>.<ext>`` in the image root (ext one of
  :data:`~specs_metric.data.images.IMAGE_EXTENSIONS`); or a COCO results list
  ``[{"image_id": 42, "caption": "..."}]`` (see :mod:`specs_metric.data.coco`).

Files are UTF-8, with or without a byte-order mark. A line that is not valid UTF-8, longer
than :data:`~specs_metric.limits.MAX_LINE_CHARS`, or not well-formed JSON/CSV is that row's
error. A CSV quote that is never closed, or that runs over what looks like a row of its own,
makes the row it opens on an error; the rows after it are read as usual. Every row goes
through :func:`~specs_metric.data.rows.build_row`, whose checks every format shares.
"""

from __future__ import annotations

import csv
import io
import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from specs_metric.data.coco import coco_rows
from specs_metric.data.images import IMAGE_EXTENSIONS, find_image
from specs_metric.data.rows import (
    Row,
    SourceOptions,
    build_row,
    id_problem,
    type_name,
    utf8_problem,
)
from specs_metric.errors import DataError
from specs_metric.io.jsonio import iter_json_document
from specs_metric.io.reading import open_text
from specs_metric.limits import MAX_LINE_CHARS


class _LineTooLong(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def _open_text(path: Path, newline: str | None = None) -> io.TextIOWrapper:
    """A text input as UTF-8 (a byte-order mark skipped; bytes that are not UTF-8 kept as
    surrogates, so the row that holds them can say where; UTF-16 refused as a whole)."""
    return open_text(path, what="input file", errors="surrogateescape", newline=newline)


def _jsonl_rows(path: Path, root: Path, options: SourceOptions) -> Iterator[Row]:
    confine = options.confine_images
    with _open_text(path) as fh:
        index = line_no = 0
        while text := fh.readline(MAX_LINE_CHARS + 1):
            line_no += 1
            if len(text) > MAX_LINE_CHARS and not text.endswith("\n"):
                while text and not text.endswith("\n"):  # skip the rest, unread
                    text = fh.readline(1 << 16)
                error = f"line longer than {MAX_LINE_CHARS} characters"
                yield build_row(index, {}, root, line=line_no, error=error, missing_id=index)
                index += 1
                continue
            if not text.strip():
                continue
            error = utf8_problem(text)
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as exc:
                obj, error = {}, error or f"malformed JSON line ({exc})"
            if not isinstance(obj, dict):
                got = type_name(obj)
                obj, error = {}, error or f"malformed JSON line (not a JSON object: got {got})"
            yield build_row(
                index, obj, root, line=line_no, error=error, missing_id=index, confine=confine
            )
            index += 1


class _CsvLines:
    """The physical lines fed to ``csv.reader``, numbered.

    Remembers the lines of the record being read, so that a malformed record (a quote that
    swallowed the rows after it) can be read again from its second line. A line longer than
    :data:`MAX_LINE_CHARS` is skipped unread and raises :class:`_LineTooLong` (again when
    read again).
    """

    def __init__(self, fh) -> None:
        self.fh = fh
        self.number = 0
        self.pending: deque[tuple[int, str | None]] = deque()
        self.record: list[tuple[int, str | None]] = []  # text None: a line too long

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        if self.pending:
            item = self.pending.popleft()
        else:
            text: str | None = self.fh.readline(MAX_LINE_CHARS + 1)
            if not text:
                raise StopIteration
            self.number += 1
            if len(text) > MAX_LINE_CHARS and not text.endswith(("\n", "\r")):
                while text and not text.endswith(("\n", "\r")):
                    text = self.fh.readline(1 << 16)
                text = None
            item = (self.number, text)
        self.record.append(item)
        if item[1] is None:
            raise _LineTooLong(item[0])
        return item[1]

    def start_record(self) -> None:
        self.record = []

    def reread_after_first(self) -> None:
        self.pending.extendleft(reversed(self.record[1:]))
        self.record = []


def _looks_like_a_row(text: str, n_fields: int, image_col: int) -> bool:
    """Whether a physical line inside a quoted field would be a whole row on its own."""
    try:
        fields = next(csv.reader([text]), [])
    except csv.Error:
        return False
    return len(fields) == n_fields and fields[image_col].strip().lower().endswith(IMAGE_EXTENSIONS)


def _csv_header(reader, path: Path) -> list[str]:
    try:
        header: list[str] = []
        while not header:
            header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty CSV file (no header)") from None
    except (csv.Error, _LineTooLong) as exc:
        raise DataError(f"{path}: cannot read the CSV header ({exc})") from None
    names = [name.strip() for name in header]
    if any(utf8_problem(name) for name in names):
        raise DataError(f"{path}: the CSV header is not valid UTF-8")
    missing = {"image", "caption"} - set(names)
    if missing:
        raise DataError(f"{path}: CSV header lacks column(s) {sorted(missing)}")
    repeated = sorted({n for n in names if n in ("id", "image", "caption") and names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: CSV header repeats column(s) {repeated}")
    return names


def _csv_error(exc: Exception, lines: _CsvLines) -> tuple[int, str]:
    """(line, message) of a record the reader refused."""
    line = lines.record[0][0]
    if isinstance(exc, _LineTooLong):
        if line == exc.line:
            return line, f"line longer than {MAX_LINE_CHARS} characters"
        return line, (
            f"malformed CSV row (a quoted field opened here runs over line {exc.line}, "
            f"which is longer than {MAX_LINE_CHARS} characters; an unbalanced quote?)"
        )
    if "unexpected end of data" in str(exc):
        return line, "malformed CSV row (a quoted field opened here is never closed)"
    return line, f"malformed CSV row ({exc}; an unbalanced quote?)"


def _record_problem(values: list[str], record: list[tuple[int, str]], names: list[str]):
    """What is wrong with a parsed record, and whether its lines after the first must be
    read again as rows (a quote that swallowed them)."""
    image_col = names.index("image")
    for number, text in record[1:]:
        if _looks_like_a_row(text, len(names), image_col):
            return (
                f"malformed CSV row (a quoted field opened here runs over line {number}, "
                "which looks like a row of its own; an unbalanced quote?)"
            ), True
    if len(values) != len(names):
        return f"malformed CSV row ({len(values)} fields, the header has {len(names)})", False
    for number, text in record:
        if problem := utf8_problem(text):
            return (problem if number == record[0][0] else f"{problem} on line {number}"), False
    return None, False


def _csv_rows(path: Path, root: Path, options: SourceOptions) -> Iterator[Row]:
    with _open_text(path, newline="") as fh:
        lines = _CsvLines(fh)
        reader = csv.reader(lines, strict=True)
        names = _csv_header(reader, path)
        has_ids = "id" in names
        index = 0
        while True:
            lines.start_record()
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, _LineTooLong) as exc:
                line, error = _csv_error(exc, lines)
                try:  # what the first line alone says of the row (its id)
                    values = next(csv.reader([lines.record[0][1] or ""]), [])
                except csv.Error:
                    values = []
                reread = True
            else:
                if not values:  # a blank line
                    continue
                line = lines.record[0][0]
                error, reread = _record_problem(values, lines.record, names)
            if reread:  # the rows a bad quote swallowed are read as rows
                lines.reread_after_first()
                reader = csv.reader(lines, strict=True)
            fields = dict(zip(names, values, strict=False))
            yield build_row(
                index,
                fields,
                root,
                line=line,
                error=error,
                missing_id=None if has_ids else index,
                confine=options.confine_images,
            )
            index += 1


def _mapping_rows(path: Path, root: Path, options: SourceOptions) -> Iterator[Row]:
    # Read element by element: a results file of millions of entries stays small in memory.
    with _open_text(path) as fh:
        try:
            kind, items = iter_json_document(fh, str(path))
        except DataError:
            raise DataError(
                f"{path}: expected a JSON object {{image_id: caption}} or a COCO results list"
            ) from None
        if kind == "list":  # a COCO results file
            yield from coco_rows(items, path, root, options)
            return
        yield from _clipscore_rows(items, root, options.confine_images)


def _clipscore_rows(
    items: Iterator[tuple[str, object]], root: Path, confine: bool
) -> Iterator[Row]:
    for index, (image_id, caption) in enumerate(items):
        fields = {"id": image_id, "image": image_id, "caption": caption}
        if id_problem(image_id) is not None:
            yield build_row(index, fields, root)
            continue
        found = find_image(root, image_id)
        fields["image"] = found.name
        yield build_row(index, fields, root, path=found, confine=confine)


def text_rows(path: Path, root: Path, options: SourceOptions) -> Iterator[Row]:
    """The rows of one local ``.jsonl`` / ``.ndjson``, ``.csv`` or ``.json`` file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path, root, options)
    if suffix == ".csv":
        return _csv_rows(path, root, options)
    if suffix == ".json":
        return _mapping_rows(path, root, options)
    raise DataError(f"{path}: unsupported input format {suffix!r} (use .jsonl, .csv or .json)")
