"""The one entry point to the rows of a scoring input, whatever its format.

:func:`read_rows` takes an input spec (a file, a glob, a brace range, fsspec URLs: see
:mod:`.locations`) and reads each file by its kind: ``.jsonl``/``.csv``/``.json`` files
(:mod:`.text`), ``.tar`` (``.tar.gz``, ``.tgz``) webdataset shards (:mod:`.webdataset`),
``.parquet``/``.arrow`` tables and HF ``datasets`` ``save_to_disk`` folders (:mod:`.tables`).
The rows of all files come in order, as one input, each checked by the rules of
:mod:`.rows`; ``specs score --output-dir`` scores the files one by one instead
(:mod:`specs_metric.jobs.shards`). Every command that reads scoring rows (score, explain,
sweep, Ray) reads them here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from specs_metric.data.hf_folders import dataset_folder_files
from specs_metric.data.locations import (
    SHARD_SUFFIXES,
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    expand,
    fsspec_module,
    is_plain_file,
    is_url,
    local_root,
)
from specs_metric.data.rows import Row, SourceOptions
from specs_metric.data.tables import dataset_folder_rows, table_rows
from specs_metric.data.text import text_rows
from specs_metric.data.webdataset import shard_rows
from specs_metric.errors import DataError
from specs_metric.io.reading import open_regular
from specs_metric.io.writing import protect, protect_all


def read_file_rows(
    name: str, image_root: str | os.PathLike[str] | None, options: SourceOptions
) -> Iterator[Row]:
    """The rows of one file of an input spec (indices from 0 within the file)."""
    suffix = Path(name).suffix.lower()
    if name.lower().endswith(SHARD_SUFFIXES):
        suffix = ".tar"
    if not is_url(name) and os.path.isdir(name):
        return dataset_folder_rows(name, image_root, options)
    if suffix in SHARD_SUFFIXES:
        return shard_rows(name, options)
    if suffix in TABLE_SUFFIXES:
        return table_rows(name, image_root, options)
    if suffix in TEXT_SUFFIXES and not is_url(name):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"input file not found: {path}")
        return text_rows(path, local_root(name, image_root), options)
    if suffix in TEXT_SUFFIXES:
        raise DataError(f"{name}: JSONL, CSV and JSON inputs are read from local files only")
    raise DataError(
        f"{name}: unsupported input format {suffix!r} (use .jsonl, .csv, .json, .tar, "
        ".parquet, .arrow or an HF datasets folder)"
    )


def read_rows(
    spec: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
) -> Iterator[Row]:
    """Stream the rows of every file of ``spec``, in order, as one input.

    Relative image paths resolve against ``image_root``, by default each file's folder.

    Raises:
        DataError: an unsupported format, or a file that cannot be read as a whole (not a
            regular file, an unreadable header or document); problems of single rows are
            the rows' errors instead.
        FileNotFoundError: the input does not exist.
    """
    options = options or SourceOptions()
    files = [os.fspath(spec)] if is_plain_file(spec) else expand(spec)  # errors now
    if len(files) == 1:
        return read_file_rows(files[0], image_root, options)
    return _chain(files, image_root, options)


def _chain(files: list[str], image_root, options: SourceOptions) -> Iterator[Row]:
    offset = 0
    for name in files:
        count = 0
        for row in read_file_rows(name, image_root, options):
            row.index += offset
            if row.where is None:  # e.g. JSONL parts: say which file
                row.where = f"{name}: line {row.line}"
                if row.error and row.error.startswith(f"line {row.line}:"):
                    row.error = f"{name}: {row.error}"
            count += 1
            yield row
        offset += count


def count_rows(
    spec: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
) -> int:
    """Number of rows :func:`read_rows` yields (one streaming pass)."""
    return sum(1 for _ in read_rows(spec, image_root, options))


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a regular file's content, read in bounded memory (about 0.7 s per GB
    from the page cache on a 2-core machine)."""
    digest = hashlib.sha256()
    with open_regular(path, what="input file") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_identity(name: str) -> list:
    """What identifies one input file for a job's resume check: a local file by its path,
    size and content (sha256), so a file edited in place is noticed even when its size and
    times were restored (``cp -p``, ``rsync -t``); an fsspec URL by its size and the
    server's modification time or ETag (its content would have to be downloaded)."""
    if is_url(name):
        fs, _, (path,) = fsspec_module().get_fs_token_paths(name)
        info = fs.info(path)
        mtime = info.get("mtime", info.get("LastModified", info.get("created")))
        etag = info.get("ETag", info.get("etag"))
        return [name, info.get("size"), str(etag or mtime) if (etag or mtime) else None]
    if os.path.isdir(name):
        parts = [file_identity(str(p)) for p in dataset_folder_files(name)]
        return [os.path.abspath(name), sum(p[1] for p in parts), [p[2] for p in parts]]
    return [os.path.abspath(name), os.stat(name).st_size, file_digest(name)]


def input_identity(spec: str | os.PathLike[str], options: SourceOptions | None = None) -> dict:
    """What identifies an input for ``--resume``: its files' contents (see
    :func:`file_identity`) and the source options."""
    if is_plain_file(spec):
        path = Path(spec)
        identity = {
            "input": str(path.resolve()),
            "input_size": path.stat().st_size,
            "input_sha256": file_digest(path),
        }
    else:
        identity = {
            "input": os.fspath(spec),
            "input_files": [file_identity(f) for f in expand(spec)],
        }
    if options is not None and options != SourceOptions():
        identity["source"] = options.as_dict()
    return identity


def protect_inputs(spec: str | os.PathLike[str]) -> list[str]:
    """Register every local file of ``spec`` as an input no writer of this process may
    replace (:func:`specs_metric.io.writing.protect`), before any output is written; returns
    the files. An output that is one of them (a glob's file, an ``--output-dir`` shard) is
    then refused before any work."""
    files = [os.fspath(spec)] if is_plain_file(spec) else expand(spec)
    for name in files:
        if is_url(name):
            continue
        if os.path.isdir(name):
            protect_all(dataset_folder_files(name))
        else:
            protect(name)
    return files
