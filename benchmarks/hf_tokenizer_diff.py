"""How HF ``transformers``' CLIP tokenizers differ from the reference tokenizer (ours).

Both use the same BPE vocabulary and merges (written here from the package's vocabulary
file), so any difference comes from text cleaning before BPE: the reference runs
``ftfy.fix_text`` and unescapes HTML twice before lower-casing; HF's tokenizers do not
(the captions listed in the output are the ones where that matters). Needs
``transformers`` (the ``hf`` extra).

    python benchmarks/hf_tokenizer_diff.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from specs_metric.processing.tokenizer import SOT_TOKEN, Tokenizer

CAPTIONS = [
    "A photo of a cat.",
    "Tom &amp; Jerry on a sofa",
    "Fish &amp;amp; chips",
    "caf\u00e9 au lait",
    "cafe\u0301 au lait (combining accent)",
    "The sign says \u201cOPEN\u201d",
    "\u00e2\u0080\u009cmojibake\u00e2\u0080\u009d quotes",
    "two    spaces\tand\na newline",
    "emoji \U0001f600 face",
    "Stra\u00dfe in Berlin",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 letters",
    "it's the dog's bone, isn't it",
    "x &lt;b&gt; y",
    "numbers 1234567 and 3.14",
    "ALL CAPS SHOUTING",
    "\u00bd cup of sugar",
    "ligature \ufb01sh",
    "non\u00a0breaking space",
    "zero\u200bwidth space",
    "Ελληνικά γράμματα",
    "日本語のテキスト",
    "a red <|endoftext|> cube",
    "soft\u00adhyphen",
    "ellipsis\u2026 here",
    "trailing spaces   ",
]


def main() -> int:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    ours = Tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps(ours.encoder), encoding="utf-8")
        ranked = sorted(ours._ranks, key=ours._ranks.get)
        merges.write_text(
            "#version: 0.2\n" + "\n".join(" ".join(p) for p in ranked) + "\n", encoding="utf-8"
        )
        kinds = {
            "fast": CLIPTokenizerFast(str(vocab), str(merges), bos_token=SOT_TOKEN),
            "slow": CLIPTokenizer(str(vocab), str(merges), bos_token=SOT_TOKEN),
        }
        counts = {}
        for kind, hf in kinds.items():
            differ = []
            for text in CAPTIONS:
                if hf(text)["input_ids"] != ours.token_ids(text):
                    differ.append(text)
            counts[kind] = len(differ)
            print(f"{kind}: {len(differ)} of {len(CAPTIONS)} captions differ")
            for text in differ:
                print(f"   {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
