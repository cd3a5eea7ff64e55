"""Scoring inputs beyond one JSONL/CSV/JSON file: shards, tables and remote URLs.

An input *spec* names one or more files:

- a path, a glob (``shards/*.tar``) or a brace range (``shards/{00000..00009}.tar``, zero
  padding kept; ``{a,b}`` lists too), expanded and sorted by name within each pattern;
- an fsspec URL (``s3://``, ``gs://``, ``hf://``, ``file://``, ``memory://``) when fsspec
  is installed; globs work there too.

Each file is read by its kind: ``.tar`` (``.tar.gz``, ``.tgz``) webdataset shards
(:mod:`.webdataset`), ``.parquet``/``.arrow`` tables and HF ``datasets`` ``save_to_disk``
folders (:mod:`.tables`), and ``.jsonl``/``.csv``/``.json`` files (:mod:`specs_metric.rows`). The
rows of all files come in order, as one input; ``specs score --output-dir`` scores the files
one by one instead (:mod:`specs_metric.shards`).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from specs_metric.rows import Row

TEXT_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # webdataset shards (gzip read as such)
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class SourceOptions:
    """How to find the image, caption and id in shards, tables and COCO results files."""

    image_column: str = "image"  # tables: bytes, a path, or an HF {bytes, path} struct
    caption_column: str = "caption"
    id_column: str = "id"  # tables: optional; without it the id is the row number
    caption_key: str | None = None  # webdataset: a field of the .json member (default: .txt)
    image_pattern: str | None = None  # COCO results: image file name, e.g. "{image_id}.jpg"

    def as_dict(self) -> dict:
        return asdict(self)


def is_url(spec: str | os.PathLike[str]) -> bool:
    return isinstance(spec, str) and "://" in spec


def is_plain_file(spec: str | os.PathLike[str]) -> bool:
    """One local JSONL/CSV/JSON file, the classic inputs read by :mod:`specs_metric.rows`."""
    text = os.fspath(spec)
    if is_url(text) or _GLOB_CHARS.search(text) or _BRACE.search(text):
        return False
    return Path(text).suffix.lower() in TEXT_SUFFIXES


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> ``a00b a01b a02b``; ``{x,y}`` -> both; nested from the left.

    >>> expand_braces("s-{08..10}.tar")
    ['s-08.tar', 's-09.tar', 's-10.tar']
    >>> expand_braces("{train,val}/{0..1}.tar")
    ['train/0.tar', 'train/1.tar', 'val/0.tar', 'val/1.tar']
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    rng = _RANGE.match(body)
    if rng:
        first, last = rng.group(1), rng.group(2)
        width = len(first) if first.lstrip("-").startswith("0") else 0
        lo, hi = int(first), int(last)
        step = 1 if hi >= lo else -1
        choices = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # not a brace expression (e.g. a literal "{x}")
        choices = ["{" + body + "}"]
        head = pattern[: match.end()]
        return [head + rest for rest in expand_braces(pattern[match.end() :])]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for c in choices for out in expand_braces(head + c + tail)]


def _fsspec():
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with huggingface_hub
        raise ValueError("reading URLs needs fsspec: pip install fsspec") from exc
    return fsspec


def expand(spec: str | os.PathLike[str]) -> list[str]:
    """The files an input spec names, in order (see the module docstring).

    Raises:
        FileNotFoundError: a pattern matches nothing, or a named file does not exist.
    """
    text = os.fspath(spec)
    files: list[str] = []
    for pattern in expand_braces(text):
        if is_url(pattern):
            fs, _, paths = _fsspec().get_fs_token_paths(pattern)
            found = sorted(paths) if _GLOB_CHARS.search(pattern) else paths
            if not found or not all(fs.exists(p) for p in found):
                raise FileNotFoundError(f"input not found: {pattern}")
            files.extend(fs.unstrip_protocol(p) for p in found)
        elif _GLOB_CHARS.search(pattern):
            found = sorted(glob.glob(os.path.expanduser(pattern)))
            if not found:
                raise FileNotFoundError(f"input pattern matches no file: {pattern}")
            files.extend(found)
        else:
            if not os.path.exists(os.path.expanduser(pattern)):
                raise FileNotFoundError(f"input file not found: {pattern}")
            files.append(os.path.expanduser(pattern))
    return files


@contextmanager
def open_binary(name: str) -> Iterator[IO[bytes]]:
    """A local file or an fsspec URL, opened for reading bytes."""
    if is_url(name):
        with _fsspec().open(name, "rb") as fh:
            yield fh
    else:
        with open(name, "rb") as fh:
            yield fh


def file_identity(name: str) -> list:
    """``[name, size, mtime]`` of one input file, for a job's resume check."""
    if is_url(name):
        fs, _, (path,) = _fsspec().get_fs_token_paths(name)
        info = fs.info(path)
        mtime = info.get("mtime", info.get("LastModified", info.get("created")))
        return [name, info.get("size"), str(mtime) if mtime is not None else None]
    if os.path.isdir(name):
        from specs_metric.sources.tables import dataset_folder_files

        parts = [file_identity(p) for p in dataset_folder_files(name)]
        return [os.path.abspath(name), sum(p[1] for p in parts), [p[2] for p in parts]]
    stat = os.stat(name)
    return [os.path.abspath(name), stat.st_size, stat.st_mtime_ns]


def input_identity(spec: str | os.PathLike[str], options: SourceOptions | None = None) -> dict:
    """What identifies an input for ``--resume``: its files' sizes and times, and options."""
    if is_plain_file(spec):
        path = Path(spec)
        stat = path.stat()
        identity = {
            "input": str(path.resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
        }
    else:
        identity = {
            "input": os.fspath(spec),
            "input_files": [file_identity(f) for f in expand(spec)],
        }
    if options is not None and options != SourceOptions():
        identity["source"] = options.as_dict()
    return identity


def local_root(name: str, image_root: str | os.PathLike[str] | None) -> Path:
    """Folder for relative image paths: ``image_root``, else the input file's folder."""
    if image_root is not None:
        return Path(image_root)
    if is_url(name):
        return Path.cwd()
    return Path(name).parent if not os.path.isdir(name) else Path(name)


def read_file_rows(
    name: str, image_root: str | os.PathLike[str] | None, options: SourceOptions
) -> Iterator[Row]:
    """The rows of one file of an input spec (indices from 0 within the file)."""
    suffix = Path(name).suffix.lower()
    if name.lower().endswith(SHARD_SUFFIXES):
        suffix = ".tar"
    if not is_url(name) and os.path.isdir(name):
        from specs_metric.sources.tables import dataset_folder_rows

        return dataset_folder_rows(name, image_root, options)
    if suffix in SHARD_SUFFIXES:
        from specs_metric.sources.webdataset import shard_rows

        return shard_rows(name, options)
    if suffix in TABLE_SUFFIXES:
        from specs_metric.sources.tables import table_rows

        return table_rows(name, image_root, options)
    if suffix in TEXT_SUFFIXES and not is_url(name):
        from specs_metric.rows import read_rows

        return read_rows(name, image_root, options)
    if suffix in TEXT_SUFFIXES:
        raise ValueError(f"{name}: JSONL, CSV and JSON inputs are read from local files only")
    raise ValueError(
        f"{name}: unsupported input format {suffix!r} (use .jsonl, .csv, .json, .tar, "
        ".parquet, .arrow or an HF datasets folder)"
    )


def read_source(
    spec: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    options: SourceOptions | None = None,
) -> Iterator[Row]:
    """Stream the rows of every file of ``spec``, in order, as one input."""
    options = options or SourceOptions()
    files = expand(spec)  # errors now, not at the first row
    return _chain(files, image_root, options)


def _chain(files: list[str], image_root, options: SourceOptions) -> Iterator[Row]:
    offset = 0
    for name in files:
        count = 0
        for row in read_file_rows(name, image_root, options):
            row.index += offset
            if len(files) > 1 and row.where is None:  # e.g. JSONL parts: say which file
                row.where = f"{name}: line {row.line}"
                if row.error and row.error.startswith(f"line {row.line}:"):
                    row.error = f"{name}: {row.error}"
            count += 1
            yield row
        offset += count
