"""Tables: parquet files, arrow files and HF ``datasets`` ``save_to_disk`` folders.

The image column (``image`` by default) holds image bytes, an image path (relative paths
resolve against the image root, default the table's folder), or an HF ``datasets`` image
struct ``{"bytes": ..., "path": ...}``; :mod:`specs_metric.data.images` resolves every cell.
The caption column defaults to ``caption``; the id column to ``id`` and, when the table has
none, the 0-based row number is the id.

Tables are read in batches of :data:`_BATCH_ROWS` rows; local arrow files are memory-mapped,
so a table larger than memory is read as it is scored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from specs_metric.data.hf_folders import dataset_folder_files
from specs_metric.data.locations import is_url, local_root, open_binary
from specs_metric.data.rows import Row, SourceOptions, build_row
from specs_metric.errors import DataError
from specs_metric.io.reading import memory_map

_BATCH_ROWS = 256  # rows decoded from the table at a time


def _arrow_reader(source) -> pa.RecordBatchReader | pa.ipc.RecordBatchFileReader:
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        if hasattr(source, "seek"):
            source.seek(0)
        return pa.ipc.open_file(source)


class _Table:
    """One parquet or arrow table, opened: its schema and its record batches."""

    def __init__(self, name: str, stack: ExitStack) -> None:
        self.name = name
        self.parquet = Path(name).suffix.lower() == ".parquet"
        try:
            if self.parquet:
                self.file = pq.ParquetFile(stack.enter_context(open_binary(name)))
                self.schema = self.file.schema_arrow
            else:
                if is_url(name):
                    source = stack.enter_context(open_binary(name))
                else:  # memory-mapped: the table is paged in as it is read
                    source = stack.enter_context(memory_map(name))
                self.reader = _arrow_reader(source)
                self.schema = self.reader.schema
        except pa.ArrowException as exc:
            kind = "parquet" if self.parquet else "arrow"
            raise DataError(f"{name}: not a readable {kind} file ({exc})") from exc

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            if self.parquet:
                yield from self.file.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
            elif isinstance(self.reader, pa.ipc.RecordBatchFileReader):
                for i in range(self.reader.num_record_batches):
                    yield self.reader.get_batch(i).select(columns)
            else:
                for batch in self.reader:
                    yield batch.select(columns)
        except pa.ArrowException as exc:
            raise DataError(f"{self.name}: cannot read the table ({exc})") from exc


def table_rows(
    name: str,
    image_root: str | os.PathLike[str] | None,
    options: SourceOptions,
    label: str | None = None,
    first: int = 0,
) -> Iterator[Row]:
    """One :class:`Row` per table row of ``name``; ``first`` numbers the rows of the table
    after a previous table of the same dataset."""
    with ExitStack() as stack:
        table = _Table(name, stack)
        names = table.schema.names
        missing = [c for c in (options.image_column, options.caption_column) if c not in names]
        if missing:
            raise DataError(
                f"{name}: no column(s) {missing} (columns: {names}); "
                "choose with --image-column / --caption-column"
            )
        columns = [options.image_column, options.caption_column]
        has_id = options.id_column in names
        if has_id:
            columns.append(options.id_column)
        root = local_root(name, image_root)
        label = label or Path(name).name
        index = first
        for batch in table.batches(columns):
            cells = {c: batch.column(c).to_pylist() for c in columns}
            for k in range(batch.num_rows):
                fields = {
                    "image": cells[options.image_column][k],
                    "caption": cells[options.caption_column][k],
                }
                if has_id:
                    fields["id"] = cells[options.id_column][k]
                yield build_row(
                    index,
                    fields,
                    root,
                    where=f"{label}: row {index}",
                    missing_id=index,
                    image_cell=True,
                    confine=options.confine_images,
                )
                index += 1


def dataset_folder_rows(
    folder: str, image_root: str | os.PathLike[str] | None, options: SourceOptions
) -> Iterator[Row]:
    """The rows of an HF ``save_to_disk`` folder: its arrow files in order, numbered as one
    table."""
    count = 0
    label = Path(folder).name
    for name in dataset_folder_files(folder):
        for row in table_rows(str(name), image_root or folder, options, label, first=count):
            count += 1
            yield row
