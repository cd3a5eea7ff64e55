"""Per-detail attribution: how much each segment of a caption moves its score.

A caption is cut into segments: ``sentence`` (default), or the training segmenters
``clause`` and ``chunk`` (:mod:`specs_metric.processing.segmentation`), or any callable
``caption -> list[str]``. With ``s(t)`` the score of text ``t`` against the image:

* ``prefix`` (default): segment ``k`` gets the score of the prefix ``p_k`` (the caption
  through segment ``k``) and ``delta_k = s(p_k) - s(p_{k-1})``, where ``p_0`` is the empty
  caption (its tokens are SOT, EOT).
* ``leave-one-out``: segment ``k`` gets the score of the caption without it, ``w_k``, and
  ``delta_k = s(caption) - s(w_k)``: the full score minus the score without the segment,
  negated so that, as for ``prefix``, a positive delta means the segment raises the score.
* ``neutral``: the prefix score, and ``delta_k = s(p_k) - s(p_{k-1} + " " + neutral)``:
  segment ``k`` against a neutral sentence at the same place, which removes the drift a
  prefix delta has because the score saturates as the caption grows. The neutral sentence
  (:data:`NEUTRAL_SENTENCE`, ``"This is an image."``) is true of every image and states no
  detail of it.

Texts. Each segment is located in the caption by matching its non-whitespace characters,
in order, against the caption's; ``p_k = caption[:end_k]`` and
``w_k = caption[:start_k] + caption[end_k:]`` (the tokenizer collapses the whitespace
left behind). So ``p_k`` is exactly the caption's text up to the end of segment ``k``, and
the last prefix is the caption itself up to trailing text outside every segment. When a
segmenter rewrites its text so that a segment cannot be found (the ``chunk`` segmenter's
tokenised quotes), all texts of that caption are the segments joined by single spaces.

Context. A segment is beyond the context when the caption has run past the context at or
before it: when the prefix ``p_j`` of some segment ``j <= k`` has more tokens (SOT and EOT
included) than the context. Such a segment is marked ``beyond_context`` with null score and
delta, whatever the attribution; the caption's own score is that of the truncated caption,
as ``specs score`` computes it, and ``tokens`` its full token count.

Cost and exactness. All texts of a caption are one chain for
:func:`~specs_metric.evaluation.intrinsic.encode_chains`: the longest text runs once, keeping
each layer's keys and values, and every other text computes only its tokens after the
prefix it shares with it, found by comparing token ids (nothing is assumed about how BPE
treats a segment boundary). A ``prefix`` caption costs one forward pass plus a one-token
query per segment; every score equals scoring that text alone up to float rounding.

Tokenizing is bounded by the context too. The caption is tokenized once in full (its token
count and warning); the prefixes are tokenized in order up to the first one past the
context, and no later one is made; a leave-one-out or neutral text is read only as far as
its first context tokens need
(:meth:`~specs_metric.processing.tokenizer.Tokenizer.truncated_ids`, the same ids as
truncating its full tokenization). Only truncated ids are kept.

``specs explain`` files (reading rows, writing explanations as they go) are
:mod:`specs_metric.jobs.explain_files`.

Example:
    >>> from specs_metric.models.factory import build_model
    >>> from specs_metric.scoring.scorer import Scorer
    >>> from PIL import Image
    >>> scorer = Scorer(build_model(tiny_state_dict()), device="cpu")
    >>> image = Image.new("RGB", (32, 32), (200, 30, 30))
    >>> caption = "A red square. It is large. The background is white."
    >>> [ex] = scorer.explain([image], [caption])
    >>> [seg.text for seg in ex.segments]
    ['A red square.', 'It is large.', 'The background is white.']
    >>> alone = scorer.score([image] * 2, ["A red square. It is large.", caption])
    >>> bool(abs(ex.segments[1].score - alone[0]) < 1e-5), bool(abs(ex.score - alone[1]) < 1e-5)
    (True, True)
    >>> empty = scorer.score([image], [""])[0]
    >>> bool(abs(ex.segments[0].delta - (ex.segments[0].score - empty)) < 1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from specs_metric.data.images import ImageSource
from specs_metric.errors import CaptionTooLongError
from specs_metric.models.prefix import encode_chains
from specs_metric.processing.segmentation import Segmenter, get_segmenter
from specs_metric.processing.tokenizer import Tokenizer, literal_special_warning, truncate_ids
from specs_metric.scoring.scales import apply_scale, check_scale, cosine_similarity

ATTRIBUTIONS = ("prefix", "leave-one-out", "neutral")
DEFAULT_SEGMENTER = "sentence"
NEUTRAL_SENTENCE = "This is an image."
# Captions encoded together (one chain each).
DEFAULT_CHAINS_PER_BATCH = 8


@dataclass
class SegmentScore:
    """One segment: its text, score and delta (``None`` beyond the context)."""

    text: str
    score: float | None
    delta: float | None
    beyond_context: bool = False

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "score": self.score,
            "delta": self.delta,
            "beyond_context": self.beyond_context,
        }


@dataclass
class Explanation:
    """A caption's score, cosine, token count and per-segment attribution."""

    score: float
    cosine: float
    tokens: int  # SOT and EOT included, before truncation
    truncated: bool
    segments: list[SegmentScore] = field(default_factory=list)
    warning: str | None = None  # as in specs score (a literal special token in the caption)

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "cosine": self.cosine,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "warning": self.warning,
            "segments": [s.to_dict() for s in self.segments],
        }


# --------------------------------------------------------------------------------------
# Texts of one caption
# --------------------------------------------------------------------------------------


def resolve_segmenter(segmenter: str | Segmenter) -> Segmenter:
    """A segmenter by name (one of :data:`SEGMENTERS`) or the callable itself."""
    if callable(segmenter):
        return segmenter
    return get_segmenter(segmenter)


def locate_segments(caption: str, segments: Sequence[str]) -> list[tuple[int, int]] | None:
    """Character spans ``(start, end)`` of ``segments`` in ``caption``, in order.

    Whitespace is ignored on both sides; ``None`` when a segment's characters do not
    follow in the caption.

    Example:
        >>> locate_segments("A cat.  It  sleeps.", ["A cat.", "It sleeps."])
        [(0, 6), (8, 19)]
        >>> locate_segments("A cat.", ["A dog."]) is None
        True
    """
    spans = []
    pos = 0
    for seg in segments:
        chars = [c for c in seg if not c.isspace()]
        if not chars:
            return None
        start = None
        for c in chars:
            while pos < len(caption) and caption[pos].isspace():
                pos += 1
            if pos == len(caption) or caption[pos] != c:
                return None
            if start is None:
                start = pos
            pos += 1
        spans.append((start, pos))
    return spans


def _texts(
    caption: str, segments: Sequence[str], spans: list[tuple[int, int]] | None
) -> tuple[Callable[[int], str], Callable[[int], str]]:
    """``p_k`` and ``w_k`` as functions of ``k``: made one at a time, as each is a copy of
    (up to) the whole caption."""
    if spans is None:
        return (
            lambda k: " ".join(segments[: k + 1]),
            lambda k: " ".join([*segments[:k], *segments[k + 1 :]]),
        )
    return (
        lambda k: caption[: spans[k][1]],
        lambda k: caption[: spans[k][0]] + caption[spans[k][1] :],
    )


def prefix_texts(caption: str, segments: Sequence[str]) -> list[str]:
    """``p_1 .. p_n``: the caption through each segment (see the module docstring)."""
    prefix, _ = _texts(caption, segments, locate_segments(caption, segments))
    return [prefix(k) for k in range(len(segments))]


def leave_one_out_texts(caption: str, segments: Sequence[str]) -> list[str]:
    """``w_1 .. w_n``: the caption without each segment (see the module docstring)."""
    _, without = _texts(caption, segments, locate_segments(caption, segments))
    return [without(k) for k in range(len(segments))]


@dataclass
class CaptionPlan:
    """The token sequences of one caption (one chain) and how segments read their scores.

    ``picks[k]`` is ``(score, plus, minus)``: indices into ``sequences`` with the segment's
    score ``s[score]`` and delta ``s[plus] - s[minus]``; ``None`` beyond the context.
    """

    segments: list[str]
    sequences: list[list[int]]
    full: int  # index of the caption itself
    picks: list[tuple[int, int, int] | None]
    tokens: int
    truncated: bool
    warning: str | None = None


class _Sequences:
    """Distinct token sequences of a chain (the context's truncation applied)."""

    def __init__(self, tokenizer: Tokenizer, context: int) -> None:
        self.tokenizer, self.context = tokenizer, context
        self.items: list[list[int]] = []
        self._index: dict[tuple[int, ...], int] = {}

    def add_ids(self, ids: list[int]) -> int:
        """The index of truncated ids ``ids``, added when new."""
        key = tuple(ids)
        if key not in self._index:
            self._index[key] = len(self.items)
            self.items.append(ids)
        return self._index[key]

    def add(self, text: str) -> int:
        """The index of ``text``'s truncated ids (only a head of a long text is read)."""
        return self.add_ids(self.tokenizer.truncated_ids(text, self.context)[0])


def plan_caption(
    caption: str,
    segmenter: Segmenter,
    attribution: str,
    tokenizer: Tokenizer,
    context: int,
    long_captions: str = "truncate",
    neutral: str = NEUTRAL_SENTENCE,
) -> CaptionPlan:
    """Segments and token sequences of one caption.

    Raises:
        CaptionTooLongError: the caption exceeds the context and ``long_captions`` is
            ``"error"``.
    """
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"unknown attribution {attribution!r}; choose one of {ATTRIBUTIONS}")
    ids = tokenizer.token_ids(caption)  # the one full tokenization: count and warning
    n_tokens, warning = len(ids), literal_special_warning(ids)
    if n_tokens > context and long_captions == "error":
        raise CaptionTooLongError(
            f"caption has {n_tokens} tokens, more than the context length {context}"
        )
    seqs = _Sequences(tokenizer, context)
    full = seqs.add_ids(truncate_ids(ids, context))
    del ids
    segments = [s for s in segmenter(caption) if s.strip()]
    prefix, without = _texts(caption, segments, locate_segments(caption, segments))
    # Truncated ids of the prefixes within the context, in order, up to the first one past it.
    within: list[list[int]] = []
    for k in range(len(segments)):
        ids, cut = tokenizer.truncated_ids(prefix(k), context)
        if cut:
            break
        within.append(ids)
    picks: list[tuple[int, int, int] | None] = []
    for k, ids in enumerate(within):  # sequences added in the order of earlier versions
        if attribution == "leave-one-out":
            w = seqs.add(without(k))
            picks.append((w, full, w))
            continue
        p = seqs.add_ids(ids)
        if attribution == "prefix":
            base = seqs.add_ids(within[k - 1]) if k else seqs.add("")
        else:
            base = seqs.add(f"{prefix(k - 1)} {neutral}" if k else neutral)
        picks.append((p, p, base))
    picks += [None] * (len(segments) - len(within))
    return CaptionPlan(segments, seqs.items, full, picks, n_tokens, n_tokens > context, warning)


def finish(plan: CaptionPlan, cosines: np.ndarray, scale: str = "specs") -> Explanation:
    """The explanation of a plan from the cosines of its sequences with the image."""
    scores = apply_scale(np.asarray(cosines, dtype=np.float64), scale)
    segments = []
    for text, pick in zip(plan.segments, plan.picks, strict=True):
        if pick is None:
            segments.append(SegmentScore(text, None, None, True))
        else:
            i, plus, minus = pick
            segments.append(
                SegmentScore(text, float(scores[i]), float(scores[plus] - scores[minus]))
            )
    return Explanation(
        float(scores[plan.full]),
        float(cosines[plan.full]),
        plan.tokens,
        plan.truncated,
        segments,
        plan.warning,
    )


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def explain_embedded(
    scorer,
    image_embeddings: torch.Tensor,
    plans: Sequence[CaptionPlan],
    scale: str = "specs",
    chains_per_batch: int = DEFAULT_CHAINS_PER_BATCH,
) -> list[Explanation]:
    """Explanations of plans, given each one's raw image embedding (N, D)."""
    out = []
    for start in range(0, len(plans), chains_per_batch):
        batch = plans[start : start + chains_per_batch]
        with torch.inference_mode(), scorer.forward_context():
            texts = encode_chains(scorer.model, [p.sequences for p in batch])
        for plan, img, emb in zip(batch, image_embeddings[start:], texts, strict=False):
            emb = emb.float().cpu()
            cos = cosine_similarity(img.expand(len(emb), -1), emb)
            out.append(finish(plan, cos, scale))
    return out


def explain(
    scorer,
    images: Sequence[ImageSource],
    captions: Sequence[str],
    segmenter: str | Segmenter = DEFAULT_SEGMENTER,
    attribution: str = "prefix",
    scale: str = "specs",
    neutral: str = NEUTRAL_SENTENCE,
    chains_per_batch: int = DEFAULT_CHAINS_PER_BATCH,
) -> list[Explanation]:
    """Per-segment attribution of 1:1 pairs ``(images[i], captions[i])``.

    Args:
        scorer: a :class:`~specs_metric.scoring.scorer.Scorer`.
        images: paths, encoded bytes or PIL images.
        captions: the captions (strings).
        segmenter: ``sentence`` (default), ``clause``, ``chunk`` or a callable.
        attribution: ``prefix`` (default), ``leave-one-out`` or ``neutral``.
        scale: score scale of scores and deltas (see :mod:`specs_metric.scoring.scales`).
        neutral: the neutral sentence of ``attribution="neutral"``.
        chains_per_batch: captions encoded together.

    Raises:
        CaptionTooLongError: with the scorer's ``long_captions="error"``.
    """
    check_scale(scale)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    seg = resolve_segmenter(segmenter)
    plans = [
        plan_caption(
            c,
            seg,
            attribution,
            scorer.tokenizer,
            scorer.context_length,
            scorer.long_captions,
            neutral,
        )
        for c in captions
    ]
    return explain_embedded(scorer, scorer.embed_images(images), plans, scale, chains_per_batch)

