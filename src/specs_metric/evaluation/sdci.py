"""Reading data sets in the sDCI layout: one row per image with cumulative captions.

Columns: ``image`` (a path, encoded bytes, or a Hugging Face ``Image`` struct with
``bytes`` / ``path``), ``captions`` (``c_1..c_n``) and ``neg_captions`` (``n_2..n_n``, one
fewer than ``captions``; ``neg_captions[j]`` pairs with ``captions[j + 1]``), and
optionally ``id``. Other columns are ignored.

Accepted sources:

* a Hugging Face ``datasets`` directory written by ``save_to_disk`` (a ``DatasetDict`` with
  ``dataset_dict.json`` and one folder per split, or a single ``Dataset`` folder with
  ``state.json`` and ``*.arrow`` files); the Arrow files are read with pyarrow, so the
  ``datasets`` package is not needed;
* a directory holding ``{split}.parquet`` or ``{split}.jsonl`` (as ``specs synth`` writes);
* a ``.parquet``, ``.arrow``, ``.jsonl`` or ``.json`` (JSON lines) file.

Relative image paths are resolved against ``image_root`` (by default the directory given,
or the folder of the file given). An absolute path that does not exist is looked up as
``image_root / file name`` when ``image_root`` is given (data sets written on another
machine). Image bytes stay in the Arrow table (memory-mapped for ``.arrow`` files) until
:func:`load_image_source` asks for one row's image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from specs_metric.data.hf_folders import read_arrow, source_files
from specs_metric.data.images import image_source
from specs_metric.errors import DataError, reading
from specs_metric.io.jsonio import read_jsonl
from specs_metric.io.reading import read_parquet

REQUIRED_COLUMNS = ("image", "captions", "neg_captions")


SdciFormatError = DataError  # the former name of this reader's layout error


@dataclass(frozen=True)
class ArrowImage:
    """A reference to the image of one row of an Arrow column (read on demand)."""

    column: pa.ChunkedArray
    index: int
    where: str  # file and row, for messages
    root: Path
    explicit_root: bool

    def source(self) -> str | bytes:
        """The image as a path or encoded bytes."""
        value = self.column[self.index].as_py()
        return image_source(value, self.root, self.where, relocate=self.explicit_root)


@dataclass
class SdciRow:
    """One image with its cumulative captions and negatives."""

    id: str
    image: str | bytes | ArrowImage
    captions: list[str]
    neg_captions: list[str]


def _resolve_source(path: Path, split: str | None) -> tuple[list[Path], str]:
    """The files holding the rows, and a description for messages."""
    return source_files(path, split, (".parquet", ".jsonl"))


def _read_records(file: Path) -> tuple[list[dict], pa.ChunkedArray | None]:
    """Rows without their ``image`` value, and the ``image`` column (None for JSON lines)."""
    suffix = file.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        with reading(file):
            table = read_parquet(file) if suffix == ".parquet" else read_arrow(file)
        images = table.column("image") if "image" in table.column_names else None
        rest = table.drop_columns(["image"]) if images is not None else table
        records = rest.to_pylist()
        if images is not None:
            for rec in records:
                rec["image"] = None  # placeholder: the value stays in the column
        return records, images
    if suffix in (".jsonl", ".json"):
        with reading(file):  # deep nesting, huge numbers: what read_jsonl leaves to us
            return [rec for _, rec in read_jsonl(file)], None
    raise DataError(f"{file}: unsupported file type (use .parquet, .arrow or .jsonl)")


def load_image_source(image: str | bytes | ArrowImage) -> str | bytes:
    """A path or encoded bytes for a row's image (reading an :class:`ArrowImage`)."""
    return image.source() if isinstance(image, ArrowImage) else image


def _string_list(value: object, column: str, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {column!r} must be a list of strings")
    return list(value)


def read_sdci(
    path: str | Path, split: str | None = None, image_root: str | Path | None = None
) -> list[SdciRow]:
    """Read every row of an sDCI-layout data set.

    Args:
        path: a ``datasets`` folder, a folder with ``{split}.parquet``/``.jsonl``, or a file.
        split: which split of a multi-split source (default ``test`` when present).
        image_root: folder for relative image paths (default: ``path`` if it is a folder,
            else its parent).

    Raises:
        DataError: naming the file and row of the first problem.
    """
    path = Path(path)
    files, description = _resolve_source(path, split)
    if not files:
        raise DataError(f"{description}: no data files")
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    explicit_root = image_root is not None
    rows: list[SdciRow] = []
    for file in files:
        records, image_column = _read_records(file)
        for i, rec in enumerate(records):
            where = f"{file}, row {i}"
            missing = [c for c in REQUIRED_COLUMNS if c not in rec]
            if missing:
                raise DataError(
                    f"{where}: missing column(s) {missing}; found {sorted(rec)}"
                )
            captions = _string_list(rec["captions"], "captions", where)
            negs = _string_list(rec["neg_captions"], "neg_captions", where)
            if not captions:
                raise DataError(f"{where}: 'captions' is empty")
            if len(negs) != len(captions) - 1:
                raise DataError(
                    f"{where}: {len(captions)} captions need {len(captions) - 1} neg_captions "
                    f"(n_k = c_(k-1) + a wrong segment), got {len(negs)}"
                )
            row_id = rec.get("id")
            rows.append(
                SdciRow(
                    id=str(row_id) if row_id is not None else str(len(rows)),
                    image=(
                        ArrowImage(image_column, i, where, root, explicit_root)
                        if image_column is not None
                        else image_source(rec["image"], root, where, relocate=explicit_root)
                    ),
                    captions=captions,
                    neg_captions=negs,
                )
            )
    return rows
