"""SPECS against its contrastive baseline on the synthetic world, end to end on a CPU.

The experiment of the SPECS paper in miniature, with ground truth instead of annotators:

1. generate the synthetic world (``specs_metric.synth``): train and test scenes, their
   cumulative captions and negatives, and graded candidate captions with a known quality;
2. pre-train a tiny LongCLIP-shaped model (248 text positions) from random weights with
   the symmetric CLIP loss on (image, full caption) of the train split;
3. fine-tune two copies of it for the same number of steps on the same data with the same
   seed: contrastive only (``lambda_detail = lambda_neg = 0``, the LongCLIP baseline) and
   the specificity objective (docs/training.md, "Objective": the released loss weights and
   adaptive margin);
4. evaluate all three on the test split, whose scenes each contain a colour-shape pair that
   no training scene or caption contains: the intrinsic benchmark (docs/intrinsic.md) and Kendall
   tau-b between the score and the fact-level F1 of the graded candidates.

It writes ``OUT/results.md`` (markdown table), ``OUT/results.json``, ``OUT/replication.png``
and the training runs (``OUT/runs/*``, with their CSV logs), and prints the table.
``--export-demo DIR`` also writes the two fine-tuned models (fp16 safetensors,
``specs-synth-demo`` and ``clip-synth-demo``) and an ``examples/`` folder from scenes of a
seed the models never saw into DIR (:func:`specs_metric.demo.recipe.export_demo`); the
bundle changes only when they are copied into the package. (The bundled demo models come
from a longer, GPU pre-trained run that grounds facts: ``grounding_experiments.py finetune
--export-demo DIR``, see docs/synthetic-replication.md; this run's models are weaker.)

Usage:
    python benchmarks/synthetic_replication.py --out runs/synthetic-replication
    python benchmarks/synthetic_replication.py --export-demo runs/demo   # export this run's models
    python benchmarks/synthetic_replication.py --smoke --out /tmp/x  # wiring check, ~1 min

Every random choice is seeded from ``--seed``; the defaults take about 10 minutes on 2 CPU
cores (9.7 measured; results in docs/synthetic-replication.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from specs_metric.demo.recipe import (
    DEMO_FILES,
    Settings,
    evaluate,
    export_demo,
    finetune_arms,
    train_model,
    training_table,
)
from specs_metric.models.model import LongCLIP
from specs_metric.models.weights.checkpoint import save_state_dict
from specs_metric.synth import generate

ARMS = ("pretrained", "baseline", "specs")
ARM_LABELS = {
    "pretrained": "pre-trained (CLIP loss)",
    "baseline": "+ contrastive fine-tuning (LongCLIP baseline)",
    "specs": "+ specificity fine-tuning (SPECS)",
}


SMOKE = {
    "scenes": 120,
    "pretrain_steps": 4,
    "finetune_steps": 3,
    "pretrain_batch_size": 16,
    "finetune_batch_size": 16,
}


# ----------------------------------------------------------------------------- reporting


def markdown_table(results: dict) -> str:
    lines = [
        "| model | positive % | negative % | average % | Kendall tau-b | pairwise acc. % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        r = results[arm]
        lines.append(
            f"| {ARM_LABELS[arm]} | {r['positive']:.2f} | {r['negative']:.2f} | "
            f"{r['average']:.2f} | {r['kendall_b']:.3f} | {r['pairwise_accuracy']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1.2]})
    metrics = ("positive", "negative", "average")
    colours = {"pretrained": "#bbbbbb", "baseline": "#4c72b0", "specs": "#dd8452"}
    x = np.arange(len(metrics))
    width = 0.27
    for i, arm in enumerate(ARMS):
        values = [results[arm][m] for m in metrics]
        bars = left.bar(x + (i - 1) * width, values, width, label=arm, color=colours[arm])
        left.bar_label(bars, fmt="%.1f", fontsize=7)
    left.set_xticks(x, [f"{m} rate" for m in metrics])
    left.set_ylim(0, 105)
    left.set_ylabel("% of increments (test split)")
    left.set_title("intrinsic specificity")
    left.legend(loc="lower right", fontsize=8)
    taus = [results[arm]["kendall_b"] for arm in ARMS]
    bars = right.bar(range(len(ARMS)), taus, color=[colours[a] for a in ARMS])
    right.bar_label(bars, fmt="%.3f", fontsize=7)
    right.set_xticks(range(len(ARMS)), ARMS, fontsize=8)
    right.set_title("Kendall tau-b vs fact F1")
    right.axhline(0, color="black", linewidth=0.5)
    fig.suptitle("Synthetic world: tiny LongCLIP, contrastive vs specificity fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/synthetic-replication"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--export-demo",
        type=Path,
        metavar="DIR",
        help="write the fine-tuned models (fp16) and a fresh examples/ folder into DIR "
        "(copy them to src/specs_metric/assets/ and examples/ to update the bundle)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the wiring only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    defaults = Settings()
    for field, value in asdict(defaults).items():
        if field == "seed":
            continue
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None)
    args = p.parse_args(argv)
    settings = replace(defaults, seed=args.seed, **(SMOKE if args.smoke else {}))
    overrides = {
        f: getattr(args, f)
        for f in asdict(defaults)
        if f != "seed" and getattr(args, f) is not None
    }
    return args, replace(settings, **overrides)


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    data = out / "data"
    t0 = time.perf_counter()
    generate(
        data,
        n=settings.scenes,
        seed=settings.seed,
        image_size=settings.image_size,
        test_fraction=settings.test_fraction,
    )
    table = training_table(data, out / "train_table.parquet")
    timings["generate"] = time.perf_counter() - t0
    print(f"data: {settings.scenes} scenes in {timings['generate']:.0f} s", flush=True)

    init = out / "init.safetensors"
    model = LongCLIP(settings.model_config()).init_weights(
        torch.Generator().manual_seed(settings.seed)
    )
    save_state_dict({k: v.detach() for k, v in model.state_dict().items()}, init)
    runs = out / "runs"
    models: dict[str, Path] = {}
    models["pretrained"], timings["pretrain"] = train_model(
        settings,
        init,
        table,
        data,
        runs / "pretrain",
        objective="clip",
        steps=settings.pretrain_steps,
        batch=settings.pretrain_batch_size,
        lr=settings.pretrain_lr,
        warmup=settings.pretrain_warmup,
    )
    print(
        f"pre-training: {settings.pretrain_steps} steps in {timings['pretrain']:.0f} s", flush=True
    )
    for arm, (model, seconds) in finetune_arms(
        settings, models["pretrained"], table, data, runs
    ).items():
        models[arm], timings[arm] = model, seconds

    t0 = time.perf_counter()
    results: dict = {}
    for arm in ARMS:
        results[arm] = evaluate(models[arm], data)
        print(f"{arm}: {results[arm]}", flush=True)
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    report = {
        "settings": asdict(settings),
        "results": results,
        "seconds": timings,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor(),
        },
        "command": " ".join(["python", "benchmarks/synthetic_replication.py", *sys.argv[1:]]),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table_md = markdown_table(results)
    goal = results["specs"]["average"] - results["baseline"]["average"]
    md = (
        f"# Synthetic replication (seed {settings.seed})\n\n{table_md}\n"
        f"SPECS minus baseline, average: {goal:+.2f} points. Test split: "
        f"{results['specs']['images']} scenes, {results['specs']['graded']} graded captions. "
        f"Wall time {timings['total'] / 60:.1f} min "
        f"({torch.get_num_threads()} threads).\n"
    )
    (out / "results.md").write_text(md)
    plot(results, out / "replication.png")
    print("\n" + md)

    if args.export_demo:
        export_demo(models, args.export_demo, settings, out)
        print(f"exported {', '.join(DEMO_FILES.values())} and examples/ to {args.export_demo}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
