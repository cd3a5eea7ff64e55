"""CLIP byte-level BPE tokenizer, producing the reference token ids.

The vocabulary (``assets/bpe_simple_vocab_16e6.txt.gz``, 49408 ids) is OpenAI's CLIP BPE
file. Text is cleaned the way the reference does it (``ftfy.fix_text``, HTML unescaped
twice, whitespace collapsed, stripped, lower-cased) before BPE, and every sequence is
``[SOT] + bpe + [EOT]``, zero padded to the model's context length.

Cost is linear in the text up to a log factor: BPE merges a word of n characters in
O(n log n) (:func:`bpe_merge`), and :meth:`Tokenizer.encode_head` reads only as much of a
long text as its first ids need.
"""

from __future__ import annotations

import gzip
import heapq
import html
import re
from collections.abc import Iterable, Mapping, Sequence
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
# Longest pre-tokenised piece kept in the per-word caches: words are short, and a caption
# that is one huge run of letters must not stay in memory (nor evict useful words).
CACHED_PIECE_CHARS = 64
# Characters of cleaned text per token, space included, that ordinary text stays under.
_TYPICAL_TOKEN_CHARS = 8

# Pre-tokenisation: special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = re.compile(r"\s+")
_SPACE = re.compile(r"\s")
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


def bpe_merge(word: list[str], ranks: Mapping[tuple[str, str], int]) -> tuple[list[str], int]:
    """Merge the symbols of one word by rank, as CLIP's BPE does, in O(n log n).

    Returns the merged symbols and the number of heap operations (pushes and pops: at most
    ``3n`` of each, so the work is O(n log n) in the word's length ``n``).

    The reference loop repeatedly takes the lowest-ranked adjacent pair ``(a, b)`` and merges
    all its occurrences left to right, skipping one that overlaps the previous merge (so
    ``a a a`` becomes ``aa a``), which costs O(n) per round and O(n^2) for a long word. Here
    the symbols are a linked list over their first positions and every adjacent pair with a
    rank sits in a heap keyed ``(rank, position)``; an entry whose pair has since changed
    is skipped when popped. One round pops *all* entries of the lowest rank ``r`` first
    (positions ascending) and only then merges them, so a new pair of rank below ``r``
    waits for the next round as it does in the reference. A new pair is ``(x, ab)`` or
    ``(ab, y)``, never ``(a, b)`` itself because ``ab`` is longer than ``a`` and ``b``, and a
    rank names one pair, so no new pair can join the round. Within the round, an occurrence
    whose first symbol was absorbed by the merge to its left (``a a a``: the second ``a``)
    is dead and skipped, exactly the reference's left-to-right rule; any other occurrence is
    untouched by the merges to its left, so it is merged as the reference merges it.

    Example:
        >>> bpe_merge(list("aaa"), {("a", "a"): 0})  # overlapping occurrences
        (['aa', 'a'], 4)
        >>> # (ab, a) ranks before (a, b) but only forms in the round merging (a, b)
        >>> bpe_merge(list("abab"), {("ab", "a"): 0, ("a", "b"): 1})[0]
        ['ab', 'ab']
    """
    n = len(word)
    if n < 2:
        return list(word), 0
    sym: list[str | None] = list(word)  # None: merged into the symbol to its left
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    get = ranks.get
    heap = []
    for i in range(n - 1):
        r = get((word[i], word[i + 1]))
        if r is not None:
            heap.append((r, i))
    heapq.heapify(heap)
    ops = len(heap)
    push, pop = heapq.heappush, heapq.heappop
    while heap:
        rank, i = pop(heap)
        batch = [i]
        while heap and heap[0][0] == rank:
            batch.append(pop(heap)[1])
        ops += len(batch)
        for i in batch:
            left = sym[i]
            j = nxt[i]
            if left is None or j == -1 or get((left, sym[j])) != rank:
                continue  # absorbed by the merge to its left, or a stale entry
            merged = sym[i] = left + sym[j]
            sym[j] = None
            k = nxt[i] = nxt[j]
            if k != -1:
                prv[k] = i
                r = get((merged, sym[k]))
                if r is not None:
                    push(heap, (r, i))
                    ops += 1
            p = prv[i]
            if p != -1:
                r = get((sym[p], merged))
                if r is not None:
                    push(heap, (r, p))
                    ops += 1
    out = []
    i = 0  # the first symbol is never absorbed
    while i != -1:
        out.append(sym[i])
        i = nxt[i]
    return out, ops


def _fix(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text)))


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text.strip()).strip().lower()


def clean_text(text: str) -> str:
    """Normalise text exactly as the reference tokenizer does before BPE."""
    return _collapse(text if _PLAIN_ASCII.fullmatch(text) else _fix(text))


def _clean_head(text: str, limit: int, plain: bool) -> tuple[str, bool]:
    """A prefix of ``clean_text(text)`` of about ``limit`` characters, and whether it is all
    of it. When it is not (and is not empty), the cleaned text goes on with a space, or
    ends (the rest of the raw text was whitespace).

    The raw text is cut at or after ``limit``. Plain text at a whitespace: its cleaning
    collapses whitespace, strips and lower-cases ASCII, each acting on the two sides of a
    whitespace run independently. Other text after a line break: ftfy fixes each line on
    its own (only an earlier line can turn its HTML unescaping off), HTML references never
    span a line break and Python's final-sigma lower-casing stops at whitespace. The
    cleaned head is then cut at its first space at or after ``limit``.
    """
    head, whole = None, True
    if limit < len(text):
        if plain:
            found = _SPACE.search(text, limit)
            if found is not None:
                head, whole = _collapse(text[: found.start()]), False
        else:
            end = text.find("\n", limit) + 1
            if end:
                fixed = _fix(text[:end])
                if fixed.endswith("\n"):  # else the line break was rewritten: read it all
                    head, whole = _collapse(fixed), False
    if head is None:
        head = _collapse(text if plain else _fix(text))
    cut = head.find(" ", limit)
    if cut != -1:
        head, whole = head[:cut], False
    return head, whole


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
        # Characters of text the longest token spells (a byte is at most one character).
        self.longest_token = max(len(t.removesuffix("</w>")) for t in vocab)
        assert len(self.encoder) == VOCAB_SIZE

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word, _ = bpe_merge(list(token[:-1]) + [token[-1] + "</w>"], self._ranks)
        result = " ".join(word)
        if len(token) <= CACHED_PIECE_CHARS and len(self._cache) < 100_000:
            self._cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT."""
        return self._encode_clean(clean_text(text))

    def _encode_clean(self, text: str) -> list[int]:
        ids: list[int] = []
        known = self._piece_ids
        for piece in _WORD_PATTERN.findall(text):
            piece_ids = known.get(piece)
            if piece_ids is None:
                mapped = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
                piece_ids = tuple(self.encoder[t] for t in self._bpe(mapped).split(" "))
                if len(piece) <= CACHED_PIECE_CHARS and len(known) < 100_000:
                    known[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def encode_head(self, text: str, n: int) -> tuple[list[int], bool]:
        """``encode(text)[:n]`` and whether ``encode(text)`` has more than ``n`` ids, reading
        only a head of the text: a few characters per id, more for text with long
        whitespace runs or words (and, outside plain ASCII, the line holding the cut, as
        ftfy cleans whole lines).

        Exactness: the head is a prefix of the cleaned text that ends where the cleaned
        text has a space (:func:`_clean_head`), so the pre-tokenisation finds in it the
        pieces that start the whole text (a space ends every letter or symbol run and fails
        every literal alternative), and BPE works piece by piece. Bound: a token spells at
        most ``self.longest_token`` characters and pieces are at most one space apart, so a
        head of ``(n + 1) * (self.longest_token + 1)`` cleaned characters holds more than
        ``n`` tokens. A first, shorter head of ``8 * (n + 1)`` characters is enough for
        most text; after it, the bound; a head shorter than the bound (the raw text's
        whitespace runs collapsed, or HTML references shrank) is read again with twice the
        limit.

        Example:
            >>> tok = Tokenizer()
            >>> tok.encode_head("a photo of a cat", 2)
            ([320, 1125], True)
            >>> tok.encode_head("a photo of a cat", 5)
            ([320, 1125, 539, 320, 2368], False)
        """
        plain = _PLAIN_ASCII.fullmatch(text) is not None
        bound = (n + 1) * (self.longest_token + 1)
        limit = (n + 1) * _TYPICAL_TOKEN_CHARS  # enough for most text, else the bound
        while True:
            head, whole = _clean_head(text, limit, plain)
            ids = self._encode_clean(head)
            if len(ids) > n or whole:
                return ids[:n], len(ids) > n
            limit = max(2 * limit, bound)

    def truncated_ids(self, text: str, context_length: int) -> tuple[list[int], bool]:
        """``truncate_ids(token_ids(text), context_length)`` and whether it cut, reading a
        head of the text only (:meth:`encode_head`).

        Example:
            >>> tok = Tokenizer()
            >>> tok.truncated_ids("a photo of a cat", 4)
            ([49406, 320, 1125, 49407], True)
        """
        if context_length < 2:  # no room for SOT and EOT: the plain rule
            full = self.token_ids(text)
            return truncate_ids(full, context_length), len(full) > context_length
        # Cut or not, the sequence is SOT, the first context_length - 2 ids, EOT.
        head, cut = self.encode_head(text, context_length - 2)
        return [SOT_ID, *head, EOT_ID], cut

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
