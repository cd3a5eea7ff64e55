"""Image cells: the one place where a cell of any input (a JSONL field, a table cell, a shard
member, a benchmark record, a training row) becomes an image to read.

A cell holds a path, the encoded image itself (bytes), or a Hugging Face ``datasets`` image
struct ``{"bytes": ..., "path": ...}`` (its bytes when present, else its path). The rules,
the same for every command:

- a relative path resolves against the image root: ``--image-root`` when given, else the
  folder of the data file that names it;
- ``~`` at the start of a path is the user's home folder, and an absolute path is used as
  it is, so paths may name files outside the image root. Services that score rows they do
  not trust pass ``confine=True`` (``specs score --confine-images``): then a path must stay
  inside the image root after symbolic links are followed (``..``, absolute paths and links
  that leave it are refused), and ``~`` is an ordinary character, not the home folder;
- bytes in a cell are at most :data:`specs_metric.limits.MAX_IMAGE_BYTES`, like a file.

A cell that is none of these is a :class:`~specs_metric.errors.DataError` whose message
says what the cell holds; readers put the file and row in front of it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from specs_metric.errors import DataError
from specs_metric.limits import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# What the Python API takes as an image: a path, the encoded bytes, or a decoded PIL image.
ImageSource = Union[str, os.PathLike, bytes, "Image.Image"]  # noqa: UP007 (a forward name)

_BYTES_LIKE = (bytes, bytearray, memoryview)


@dataclass(frozen=True)
class ImageCell:
    """A resolved image cell: a file to read or the image's bytes, and how outputs show it.

    Attributes:
        shown: the cell as the output shows it (the path as written, a struct's path), or
            ``None`` for bare bytes.
        path: the file to read (``None`` when the cell holds the bytes).
        data: the encoded image (``None`` when the cell names a file).
    """

    shown: str | None
    path: Path | None = None
    data: bytes | None = None

    @property
    def source(self) -> str | bytes:
        """What the image readers take: the bytes, else the path."""
        return self.data if self.data is not None else str(self.path)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _bounded_bytes(value: object) -> bytes:
    size = value.nbytes if isinstance(value, memoryview) else len(value)  # type: ignore[arg-type]
    if size > MAX_IMAGE_BYTES:
        raise DataError(f"image bytes too large ({size} bytes; the limit is {MAX_IMAGE_BYTES})")
    return bytes(value)  # type: ignore[arg-type]


def check_inside(path: Path, root: Path, shown: str | None = None) -> Path:
    """``path`` if it lies inside ``root`` once symbolic links are followed, else a
    DataError (``--confine-images``)."""
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise DataError(f"image path {shown or str(path)!r} leaves the image root {root}")
    return path


def resolve_path(text: str, root: Path, *, confine: bool = False) -> Path:
    """An image path as written in a cell -> the file to read (see the module docstring).

    >>> resolve_path("a/b.png", Path("/data"))
    PosixPath('/data/a/b.png')
    >>> resolve_path("../x.png", Path("/data"), confine=True)
    Traceback (most recent call last):
    ...
    specs_metric.errors.DataError: image path '../x.png' leaves the image root /data
    """
    if confine:
        path = Path(text)
        return check_inside(path if path.is_absolute() else root / path, root, text)
    path = Path(text)
    try:
        path = path.expanduser()
    except RuntimeError:  # "~someone" who does not exist here: a name like any other
        pass
    return path if path.is_absolute() else root / path


def resolve_image_cell(
    value: object,
    root: Path,
    *,
    confine: bool = False,
    relocate: bool = False,
) -> ImageCell:
    """One image cell -> :class:`ImageCell`.

    Args:
        value: a path string, bytes, or an HF ``{"bytes", "path"}`` struct.
        root: the image root for relative paths.
        confine: paths must stay inside ``root`` (see the module docstring).
        relocate: an absolute path that does not exist is looked up as ``root / its file
            name`` (data sets written on another machine, e.g. sDCI).

    Raises:
        DataError: an empty cell, a cell of another type, bytes over the size limit, or
            (with ``confine``) a path outside the root.

    >>> resolve_image_cell({"bytes": b"png", "path": "x.png"}, Path(".")).data
    b'png'
    >>> resolve_image_cell(7, Path("."))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    specs_metric.errors.DataError: image must be a path, bytes or an HF {bytes, path} ...
    """
    shown = None
    if isinstance(value, dict):  # the HF datasets Image struct
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, _BYTES_LIKE):
            raise DataError(f"the image struct's bytes are not bytes (got {_type_name(data)})")
        if path is not None and not isinstance(path, str):
            raise DataError(f"the image struct's path is not a string (got {_type_name(path)})")
        if data:
            return ImageCell(path, None, _bounded_bytes(data))
        value = path
    if isinstance(value, _BYTES_LIKE):
        if not len(value):
            raise DataError("image bytes are empty")
        return ImageCell(None, None, _bounded_bytes(value))
    if isinstance(value, str):
        if not value.strip():
            raise DataError("row has no image")
        shown = value
        path = resolve_path(value, root, confine=confine)
        if relocate and Path(value).is_absolute() and not path.exists():
            path = root / path.name
        return ImageCell(shown, path)
    if value is None:
        raise DataError("row has no image")
    raise DataError(
        f"image must be a path, bytes or an HF {{bytes, path}} struct (got {_type_name(value)})"
    )


def find_image(root: Path, image_id: str) -> Path:
    """The file ``<image_id>.<ext>`` in ``root`` (the first of :data:`IMAGE_EXTENSIONS`
    present), else ``root / image_id`` (clipscore-style ``{image_id: caption}`` inputs)."""
    for ext in IMAGE_EXTENSIONS:
        candidate = root / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    return root / image_id


def image_key(source: str | bytes) -> str:
    """Identity of an image for grouping rows: its path, or a hash of its bytes."""
    if isinstance(source, bytes):
        return "sha1:" + hashlib.sha1(source).hexdigest()
    return str(source)


def image_source(
    value: object, root: Path, where: str, *, confine: bool = False, relocate: bool = False
) -> str | bytes:
    """An image cell of a data set -> a path or the encoded bytes (what the image readers
    take), or a :class:`~specs_metric.errors.DataError` that starts with ``where``."""
    try:
        return resolve_image_cell(value, root, confine=confine, relocate=relocate).source
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
