"""BPE time against the length of one word: the reference loop vs the heap (bpe_merge).

The reference loop (CLIP's ``bpe``, re-implemented plainly here as the baseline) makes one
pass over the word per merge round, so a word of n letters costs O(n^2); the project's
``bpe_merge`` is O(n log n). Both run in this process on the same words (random lowercase
letters, seeded), each timed as the best of ``--repeats`` runs, and the merged symbols are
checked equal. The table gives each time and the ratios: baseline / new at each length,
and each algorithm's time over its time at the first length (x4 letters per step: about x4
for n log n, x16 for n^2). The new algorithm alone also runs on a 200k-letter word, and
``Tokenizer.encode`` on that word as a caption (cleaning, pre-tokenisation, BPE).

    PYTHONPATH=src python3 benchmarks/tokenizer_scaling.py
"""

from __future__ import annotations

import argparse
import platform
import random
import time

from specs_metric.processing.tokenizer import Tokenizer, bpe_merge


def reference_bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's loop: merge every occurrence of the lowest-ranked pair, left to right."""
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        first, second = best
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000, 4_000, 16_000])
    parser.add_argument("--long", type=int, default=200_000, help="new algorithm only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tok = Tokenizer()
    ranks = tok._ranks
    rng = random.Random(args.seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word_of(n: int) -> list[str]:
        text = "".join(rng.choice(letters) for _ in range(n))
        return list(text[:-1]) + [text[-1] + "</w>"]

    print(f"python {platform.python_version()}, {platform.machine()}, best of {args.repeats}")
    print(f"{'letters':>8} {'baseline s':>11} {'new s':>9} {'base/new':>9} "
          f"{'base growth':>12} {'new growth':>11}")
    first = None
    for n in args.lengths:
        word = word_of(n)
        t_old, old = best_time(lambda w=word: reference_bpe(list(w), ranks), args.repeats)
        t_new, (new, _) = best_time(lambda w=word: bpe_merge(w, ranks), args.repeats)
        assert old == new, f"results differ at {n} letters"
        first = first or (t_old, t_new)
        print(f"{n:>8} {t_old:>11.4f} {t_new:>9.4f} {t_old / t_new:>9.1f} "
              f"{t_old / first[0]:>12.1f} {t_new / first[1]:>11.1f}")
    word = word_of(args.long)
    t_new, (_, ops) = best_time(lambda: bpe_merge(word, ranks), args.repeats)
    growth = t_new / first[1]
    print(f"{args.long:>8} {'-':>11} {t_new:>9.4f} {'-':>9} {'-':>12} {growth:>11.1f}"
          f"   (x{args.long / args.lengths[0]:.0f} letters; {ops} heap operations)")
    caption = "".join(w.removesuffix("</w>") for w in word)
    t_enc, ids = best_time(lambda: tok.encode(caption), args.repeats)
    print(f"Tokenizer.encode of a {len(caption)}-letter caption: {t_enc:.3f} s, "
          f"{len(ids)} tokens")


if __name__ == "__main__":
    main()
