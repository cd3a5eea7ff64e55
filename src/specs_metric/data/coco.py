"""COCO-style captioning results: ``[{"image_id": 42, "caption": "..."}, ...]``.

This is the file pycocoevalcap reads and captioning repositories write. Each entry is one
row with id ``image_id``. The image file is ``image_pattern`` formatted with the entry's
fields (``COCO_val2014_{image_id:012d}.jpg``) in the image root; without a pattern it is
``<image_id>.<ext>`` as for clipscore-style JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from specs_metric.data.images import find_image
from specs_metric.data.rows import Row, SourceOptions, build_row
from specs_metric.errors import DataError


def image_name(entry: dict, pattern: str | None, root: Path) -> str:
    """The image file name of one results entry.

    >>> image_name({"image_id": 42}, "COCO_val2014_{image_id:012d}.jpg", Path("."))
    'COCO_val2014_000000000042.jpg'

    Raises:
        DataError: the pattern does not fit the entry (a missing field, a wrong type).
    """
    if pattern is None:
        return find_image(root, str(entry.get("image_id"))).name
    try:
        return pattern.format_map(entry)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise DataError(f"--image-pattern {pattern!r} does not fit this entry ({exc})") from exc


def coco_rows(
    entries: Iterable[object], path: Path, root: Path, options: SourceOptions
) -> Iterator[Row]:
    """One :class:`Row` per entry of a COCO results list read from ``path``."""
    for index, entry in enumerate(entries):
        where = f"{path.name}: entry {index}"
        if not isinstance(entry, dict) or "image_id" not in entry:
            error = "not an object with an image_id"
            yield build_row(index, {"id": index}, root, where=where, error=error)
            continue
        fields = {"id": entry["image_id"], "caption": entry.get("caption")}
        try:
            fields["image"] = image_name(entry, options.image_pattern, root)
        except DataError as exc:
            yield build_row(index, fields, root, where=where, error=str(exc))
            continue
        yield build_row(index, fields, root, where=where, confine=options.confine_images)
