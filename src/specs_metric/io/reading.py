"""The bounded reader: every file the package reads goes through :func:`open_regular`.

Inputs are untrusted, so a read must neither block nor allocate without bound:

- only regular files are opened: a FIFO, a device (``/dev/zero``), a socket or a directory is
  refused from its ``stat`` before it is opened (and the opened file is checked again with
  ``fstat``, in case the path changed in between; ``O_NONBLOCK`` keeps that open from
  blocking on a FIFO);
- a whole-file read (:func:`read_bounded`) checks the size before reading and reads at most
  the limit, so a file that grows meanwhile is refused too;
- JSON documents (:func:`read_json`) are read bounded, and nesting too deep for the parser is
  the same one-line error as any other malformed document.

Errors name the file; each caller chooses the error class of its layer (``ImageError`` for
image files, ``DataError`` for data files, ``CheckpointError`` for model files).
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from typing import IO, Any

from specs_metric.errors import DataError, ImageError, SpecsError
from specs_metric.io import writing
from specs_metric.limits import MAX_IMAGE_BYTES


def printable(name: str) -> str:
    """A name that can be written as UTF-8 (a path with bytes that are not UTF-8: escaped)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _article(what: str) -> str:
    return "an" if what[:1] in "aeiou" else "a"


def _os_error(name: str, exc: OSError, what: str, error: type[SpecsError]) -> SpecsError:
    reasons = {
        errno.ENOENT: f"{what} not found",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EISDIR: f"is a directory, not {_article(what)} {what}",
        errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.ENAMETOOLONG: "path too long",
        errno.ENXIO: "not a regular file",
    }
    reason = reasons.get(exc.errno) or f"cannot read {what} ({exc.strerror or exc})"
    return error(f"{name}: {reason}")


def check_regular(
    name: str,
    st: os.stat_result,
    max_bytes: int | None = None,
    *,
    what: str = "file",
    error: type[SpecsError] = DataError,
) -> None:
    """Refuse what is not a regular file, or (with ``max_bytes``) one larger than that."""
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{name}: is a directory, not {_article(what)} {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name}: not a regular file ({_file_kind(st.st_mode)})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{name}: {what} too large ({st.st_size} bytes; the limit is {max_bytes})")


def open_regular(
    path: str | os.PathLike[str],
    *,
    max_bytes: int | None = None,
    what: str = "file",
    error: type[SpecsError] = DataError,
    name: str | None = None,
    protect: bool = True,
) -> IO[bytes]:
    """Open a regular file for reading bytes (see the module docstring). With ``protect``
    (all but image files) the file is registered as an input that no writer of this process
    may replace (:func:`specs_metric.io.writing.protect`).

    Raises:
        ``error``: not found, permission denied, a directory, not a regular file, a path
            that cannot name a file (a NUL byte), or larger than ``max_bytes``.
    """
    name = printable(name or os.fspath(path))
    try:
        # stat first: a FIFO or a device is refused without being opened at all
        check_regular(name, os.stat(path), max_bytes, what=what, error=error)
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except SpecsError:
        raise
    except OSError as exc:
        raise _os_error(name, exc, what, error) from None
    except ValueError as exc:  # a NUL byte, or text that is not a valid file name
        raise error(f"{name!r}: not a valid file path ({exc})") from None
    try:
        st = os.fstat(fd)
        check_regular(name, st, max_bytes, what=what, error=error)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    if protect:
        writing.protect(path, st)
    return os.fdopen(fd, "rb")


def read_bounded(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    what: str = "file",
    error: type[SpecsError] = DataError,
    name: str | None = None,
    allow_empty: bool = False,
    protect: bool = True,
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, read in bounded memory."""
    name = printable(name or os.fspath(path))
    with open_regular(
        path, max_bytes=max_bytes, what=what, error=error, name=name, protect=protect
    ) as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise _os_error(name, exc, what, error) from None
    if len(data) > max_bytes:  # the file grew while being read
        raise error(f"{name}: {what} too large (over {max_bytes} bytes)")
    if not data and not allow_empty:
        raise error(f"{name}: {what} is empty (0 bytes)")
    return data


def read_image_bytes(
    path: str | os.PathLike[str], max_bytes: int | None = None, name: str | None = None
) -> bytes:
    """The bytes of an image file: a regular file of at most ``max_bytes`` (default
    :data:`~specs_metric.limits.MAX_IMAGE_BYTES`), not empty.

    Raises:
        ImageError: not found, permission denied, a directory, not a regular file, a path
            that cannot name a file (a NUL byte), empty, or larger than ``max_bytes``.
    """
    limit = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    return read_bounded(
        path, limit, what="image file", error=ImageError, name=name, protect=False
    )


def parse_json(
    text: str | bytes,
    name: str,
    error: type[SpecsError] = DataError,
    max_depth: int | None = None,
) -> Any:
    """A JSON document from untrusted text; anything malformed is one ``error`` naming
    ``name``: not JSON, not UTF-8, nested deeper than the parser recurses, or (with
    ``max_depth``) deeper than that many levels of lists and objects."""
    try:
        value = json.loads(text)
    except UnicodeDecodeError as exc:
        raise error(f"{name}: not valid UTF-8 (byte {exc.start + 1})") from None
    except RecursionError:
        raise error(f"{name}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise error(f"{name}: not valid JSON ({exc})") from None
    if max_depth is not None:  # iterative, so that checking a deep value cannot recurse
        stack = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            children = node.values() if isinstance(node, dict) else node
            for child in children if isinstance(node, (dict, list)) else ():
                if isinstance(child, (dict, list)):
                    if depth + 1 > max_depth:
                        raise error(f"{name}: JSON nested too deeply (limit {max_depth} levels)")
                    stack.append((child, depth + 1))
    return value


def read_json(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    what: str = "JSON file",
    error: type[SpecsError] = DataError,
    protect: bool = True,
) -> Any:
    """A JSON file of at most ``max_bytes``, parsed (see :func:`parse_json`)."""
    name = printable(os.fspath(path))
    data = read_bounded(
        path, max_bytes, what=what, error=error, allow_empty=True, protect=protect
    )
    return parse_json(data, name, error)


def open_text(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    error: type[SpecsError] = DataError,
    newline: str | None = None,
    errors: str = "strict",
    protect: bool = True,
) -> IO[str]:
    """A regular file opened for reading UTF-8 text (a byte-order mark skipped). With the
    default ``errors="strict"`` a byte that is not UTF-8 raises ``UnicodeDecodeError`` where
    it is read; parse inside :func:`specs_metric.errors.reading` to name the file."""
    raw = open_regular(path, what=what, error=error, protect=protect)
    check_utf8_start(raw.peek(4)[:4], printable(os.fspath(path)), error)
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors=errors, newline=newline)


_OTHER_ENCODINGS = (
    (b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"),
)  # fmt: skip


def check_utf8_start(head: bytes, name: str, error: type[SpecsError] = DataError) -> None:
    """Refuse text that starts with a UTF-16 or UTF-32 byte-order mark: read as UTF-8 it
    would give garbage rows, one per line, instead of one clear error."""
    for mark, encoding in _OTHER_ENCODINGS:
        if head.startswith(mark):
            raise error(f"{name}: the file is {encoding} text; convert it to UTF-8")


def read_text(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    what: str = "file",
    error: type[SpecsError] = DataError,
) -> str:
    """A whole UTF-8 text file of at most ``max_bytes`` (a byte-order mark skipped)."""
    name = printable(os.fspath(path))
    data = read_bounded(path, max_bytes, what=what, error=error, allow_empty=True)
    check_utf8_start(data[:4], name, error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{name}: not valid UTF-8 (byte {exc.start + 1})") from None


def check_file(
    path: str | os.PathLike[str], *, what: str = "file", error: type[SpecsError] = DataError
) -> None:
    """Refuse a path that is not a regular file, for libraries that open it themselves
    (memory maps, safetensors, ``torch.load``); registers it as an input."""
    open_regular(path, what=what, error=error).close()


def read_parquet(
    path: str | os.PathLike[str],
    columns: list[str] | None = None,
    *,
    error: type[SpecsError] = DataError,
):
    """A whole parquet file as a pyarrow ``Table`` (a regular file only; a file that is not
    parquet is one ``error`` naming it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(path, what="parquet file", error=error) as fh:
        try:
            return pq.read_table(fh, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            name = printable(os.fspath(path))
            raise error(f"{name}: not a readable parquet file ({exc})") from None


def parquet_file(
    path: str | os.PathLike[str], *, error: type[SpecsError] = DataError, protect: bool = True
):
    """A ``pyarrow.parquet.ParquetFile`` over a regular file, for reading in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fh = open_regular(path, what="parquet file", error=error, protect=protect)
    try:
        return pq.ParquetFile(fh)
    except (pa.ArrowException, OSError) as exc:
        fh.close()
        raise error(f"{printable(os.fspath(path))}: not a readable parquet file ({exc})") from None


def memory_map(path: str | os.PathLike[str], *, error: type[SpecsError] = DataError):
    """``pyarrow.memory_map`` of a regular file (a FIFO or a device is refused unopened)."""
    import pyarrow as pa

    check_file(path, what="Arrow file", error=error)
    return pa.memory_map(os.fspath(path), "r")
