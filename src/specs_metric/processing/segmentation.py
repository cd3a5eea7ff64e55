"""Cutting a long caption into detail segments.

Three segmenters share one interface, ``segmenter(caption) -> list[str]``:

- ``chunk``: the segmentation the released SPECS training set was built with. Sentences
  are word-tokenised and part-of-speech tagged (NLTK), chunked with the grammar

      NP: {<DT>?<JJ>*<NN|NNS|NNP|NNPS>+}
      VP: {<VB.*><NP|PP|CLAUSE>*}
      PP: {<IN><NP>}
      CLAUSE: {<NP><VP>}
      CONJ: {<CC><NP|VP|PP|CLAUSE>+}

  and a segment ends after every top-level NP, VP, PP or CLAUSE chunk. A post-processing
  pass (:func:`merge_segments`) then glues segments together and cuts after every full stop.
  Tagging needs NLTK's ``punkt_tab`` and ``averaged_perceptron_tagger_eng`` data; the
  sentence splitter, word tokenizer and tagger can be injected instead.
- ``sentence``: one segment per sentence (rule-based, no downloaded data).
- ``clause`` (the default): a rule-based clause splitter that needs no downloaded data.
  Each sentence is cut at commas, semicolons and colons, and before the connectives in
  :data:`CLAUSE_CONNECTIVES` ("and", "while", "which", "with", ...); a piece of fewer than
  :data:`MIN_CLAUSE_WORDS` words is glued to the piece before it (or, at the start of a
  sentence, to the piece after it). Sentence-final punctuation stays with its sentence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from specs_metric.errors import SegmenterError, UsageError

SEGMENTERS = ("clause", "sentence", "chunk")
DEFAULT_SEGMENTER = "clause"

Segmenter = Callable[[str], list[str]]
Tagger = Callable[[list[str]], list[tuple[str, str]]]

CHUNK_GRAMMAR = r"""
    NP: {<DT>?<JJ>*<NN|NNS|NNP|NNPS>+}
    VP: {<VB.*><NP|PP|CLAUSE>*}
    PP: {<IN><NP>}
    CLAUSE: {<NP><VP>}
    CONJ: {<CC><NP|VP|PP|CLAUSE>+}
"""
# Chunks after which a segment ends (CONJ chunks continue the current segment).
_BOUNDARY_CHUNKS = frozenset({"NP", "VP", "PP", "CLAUSE"})
# A segment is glued to the next one when the next starts with one of these words.
GLUE_WORDS = frozenset(
    "behind in under on to above left right next up down out of 's is".split()
)

NLTK_DATA = {
    "tokenizers/punkt_tab": "nltk.download('punkt_tab')",
    "taggers/averaged_perceptron_tagger_eng": "nltk.download('averaged_perceptron_tagger_eng')",
}



# ----------------------------------------------------------------------------- chunk


def merge_segments(segments: Sequence[str]) -> list[str]:
    """Post-process chunker segments exactly as the reference data preparation does.

    The segments are written as ``"s1 | s2 | ... |"`` and the text is scanned once, left to
    right, over the positions of the *original* string. At each ``|`` (with ``words`` the
    whitespace-separated tokens since the last full stop, which may include earlier ``|``
    marks) the bar is removed (gluing two segments) when

    1. a full stop precedes and ``words`` is a short fragment (at most 3 tokens) starting
       with ``The``; or
    2. the word after the bar is in :data:`GLUE_WORDS` (never checked for the last word of
       the text, which has no space after it); or
    3. a full stop precedes and ``words`` starts with a glue word (any case) and contains
       neither ``is`` nor ``are``.

    Removing a bar shortens the text by two characters while the scan position keeps
    advancing by one, so the character after a removed bar is skipped; that character is
    never a bar in tokenised text. Finally every full stop ends a segment.

    Example:
        >>> merge_segments(["a dog", "sits", "on the mat ."])
        ['a dog', 'sits on the mat .']
    """
    text = " | ".join(segments) + " |"
    text = text.replace("| . |", ".").replace("| .", ".").replace(". |", ".")
    scan_length = len(text)
    pos = 0
    while pos < scan_length and pos < len(text):
        if text[pos] == "|" and _glue_here(text, pos):
            text = text[:pos] + text[pos + 2 :]
        pos += 1
    text = text.replace(".", ".|")
    return [piece.strip() for piece in text.split("|") if piece.strip()]


def _glue_here(text: str, bar: int) -> bool:
    """Whether the bar at ``bar`` should be removed (see :func:`merge_segments`)."""
    last_dot = text.rfind(".", 0, bar)
    after = text[bar + 2 :]
    space = after.find(" ")
    if space == -1:
        space = len(after)
    words: list[str] = []
    has_dot_before = last_dot != -1 and last_dot < bar - 2
    if has_dot_before:
        words = text[last_dot + 1 : bar - 1].strip().split()
        if words and len(words) <= 3 and words[0] == "The":
            return True
    if bar + 2 < len(text) and space < len(after):
        if text[bar + 2 : bar + 2 + space].strip() in GLUE_WORDS:
            return True
    if has_dot_before and words and words[0].lower() in GLUE_WORDS:
        return "is" not in words and "are" not in words
    return False


def chunk_sentence(tagged: Sequence[tuple[str, str]], parser=None) -> list[str]:
    """Segments of one POS-tagged sentence: cut after each NP, VP, PP or CLAUSE chunk.

    Words inside a segment are joined by single spaces (tokenised text, e.g. ``"mat ."``).

    Args:
        tagged: ``(word, tag)`` pairs with Penn Treebank tags.
        parser: a chunk parser for :data:`CHUNK_GRAMMAR`; built when omitted.
    """
    if parser is None:
        parser = _chunk_parser()
    segments: list[str] = []
    current: list[str] = []
    for node in parser.parse(list(tagged)):
        if hasattr(node, "label"):
            current.extend(word for word, _ in node.leaves())
            if node.label() in _BOUNDARY_CHUNKS:
                segments.append(" ".join(current))
                current = []
        else:
            current.append(node[0])
    if current:
        segments.append(" ".join(current))
    return segments


def _chunk_parser():
    try:
        import nltk
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SegmenterError(
            "the 'chunk' segmenter needs NLTK: pip install 'specs-metric[train]' (or nltk)"
        ) from exc
    return nltk.RegexpParser(CHUNK_GRAMMAR)


class ChunkSegmenter:
    """The reference grammar segmenter (see the module docstring).

    Args:
        tagger: maps a list of words to ``(word, tag)`` pairs; NLTK's averaged perceptron
            tagger when omitted.
        sent_tokenize: splits text into sentences; NLTK's punkt when omitted.
        word_tokenize: splits a sentence into words; NLTK's ``word_tokenize`` when omitted.

    Raises:
        SegmenterError: NLTK or one of its data packages is missing; the message names the
            ``nltk.download(...)`` call that installs it.
    """

    def __init__(
        self,
        tagger: Tagger | None = None,
        sent_tokenize: Callable[[str], list[str]] | None = None,
        word_tokenize: Callable[[str], list[str]] | None = None,
    ) -> None:
        self._parser = _chunk_parser()
        needed = []
        if sent_tokenize is None or word_tokenize is None:
            needed.append("tokenizers/punkt_tab")
        if tagger is None:
            needed.append("taggers/averaged_perceptron_tagger_eng")
        if needed:
            import nltk

            missing = []
            for resource in needed:
                try:
                    nltk.data.find(resource)
                except LookupError:
                    missing.append(NLTK_DATA[resource])
            if missing:
                raise SegmenterError(
                    "the 'chunk' segmenter needs NLTK data that is not installed; run "
                    + " and ".join(missing)
                    + " in Python (or pick --segmenter clause, which needs no data)"
                )
        if tagger is None:
            from nltk import pos_tag as tagger
        if sent_tokenize is None:
            from nltk.tokenize import sent_tokenize
        if word_tokenize is None:
            from nltk.tokenize import word_tokenize
        self.tagger = tagger
        self.sent_tokenize = sent_tokenize
        self.word_tokenize = word_tokenize

    def __call__(self, caption: str) -> list[str]:
        segments: list[str] = []
        for sentence in self.sent_tokenize(caption):
            tagged = self.tagger(self.word_tokenize(sentence))
            segments.extend(chunk_sentence(tagged, self._parser))
        return merge_segments(segments)


# ----------------------------------------------------------------------------- rule based

# A sentence ends at . ! or ? (optionally followed by closing quotes or brackets) followed
# by whitespace, unless the full stop belongs to a common abbreviation or a single letter.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc e.g i.e approx no fig co inc ltd prof".split()
)


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence splitter (no downloaded data).

    Example:
        >>> split_sentences("A dog runs. Mr. Smith waves! Is it 3.5 m tall? Yes.")
        ['A dog runs.', 'Mr. Smith waves!', 'Is it 3.5 m tall?', 'Yes.']
    """
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return []
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        candidate = text[start : match.start()].rstrip()
        last_word = candidate.rsplit(" ", 1)[-1].rstrip(".").lower()
        if candidate.endswith(".") and (last_word in _ABBREVIATIONS or len(last_word) == 1):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    if start < len(text):
        sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def sentence_segments(caption: str) -> list[str]:
    """The ``sentence`` segmenter: one segment per sentence."""
    return split_sentences(caption)


# Words that open a new clause or descriptive phrase in caption prose.
CLAUSE_CONNECTIVES = frozenset(
    "and but while whereas which who whose where that with featuring showing "
    "wearing holding surrounded revealing creating giving adding".split()
)
MIN_CLAUSE_WORDS = 3
_PUNCT_CUT = re.compile(r"(?<=[,;:])\s+")


def clause_segments(caption: str) -> list[str]:
    """The default ``clause`` segmenter (rule-based, no downloaded data).

    Example:
        >>> clause_segments("A red car is parked on a street, with a tree behind it. "
        ...                 "The sky is blue and clear.")
        ['A red car is parked on a street,', 'with a tree behind it.', 'The sky is blue and clear.']
    """
    segments: list[str] = []
    for sentence in split_sentences(caption):
        segments.extend(_split_clauses(sentence))
    return segments


def _split_clauses(sentence: str) -> list[str]:
    pieces: list[list[str]] = []
    for part in _PUNCT_CUT.split(sentence):
        current: list[str] = []
        for word in part.split():
            bare = word.strip("\"'()[]").lower()
            if current and bare in CLAUSE_CONNECTIVES:
                pieces.append(current)
                current = []
            current.append(word)
        if current:
            pieces.append(current)
    merged: list[list[str]] = []
    for piece in pieces:
        if merged and (len(piece) < MIN_CLAUSE_WORDS or len(merged[-1]) < MIN_CLAUSE_WORDS):
            merged[-1] = merged[-1] + piece
        else:
            merged.append(piece)
    return [" ".join(piece) for piece in merged]


def get_segmenter(name: str = DEFAULT_SEGMENTER) -> Segmenter:
    """The segmenter called ``name`` (one of :data:`SEGMENTERS`).

    Raises:
        UsageError: unknown name.
        SegmenterError: ``chunk`` without NLTK or its data.
    """
    if name == "clause":
        return clause_segments
    if name == "sentence":
        return sentence_segments
    if name == "chunk":
        return ChunkSegmenter()
    raise UsageError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
