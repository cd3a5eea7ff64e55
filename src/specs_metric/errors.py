"""The project's errors: one family, one module.

Every problem a user can cause or fix (bad input, an unusable file or checkpoint, a setting
that does not fit, an output that would be overwritten) raises a :class:`SpecsError` kind
with a one-line message naming the file, row or option. The ``specs`` command line prints
these, and ``OSError`` (a missing file, a full disk), in one line and exits with status 2;
any other exception is a bug and keeps its traceback.

:class:`SpecsError` is a ``ValueError``, so code written against the older per-module
errors (``except ValueError``) keeps working.

Example:
    >>> issubclass(ImageError, SpecsError), issubclass(SpecsError, ValueError)
    (True, True)
"""

from __future__ import annotations

import sys
from contextlib import contextmanager


class SpecsError(ValueError):
    """A problem with the user's input, files or settings (a one-line message)."""


class UsageError(SpecsError):
    """Options that cannot work together, or a value an option does not take."""


class DataError(SpecsError):
    """A data set that does not follow its layout (the message names the file and row)."""


class PrepareError(DataError):
    """Input rows of ``specs prepare`` that cannot be read at all."""


class ImageError(SpecsError):
    """An image that cannot be used; the message names the file and the problem."""


class CaptionTooLongError(SpecsError):
    """A caption over the context length under the ``error`` policy."""


class SegmenterError(SpecsError):
    """A segmenter that cannot run (e.g. the NLTK data it needs is missing)."""


class ConfigError(SpecsError):
    """An architecture or preprocessing description that is invalid or contradicts weights."""


class CheckpointError(SpecsError):
    """A checkpoint file that cannot be read safely or does not describe a usable model."""


class ModelNotAvailableError(SpecsError):
    """A named model that is neither cached nor downloadable now."""


class JobError(SpecsError):
    """A job that cannot start or finish correctly."""


class OutputLockedError(JobError):
    """Another job holds the lock of this output."""


class OutputError(JobError):
    """An output that would overwrite an input, an earlier result or a file it must not."""


class InterruptedJobError(JobError):
    """A job stopped by a signal or a dead worker; its rows so far are kept for resume."""


class NothingScoredError(JobError):
    """A run that wrote its output but could score none of its rows (every row failed)."""


class CompareError(SpecsError):
    """Two score files that cannot be compared."""


class SweepError(SpecsError):
    """Checkpoint files a sweep cannot score or test."""


class PlotError(SpecsError):
    """A plot that cannot be made here (matplotlib cannot be imported); reports go on
    without it."""


class TrainError(SpecsError):
    """A training run that cannot start or continue."""


class ServiceError(SpecsError):
    """A scoring service (``specs serve``) that refused or failed a request."""


class OverloadedError(ServiceError):
    """A scoring service with no room for a request now (HTTP 503): try again later."""


def describe_parse_error(exc: BaseException) -> str:
    """A short description of a parser's failure on a user's file (for a one-line message)."""
    if isinstance(exc, UnicodeDecodeError):
        bad = exc.object[exc.start : exc.start + 1]
        return f"not UTF-8 text (byte 0x{bad.hex()})" if bad else "not UTF-8 text"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_errors() -> tuple[type[BaseException], ...]:
    """What the parsers of users' files raise: ValueError (JSON, UTF-8, numbers, and
    pyarrow's ArrowInvalid), RecursionError (deep JSON), ``csv.Error`` and the other pyarrow
    errors. Modules are looked up only if loaded: an error cannot come from one that is not."""
    found: list[type[BaseException]] = [ValueError, RecursionError]
    if "csv" in sys.modules:
        found.append(sys.modules["csv"].Error)
    if "pyarrow" in sys.modules:
        found.append(sys.modules["pyarrow"].ArrowException)
    return tuple(found)


@contextmanager
def reading(path: object, kind: type[SpecsError] = DataError, what: str = "cannot read"):
    """Turn a parser's error on the user's file ``path`` into ``kind`` naming the file.

    Keep the block to the parsing itself: any ``ValueError`` inside becomes a file error.
    ``SpecsError`` and ``OSError`` pass unchanged.

    Example:
        >>> import json
        >>> try:
        ...     with reading("a.json"):
        ...         json.loads("[1,")
        ... except DataError as exc:
        ...     print(exc)
        a.json: cannot read (Expecting value: line 1 column 4 (char 3))
    """
    try:
        yield
    except SpecsError:
        raise
    except OSError:
        raise
    except parse_errors() as exc:
        raise kind(f"{path}: {what} ({describe_parse_error(exc)})") from exc
