"""Where an input's files are: paths, globs, brace ranges and fsspec URLs.

An input *spec* names one or more files:

- a path, a glob (``shards/*.tar``) or a brace range (``shards/{00000..00009}.tar``, zero
  padding kept; ``{a,b}`` lists too), expanded and sorted by name within each pattern; a
  spec may name at most :data:`~specs_metric.limits.MAX_INPUT_FILES` files, counted before
  anything is expanded;
- an fsspec URL (``s3://``, ``gs://``, ``hf://``, ``file://``, ``memory://``) when fsspec
  is installed; globs work there too.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from specs_metric.errors import DataError
from specs_metric.io.reading import open_regular
from specs_metric.limits import MAX_INPUT_FILES

TEXT_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # webdataset shards (gzip read as such)
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def is_url(spec: str | os.PathLike[str]) -> bool:
    return isinstance(spec, str) and "://" in spec


def is_plain_file(spec: str | os.PathLike[str]) -> bool:
    """One local JSONL/CSV/JSON file, the classic inputs read by :mod:`specs_metric.data.text`."""
    text = os.fspath(spec)
    if is_url(text) or _GLOB_CHARS.search(text) or _BRACE.search(text):
        return False
    return Path(text).suffix.lower() in TEXT_SUFFIXES


def _choices(body: str) -> int | None:
    """How many names one brace expression gives, or None for a literal ``{x}``."""
    rng = _RANGE.match(body)
    if rng:
        return abs(int(rng.group(2)) - int(rng.group(1))) + 1
    if "," in body:
        return len(body.split(","))
    return None


def count_expansions(pattern: str) -> int:
    """How many names :func:`expand_braces` gives, without expanding anything.

    >>> count_expansions("s-{000..999}/{a,b}.tar")
    2000
    """
    total = 1
    for match in _BRACE.finditer(pattern):
        total *= _choices(match.group(1)) or 1
        if total > MAX_INPUT_FILES:
            return MAX_INPUT_FILES + 1  # enough to refuse; the product may be astronomical
    return total


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> ``a00b a01b a02b``; ``{x,y}`` -> both; nested from the left.

    >>> expand_braces("s-{08..10}.tar")
    ['s-08.tar', 's-09.tar', 's-10.tar']
    >>> expand_braces("{train,val}/{0..1}.tar")
    ['train/0.tar', 'train/1.tar', 'val/0.tar', 'val/1.tar']

    Raises:
        DataError: the pattern names more than :data:`~specs_metric.limits.MAX_INPUT_FILES`.
    """
    if count_expansions(pattern) > MAX_INPUT_FILES:
        raise DataError(
            f"input pattern {pattern!r} names more than {MAX_INPUT_FILES} files; "
            "give a smaller range"
        )
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
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
        head = pattern[: match.end()]
        return [head + rest for rest in _expand(pattern[match.end() :])]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for c in choices for out in _expand(head + c + tail)]


def fsspec_module():
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with huggingface_hub
        raise DataError("reading URLs needs fsspec: pip install fsspec") from exc
    return fsspec


def expand(spec: str | os.PathLike[str]) -> list[str]:
    """The files an input spec names, in order (see the module docstring).

    Raises:
        FileNotFoundError: a pattern matches nothing, or a named file does not exist.
        DataError: the spec names more than :data:`~specs_metric.limits.MAX_INPUT_FILES`.
    """
    text = os.fspath(spec)
    files: list[str] = []
    for pattern in expand_braces(text):
        if is_url(pattern):
            fs, _, paths = fsspec_module().get_fs_token_paths(pattern)
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
        if len(files) > MAX_INPUT_FILES:
            raise DataError(f"input {text!r} names more than {MAX_INPUT_FILES} files")
    return files


@contextmanager
def open_binary(name: str) -> Iterator[IO[bytes]]:
    """A local regular file (never a FIFO or a device) or an fsspec URL, for reading bytes."""
    if is_url(name):
        with fsspec_module().open(name, "rb") as fh:
            yield fh
    else:
        with open_regular(name, what="input file") as fh:
            yield fh


def local_root(name: str, image_root: str | os.PathLike[str] | None) -> Path:
    """Folder for relative image paths: ``image_root``, else the input file's folder."""
    if image_root is not None:
        return Path(image_root)
    if is_url(name):
        return Path.cwd()
    return Path(name).parent if not os.path.isdir(name) else Path(name)
