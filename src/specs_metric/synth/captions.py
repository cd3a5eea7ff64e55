"""Captions of synthetic scenes: one detail segment per fact, negatives, graded candidates.

Segments use a small plain-English grammar (one sentence per fact)::

    The background is blue.
    There is a red star.            (existence)
    The red star is small.          (size)
    The red star is striped.        (texture)
    The red star is in the top left.
    The red star is left of the blue ring.

A full description is the background, then each object's existence, size, texture and
position, then up to ``MAX_RELATIONS`` relations while the caption stays within
:data:`MAX_CAPTION_TOKENS`. Cumulative captions ``c_k`` join the first ``k`` segments with
spaces; because the CLIP tokenizer splits on words, the tokens of ``c_k`` are a prefix of
the tokens of ``c_{k+1}``.

A negative segment for position ``k`` is false for the scene: either the segment at the
same position of another scene of the same split (the reference's construction), kept only
if :func:`~specs_metric.synth.world.truth` says it is false here, or fact ``k`` with one
attribute swapped. Training negatives never mention a held-out colour-shape pair.

Graded candidates keep ``c`` of the scene's ``F`` facts, replace ``h`` of the omitted ones
with false facts (made like negatives) and drop the rest (``m = F - c`` missing). Their
ground-truth quality is the fact-level F1 with hallucinations counted as errors::

    precision = c / (c + h),  recall = c / F,  F1 = 2c / (2c + h + m)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specs_metric.errors import DataError
from specs_metric.processing.tokenizer import Tokenizer
from specs_metric.synth.world import (
    COLOUR_NAMES,
    GRID,
    MAX_RELATIONS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Fact,
    Scene,
    Split,
    held_out,
    relation_candidates,
    scene_facts,
    truth,
)

MIN_CAPTION_TOKENS = 60
MAX_CAPTION_TOKENS = 240
CONTEXT_TOKENS = 248
# Tries at drawing a false segment from another scene before swapping an attribute.
OTHER_SCENE_TRIES = 5
# Probability of trying another scene's segment first (otherwise swap an attribute).
OTHER_SCENE_PROBABILITY = 0.5
GRADED_PER_SCENE = 6
MAX_HALLUCINATED = 4


class TokenCounter:
    """Counts BPE tokens of segments, remembering each distinct segment.

    The tokenizer splits on words, so the token count of segments joined by spaces is the
    sum of their counts (plus SOT and EOT); the tests check this on every caption.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._counts: dict[str, int] = {}

    def __call__(self, segment: str) -> int:
        n = self._counts.get(segment)
        if n is None:
            n = self._counts[segment] = len(self.tokenizer.encode(segment))
        return n


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def segment_text(fact: Fact) -> str:
    """The sentence stating ``fact``."""
    if fact.kind == "background":
        return f"The background is {fact.value}."
    assert fact.subject is not None
    colour, shape = fact.subject
    name = f"{colour} {shape}"
    if fact.kind == "exists":
        return f"There is {_article(colour)} {name}."
    if fact.kind in ("size", "texture"):
        return f"The {name} is {fact.value}."
    if fact.kind == "position":
        return f"The {name} is in the {POSITIONS[int(fact.value)]}."
    if fact.kind == "relation":
        assert fact.other is not None
        return f"The {name} is {fact.value} the {fact.other[0]} {fact.other[1]}."
    raise ValueError(f"unknown fact kind {fact.kind!r}")


_OBJECT = rf"({'|'.join(COLOUR_NAMES)}) ({'|'.join(SHAPES)})"
_SEGMENT_GRAMMAR: tuple[tuple[str, re.Pattern], ...] = (
    ("background", re.compile(rf"The background is ({'|'.join(COLOUR_NAMES)})\.")),
    ("exists", re.compile(rf"There is an? {_OBJECT}\.")),
    ("size", re.compile(rf"The {_OBJECT} is ({'|'.join(SIZES)})\.")),
    ("texture", re.compile(rf"The {_OBJECT} is ({'|'.join(TEXTURES)})\.")),
    ("position", re.compile(rf"The {_OBJECT} is in the ({'|'.join(POSITIONS)})\.")),
    ("relation", re.compile(rf"The {_OBJECT} is ({'|'.join(RELATIONS)}) the {_OBJECT}\.")),
)


def parse_segment(segment: str) -> Fact:
    """The fact a segment states: the inverse of :func:`segment_text`.

    Lets analyses of any world in this layout (e.g. which kinds of false detail a metric
    misses) recover facts from the captions alone.

    Raises:
        DataError: ``segment`` is not a sentence of the grammar.

    Example:
        >>> parse_segment("The red star is left of the blue ring.")
        Fact(kind='relation', subject=('red', 'star'), value='left of', other=('blue', 'ring'))
    """
    for kind, pattern in _SEGMENT_GRAMMAR:
        m = pattern.fullmatch(segment.strip())
        if m is None:
            continue
        g = m.groups()
        if kind == "background":
            return Fact("background", value=g[0])
        if kind == "exists":
            return Fact("exists", subject=(g[0], g[1]))
        if kind == "position":
            return Fact("position", subject=(g[0], g[1]), value=str(POSITIONS.index(g[2])))
        if kind == "relation":
            return Fact("relation", subject=(g[0], g[1]), value=g[2], other=(g[3], g[4]))
        return Fact(kind, subject=(g[0], g[1]), value=g[2])
    raise DataError(f"not a segment of the synthetic world's grammar: {segment!r}")


def mentions_held_out(fact: Fact) -> bool:
    """Whether the fact names a held-out colour-shape pair."""
    return any(key is not None and held_out(*key) for key in (fact.subject, fact.other))


@dataclass
class Description:
    """A scene's full description: facts and their segments, in order."""

    facts: list[Fact]
    segments: list[str]
    lengths: list[int]  # BPE tokens per segment (no SOT/EOT)

    def cumulative(self) -> list[str]:
        """``c_1 .. c_n``: the first k segments joined by spaces."""
        return [" ".join(self.segments[: k + 1]) for k in range(len(self.segments))]


def describe(scene: Scene, rng: np.random.Generator, count: TokenCounter) -> Description:
    """The full description of ``scene`` (60-240 tokens including SOT and EOT)."""
    candidates = relation_candidates(scene)
    chosen = [candidates[i] for i in rng.permutation(len(candidates))[:MAX_RELATIONS]]
    facts = scene_facts(scene, [])
    segments = [segment_text(f) for f in facts]
    lengths = [count(s) for s in segments]
    for rel in chosen:
        text = segment_text(rel)
        n = count(text)
        if 2 + sum(lengths) + n > MAX_CAPTION_TOKENS:
            break
        facts.append(rel)
        segments.append(text)
        lengths.append(n)
    total = 2 + sum(lengths)
    if not MIN_CAPTION_TOKENS <= total <= MAX_CAPTION_TOKENS:
        raise AssertionError(f"description of {total} tokens is outside the world's bounds")
    return Description(facts, segments, lengths)


def _swap_values(kind: str) -> Sequence[str]:
    if kind == "background":
        return COLOUR_NAMES
    if kind == "size":
        return SIZES
    if kind == "texture":
        return TEXTURES
    if kind == "position":
        return [str(i) for i in range(GRID * GRID)]
    raise ValueError(f"no attribute values for fact kind {kind!r}")


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def swap_attribute(fact: Fact, scene: Scene, rng: np.random.Generator, split: Split) -> Fact:
    """``fact`` with one attribute changed so that it is false for ``scene``."""
    if fact.kind == "exists":
        assert fact.subject is not None
        colour, shape = fact.subject
        if rng.random() < 0.5:
            options = [(c, shape) for c in COLOUR_NAMES if c != colour]
        else:
            options = [(colour, s) for s in SHAPES if s != shape]
        options = [
            k for k in options if scene.find(*k) is None and not (split == "train" and held_out(*k))
        ]
        return Fact("exists", options[int(rng.integers(len(options)))])
    if fact.kind == "relation":
        return Fact("relation", fact.subject, _OPPOSITE[fact.value], fact.other)
    options = [v for v in _swap_values(fact.kind) if v != fact.value]
    return Fact(fact.kind, fact.subject, options[int(rng.integers(len(options)))], fact.other)


def false_fact(
    index: int,
    own: list[Fact],
    scene: Scene,
    others: Sequence[list[Fact]],
    self_index: int,
    rng: np.random.Generator,
    split: Split,
) -> Fact:
    """A fact false for ``scene`` standing in for ``own[index]``.

    Tries the fact at the same position of other scenes (their last one when shorter),
    then falls back to swapping one attribute of ``own[index]``.
    """
    if len(others) > 1 and rng.random() < OTHER_SCENE_PROBABILITY:
        for _ in range(OTHER_SCENE_TRIES):
            j = int(rng.integers(len(others)))
            if j == self_index:
                continue
            facts = others[j]
            candidate = facts[min(index, len(facts) - 1)]
            if truth(candidate, scene) is False and not (
                split == "train" and mentions_held_out(candidate)
            ):
                return candidate
    fact = swap_attribute(own[index], scene, rng, split)
    assert truth(fact, scene) is False
    return fact


@dataclass
class Chain:
    """The sDCI row of one scene: cumulative captions and their negatives."""

    captions: list[str]
    neg_captions: list[str]  # neg_captions[j] = captions[j] + a false segment (pairs captions[j+1])
    neg_facts: list[Fact]


@dataclass(frozen=True)
class SceneContext:
    """One scene as the captioner sees it: its description, and where false facts come
    from (the facts of every scene of the split, ``pool[index]`` being its own)."""

    desc: Description
    scene: Scene
    pool: Sequence[list[Fact]]
    index: int
    split: Split
    count: TokenCounter

    def false_fact(self, position: int, rng: np.random.Generator) -> Fact:
        """A false fact standing in for fact ``position`` of the description."""
        return false_fact(
            position, self.desc.facts, self.scene, self.pool, self.index, rng, self.split
        )


def build_chain(ctx: SceneContext, rng: np.random.Generator) -> Chain:
    """Cumulative captions ``c_1..c_n`` and negatives ``n_2..n_n`` (``n_k = c_{k-1} + false``)."""
    desc, count = ctx.desc, ctx.count
    captions = desc.cumulative()
    negs, neg_facts = [], []
    for k in range(1, len(desc.facts)):
        prefix_tokens = 2 + sum(desc.lengths[:k])
        for _ in range(20):
            fact = ctx.false_fact(k, rng)
            text = segment_text(fact)
            if prefix_tokens + count(text) <= CONTEXT_TOKENS:
                break
        else:  # pragma: no cover - segments are far shorter than the slack
            raise AssertionError("no negative fits the context")
        negs.append(f"{captions[k - 1]} {text}")
        neg_facts.append(fact)
    return Chain(captions, negs, neg_facts)


@dataclass
class Candidate:
    """A graded caption with its fact counts and ground-truth quality."""

    caption: str
    n_facts: int
    n_correct: int
    n_hallucinated: int

    @property
    def n_missing(self) -> int:
        return self.n_facts - self.n_correct

    @property
    def score(self) -> float:
        return fact_f1(self.n_correct, self.n_hallucinated, self.n_facts)


def fact_f1(correct: int, hallucinated: int, total: int) -> float:
    """Fact-level F1: precision correct/(correct+hallucinated), recall correct/total.

    Example:
        >>> fact_f1(correct=3, hallucinated=1, total=4)  # P = 3/4, R = 3/4
        0.75
        >>> fact_f1(correct=0, hallucinated=2, total=5)
        0.0
    """
    if correct == 0:
        return 0.0
    return 2.0 * correct / (2.0 * correct + hallucinated + (total - correct))


def graded_candidates(
    ctx: SceneContext, rng: np.random.Generator, per_scene: int = GRADED_PER_SCENE
) -> list[Candidate]:
    """``per_scene`` captions with distinct (correct, hallucinated) counts."""
    desc, count = ctx.desc, ctx.count
    n = len(desc.facts)
    out: list[Candidate] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(per_scene * 20):
        if len(out) == per_scene:
            break
        keep = int(rng.integers(1, n + 1))
        hall = int(rng.integers(0, min(n - keep, MAX_HALLUCINATED) + 1))
        if (keep, hall) in seen:
            continue
        kept = set(rng.permutation(n)[:keep].tolist())
        omitted = [i for i in range(n) if i not in kept]
        replaced = set(rng.permutation(omitted)[:hall].tolist()) if hall else set()
        parts = []
        for i in range(n):
            if i in kept:
                parts.append(desc.segments[i])
            elif i in replaced:
                parts.append(segment_text(ctx.false_fact(i, rng)))
        caption = " ".join(parts)
        if 2 + sum(count(p) for p in parts) > CONTEXT_TOKENS:
            continue
        seen.add((keep, hall))
        out.append(Candidate(caption, n, keep, hall))
    return out
