"""``specs explain`` / ``Scorer.explain``: every score against scoring its text alone.

Expected texts are built here from the sentences by hand (single-spaced captions, so the
caption through sentence k is the first k sentences joined by spaces), and every score is
compared with ``Scorer.score`` of that text on its own.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric import load
from specs_metric.cli import main
from specs_metric.jobs.results import OUTPUT_FIELDS as SCORE_FIELDS
from specs_metric.models.factory import build_model
from specs_metric.processing.segmentation import ChunkSegmenter, sentence_segments
from specs_metric.processing.tokenizer import Tokenizer, clean_text
from specs_metric.scoring.explain import (
    leave_one_out_texts,
    locate_segments,
    plan_caption,
    prefix_texts,
)
from specs_metric.scoring.scorer import Scorer
from specs_metric.synth import generate

TOL = 1e-5

CAPTIONS = [
    "A red square sits on a table. It is large. The background is white.",
    "One sentence only.",
    "A dog runs in the park, with a ball in its mouth. The grass is green and short. "
    "Two trees stand behind it; one is taller.",
    "Hello! Is this a cat? Yes, it is a grey cat on a red sofa.",
]


@pytest.fixture(scope="module")
def tiny():
    return Scorer(build_model(make_state_dict(seed=3, text_layers=2)), device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain_images")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        arr = rng.integers(0, 255, size=(40, 36 + i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
        paths.append(d / f"img{i}.png")
    return paths


def _sentences(caption):
    """Hand-written sentence split of the test captions (. ! ? followed by a space)."""
    return [s for s in re.split(r"(?<=[.!?]) ", caption) if s]


def _check_prefix(scorer, image, caption, ex, segments):
    texts = [" ".join(segments[: k + 1]) for k in range(len(segments))]
    alone = scorer.score([image] * (len(texts) + 2), ["", *texts, caption])
    assert [s.text for s in ex.segments] == segments
    assert ex.score == pytest.approx(alone[-1], abs=TOL)
    previous = alone[0]  # the empty caption
    for seg, expected in zip(ex.segments, alone[1:-1], strict=True):
        assert not seg.beyond_context
        assert seg.score == pytest.approx(expected, abs=TOL)
        assert seg.delta == pytest.approx(expected - previous, abs=TOL)
        previous = expected


@pytest.mark.parametrize("index", range(len(CAPTIONS)))
def test_prefix_scores_equal_scoring_each_prefix_alone(tiny, images, index):
    caption = CAPTIONS[index]
    image = images[index % len(images)]
    [ex] = tiny.explain([image], [caption])
    _check_prefix(tiny, image, caption, ex, _sentences(caption))


def test_clause_and_chunk_segmenters(tiny, images):
    caption = CAPTIONS[2]
    [ex] = tiny.explain([images[0]], [caption], segmenter="clause")
    # the clause rules: cut after , ; and before connectives like "with" and "and"
    clauses = [
        "A dog runs in the park,",
        "with a ball in its mouth.",
        "The grass is green",
        "and short.",
        "Two trees stand behind it;",
        "one is taller.",
    ]
    # "and short." has fewer than 3 words, so it is glued to the clause before it
    clauses = clauses[:2] + ["The grass is green and short."] + clauses[4:]
    _check_prefix(tiny, images[0], caption, ex, clauses)

    tags = {"a": "DT", "the": "DT", "dog": "NN", "park": "NN", "sits": "VBZ", "in": "IN"}

    def tagger(words):
        return [(w, tags.get(w.lower(), ".")) for w in words]

    chunker = ChunkSegmenter(
        tagger=tagger,
        sent_tokenize=lambda t: re.split(r"(?<=\.) ", t),
        word_tokenize=lambda s: re.findall(r"\w+|[^\w\s]", s),
    )
    caption = "A dog sits in the park. The dog sits."
    [ex] = tiny.explain([images[1]], [caption], segmenter=chunker)
    segments = [s.text for s in ex.segments]
    assert segments == chunker(caption) and len(segments) >= 2
    # chunk segments are tokenised text ("park ."); the caption's own text is used
    texts = prefix_texts(caption, segments)
    assert texts[-1] == caption
    alone = tiny.score([images[1]] * len(texts), texts)
    np.testing.assert_allclose([s.score for s in ex.segments], alone, atol=TOL)


def test_a_cut_inside_a_word_is_still_exact(tiny, images):
    # BPE of "A reddish" differs from the start of "A reddish square"'s tokens: the shared
    # part of the token ids is reused, the rest computed, and the scores stay exact.
    caption = "A reddish square. It is large."
    [ex] = tiny.explain(
        [images[0]], [caption], segmenter=lambda c: ["A red", "dish square.", "It is large."]
    )
    texts = ["A red", "A reddish square.", caption]
    alone = tiny.score([images[0]] * 4, ["", *texts])
    np.testing.assert_allclose([s.score for s in ex.segments], alone[1:], atol=TOL)
    np.testing.assert_allclose([s.delta for s in ex.segments], np.diff(alone), atol=TOL)


def test_leave_one_out_equals_scoring_without_each_segment(tiny, images):
    captions = CAPTIONS[:3]
    imgs = images[:3]
    exs = tiny.explain(imgs, captions, attribution="leave-one-out")
    for image, caption, ex in zip(imgs, captions, exs, strict=True):
        sents = _sentences(caption)
        without = [" ".join(sents[:k] + sents[k + 1 :]) for k in range(len(sents))]
        alone = tiny.score([image] * (len(sents) + 1), [caption, *without])
        assert ex.score == pytest.approx(alone[0], abs=TOL)
        for seg, w in zip(ex.segments, alone[1:], strict=True):
            assert seg.score == pytest.approx(w, abs=TOL)
            # positive = the segment helps: full score minus the score without it
            assert seg.delta == pytest.approx(alone[0] - w, abs=TOL)


def test_neutral_compares_each_segment_with_a_neutral_sentence(tiny, images):
    caption = CAPTIONS[0]
    [ex] = tiny.explain([images[0]], [caption], attribution="neutral")
    sents = _sentences(caption)
    prefixes = [" ".join(sents[: k + 1]) for k in range(len(sents))]
    neutral = ["This is an image."] + [f"{p} This is an image." for p in prefixes[:-1]]
    alone = tiny.score([images[0]] * (2 * len(sents)), prefixes + neutral)
    n = len(sents)
    np.testing.assert_allclose([s.score for s in ex.segments], alone[:n], atol=TOL)
    np.testing.assert_allclose([s.delta for s in ex.segments], alone[:n] - alone[n:], atol=TOL)


def test_segments_beyond_the_context_are_marked(tiny, images):
    sentence = "The small blue triangle is striped and sits in the top left corner."
    n_tok = len(tiny.tokenizer.encode(sentence))
    count = 248 // n_tok + 3  # well over the context
    caption = " ".join([sentence] * count)
    for attribution in ("prefix", "leave-one-out"):
        [ex] = tiny.explain([images[0]], [caption], attribution=attribution)
        assert ex.truncated and ex.tokens == 2 + count * n_tok
        assert len(ex.segments) == count  # nothing dropped
        fits = [2 + (k + 1) * n_tok <= 248 for k in range(count)]
        assert [not s.beyond_context for s in ex.segments] == fits
        assert all(s.score is None and s.delta is None for s in ex.segments if s.beyond_context)
        # the caption's own score is the truncated caption's, as `specs score` computes it
        assert ex.score == pytest.approx(tiny.score([images[0]], [caption])[0], abs=TOL)
    [ex] = tiny.explain([images[0]], [caption])
    inside = sum(fits)
    texts = [" ".join([sentence] * (k + 1)) for k in range(inside)]
    alone = tiny.score([images[0]] * inside, texts)
    np.testing.assert_allclose([s.score for s in ex.segments[:inside]], alone, atol=TOL)


def test_text_rules():
    caption = "A cat.  It sleeps.\nThe end."
    segs = ["A cat.", "It sleeps.", "The end."]
    assert locate_segments(caption, segs) == [(0, 6), (8, 18), (19, 27)]
    assert prefix_texts(caption, segs) == ["A cat.", "A cat.  It sleeps.", caption]
    assert leave_one_out_texts(caption, segs) == [
        "  It sleeps.\nThe end.",
        "A cat.  \nThe end.",
        "A cat.  It sleeps.\n",
    ]
    # a segment that is not in the caption: joined segments instead
    assert prefix_texts("A cat . ``Hi''", ["A cat .", '"Hi"']) == ["A cat .", 'A cat . "Hi"']


# ---------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def synth_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain_synth")
    generate(d, n=6, seed=7, test_fraction=0.5)
    return d


def test_demo_model_prefix_and_leave_one_out_are_exact(synth_world):
    scorer = load("specs-synth-demo", device="cpu")
    rows = [json.loads(line) for line in (synth_world / "graded_test.jsonl").open()][:4]
    images = [synth_world / r["image"] for r in rows]
    captions = [r["caption"] for r in rows]
    for image, caption, ex in zip(images, captions, scorer.explain(images, captions), strict=True):
        _check_prefix(scorer, image, caption, ex, _sentences(caption))
    loo = scorer.explain(images[:2], captions[:2], attribution="leave-one-out")
    for image, caption, ex in zip(images, captions, loo, strict=False):
        sents = _sentences(caption)
        without = [" ".join(sents[:k] + sents[k + 1 :]) for k in range(len(sents))]
        alone = scorer.score([image] * len(without), without)
        np.testing.assert_allclose([s.score for s in ex.segments], alone, atol=TOL)


# ---------------------------------------------------------------- the command


def test_explain_command_rows_errors_and_html(tiny, images, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.pt"
    torch.save(make_state_dict(seed=3, text_layers=2), ckpt)
    root = images[0].parent
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_bytes(b"not an image")
    rows = [
        {"id": "a", "image": "img0.png", "caption": CAPTIONS[0]},
        {"id": "missing", "image": "nope.png", "caption": "A cat."},
        {"id": "empty", "image": "empty.png", "caption": "A cat."},
        {"id": "text", "image": "text.png", "caption": "A cat."},
        {"id": "nocap", "image": "img1.png", "caption": " "},
        {"id": "b", "image": "img1.png", "caption": CAPTIONS[2]},
    ]
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"id": "broken", ')
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    html = tmp_path / "report.html"
    args = ["explain", "--model", str(ckpt), "--input", str(src), "--image-root", str(root)]
    args += ["--output", str(out), "--html", str(html), "--no-progress"]
    assert main(args) == 0
    result = [json.loads(line) for line in out.open()]
    assert [r["id"] for r in result] == ["a", "missing", 2, "empty", "text", "nocap", "b"]
    errors = {r["id"]: r["error"] for r in result}
    assert errors["a"] is None and errors["b"] is None
    assert errors[2].startswith("line 3: malformed JSON")
    assert re.match(r"line 2: .*not found", errors["missing"])
    assert re.match(r"line 4: .*empty", errors["empty"])
    assert re.match(r"line 5: .*not a recognised image", errors["text"])
    assert errors["nocap"] == "line 6: caption is empty"
    for rec in result:
        if rec["error"]:
            assert rec["score"] is None and rec["segments"] is None
    by_id = {r["id"]: r for r in result}
    loaded = load(ckpt, device="cpu")  # weights rounded like the reference loader
    for key, image, caption in (("a", images[0], CAPTIONS[0]), ("b", images[1], CAPTIONS[2])):
        rec = by_id[key]
        [ex] = loaded.explain([image], [caption])
        assert rec["score"] == pytest.approx(ex.score, abs=TOL)
        assert [s["text"] for s in rec["segments"]] == [s.text for s in ex.segments]
        got = [(s["score"], s["delta"]) for s in rec["segments"]]
        np.testing.assert_allclose(got, [(s.score, s.delta) for s in ex.segments], atol=TOL)
        assert set(rec) == {*SCORE_FIELDS, "segments"}  # a specs score row plus segments
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["n_rows"] == 7 and summary["n_errors"] == 5 and summary["images_encoded"] == 2
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") or "<html" in page[:200]
    assert "A red square sits on a table." in page
    # --strict: non-zero exit after writing everything (--overwrite: the output exists);
    # unknown segmenter: exit 2
    assert main([*args, "--strict", "--overwrite"]) == 1
    with pytest.raises(SystemExit):
        main([*args, "--segmenter", "words"])


def test_explain_rows_carry_the_warning_of_specs_score(images, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(make_state_dict(seed=3, text_layers=2), ckpt)
    root = images[0].parent
    captions = {
        "eot": "A red square. It sits <|endoftext|> on a table.",
        "sot": "A red square. <|startoftext|>It is large.",
        "clean": "A red square. It is large.",
        "missing": "A red square <|endoftext|> on a table.",  # an error row keeps its warning
    }
    src = tmp_path / "in.jsonl"
    with open(src, "w") as fh:
        for key, caption in captions.items():
            image = "nope.png" if key == "missing" else "img0.png"
            fh.write(json.dumps({"id": key, "image": image, "caption": caption}) + "\n")
    common = ["--model", str(ckpt), "--input", str(src), "--image-root", str(root)]
    assert main(["explain", *common, "--output", str(tmp_path / "x.jsonl"), "--no-progress"]) == 0
    score_args = ["--output", str(tmp_path / "s.jsonl"), "--workers", "0", "--no-progress"]
    assert main(["score", *common, *score_args]) == 0
    explained = [json.loads(line) for line in open(tmp_path / "x.jsonl")]
    scored = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    warnings = {r["id"]: r["warning"] for r in explained}
    assert warnings == {r["id"]: r["warning"] for r in scored}  # the same text, row by row
    assert "literal <|endoftext|>" in warnings["eot"] and "<|startoftext|>" in warnings["sot"]
    assert warnings["clean"] is None and "literal <|endoftext|>" in warnings["missing"]
    assert explained[-1]["error"] is not None
    summary = json.loads((tmp_path / "x.jsonl.summary.json").read_text())
    assert summary["n_warnings"] == 2  # scored rows with a warning, as specs score counts them
    assert summary["n_warnings"] == json.loads((tmp_path / "s.jsonl.summary.json").read_text())[
        "n_warnings"
    ]


# ---------------------------------------------------------------- long captions


class _CountingTokenizer(Tokenizer):
    """Counts full tokenizations and the characters that reach pre-tokenisation and BPE."""

    def __init__(self) -> None:
        super().__init__()
        self.full_calls = 0
        self.chars = 0

    def token_ids(self, text):
        self.full_calls += 1
        return super().token_ids(text)

    def _encode_clean(self, text):
        self.chars += len(text)
        return super()._encode_clean(text)


def _short_sentences(n, seed=0):
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "big", "small", "tree", "house", "old", "wet"]
    return [
        f"The {rng.choice(words)} {rng.choice(words)} is {rng.choice(words)}." for _ in range(n)
    ]


def _first_prefix_past(tokenizer, sentences, context=248):
    """The first k whose caption through sentence k has more than ``context`` tokens."""
    k = 0
    while len(tokenizer.token_ids(" ".join(sentences[: k + 1]))) <= context:
        k += 1
    return k


@pytest.mark.parametrize("attribution", ["prefix", "leave-one-out", "neutral"])
def test_a_caption_of_thousands_of_sentences_costs_what_the_context_needs(attribution):
    """Beyond the caption's one full tokenization, the characters tokenized do not grow
    with the caption (1,000 or 4,000 sentences, the same first ones)."""
    sentences = _short_sentences(4000)
    plain = Tokenizer()
    past = _first_prefix_past(plain, sentences)
    extra = []
    for n in (1000, 4000):
        caption = " ".join(sentences[:n])
        tok = _CountingTokenizer()
        plan = plan_caption(caption, sentence_segments, attribution, tok, 248)
        assert tok.full_calls == 1  # the caption itself: its token count
        assert plan.tokens == len(plain.token_ids(caption)) and plan.truncated
        assert [pick is None for pick in plan.picks] == [k >= past for k in range(n)]
        assert all(len(seq) <= 248 for seq in plan.sequences)
        extra.append(tok.chars - len(clean_text(caption)))
    assert extra[0] == extra[1]
    # at most: each prefix within the context (at most 40 sentences, 1 kB) and the head
    # of each other text (twice the characters of 248 tokens)
    assert extra[0] <= past * (1_000 + 2 * 249 * (plain.longest_token + 1))


def test_long_caption_scores_within_the_context_equal_scoring_them_alone(tiny, images):
    sentences = _short_sentences(1000, seed=1)
    caption = " ".join(sentences)
    past = _first_prefix_past(tiny.tokenizer, sentences)
    assert 0 < past < 100
    [ex] = tiny.explain([images[0]], [caption])
    assert ex.tokens == len(tiny.tokenizer.token_ids(caption)) and ex.truncated
    assert [s.text for s in ex.segments] == sentences
    assert [s.beyond_context for s in ex.segments] == [k >= past for k in range(1000)]
    assert all(s.score is None and s.delta is None for s in ex.segments[past:])
    texts = [" ".join(sentences[: k + 1]) for k in range(past)]
    alone = tiny.score([images[0]] * (past + 2), ["", *texts, caption])
    np.testing.assert_allclose([s.score for s in ex.segments[:past]], alone[1:-1], atol=TOL)
    np.testing.assert_allclose([s.delta for s in ex.segments[:past]], np.diff(alone[:-1]), atol=TOL)
    assert ex.score == pytest.approx(alone[-1], abs=TOL)

    [loo] = tiny.explain([images[0]], [caption], attribution="leave-one-out")
    without = [" ".join(sentences[:k] + sentences[k + 1 :]) for k in range(past)]
    alone = tiny.score([images[0]] * past, without)  # each truncated as specs score does
    np.testing.assert_allclose([s.score for s in loo.segments[:past]], alone, atol=TOL)
    assert [s.beyond_context for s in loo.segments] == [k >= past for k in range(1000)]
