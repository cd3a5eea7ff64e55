"""Row preparation: what every command does to a row before the model sees it.

A :class:`~specs_metric.data.rows.Row` (already checked by the data layer: id, image cell,
caption) becomes an output record and, when it can be scored, the caption's token ids and
the image's encoded bytes. The scoring job (in its worker processes), the Ray engine,
``specs explain`` and the sweep all prepare rows here, so a check added once applies to
every command:

- :func:`fit_caption`: tokenized as the model reads it (truncated with EOT last, or an error
  under ``long_captions="error"``), with a warning for a literal special token;
- :func:`row_image_bytes`: the image's encoded bytes, read by the bounded reader (or the
  bytes the input holds);
- :class:`RowPreparer`: both, and the record the output will hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from specs_metric.data.rows import Row
from specs_metric.errors import ImageError
from specs_metric.io.reading import read_image_bytes
from specs_metric.processing.tokenizer import Tokenizer, literal_special_warning, truncate_ids

# The fields of a prepared record before scoring (the output adds score and cosine).
RECORD_FIELDS = ("index", "line", "id", "image", "caption", "tokens", "truncated", "warning",
                 "error")  # fmt: skip


@dataclass
class FittedCaption:
    """A caption's ids as the model reads them, with what the output reports about it."""

    ids: list[int] | None  # None when the caption cannot be scored (see error)
    tokens: int  # SOT and EOT counted, before truncation
    truncated: bool
    warning: str | None
    error: str | None


def fit_caption(
    tokenizer: Tokenizer, caption: str, context_length: int, long_captions: str, label: str
) -> FittedCaption:
    """Tokenize one caption for scoring: truncated with EOT last, or an error for an
    over-long caption under ``long_captions="error"``; literal special tokens warned about."""
    ids = tokenizer.token_ids(caption)
    truncated = len(ids) > context_length
    error = None
    if truncated and long_captions == "error":
        error = (
            f"{label}: caption has {len(ids)} tokens, more than the context length "
            f"{context_length}"
        )
    return FittedCaption(
        None if error else truncate_ids(ids, context_length),
        len(ids),
        truncated,
        literal_special_warning(ids),
        error,
    )


def row_image_bytes(row: Row) -> bytes:
    """The encoded image of a row that has no error: the bytes its input holds, else its
    file read by :func:`~specs_metric.io.reading.read_image_bytes`.

    Raises:
        ImageError: a file the bounded reader refuses, or empty bytes.
    """
    if row.data is not None:
        if not row.data:
            raise ImageError(f"{row.image or 'image bytes'}: image is empty (0 bytes)")
        return row.data
    if row.path is None:
        raise ImageError("row has no image")
    return read_image_bytes(row.path)


def image_name(row: Row) -> str:
    """How messages call a row's image: its file, or what the input calls its bytes."""
    if row.data is None:
        return str(row.path)
    return str(row.image or "image bytes")


class RowPreparer:
    """Turns rows into records and token ids with one model's tokenizer and context."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, long_captions: str) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.long_captions = long_captions

    def prepare(self, row: Row) -> tuple[dict, list[int] | None]:
        """The row's output record (score and cosine still missing) and, when its caption
        can be scored, its token ids (``None`` for a row with an error)."""
        rec = {
            "index": row.index,
            "line": row.line,
            "id": row.id,
            "image": row.image,
            "caption": row.caption,
            "tokens": None,
            "truncated": None,
            "warning": None,
            "error": row.error,
        }
        if row.error is not None:
            return rec, None
        fitted = fit_caption(
            self.tokenizer, row.caption, self.context_length, self.long_captions, row.label
        )
        rec["tokens"], rec["truncated"] = fitted.tokens, fitted.truncated
        rec["warning"], rec["error"] = fitted.warning, fitted.error
        return rec, fitted.ids
