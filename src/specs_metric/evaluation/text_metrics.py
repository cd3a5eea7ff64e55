"""Reference-based caption metrics without Java: BLEU-n, ROUGE-L and CIDEr-D.

The definitions follow the MS-COCO caption evaluation toolkit (coco-caption), which is what
papers report: BLEU with "closest" reference length and the toolkit's tiny smoothing constants,
ROUGE-L as an F-measure with beta = 1.2 over the best precision and best recall across
references, and CIDEr-D with clipped tf-idf n-gram vectors (n = 1..4), a Gaussian length
penalty (sigma = 6) and a factor of 10. On identically tokenised text the numbers equal the
toolkit's; the tests check this on fixtures it produced.

The toolkit tokenises with the Stanford PTB tokenizer (Java). :func:`tokenize` instead
lower-cases, keeps runs of letters/digits (with inner apostrophes) and drops punctuation,
so scores on raw text can differ slightly from the toolkit's (contractions such as "don't"
stay one token here).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence

import numpy as np

TEXT_METRICS = ("bleu-4", "rouge-l", "cider-d")

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")

# coco-caption's constants: keep a zero n-gram match from producing log(0), and a zero
# guess count from dividing by zero.
_TINY = 1e-15
_SMALL = 1e-9

Tokenizer = Callable[[str], list[str]]


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation removed."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (as tuples)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(
            f"{len(candidates)} candidates but {len(references)} reference lists; "
            "each candidate needs its own list of references"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"row {i}: references must be a non-empty list of strings")


def _bleu_counts(cand: list[str], refs: list[list[str]], n: int):
    """(test length, closest reference length, clipped matches per order, guesses per order)."""
    max_ref: Counter = Counter()
    for ref in refs:
        for gram, c in _ngrams(ref, n).items():
            max_ref[gram] = max(max_ref[gram], c)
    correct = [0] * n
    for gram, c in _ngrams(cand, n).items():
        correct[len(gram) - 1] += min(c, max_ref.get(gram, 0))
    guess = [max(0, len(cand) - k + 1) for k in range(1, n + 1)]
    # closest reference length; on a tie the shorter one (as coco-caption does)
    reflen = min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    return len(cand), reflen, correct, guess


def _bleu_from_counts(testlen, reflen, correct, guess, n: int) -> float:
    log_p = sum(math.log((correct[k] + _TINY) / (guess[k] + _SMALL)) for k in range(n))
    score = math.exp(log_p / n)
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


def bleu(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    tokenizer: Tokenizer = tokenize,
) -> tuple[np.ndarray, float]:
    """Sentence-level and corpus-level BLEU-n.

    Args:
        candidates: One caption per row.
        references: A non-empty list of reference captions per row.
        n: Highest n-gram order (4 for BLEU-4).
        tokenizer: Text to tokens.

    Returns:
        (per-row BLEU-n with the toolkit's smoothing, corpus BLEU-n over summed counts).
    """
    _check(candidates, references)
    rows = []
    totals = [0, 0, [0] * n, [0] * n]
    for cand, refs in zip(candidates, references, strict=True):
        counts = _bleu_counts(tokenizer(cand), [tokenizer(r) for r in refs], n)
        rows.append(_bleu_from_counts(*counts, n))
        totals[0] += counts[0]
        totals[1] += counts[1]
        for k in range(n):
            totals[2][k] += counts[2][k]
            totals[3][k] += counts[3][k]
    corpus = _bleu_from_counts(*totals, n) if rows else float("nan")
    return np.array(rows, dtype=np.float64), corpus


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel over ``a`` (Allison-Dix).

    Bit i of ``v`` is 0 where position i of ``a`` ends a row-wise LCS increment; one step per
    item of ``b`` makes long captions (hundreds of tokens) cheap.
    """
    if not a or not b:
        return 0
    masks: dict[Hashable, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    beta: float = 1.2,
    tokenizer: Tokenizer = tokenize,
) -> np.ndarray:
    """Per-row ROUGE-L F-measure (best precision and best recall over the references)."""
    _check(candidates, references)
    out = np.zeros(len(candidates))
    for row, (cand, refs) in enumerate(zip(candidates, references, strict=True)):
        c = tokenizer(cand)
        best_p = best_r = 0.0
        for ref in refs:
            r = tokenizer(ref)
            lcs = lcs_length(r, c)
            if c:
                best_p = max(best_p, lcs / len(c))
            if r:
                best_r = max(best_r, lcs / len(r))
        if best_p > 0 and best_r > 0:
            out[row] = (1 + beta**2) * best_p * best_r / (best_r + beta**2 * best_p)
    return out


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    documents: Sequence[Hashable] | None = None,
    tokenizer: Tokenizer = tokenize,
) -> np.ndarray:
    """Per-row CIDEr-D (the corpus score is the mean).

    Document frequencies come from the references: each document (an image's reference
    set) counts an n-gram once. Rows that share a document (several candidates for the same
    image) count it once; by default rows with identical reference lists share a document.

    Args:
        candidates: One caption per row.
        references: A non-empty list of reference captions per row.
        n: Highest n-gram order.
        sigma: Width of the Gaussian penalty on the length difference.
        documents: Optional document key per row (e.g. the image id).
        tokenizer: Text to tokens.
    """
    _check(candidates, references)
    ref_tokens = [[tokenizer(r) for r in refs] for refs in references]
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in ref_tokens]
    if documents is None:
        documents = [tuple(tuple(t) for t in refs) for refs in ref_tokens]
    if len(documents) != len(candidates):
        raise ValueError(f"{len(documents)} document keys for {len(candidates)} candidates")
    df: Counter = Counter()
    seen: set = set()
    for key, counts in zip(documents, ref_counts, strict=True):
        if key in seen:
            continue
        seen.add(key)
        df.update({gram for c in counts for gram in c})
    log_docs = math.log(float(len(seen))) if seen else 0.0

    def vectorise(counts: Counter, length: int):
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            w = tf * (log_docs - math.log(max(1.0, df[gram])))
            vec[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        # the toolkit's length is the number of bigrams, i.e. tokens - 1
        return vec, [math.sqrt(x) for x in norm], max(0, length - 1)

    out = np.zeros(len(candidates))
    for row, cand in enumerate(candidates):
        tokens = tokenizer(cand)
        vh, nh, lh = vectorise(_ngrams(tokens, n), len(tokens))
        total = np.zeros(n)
        for ref, counts in zip(ref_tokens[row], ref_counts[row], strict=True):
            vr, nr, lr = vectorise(counts, len(ref))
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    dot /= nh[k] * nr[k]
                total[k] += dot * penalty
        out[row] = 10.0 * total.mean() / len(ref_tokens[row])
    return out


def text_metric(
    name: str,
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    documents: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Per-row scores of one of :data:`TEXT_METRICS` by name."""
    if name == "bleu-4":
        return bleu(candidates, references, n=4)[0]
    if name == "rouge-l":
        return rouge_l(candidates, references)
    if name == "cider-d":
        return cider_d(candidates, references, documents=documents)
    raise ValueError(f"unknown text metric {name!r}; choose from {', '.join(TEXT_METRICS)}")
