"""What a row of a scoring input is, and the checks every reader applies to it.

Every input row, whatever its format, becomes exactly one :class:`Row`. A row that cannot be
used carries an ``error`` naming where it is (``line N``, ``shard.tar: sample 'k'``,
``table.parquet: row N``) and the problem, instead of stopping the job. The checks are the
same for every format (:func:`build_row`, :func:`check_row`):

- ids: a row without an id gets its 0-based row number; an id that is present must be a
  non-empty string or a finite number, otherwise the row is an error and its output id is
  ``null`` (a row number never stands in for an id the file meant to give);
- the image: a path, or bytes the input holds (see :mod:`specs_metric.data.images`);
- the caption: a non-empty string;
- id, image path and caption must be valid Unicode (no lone surrogates).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from specs_metric.data.images import check_inside, resolve_image_cell, resolve_path
from specs_metric.errors import DataError

# Decoding with surrogateescape turns each byte that is not UTF-8 into U+DC80..U+DCFF; JSON
# escapes can also produce lone surrogates (U+D800..U+DFFF), which cannot be written as UTF-8.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class SourceOptions:
    """Where the image, caption and id are in shards, tables and COCO results files, and
    how image paths resolve."""

    image_column: str = "image"  # tables: bytes, a path, or an HF {bytes, path} struct
    caption_column: str = "caption"
    id_column: str = "id"  # tables: optional; without it the id is the row number
    caption_key: str | None = None  # webdataset: a field of the .json member (default: .txt)
    image_pattern: str | None = None  # COCO results: image file name, e.g. "{image_id}.jpg"
    confine_images: bool = False  # image paths must stay inside the image root

    def as_dict(self) -> dict:
        out = asdict(self)
        if not self.confine_images:  # absent otherwise: older job records stay equal
            del out["confine_images"]
        return out


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

    @property
    def image_source(self) -> str | bytes | None:
        """What the image readers take: the bytes the input holds, else the file's path."""
        if self.data is not None:
            return self.data
        return str(self.path) if self.path is not None else None


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def utf8_problem(text: str) -> str | None:
    """Where ``text`` (decoded with ``surrogateescape``) holds a byte that is not UTF-8."""
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


def printable(value: object) -> object:
    """A field as the output can show it: JSON-safe, bytes that were not UTF-8 escaped."""
    if isinstance(value, (list, dict, bytes, bytearray, memoryview)):
        return None  # never a valid field; the error names its type
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and _SURROGATE.search(value):
        try:  # bytes that were not UTF-8 -> \xe9
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape -> \ud800
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def id_problem(value: object) -> str | None:
    """Why an id that is present cannot be used, or ``None``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "empty id"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"id must be a string or a number (got {type_name(value)})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"id is not a finite number ({value})"
    if isinstance(value, str) and (where := _surrogate(value)):
        return f"id is not valid Unicode ({where})"
    return None


def caption_problem(caption: object) -> str | None:
    """Why a caption cannot be scored, or ``None``."""
    if not isinstance(caption, str):
        return f"caption is not a string (got {type_name(caption)})"
    if where := _surrogate(caption):
        return f"caption is not valid Unicode ({where})"
    if not caption.strip():
        return "caption is empty"
    return None


def _image_text_problem(image: object) -> str | None:
    if image is None or (isinstance(image, str) and not image.strip()):
        return "row has no image"
    if not isinstance(image, str):
        return f"image is not a string (got {type_name(image)})"
    if where := _surrogate(image):
        return f"image path is not valid Unicode ({where})"
    return None


def build_row(
    index: int,
    fields: Mapping[str, object],
    root: Path,
    *,
    line: int | None = None,
    where: str | None = None,
    error: str | None = None,
    missing_id: object = None,
    path: Path | None = None,
    image_cell: bool = False,
    confine: bool = False,
) -> Row:
    """A checked row from its fields (``id``, ``image``, ``caption``).

    Args:
        index: 0-based position in the input.
        fields: the row's fields; an absent ``id`` gives ``missing_id``.
        root: the image root for relative paths.
        line: 1-based line for messages (default ``index + 1``).
        where: how messages name the row when not by its line (a shard member, a table row).
        error: a problem found while reading (a malformed line); it wins over field checks.
        path: the image file when the reader found it itself (clipscore-style JSON).
        image_cell: the image field may hold bytes or an HF struct (tables, Ray), not only
            a path string (text formats).
        confine: image paths must stay inside ``root``.
    """
    line = index + 1 if line is None else line
    label = where or f"line {line}"
    if "id" in fields:
        id_error = id_problem(fields["id"])
        row_id = None if id_error else fields["id"]
    else:
        id_error, row_id = None, missing_id
    image, caption = fields.get("image"), fields.get("caption")
    shown, data = image, None
    problem = error or id_error
    if problem is None and image_cell and not isinstance(image, str):
        try:
            cell = resolve_image_cell(image, root, confine=confine)
            shown, path, data = cell.shown, cell.path, cell.data
        except DataError as exc:
            problem = str(exc)
    elif problem is None:
        problem = _image_text_problem(image)
        try:
            if problem is None and path is None:
                path = resolve_path(str(image), root, confine=confine)
            elif problem is None and confine:  # a path the reader found (clipscore JSON)
                check_inside(path, root, str(image))
        except DataError as exc:
            problem = str(exc)
    problem = problem or caption_problem(caption)
    return Row(
        index,
        line,
        row_id,
        printable(shown),
        printable(caption),
        None if problem else path,
        f"{label}: {problem}" if problem else None,
        None if problem else data,
        where,
    )


def check_row(row: Row) -> Row:
    """Set the error of a row built by another reader (shards, tables) whose id, image or
    caption cannot be used, with the rules of :func:`build_row`."""
    if row.error:
        return row
    image = row.image if row.data is None else (row.image or "<image bytes>")
    problem = id_problem(row.id) or _image_text_problem(image) or caption_problem(row.caption)
    if problem:
        row.error = f"{row.label}: {problem}"
        row.id, row.image, row.caption = (
            None if id_problem(row.id) else row.id,
            printable(row.image),
            printable(row.caption),
        )
        row.path = row.data = None
    return row
