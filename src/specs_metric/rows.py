"""Reading the rows of a scoring job: JSONL, CSV, or a clipscore-style JSON mapping.

Every input row becomes exactly one :class:`Row`; a row that cannot be used carries an
``error`` naming the line and the problem instead of stopping the job.

Formats:

- ``.jsonl``: one JSON object per line with ``image``, ``caption`` and optionally ``id``;
  blank lines are skipped;
- ``.csv``: a header with ``image``, ``caption`` and optionally ``id``;
- ``.json``: ``{"image_id": "caption", ...}`` (clipscore's format); the image is the file
  ``<image_id>.<ext>`` in the image root (ext one of :data:`IMAGE_EXTENSIONS`); or a COCO
  results list ``[{"image_id": 42, "caption": "..."}]`` (see :mod:`specs_metric.sources.coco`);
- webdataset shards, parquet, arrow and HF ``datasets`` folders, globs, brace ranges and
  fsspec URLs: see :mod:`specs_metric.sources`.

Files are UTF-8, with or without a byte-order mark. A line that is not valid UTF-8, longer
than :data:`MAX_LINE_CHARS`, or not well-formed JSON/CSV is that row's error. A CSV quote
that is never closed, or that runs over what looks like a row of its own, makes the row it
opens on an error; the rows after it are read as usual.

Relative image paths are resolved against ``image_root`` (default: the input file's folder).

Ids: a JSONL row without an ``id`` key, or every row of a CSV without an ``id`` column, gets
its 0-based row number as id. An id that is present must be a non-empty string or a finite
number: an empty cell, ``null``, ``""``, a list, an object or a boolean is that row's error,
and its output id is ``null`` (so a row number never stands in for an id the file meant to
give).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specs_metric.sources import SourceOptions

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Longest input line read (characters); a longer line is a row error, skipped unread.
MAX_LINE_CHARS = 1 << 20

# Decoding with surrogateescape turns each byte that is not UTF-8 into U+DC80..U+DCFF; JSON
# escapes can also produce lone surrogates (U+D800..U+DFFF), which cannot be written as UTF-8.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Row:
    """One input row of a scoring job."""

    index: int  # 0-based position in the input
    line: int  # 1-based line number in the input file (for messages)
    id: object
    image: object  # as given in the input (a string, unless the row is an error)
    caption: object
    path: Path | None = None  # resolved image file
    error: str | None = None
    data: bytes | None = None  # the image itself, when the input holds it (shards, tables)
    where: str | None = None  # position for messages when not a line (shard member, table row)

    @property
    def label(self) -> str:
        """Where the row is, for messages: ``line N`` or e.g. ``shard.tar: sample 'k'``."""
        return self.where or f"line {self.line}"


class _LineTooLong(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _utf8_problem(text: str) -> str | None:
    match = _NOT_UTF8.search(text)
    if match is None:
        return None
    byte = ord(match.group()) - 0xDC00
    return f"not valid UTF-8 (byte 0x{byte:02x} at character {match.start() + 1})"


def _surrogate(text: str) -> str | None:
    match = _SURROGATE.search(text)
    if match is None:
        return None
    return f"lone surrogate U+{ord(match.group()):04X} at character {match.start() + 1}"


def _printable(value: object) -> object:
    """A field as the output can show it: JSON-safe, bytes that were not UTF-8 escaped."""
    if isinstance(value, (list, dict)):
        return None  # never a valid field; the error names its type
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and _SURROGATE.search(value):
        try:  # bytes that were not UTF-8 -> \xe9
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape -> \ud800
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _id_problem(value: object) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return "empty id"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"id must be a string or a number (got {_type_name(value)})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"id is not a finite number ({value})"
    if isinstance(value, str) and (where := _surrogate(value)):
        return f"id is not valid Unicode ({where})"
    return None


def _field_problem(image: object, caption: object) -> str | None:
    if image is None or (isinstance(image, str) and not image.strip()):
        return "row has no image"
    if not isinstance(image, str):
        return f"image is not a string (got {_type_name(image)})"
    if where := _surrogate(image):
        return f"image path is not valid Unicode ({where})"
    if not isinstance(caption, str):
        return f"caption is not a string (got {_type_name(caption)})"
    if where := _surrogate(caption):
        return f"caption is not valid Unicode ({where})"
    if not caption.strip():
        return "caption is empty"
    return None


def resolve_image(image: str, root: Path) -> Path:
    """An image cell as a path: absolute as given, relative to ``root`` otherwise."""
    path = Path(image).expanduser()
    return path if path.is_absolute() else root / path


def _make_row(
    index: int,
    line: int,
    fields: Mapping[str, object],
    root: Path,
    error: str | None = None,
    missing_id: object = None,
    path: Path | None = None,
) -> Row:
    """A row from its fields; ``error`` (a line-level problem) wins over field problems.

    ``missing_id`` is the id of a row whose fields hold no ``id`` at all.
    """
    if "id" in fields:
        id_error = _id_problem(fields["id"])
        row_id = None if id_error else fields["id"]
    else:
        id_error, row_id = None, missing_id
    image, caption = fields.get("image"), fields.get("caption")
    error = error or id_error or _field_problem(image, caption)
    if error is None and path is None:
        path = resolve_image(str(image), root)  # a string: checked above
    return Row(
        index,
        line,
        row_id,
        _printable(image),
        _printable(caption),
        None if error else path,
        f"line {line}: {error}" if error else None,
    )


def check_row(row: Row) -> Row:
    """Set the error of a row built by another reader (shards, tables) whose id, image or
    caption cannot be used, with the rules of the file readers."""
    if row.error:
        return row
    image = row.image if row.data is None else (row.image or "<image bytes>")
    problem = _id_problem(row.id) or _field_problem(image, row.caption)
    if problem:
        row.error = f"{row.label}: {problem}"
        row.id, row.image, row.caption = (
            None if _id_problem(row.id) else row.id,
            _printable(row.image),
            _printable(row.caption),
        )
    return row


def _jsonl_rows(path: Path, root: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        index = line_no = 0
        while text := fh.readline(MAX_LINE_CHARS + 1):
            line_no += 1
            if len(text) > MAX_LINE_CHARS and not text.endswith("\n"):
                while text and not text.endswith("\n"):  # skip the rest, unread
                    text = fh.readline(1 << 16)
                error = f"line longer than {MAX_LINE_CHARS} characters"
                yield _make_row(index, line_no, {}, root, error, index)
                index += 1
                continue
            if not text.strip():
                continue
            error = _utf8_problem(text)
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as exc:
                obj, error = {}, error or f"malformed JSON line ({exc})"
            if not isinstance(obj, dict):
                got = _type_name(obj)
                obj, error = {}, error or f"malformed JSON line (not a JSON object: got {got})"
            yield _make_row(index, line_no, obj, root, error, index)
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
        raise ValueError(f"{path}: empty CSV file (no header)") from None
    except (csv.Error, _LineTooLong) as exc:
        raise ValueError(f"{path}: cannot read the CSV header ({exc})") from None
    names = [name.strip() for name in header]
    if any(_NOT_UTF8.search(name) for name in names):
        raise ValueError(f"{path}: the CSV header is not valid UTF-8")
    missing = {"image", "caption"} - set(names)
    if missing:
        raise ValueError(f"{path}: CSV header lacks column(s) {sorted(missing)}")
    repeated = sorted({n for n in names if n in ("id", "image", "caption") and names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path}: CSV header repeats column(s) {repeated}")
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
        if problem := _utf8_problem(text):
            return (problem if number == record[0][0] else f"{problem} on line {number}"), False
    return None, False


def _csv_rows(path: Path, root: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
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
            yield _make_row(index, line, fields, root, error, None if has_ids else index)
            index += 1


def find_image(root: Path, image_id: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        candidate = root / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    direct = root / image_id
    return direct


def _mapping_rows(path: Path, root: Path, options: SourceOptions) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            mapping = json.load(fh)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 (byte {exc.start + 1})") from None
    except (ValueError, RecursionError) as exc:
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
        fields = {"id": image_id, "image": image_id, "caption": caption}
        if _id_problem(image_id) is not None:
            yield _make_row(index, index + 1, fields, root)
            continue
        found = find_image(root, image_id)
        fields["image"] = found.name
        yield _make_row(index, index + 1, fields, root, path=found)


def read_rows(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
) -> Iterator[Row]:
    """Stream the rows of a scoring input: a file, or shards/tables/URLs (see
    :mod:`specs_metric.sources`).

    Raises:
        ValueError: unsupported extension, not a regular file, or an unreadable
            header/document (not per-row).
        FileNotFoundError: the input does not exist.
    """
    from specs_metric.sources import SourceOptions, is_plain_file, read_source

    options = options or SourceOptions()
    if not is_plain_file(path):
        return read_source(path, image_root, options)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: the input is not a regular file")
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

