"""An advisory lock that keeps two jobs from writing the same output at once."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from specs_metric.errors import OutputLockedError
from specs_metric.io.writing import open_lock_file


class OutputLock:
    """An exclusive ``flock`` on ``<output>.lock``, held from :meth:`acquire` to
    :meth:`release` (or until the process dies: the kernel drops it with the process).

    The lock file is removed on release. A job that opened the file just before it was
    removed would lock a deleted file, so :meth:`acquire` checks that the locked file is
    still the one at the path, and retries otherwise.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.with_name(output.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now, or raise :class:`OutputLockedError` naming the output."""
        for _ in range(100):
            fd = open_lock_file(self.path)  # never through a planted link
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLockedError(
                    f"another job is writing {self.output} (it holds {self.path}); wait for "
                    "it to finish or choose another --output"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)  # locked a file that its holder removed meanwhile: try again
        raise OutputLockedError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
