"""The tokenizer's fast paths (plain-ASCII cleaning, per-word id cache) keep the ids exact.

The expected ids come from a plain re-implementation of CLIP's BPE written here: clean
with ftfy + double HTML unescape + whitespace collapse + lower-casing, split with the
pre-tokenisation pattern, BPE-merge each word by rank, look the pieces up.
"""

from __future__ import annotations

import gzip
import html
import random
import re
from importlib import resources

import ftfy
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specs_metric.processing import tokenizer as tokenizer_module
from specs_metric.processing.tokenizer import (
    CACHED_PIECE_CHARS,
    EOT_ID,
    SOT_ID,
    Tokenizer,
    bpe_merge,
    clean_text,
    truncate_ids,
)

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _slow_clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text.strip()).strip().lower()


class _PlainBPE:
    """CLIP BPE without caches or shortcuts."""

    def __init__(self) -> None:
        raw = resources.files("specs_metric").joinpath("assets/bpe_simple_vocab_16e6.txt.gz")
        lines = gzip.decompress(raw.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_char = dict(zip(bs, map(chr, cs), strict=True))
        vocab = list(self.byte_char.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, token: str) -> list[str]:
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return [token]
        return _plain_merge(list(token[:-1]) + [token[-1] + "</w>"], self.ranks)

    def token_ids(self, text: str) -> list[int]:
        ids = [SOT_ID]
        for piece in _PATTERN.findall(_slow_clean(text)):
            mapped = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.ids[t] for t in self.bpe(mapped))
        return ids + [EOT_ID]


TRICKY = [
    "A  cat\ton\na mat.\r\n",
    "Fish &amp; chips &amp;amp; peas &lt;b&gt;",
    "caf\u00e9 na\u00efve \u00c9COLE \u2014 \u201cquoted\u201d",
    "emoji \U0001f600\U0001f3fd and flags \U0001f1eb\U0001f1f7",
    "control\x07bell\x0bvt\x0cff\x1b[31mred\x1b[0m\x7fdel",
    "mojibake: caf\u00c3\u00a9",
    "<|endoftext|> then more text",
    "don't you'll we've I'M they'RE",
    "\uff26\uff55\uff4c\uff4c width and \ufb01 ligature",
    "digits 12345 and 3.14159 and $100%",
    "",
    "   ",
]


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["cat", "Dog", "a", "the", "striped", "ZEBRA", "café", "naïve", "&amp;", "&lt;",
             "&#39;", "don't", "\U0001f600", "—", "“hi”", "x\ty", "3.5", "e-mail", "#tag",
             "ｗｉｄｅ", "ﬁsh", "\x1b[1m", "\x00", "über", "日本語", "Ελληνικά", "naïvely"]
    ascii_chars = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r"]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:  # plain ASCII, every printable character
            out.append("".join(rng.choice(ascii_chars) for _ in range(rng.randint(0, 120))))
        else:  # words, some of them non-ASCII or entities; some over-long
            length = rng.choice([5, 30, 120, 400])
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, length))))
    return out + TRICKY


_PLAIN = _PlainBPE()
_TOK = Tokenizer()


def test_cleaning_fast_path_equals_ftfy_pipeline():
    for text in _corpus(2000, seed=1):
        assert clean_text(text) == _slow_clean(text), repr(text)


def test_token_ids_equal_plain_bpe_on_a_large_corpus():
    plain = _PlainBPE()
    tok = Tokenizer()
    corpus = _corpus(600, seed=2)
    for text in corpus + corpus:  # the second pass goes through the per-word cache
        assert tok.token_ids(text) == plain.token_ids(text), repr(text)


# ----------------------------------------------------------------- linear-time BPE

_LETTERS = "abcdefghijklmnopqrstuvwxyzéüßøñçαβγжшя日本語"


def _adversarial_pieces(rng: random.Random) -> list[str]:
    """Words that stress the order of merges: runs, alternations, repeated syllables."""
    n = rng.randint(1, 250)
    a, b, c = rng.sample(_LETTERS, 3)
    syllable = "".join(rng.choice(_LETTERS[:26]) for _ in range(rng.randint(2, 4)))
    return [
        a * n,  # one letter: overlapping equal pairs ("a a a")
        (a + b) * n,
        (a + a + b) * (n // 2 + 1),
        (a + b + c) * (n // 3 + 1),
        syllable * (n // 3 + 1),
        rng.choice(["the", "ing", "tion", "ss", "ll"]) * (n // 2 + 1),
        "".join(rng.choice(_LETTERS) for _ in range(n)),
        "".join(rng.choice("aeiourstln") for _ in range(n)),
        "".join(rng.choice("!?.,-_*#@'\"") for _ in range(n)),  # one symbol run
        "".join(rng.choice("0123456789") for _ in range(n % 40 + 1)),
    ]


def test_token_ids_equal_plain_bpe_on_adversarial_words():
    plain = _PlainBPE()
    tok = Tokenizer()
    rng = random.Random(3)
    for _ in range(60):
        pieces = _adversarial_pieces(rng)
        for piece in pieces:
            assert tok.token_ids(piece) == plain.token_ids(piece), repr(piece[:60])
        text = " ".join(rng.sample(pieces, len(pieces)))  # joined, with digits between
        assert tok.token_ids(text) == plain.token_ids(text), repr(text[:60])


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="aabbeeinorst", min_size=1, max_size=80),  # merge-rich runs
            st.builds(lambda s, k: s * k, st.text(alphabet="aehlst", min_size=1, max_size=3),
                      st.integers(1, 60)),
            st.text(min_size=1, max_size=20),  # any code points
            st.sampled_from([" ", "  ", "\n", ".", "'s", "&amp;", "<|endoftext|>", "3"]),
        ),
        max_size=8,
    )
)
def test_token_ids_equal_plain_bpe_on_random_text(parts):
    text = "".join(parts)
    assert _TOK.token_ids(text) == _PLAIN.token_ids(text)


def test_bpe_work_is_linearithmic_on_a_200k_letter_caption(monkeypatch):
    """One 200k-letter word: the heap does O(n) operations (each O(log n)), where the
    reference loop takes a pass over the word per merge round (3.5 minutes here)."""
    rng = random.Random(5)
    caption = "".join(rng.choice("abcdefghilmnoprstu") for _ in range(200_000))
    work: list[tuple[int, int]] = []

    def counted(word, ranks):
        merged, ops = bpe_merge(word, ranks)
        work.append((len(word), ops))
        return merged, ops

    monkeypatch.setattr(tokenizer_module, "bpe_merge", counted)
    tok = Tokenizer()
    ids = tok.encode(f"a {caption} cat")
    n, ops = max(work)
    assert n == len(caption)
    # at most n - 1 initial pairs and two new pairs per merge are pushed, each popped once
    assert ops <= 6 * n
    assert len(ids) < n  # merges happened
    assert tok.decode(ids) == f"a {caption} cat"
    # the per-word caches keep the short words, not the huge one
    assert "cat" in tok._piece_ids and "cat" in tok._cache
    assert all(len(piece) <= CACHED_PIECE_CHARS for piece in [*tok._cache, *tok._piece_ids])


def test_bpe_work_counts_on_worst_case_runs():
    tok = Tokenizer()
    for word in ["a" * 50_000, "ab" * 25_000, "lll" * 20_000]:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged, ops = bpe_merge(symbols, tok._ranks)
        assert ops <= 6 * len(symbols)
        assert "".join(merged).removesuffix("</w>") == word


def _plain_merge(word: list[str], ranks: dict) -> list[str]:
    """The reference loop: merge every occurrence of the best pair, left to right."""
    while len(word) > 1:
        best = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, 10**9))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


@settings(max_examples=400, deadline=None, database=None)
@given(st.randoms(use_true_random=False), st.text(alphabet="abc", min_size=1, max_size=60))
def test_bpe_merge_equals_the_reference_loop_for_any_rank_order(rnd, word):
    """Rank tables in any order, including a merge ranked before the merges that make its
    parts (CLIP's table never does that): the rounds must still go as the reference's."""
    symbols = set("abc")
    pairs = []
    for _ in range(rnd.randint(1, 30)):
        pair = (rnd.choice(sorted(symbols)), rnd.choice(sorted(symbols)))
        pairs.append(pair)
        symbols.add("".join(pair))
    rnd.shuffle(pairs)
    ranks = {pair: r for r, pair in enumerate(pairs)}
    assert bpe_merge(list(word), ranks)[0] == _plain_merge(list(word), ranks)


# ----------------------------------------------------------------- head of a text


def _head_texts(rng: random.Random) -> list[str]:
    """Texts whose cuts fall on the hard cases: whitespace runs, long words, line breaks
    in non-ASCII text, entities and special tokens near a cut, final sigma, ligatures."""
    words = ["cat", "A", "sits", "on", "the", "mat.", "ΟΔΟΣ", "ﬁsh", "İstanbul", "&amp;",
             "&#39;s", "<|endoftext|>", "café", "don't", "3.5", "“hi”", "\x1b[1m", "x" * 70]
    seps = [" ", " ", " ", "  ", "\n", "\r\n", "\t", " " * 200, "\n\n\n"]
    out = []
    for _ in range(40):
        n = rng.randint(1, 400)
        out.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(n)))
    out += [
        "a" * 5000,  # one word crossing every cut
        "word " * 300 + "b" * 3000 + " tail",
        " " * 10_000 + "late words " * 50,  # whitespace collapses: the head doubles
        ("Σ\n" * 200) + "é",
        "é" + "x " * 1000,  # non-ASCII, one long line
        "ﬁ" * 900,
    ]
    return out


def test_encode_head_equals_the_start_of_the_full_ids():
    plain = _PlainBPE()
    tok = Tokenizer()
    for text in _head_texts(random.Random(7)):
        full = plain.token_ids(text)[1:-1]
        for n in (0, 1, 3, 17, 75, 246, len(full), len(full) - 1):
            if n < 0:
                continue
            assert tok.encode_head(text, n) == (full[:n], len(full) > n), (n, text[:60])
        for context in (77, 248):
            expected = truncate_ids([SOT_ID, *full, EOT_ID], context)
            assert tok.truncated_ids(text, context) == (expected, len(full) + 2 > context)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(
        st.sampled_from(["ab", "Σ", "é", " ", "   ", "\n", "\r", "&amp;", "&", "lt;", "<|",
                         "endoftext|>", "'s", "x" * 20, "ﬁ", "İ", "!!", "7", "\x1b[1m"]),
        max_size=200,
    ),
    st.integers(0, 6),
)
def test_encode_head_on_random_text(parts, n):
    text = "".join(parts)
    full = _PLAIN.token_ids(text)[1:-1]
    assert _TOK.encode_head(text, n) == (full[:n], len(full) > n)


@settings(max_examples=500, deadline=None, database=None)
@given(
    st.lists(
        st.sampled_from(["ab", "Σ", "é", " ", "   ", "\n", "\r\n", "&amp;", "&", "amp;", "x" * 9,
                         "\t", "ﬁ", "İ", "!", "\x1b[1m", "<", "\x85"]),
        max_size=60,
    ),
    st.integers(0, 80),
)
def test_clean_head_is_a_prefix_followed_by_a_space(parts, limit):
    text = "".join(parts)
    cleaned = _slow_clean(text)  # the whole text, cleaned by the reference pipeline
    plain = re.fullmatch(r"[\x20-\x25\x27-\x7e\t\n\r]*", text) is not None
    head, whole = tokenizer_module._clean_head(text, limit, plain)
    assert cleaned.startswith(head)
    if whole:
        assert head == cleaned
    elif head:  # a boundary for the pre-tokenisation: a space, or the end
        assert cleaned[len(head) : len(head) + 1] in ("", " ")


def test_encode_head_with_the_cut_inside_a_word():
    """Whitespace runs collapse, so a raw cut falls in few tokens and inside a word whose
    BPE changes when it is cut ("photogr" is not "photograph"): at each limit it tries."""
    plain = _PlainBPE()
    tok = Tokenizer()
    for n in (1, 2):
        limits = (n + 1) * tokenizer_module._TYPICAL_TOKEN_CHARS, (n + 1) * (tok.longest_token + 1)
        for limit in limits:
            for word in ("photograph", "understanding", "xylophones"):
                for pad in range(limit - len(word) - 1, limit + 2):
                    for text in (" " * pad + word + " cat", "é\n" + "\n" * pad + word + "\ncat"):
                        full = plain.token_ids(text)[1:-1]
                        assert tok.encode_head(text, n) == (full[:n], len(full) > n), text


def test_encode_head_reads_a_bounded_head(monkeypatch):
    tok = Tokenizer()
    read: list[int] = []
    real = tok._encode_clean
    monkeypatch.setattr(tok, "_encode_clean", lambda text: read.append(len(text)) or real(text))
    sentences = "A small dog sleeps. The red ball is near it. " * 5000  # 225 kB
    for text in (sentences, "é " + sentences, sentences.replace(". ", ".\n")):
        read.clear()
        ids, more = tok.encode_head(text, 246)
        assert more and len(ids) == 246
        # one pass over at most the bound plus one word
        assert len(read) == 1 and read[0] <= 247 * (tok.longest_token + 1) + 50
