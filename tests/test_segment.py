"""Segmenters: the reference chunk grammar (with an injected tagger), its post-processing,
and the rule-based sentence and clause splitters. Expected segments are worked out by hand
from the rules in the module docstrings."""

from __future__ import annotations

import re

import pytest

from specs_metric.errors import SegmenterError
from specs_metric.processing import segmentation as segment
from specs_metric.processing.segmentation import (
    ChunkSegmenter,
    chunk_sentence,
    clause_segments,
    get_segmenter,
    merge_segments,
    split_sentences,
)

TAGS = {
    "The": "DT", "the": "DT", "A": "DT", "a": "DT", "black": "JJ", "red": "JJ", "big": "JJ",
    "cat": "NN", "mat": "NN", "dog": "NN", "park": "NN", "table": "NN", "cup": "NN",
    "sits": "VBZ", "sleeps": "VBZ", "runs": "VBZ", "stands": "VBZ", "on": "IN", "in": "IN",
    "and": "CC", ".": ".", ",": ",",
}


def dict_tagger(words):
    return [(w, TAGS[w]) for w in words]


def word_tokenize(sentence):
    return re.findall(r"\w+|[^\w\s]", sentence)


def sent_tokenize(text):
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


def injected():
    return ChunkSegmenter(dict_tagger, sent_tokenize, word_tokenize)


def test_grammar_cuts_after_np_vp_pp_clause_but_not_conj():
    words = "The black cat sits on the red mat and a dog sleeps .".split()
    # CLAUSE(NP VP) | PP(on NP) | CONJ(and CLAUSE) + "." (CONJ does not end a segment)
    assert chunk_sentence(dict_tagger(words)) == [
        "The black cat sits", "on the red mat", "and a dog sleeps .",
    ]


def test_chunk_segmenter_with_injected_tagger():
    seg = injected()
    # Segments: "The cat sits", ".", "A dog runs", "in the park", "." ; "| . |" -> "." and
    # "in" glues "in the park" to "A dog runs"; every full stop ends a segment.
    assert seg("The cat sits. A dog runs in the park.") == [
        "The cat sits .", "A dog runs in the park .",
    ]
    assert seg("The black cat sits on the red mat and a dog sleeps.") == [
        "The black cat sits on the red mat", "and a dog sleeps .",
    ]


def test_merge_rule_short_the_fragment_after_full_stop():
    # "A cat . | The dog | sleeps . |" -> ". |" -> "." ; at the bar, the words since the
    # last full stop are ["The", "dog"] (<= 3, first "The") -> glued.
    assert merge_segments(["A cat .", "The dog", "sleeps ."]) == ["A cat .", "The dog sleeps ."]
    # Without a preceding full stop the rule does not apply.
    assert merge_segments(["The dog", "sleeps ."]) == ["The dog", "sleeps ."]
    # Four tokens since the full stop: no longer a short fragment.
    assert merge_segments(["A cat .", "The big black dog", "sleeps ."]) == [
        "A cat .", "The big black dog", "sleeps .",
    ]


def test_merge_rule_next_word_glues():
    assert merge_segments(["a dog", "on the mat", "is brown", "a cat"]) == [
        "a dog on the mat is brown", "a cat",
    ]
    assert merge_segments(["a dog", "'s tail"]) == ["a dog 's tail"]


def test_merge_rule_preposition_led_sentence():
    # Words since the full stop start with "On" (lower-cased in the glue list), no is/are.
    assert merge_segments(["A cat .", "On the big table", "a cup stands ."]) == [
        "A cat .", "On the big table a cup stands .",
    ]
    assert merge_segments(["A cat .", "On the big table is", "a cup ."]) == [
        "A cat .", "On the big table is", "a cup .",
    ]


def test_chunk_without_nltk_data_names_the_download(monkeypatch):
    import nltk

    def missing(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)
    with pytest.raises(SegmenterError) as info:
        get_segmenter("chunk")
    assert "nltk.download('punkt_tab')" in str(info.value)
    assert "nltk.download('averaged_perceptron_tagger_eng')" in str(info.value)
    # Injecting all three pieces needs no data; injecting the tagger only needs punkt_tab.
    assert injected()("A dog runs.") == ["A dog runs ."]
    with pytest.raises(SegmenterError) as info:
        ChunkSegmenter(tagger=dict_tagger)
    assert "punkt_tab" in str(info.value) and "tagger" not in str(info.value)


def test_sentence_splitter():
    assert split_sentences("A dog runs.  Mr. Smith waves! Is it 3.5 m tall? Yes") == [
        "A dog runs.", "Mr. Smith waves!", "Is it 3.5 m tall?", "Yes",
    ]
    assert split_sentences("Flags, e.g. red ones. Done.") == ["Flags, e.g. red ones.", "Done."]
    assert split_sentences("   ") == []
    assert get_segmenter("sentence")("One. Two.") == ["One.", "Two."]


def test_clause_splitter_rules():
    text = (
        "A woman in a red coat walks a dog, while a man sits on a bench reading a paper. "
        "The sky is blue and clear; trees line the path."
    )
    assert clause_segments(text) == [
        "A woman in a red coat walks a dog,",
        "while a man sits on a bench reading a paper.",
        "The sky is blue and clear;",  # "and clear;" has 2 words: glued back
        "trees line the path.",
    ]
    # A short first piece is glued to the one after it; connectives split mid-sentence.
    assert clause_segments("Outside, a cat with a long tail sleeps and a dog that barks runs.") == [
        "Outside, a cat",
        "with a long tail sleeps",
        "and a dog",
        "that barks runs.",
    ]
    assert clause_segments("") == []
    assert get_segmenter() is clause_segments


def test_unknown_segmenter():
    with pytest.raises(ValueError, match="clause, sentence, chunk"):
        get_segmenter("words")
    assert segment.DEFAULT_SEGMENTER == "clause"
