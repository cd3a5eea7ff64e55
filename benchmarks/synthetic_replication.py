"""SPECS against its contrastive baseline on the synthetic world, end to end on a CPU.

The experiment of the SPECS paper in miniature, with ground truth instead of annotators:

1. generate the synthetic world (``specs_metric.synth``): train and test scenes, their
   cumulative captions and negatives, and graded candidate captions with a known quality;
2. pre-train a tiny LongCLIP-shaped model (248 text positions) from random weights with
   the symmetric CLIP loss on (image, full caption) of the train split;
3. fine-tune two copies of it for the same number of steps on the same data with the same
   seed: contrastive only (``lambda_detail = lambda_neg = 0``, the LongCLIP baseline) and
   the specificity objective (guide §4, the released loss weights and adaptive margin);
4. evaluate all three on the test split, whose scenes each contain a colour-shape pair that
   no training scene or caption contains: the intrinsic benchmark (guide §6) and Kendall
   tau-b between the score and the fact-level F1 of the graded candidates.

It writes ``OUT/results.md`` (markdown table), ``OUT/results.json``, ``OUT/replication.png``
and the training runs (``OUT/runs/*``, with their CSV logs), and prints the table.
``--export-demo`` also stores the two fine-tuned models in the package (fp16 safetensors,
``specs-synth-demo`` and ``clip-synth-demo``) and regenerates ``examples/`` from scenes of a
seed the models never saw. (The bundled demo models come from a longer, GPU pre-trained run
that grounds facts: ``grounding_experiments.py finetune --export-demo``, see
docs/synthetic-replication.md; this run's models would replace them with weaker ones.)

Usage:
    python benchmarks/synthetic_replication.py --out runs/synthetic-replication
    python benchmarks/synthetic_replication.py --export-demo        # bundle this run's models
    python benchmarks/synthetic_replication.py --smoke --out /tmp/x  # wiring check, ~1 min

Every random choice is seeded from ``--seed``; the defaults take about 10 minutes on 2 CPU
cores (9.7 measured; results in docs/synthetic-replication.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from specs_metric.bench.intrinsic import run_intrinsic
from specs_metric.bench.sdci import read_sdci
from specs_metric.bench.stats import kendall_tau, pairwise_accuracy
from specs_metric.checkpoint import read_state_dict, save_state_dict
from specs_metric.model import LongCLIP, ModelConfig
from specs_metric.scorer import load
from specs_metric.synth import generate
from specs_metric.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "specs_metric" / "assets"
EXAMPLES = REPO / "examples"
DEMO_FILES = {"specs": "specs-synth-demo.safetensors", "baseline": "clip-synth-demo.safetensors"}
# Examples come from a seed far from any seed the replication trains on.
EXAMPLE_SEED_OFFSET = 1_000_003
ARMS = ("pretrained", "baseline", "specs")
ARM_LABELS = {
    "pretrained": "pre-trained (CLIP loss)",
    "baseline": "+ contrastive fine-tuning (LongCLIP baseline)",
    "specs": "+ specificity fine-tuning (SPECS)",
}


@dataclass
class Settings:
    """Everything that defines one replication run (written to ``results.json``)."""

    seed: int = 0
    scenes: int = 2000  # train + test
    test_fraction: float = 0.2
    image_size: int = 64
    # tiny LongCLIP: heads = width // 64
    embed_dim: int = 128
    vision_width: int = 128
    vision_layers: int = 2
    patch: int = 8
    text_width: int = 64
    text_layers: int = 2
    # training
    pretrain_batch_size: int = 64
    pretrain_steps: int = 600
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 20
    finetune_batch_size: int = 32
    finetune_steps: int = 400
    finetune_lr: float = 1e-3
    finetune_warmup: int = 20
    weight_decay: float = 0.01
    precision: str = "bf16"  # autocast; weights and the loss stay fp32
    # specificity objective (released recipe)
    lambda_detail: float = 8.0
    lambda_neg: float = 0.8
    margin: float = 0.0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            embed_dim=self.embed_dim,
            image_resolution=self.image_size,
            vision_layers=self.vision_layers,
            vision_width=self.vision_width,
            vision_patch_size=self.patch,
            context_length=248,
            vocab_size=49408,
            text_width=self.text_width,
            text_layers=self.text_layers,
        )


SMOKE = {
    "scenes": 120,
    "pretrain_steps": 4,
    "finetune_steps": 3,
    "pretrain_batch_size": 16,
    "finetune_batch_size": 16,
}


# ----------------------------------------------------------------------------- data


def training_table(data: Path, out: Path) -> Path:
    """The train split as a training table (``caption`` = the full description)."""
    source = data / "train.parquet"
    table = pq.read_table(source)
    if "caption" in table.column_names:
        return source
    captions = table.column("captions").to_pylist()
    table = table.append_column("caption", pa.array([c[-1] for c in captions], pa.string()))
    pq.write_table(table, out)
    return out


# ----------------------------------------------------------------------------- training


def _train(
    settings: Settings,
    init: Path,
    table: Path,
    data: Path,
    output: Path,
    *,
    objective: str,
    steps: int,
    batch: int,
    lr: float,
    warmup: int,
    lambda_detail: float = 0.0,
    lambda_neg: float = 0.0,
) -> tuple[Path, float]:
    start = time.perf_counter()
    train(
        TrainConfig(
            init=str(init),
            data=str(table),
            output=str(output),
            objective=objective,
            max_steps=steps,
            batch_size=batch,
            grad_accum=1,
            lr=lr,
            weight_decay=settings.weight_decay,
            warmup_steps=warmup,
            lambda_contrast=1.0,
            lambda_detail=lambda_detail,
            lambda_neg=lambda_neg,
            margin=settings.margin,
            save_every=0,
            precision=settings.precision,
            seed=settings.seed,
            image_root=str(data),
            workers=0,
            device="cpu",
            progress=False,
            tensorboard=False,
        )
    )
    return output / "model.safetensors", time.perf_counter() - start


def finetune_arms(
    settings: Settings, init: Path, table: Path, data: Path, runs: Path
) -> dict[str, tuple[Path, float]]:
    """Fine-tune ``init`` twice with the same data and seed: contrastive only (``baseline``)
    and the specificity objective (``specs``). Returns each arm's model and seconds."""
    out = {}
    for arm, ld, ln in (
        ("baseline", 0.0, 0.0),
        ("specs", settings.lambda_detail, settings.lambda_neg),
    ):
        out[arm] = _train(
            settings,
            init,
            table,
            data,
            runs / arm,
            objective="specs",
            steps=settings.finetune_steps,
            batch=settings.finetune_batch_size,
            lr=settings.finetune_lr,
            warmup=settings.finetune_warmup,
            lambda_detail=ld,
            lambda_neg=ln,
        )
        print(
            f"fine-tuning {arm}: {settings.finetune_steps} steps in {out[arm][1]:.0f} s",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: Path, data: Path) -> dict:
    """Intrinsic rates (test split) and correlation with the graded candidates' F1."""
    scorer = load(str(model), device="cpu")
    rows = read_sdci(data, split="test")
    rates, _ = run_intrinsic(scorer, rows)
    graded = [
        json.loads(line)
        for line in (data / "graded_test.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    scores = scorer.score([str(data / g["image"]) for g in graded], [g["caption"] for g in graded])
    quality = [g["human_score"] for g in graded]
    groups = [g["group"] for g in graded]
    return {
        "positive": rates.positive,
        "negative": rates.negative,
        "average": rates.average,
        "images": rates.n_images,
        "kendall_b": kendall_tau(scores, quality, "b"),
        "pairwise_accuracy": 100.0 * pairwise_accuracy(scores, quality, groups),
        "graded": len(graded),
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
    left.set_title("intrinsic specificity (guide §6)")
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


# ----------------------------------------------------------------------------- demo export


def export_model(source: Path, target: Path) -> None:
    """Store a trained model as fp16 safetensors (the loader upcasts to fp32)."""
    state = read_state_dict(source)
    save_state_dict({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, target)
    target.chmod(0o644)  # package data: readable by every user of the installation


def write_examples(settings: Settings, work: Path, target: Path, n_scenes: int = 5) -> None:
    """Regenerate ``examples/``: scenes of an unseen seed with three captions each."""
    from specs_metric.synth.world import Scene

    fresh = work / "examples-data"
    generate(
        fresh,
        n=n_scenes,
        seed=settings.seed + EXAMPLE_SEED_OFFSET,
        image_size=settings.image_size,
        test_fraction=1.0,
        graded_per_scene=0,
    )
    rows = pq.read_table(fresh / "test.parquet").to_pylist()
    images = target / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    lines = []
    for i, row in enumerate(rows):
        name = f"scene{i + 1}.png"
        shutil.copyfile(fresh / row["image"], images / name)
        captions, negatives = row["captions"], row["neg_captions"]
        scene = Scene.from_dict(json.loads(row["scene"]))
        # true long caption; the first few facts only; those facts plus a false one
        short = min(len(captions) - 1, 1 + 4 * min(2, len(scene.objects)))
        variants = [
            ("full", captions[-1]),
            ("short", captions[short - 1]),
            ("hallucinated", negatives[short - 1]),
        ]
        for kind, caption in variants:
            lines.append(
                json.dumps(
                    {"id": f"scene{i + 1}-{kind}", "image": f"images/{name}", "caption": caption}
                )
            )
    (target / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/synthetic-replication"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--export-demo",
        action="store_true",
        help="store the fine-tuned models in the package and regenerate examples/",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the wiring only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    defaults = Settings()
    for field, value in asdict(defaults).items():
        if field == "seed":
            continue
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None)
    args = p.parse_args(argv)
    if args.smoke and args.export_demo:
        p.error("--export-demo with --smoke would bundle untrained models; drop one of them")
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
    models["pretrained"], timings["pretrain"] = _train(
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
        ASSETS.mkdir(parents=True, exist_ok=True)
        for arm, name in DEMO_FILES.items():
            export_model(models[arm], ASSETS / name)
        write_examples(settings, out, EXAMPLES)
        print(f"exported {', '.join(DEMO_FILES.values())} to {ASSETS} and examples to {EXAMPLES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
