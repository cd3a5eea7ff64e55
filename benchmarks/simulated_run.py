"""A simulated captioner training run on the synthetic world, checked with ``specs sweep``.

Each test scene of a fresh synthetic world has six graded candidate captions with a known
quality (fact-level F1, hallucinations counted as errors). Checkpoint ``k`` of the simulated
run captions every image with the candidate of rank ``RANKS[k]`` of that image's candidates
sorted by F1, so the true mean F1 rises from checkpoint to checkpoint. The script scores the
files with ``specs sweep`` and prints, per checkpoint, the true mean F1 next to the measured
mean score, its CI and the paired test against the previous checkpoint; the run passes when
the sweep orders the checkpoints as their true quality does.

Usage:
    python benchmarks/simulated_run.py --out /tmp/simrun [--n 500] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_checkpoint_files(
    graded: Path, out: Path, ranks: list[int], name: str = "step"
) -> list[tuple[Path, float]]:
    """One caption file per rank (``out/<name>-<k>.jsonl``) and its true mean F1."""
    groups: dict[str, list[dict]] = {}
    for line in graded.read_text("utf-8").splitlines():
        rec = json.loads(line)
        groups.setdefault(rec["group"], []).append(rec)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, rank in enumerate(ranks, 1):
        path, total = out / f"{name}-{k}.jsonl", 0.0
        with open(path, "w", encoding="utf-8") as fh:
            for group, cands in groups.items():
                pick = sorted(cands, key=lambda r: (r["human_score"], r["caption"]))[rank]
                total += pick["human_score"]
                row = {"id": group, "image": pick["image"], "caption": pick["caption"]}
                fh.write(json.dumps(row) + "\n")
        files.append((path, total / len(groups)))
    return files


def main(argv: list[str] | None = None) -> int:
    from specs_metric.cli import main as specs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=500, help="scenes (a fifth of them are test)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--ranks", default="0,1,2,3,4,5", help="candidate rank per checkpoint")
    p.add_argument("--model", default="specs-synth-demo")
    args = p.parse_args(argv)
    world = args.out / "world"
    if not (world / "graded_test.jsonl").is_file():
        assert (
            specs(["synth", "--n", str(args.n), "--seed", str(args.seed), "--output", str(world)])
            == 0
        )
    ranks = [int(r) for r in args.ranks.split(",")]
    files = build_checkpoint_files(world / "graded_test.jsonl", args.out / "captions", ranks)
    sweep = args.out / "sweep"
    code = specs(
        ["sweep", "--model", args.model, "--out", str(sweep), "--image-root", str(world),
         "--device", "cpu", "--no-progress", *[str(f) for f, _ in files]]
    )  # fmt: skip
    if code:
        return code
    result = json.loads((sweep / "sweep.json").read_text())
    print("| checkpoint | true mean F1 | mean score | 95% CI | vs previous | p |")
    print("|---|---|---|---|---|---|")
    for (_, f1), ck in zip(files, result["checkpoints"], strict=True):
        vs = ck["vs_previous"]
        step = f"{vs['mean_diff']:+.4f} | {vs['p_value']:.4f}" if vs else "— | —"
        print(f"| {ck['name']} | {f1:.3f} | {ck['mean']:.4f} | "
              f"[{ck['ci_low']:.4f}, {ck['ci_high']:.4f}] | {step} |")  # fmt: skip
    means = [ck["mean"] for ck in result["checkpoints"]]
    ordered = all(a < b for a, b in zip(means, means[1:], strict=False))
    print(f"images {result['images']}, encoded {result['images_encoded']}; "
          f"ranked in the true order: {ordered}")  # fmt: skip
    return 0 if ordered else 1


if __name__ == "__main__":
    sys.exit(main())
