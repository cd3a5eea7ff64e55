"""The safe writer: every file a command writes goes through this module.

Outputs live in folders other people or programs may write to, so a write must not be
turned against the user:

- **No symlink is followed.** A whole file is written to a temporary created exclusively
  (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random name) in the target's folder and renamed over
  the target (:func:`atomic_write`); ``rename`` replaces a link at the target instead of
  writing through it. Files appended to (a job's part files) and lock files are opened with
  ``O_NOFOLLOW`` and must be regular files with one link (:func:`open_append`,
  :func:`open_lock_file`), so a planted symlink or hard link is refused, not written through.
- **No input is overwritten.** The bounded reader registers every data and model file it
  opens (:func:`protect`); a command also registers all the files its inputs name before it
  starts. Writing over a registered file, by any path to it (a symlink, a hard link, a
  relative path), is an :class:`~specs_metric.errors.OutputError` (:func:`check_not_input`).
- **The user's umask decides the mode.** Files are created with mode ``0o666`` and the
  process umask applies (``tempfile.mkstemp`` would make them ``0600``).
- **Nothing half-written is left.** A failed write removes its temporary; the target keeps
  its old content or gets the whole new one.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from specs_metric.errors import OutputError

_FILE_MODE = 0o666  # the umask applies
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# (device, inode) of every input file of this process: never a write target.
_PROTECTED: dict[tuple[int, int], str] = {}


def protect(path: str | os.PathLike[str], st: os.stat_result | None = None) -> None:
    """Register an input file: no writer of this process may replace or write it."""
    try:
        st = st or os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        _PROTECTED.setdefault((st.st_dev, st.st_ino), os.fspath(path))


def protect_all(paths: Iterable[str | os.PathLike[str]]) -> None:
    """:func:`protect` each of ``paths`` (e.g. every file an input pattern names)."""
    for path in paths:
        protect(path)


@contextmanager
def protection_scope() -> Iterator[None]:
    """Inputs registered inside the block are forgotten after it: one command's inputs are
    not the next command's (a process that runs several, e.g. tests, starts each afresh)."""
    saved = dict(_PROTECTED)
    _PROTECTED.clear()
    try:
        yield
    finally:
        _PROTECTED.clear()
        _PROTECTED.update(saved)


def check_not_input(path: str | os.PathLike[str], what: str = "output") -> None:
    """Refuse a write target that is (by any path to it) a registered input file.

    Raises:
        OutputError: naming the target and the input it would overwrite.
    """
    try:
        st = os.stat(path)
    except OSError:
        return  # nothing there (yet): nothing to overwrite
    source = _PROTECTED.get((st.st_dev, st.st_ino))
    if source is not None:
        raise OutputError(
            f"{what} {os.fspath(path)} is the input file {source}; choose another {what}"
        )


def _exclusive(path: str, flags: int) -> int:
    """``open`` opener: create a new file, never an existing one, never through a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, _FILE_MODE)


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


@contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "w",
    *,
    encoding: str = "utf-8",
    errors: str = "strict",
    newline: str | None = None,
    fsync: bool = False,
) -> Iterator[IO]:
    """Write ``path`` whole: into a new temporary next to it, renamed over it when the
    ``with`` block ends without error (see the module docstring).

    Args:
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        fsync: flush the data to the disk before the rename (files whose loss after a
            power cut would cost more than rewriting them).

    Raises:
        OutputError: ``path`` is an input file of this process, or an existing folder.
    """
    target = Path(path)
    check_not_input(target)
    if target.is_dir() and not target.is_symlink():
        raise OutputError(f"{target} is a folder; give a file name")
    text = {} if "b" in mode else {"encoding": encoding, "errors": errors, "newline": newline}
    tmp = _temporary_name(target)
    try:
        # builtin open with an opener: the flags are ours, the file object is the usual one
        with open(tmp, mode.replace("w", "x"), opener=_exclusive, **text) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        check_not_input(target)  # it may have become one meanwhile (a link to an input)
        os.replace(tmp, target)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """``Path.write_text`` through :func:`atomic_write`."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """``Path.write_bytes`` through :func:`atomic_write`."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def copy_file(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Copy a regular file through :func:`atomic_write` (no link followed at the target)."""
    with open(source, "rb") as src, atomic_write(target, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)


def _regular_opener(what: str):
    """``open`` opener for a file written in place: created when absent; refused when it is
    a link, has other hard links, or is not a regular file (a FIFO is refused without
    blocking)."""

    def opener(path: str, flags: int) -> int:
        flags |= os.O_CREAT | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, _FILE_MODE)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise OutputError(
                    f"{what} {path} is a symbolic link; remove it (nothing is written through one)"
                ) from None
            if exc.errno == errno.ENXIO:
                raise OutputError(f"{what} {path} is not a regular file") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            kind = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
            raise OutputError(f"{what} {path} {kind}; remove it (nothing is written through it)")
        os.set_blocking(fd, True)
        return fd

    return opener


def open_append(path: str | os.PathLike[str], what: str = "part file") -> IO[str]:
    """A text file opened for appending (created when absent), refused if it is a link, a
    file with other hard links, a FIFO or a device, or an input file."""
    check_not_input(path, what)
    return open(path, "a", encoding="utf-8", opener=_regular_opener(what))


def create_empty(path: str | os.PathLike[str], what: str = "part file") -> None:
    """``path`` as a new empty file: whatever was there (a link included) is removed first,
    never written through."""
    path = Path(path)
    check_not_input(path, what)
    if path.is_symlink() or path.exists():
        path.unlink()
    open(path, "xb", opener=_exclusive).close()


def truncate(path: str | os.PathLike[str], size: int, what: str = "part file") -> None:
    """Cut a file (never through a link) to ``size`` bytes."""
    with open(path, "r+b", opener=_regular_opener(what)) as fh:
        fh.truncate(size)


def open_lock_file(path: str | os.PathLike[str]) -> int:
    """The fd of a lock file (created when absent), never through a link."""
    return _regular_opener("lock file")(os.fspath(path), os.O_RDWR)


def publish(part: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename a file this process wrote (a part file) to ``target``: a link at ``target`` is
    replaced, not followed; an input at ``target`` is refused."""
    check_not_input(target)
    os.replace(part, target)
