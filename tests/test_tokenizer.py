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

from specs_metric.processing.tokenizer import EOT_ID, SOT_ID, Tokenizer, clean_text

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
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, 10**9))
            if best not in self.ranks:
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


def test_cleaning_fast_path_equals_ftfy_pipeline():
    for text in _corpus(2000, seed=1):
        assert clean_text(text) == _slow_clean(text), repr(text)


def test_token_ids_equal_plain_bpe_on_a_large_corpus():
    plain = _PlainBPE()
    tok = Tokenizer()
    corpus = _corpus(600, seed=2)
    for text in corpus + corpus:  # the second pass goes through the per-word cache
        assert tok.token_ids(text) == plain.token_ids(text), repr(text)
