"""The error family for data that does not follow its documented layout.

Every reader of the project (scoring rows, training sets, sDCI, retrieval, zero-shot and
human-judgment data) raises :class:`DataError`, with a message that names the file and,
where there is one, the row. It is a ``ValueError``, so the ``specs`` command line reports
it in one line (exit status 2).
"""

from __future__ import annotations


class DataError(ValueError):
    """A data set that does not follow its layout (the message names the file and row)."""
