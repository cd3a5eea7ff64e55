"""CLIP byte-level BPE tokenizer, producing the reference token ids.

The vocabulary (``assets/bpe_simple_vocab_16e6.txt.gz``, 49408 ids) is OpenAI's CLIP BPE
file. Text is cleaned the way the reference does it (``ftfy.fix_text``, HTML unescaped
twice, whitespace collapsed, stripped, lower-cased) before BPE, and every sequence is
``[SOT] + bpe + [EOT]``, zero padded to the model's context length.
"""

from __future__ import annotations

import gzip
import html
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources

import ftfy
import numpy as np
import regex
import torch

from specs_metric.errors import CaptionTooLongError

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
SOT_ID = 49406
EOT_ID = 49407

LONG_CAPTION_POLICIES = ("truncate", "error")

# Pre-tokenisation: special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = re.compile(r"\s+")
# Text that ftfy and HTML unescaping leave unchanged: printable ASCII and ordinary
# whitespace, with no "&" (entities) and no ESC (terminal escapes). Most captions are like
# this, and skipping ftfy for them halves the cost of tokenizing (ids unchanged: tested).
_PLAIN_ASCII = re.compile(r"[\x20-\x25\x27-\x7e\t\n\r]*")


def literal_special_warning(ids: Sequence[int]) -> str | None:
    """A warning for a caption whose text holds a literal special token, else ``None``.

    ``ids`` is a full :meth:`Tokenizer.token_ids` sequence. The reference tokenizer maps the
    text ``<|endoftext|>`` (any case) to the EOT id, and the text tower pools at the first
    EOT, so everything after it is silently ignored; ``<|startoftext|>`` becomes a second
    SOT. The ids stay the reference's; the warning marks the row.
    """
    inner = ids[1:-1]
    if EOT_ID in inner:
        kept = list(inner).index(EOT_ID)
        return (
            f"caption contains a literal {EOT_TOKEN}: the text after it is ignored "
            f"(scored on its first {kept} tokens, as the reference tokenizer does)"
        )
    if SOT_ID in inner:
        return f"caption contains a literal {SOT_TOKEN}, read as the special token"
    return None



@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """Map every byte to a printable unicode character (reversible, no whitespace)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clean_text(text: str) -> str:
    """Normalise text exactly as the reference tokenizer does before BPE."""
    if not _PLAIN_ASCII.fullmatch(text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    text = _WHITESPACE.sub(" ", text.strip()).strip()
    return text.lower()


def truncate_ids(ids: list[int], context_length: int) -> list[int]:
    """Keep the first ``context_length`` ids, the last one replaced by EOT when cut (the
    reference's ``truncate=True``). The one place the project truncates token ids.

    Example:
        >>> truncate_ids([SOT_ID, 1, 2, 3, EOT_ID], 4)
        [49406, 1, 2, 49407]
    """
    if len(ids) <= context_length:
        return ids
    ids = ids[:context_length]
    ids[-1] = EOT_ID
    return ids


class Tokenizer:
    """CLIP BPE tokenizer.

    Example:
        >>> tok = Tokenizer()
        >>> tok.encode("a photo of a cat")
        [320, 1125, 539, 320, 2368]
        >>> tok(["a cat"], context_length=6).tolist()
        [[49406, 320, 2368, 49407, 0, 0]]
    """

    def __init__(self) -> None:
        with (
            resources.files("specs_metric")
            .joinpath("assets/bpe_simple_vocab_16e6.txt.gz")
            .open("rb") as fh
        ):
            lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
        # Line 0 is a header; the vocabulary uses the first 48894 merges.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(_byte_alphabet().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars]
        vocab += ["".join(pair) for pair in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self._ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self._byte_encoder = _byte_alphabet()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        # Pre-tokenised piece -> its ids: one dict look-up per word for repeated words.
        self._piece_ids: dict[str, tuple[int, ...]] = {}
        assert len(self.encoder) == VOCAB_SIZE

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
            if best not in self._ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        if len(self._cache) < 100_000:
            self._cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT."""
        ids: list[int] = []
        known = self._piece_ids
        for piece in _WORD_PATTERN.findall(clean_text(text)):
            piece_ids = known.get(piece)
            if piece_ids is None:
                mapped = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
                piece_ids = tuple(self.encoder[t] for t in self._bpe(mapped).split(" "))
                if len(known) < 100_000:
                    known[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode` up to text cleaning (padding and specials dropped)."""
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (0, SOT_ID, EOT_ID))
        raw = bytearray(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def token_ids(self, text: str) -> list[int]:
        """Full sequence ``[SOT] + bpe + [EOT]`` (not padded, not truncated)."""
        return [SOT_ID, *self.encode(text), EOT_ID]

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = 248,
        long_captions: str = "truncate",
    ) -> torch.Tensor:
        """Tokenize into a zero-padded LongTensor of shape (N, context_length).

        Args:
            texts: one text or a sequence of texts.
            context_length: positions of the text tower (248 for LongCLIP, 77 for CLIP).
            long_captions: ``"truncate"`` keeps the first ``context_length`` ids and
                overwrites the last with EOT (the reference's ``truncate=True``);
                ``"error"`` raises :class:`CaptionTooLongError`.
        """
        ids, _ = self.batch(texts, context_length, long_captions)
        return ids

    def fit(
        self,
        texts: Sequence[str],
        context_length: int = 248,
        long_captions: str = "truncate",
    ) -> tuple[list[list[int]], list[bool]]:
        """Unpadded id lists that fit the context, and which texts were truncated.

        ``long_captions="truncate"`` cuts with :func:`truncate_ids`; ``"error"`` raises
        :class:`CaptionTooLongError` for a text over the context.
        """
        if long_captions not in LONG_CAPTION_POLICIES:
            raise ValueError(
                f"long_captions must be one of {LONG_CAPTION_POLICIES}, got {long_captions!r}"
            )
        out: list[list[int]] = []
        truncated: list[bool] = []
        for row, text in enumerate(texts):
            seq = self.token_ids(text)
            cut = len(seq) > context_length
            if cut and long_captions == "error":
                raise CaptionTooLongError(
                    f"caption {row} has {len(seq)} tokens, more than the context length "
                    f"{context_length}: {text[:60]!r}..."
                )
            out.append(truncate_ids(seq, context_length))
            truncated.append(cut)
        return out, truncated

    def batch(
        self,
        texts: str | Sequence[str],
        context_length: int = 248,
        long_captions: str = "truncate",
    ) -> tuple[torch.Tensor, list[bool]]:
        """Like :meth:`__call__`, also returning which rows were truncated."""
        if isinstance(texts, str):
            texts = [texts]
        seqs, truncated = self.fit(texts, context_length, long_captions)
        return pad_ids(seqs, context_length), truncated


def pad_ids(seqs: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """Id lists as a zero-padded LongTensor (N, ``length``; default: the longest list)."""
    length = max((len(s) for s in seqs), default=1) if length is None else length
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = seq
    return torch.from_numpy(out)


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """A process-wide tokenizer (loading the vocabulary takes ~0.3 s)."""
    return Tokenizer()
