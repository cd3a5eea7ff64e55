"""BLEU, ROUGE-L and CIDEr-D: hand-computed cases, brute-force LCS, and coco-caption values.

``COCO_*`` numbers were produced by the MS-COCO caption toolkit (``pycocoevalcap`` 1.2, its
pure-Python Bleu(4), Rouge and Cider scorers) on exactly the pre-tokenised inputs below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from specs_metric.evaluation import text_metrics as tm

CANDS = [
    "a dog runs on the grass in a park",
    "two people sitting at a table with food",
    "a red car parked next to a building on a street",
    "the cat sleeps",
    "a man riding a wave on top of a surfboard in the ocean",
    "a plate of food",
]
REFS = [
    [
        "a brown dog is running across the grass",
        "a dog plays in the park on the green grass",
        "the dog runs in a park",
    ],
    ["two men sit at a table eating food", "people eating at a restaurant table"],
    [
        "a red car is parked on the street beside a tall building",
        "a car parked near a building",
        "a red vehicle on a city street",
    ],
    ["a cat is sleeping on a couch", "a sleeping cat curled up on a sofa"],
    [
        "a surfer rides a large wave in the ocean",
        "a man on a surfboard riding a wave",
        "a person surfing on top of a wave",
    ],
    ["a white plate with a sandwich and fries", "a plate of food on a wooden table"],
]
COCO_BLEU4_ROWS = [
    6.311969077364884e-05,
    5.169731538105413e-05,
    4.328649144449854e-05,
    1.6842357356476073e-10,
    0.4063798281656678,
    0.36787944088786895,
]
COCO_BLEU1_ROWS = [
    0.8888888887901236,
    0.7499999998125003,
    0.6640732480845413,
    0.08786571264666526,
    0.9999999999230771,
    0.36787944098750286,
]
COCO_BLEU4_CORPUS = 0.27742675918721454
COCO_ROUGE_L = [
    0.6916099773242631,
    0.6489361702127661,
    0.6851366529389742,
    0.18654434250764526,
    0.563944530046225,
    0.6288659793814433,
]
COCO_CIDER_D = [
    2.3562356658669437,
    1.9233750387072777,
    1.6968863006245538,
    0.653185865210893,
    2.001338177433292,
    2.78683883503585,
]


def test_matches_coco_caption_toolkit():
    rows, corpus = tm.bleu(CANDS, REFS, 4, tokenizer=str.split)
    np.testing.assert_allclose(rows, COCO_BLEU4_ROWS, rtol=1e-12)
    assert corpus == pytest.approx(COCO_BLEU4_CORPUS, rel=1e-12)
    np.testing.assert_allclose(tm.bleu(CANDS, REFS, 1, tokenizer=str.split)[0], COCO_BLEU1_ROWS)
    np.testing.assert_allclose(tm.rouge_l(CANDS, REFS, tokenizer=str.split), COCO_ROUGE_L)
    cider = tm.cider_d(CANDS, REFS, tokenizer=str.split)
    np.testing.assert_allclose(cider, COCO_CIDER_D, rtol=1e-12)
    # the default tokenizer leaves these lower-case, punctuation-free captions unchanged
    np.testing.assert_allclose(tm.text_metric("cider-d", CANDS, REFS), COCO_CIDER_D, rtol=1e-12)


def test_bleu_hand_computed():
    # precisions 4/5, 3/4, 2/3, 1/2 and equal lengths
    rows, _ = tm.bleu(["a b c d e"], [["a b c d f"]])
    assert rows[0] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-8)
    # perfect precision, half the reference length: brevity penalty exp(1 - 8/4)
    rows, corpus = tm.bleu(["a b c d"], [["a b c d e f g h"]])
    assert rows[0] == pytest.approx(math.exp(-1), rel=1e-8)
    assert corpus == pytest.approx(math.exp(-1), rel=1e-8)
    # closest reference length wins: the 4-token reference, so no penalty
    rows, _ = tm.bleu(["a b c d"], [["a b c d e f g h", "a b c d"]])
    assert rows[0] == pytest.approx(1.0, rel=1e-8)
    # clipping: "the" counted at most twice, the reference maximum
    rows, _ = tm.bleu(["the the the"], [["the cat the"]], n=1)
    assert rows[0] == pytest.approx(2 / 3, rel=1e-8)


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c e d b") = 3 -> P = 3/4, R = 3/5
    p, r, b2 = 3 / 4, 3 / 5, 1.2**2
    expected = (1 + b2) * p * r / (r + b2 * p)
    assert tm.rouge_l(["a b c d"], [["a c e d b"]])[0] == pytest.approx(expected)
    assert tm.rouge_l(["x y"], [["a b"]])[0] == 0.0
    assert tm.rouge_l(["a b"], [["a b"]])[0] == pytest.approx(1.0)


def _lcs_dp(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                table[i, j] = table[i - 1, j - 1] + 1
            else:
                table[i, j] = max(table[i - 1, j], table[i, j - 1])
    return int(table[-1, -1])


def test_lcs_against_dynamic_programming():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = list(rng.integers(0, 5, rng.integers(0, 90)))
        b = list(rng.integers(0, 5, rng.integers(0, 90)))
        assert tm.lcs_length(a, b) == _lcs_dp(a, b)


def test_cider_d_hand_computed():
    # two documents with disjoint words: every n-gram has idf log(2)
    assert tm.cider_d(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]])[0] == pytest.approx(10)
    # unigram cosine 2/(sqrt2*2), bigram 1/sqrt3, no 3/4-grams; bigram counts differ by 2
    got = tm.cider_d(["a b", "e f g h"], [["a b c d"], ["e f g h"]])[0]
    expected = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    assert got == pytest.approx(expected, rel=1e-12)
    # one document only: every idf is zero
    assert tm.cider_d(["a b"], [["a b"]])[0] == 0.0


def test_cider_d_counts_shared_documents_once():
    refs = [["a b c d"], ["a b c d"], ["e f g h"]]
    shared = tm.cider_d(["a b c d", "a b", "e f g h"], refs)
    # rows 0 and 1 share their reference set, so there are two documents, as in the case above
    assert shared[0] == pytest.approx(10)
    explicit = tm.cider_d(["a b c d", "a b", "e f g h"], refs, documents=["i1", "i1", "i2"])
    np.testing.assert_allclose(shared, explicit)


def test_tokenize():
    words = ["a", "dog's", "toy", "isn't", "it", "yes"]
    assert tm.tokenize("A dog's toy, isn't it?  Yes!") == words


def test_bad_references_are_rejected():
    with pytest.raises(ValueError, match="2 candidates but 1"):
        tm.bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="row 0"):
        tm.rouge_l(["a"], ["a b"])
    with pytest.raises(ValueError, match="row 0"):
        tm.cider_d(["a"], [[]])
    with pytest.raises(ValueError, match="unknown text metric"):
        tm.text_metric("meteor", ["a"], [["a"]])
