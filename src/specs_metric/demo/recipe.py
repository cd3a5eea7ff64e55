"""The recipe of the bundled demo models (``specs-synth-demo`` and its contrastive twin
``clip-synth-demo``), in pieces the benchmark scripts share.

- :class:`Settings`: the tiny LongCLIP shape and the training settings of the synthetic
  replication; :func:`train_model` and :func:`finetune_arms` train with the package's
  trainer (:mod:`specs_metric.training`: its loss, schedule and data loading);
- :func:`evaluate`: intrinsic rates (:mod:`specs_metric.evaluation.intrinsic`) and agreement
  with the graded candidates on a synthetic world's test split;
- the scene-parsing warm-up of the image tower (:func:`cell_labels`, :func:`parse_head`,
  :func:`parse_loss`) and the sentence-level grounding pairs (:func:`segments`,
  :func:`token_batch`, which truncates like the tokenizer: EOT kept last);
- :func:`export_demo`: the explicit export step, writing the two models (fp16
  safetensors) and a fresh ``examples/`` folder into a folder the caller names. Copying
  them into ``src/specs_metric/assets/`` and ``examples/`` updates the bundle
  (docs/synthetic-replication.md, "Exporting the demo models").

The grounded pre-training that gives the demo models their start is in
:mod:`specs_metric.demo.grounding`. The experiments themselves live in ``benchmarks/``
(``synthetic_replication.py``, ``grounding_experiments.py``, ``demo_pretraining.py``) and
import these modules.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from specs_metric.evaluation.intrinsic import run_intrinsic
from specs_metric.evaluation.sdci import read_sdci
from specs_metric.evaluation.stats import kendall_tau, pairwise_accuracy
from specs_metric.io.jsonio import read_jsonl
from specs_metric.io.reading import read_parquet
from specs_metric.io.writing import atomic_write, copy_file, write_text
from specs_metric.models.model import LongCLIP, ModelConfig
from specs_metric.models.weights.checkpoint import read_state_dict, save_state_dict
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.scoring.scorer import load
from specs_metric.synth.world import COLOUR_NAMES, SHAPES, SIZES, TEXTURES, Scene
from specs_metric.synth.writer import generate
from specs_metric.training import TrainConfig, train

DEMO_FILES = {"specs": "specs-synth-demo.safetensors", "baseline": "clip-synth-demo.safetensors"}
# Examples come from a seed far from any seed the replication trains on.
EXAMPLE_SEED_OFFSET = 1_000_003
CONTEXT = 248
CELLS = 9
CELL_CLASSES = (len(COLOUR_NAMES) + 1, len(SHAPES), len(SIZES), len(TEXTURES))


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
    precision: str = "bf16"  # autocast; weights and the loss stay fp32
    # weight decay and the specificity objective: the trainer's (the released recipe)
    weight_decay: float = TrainConfig.weight_decay
    lambda_detail: float = TrainConfig.lambda_detail
    lambda_neg: float = TrainConfig.lambda_neg
    margin: float = TrainConfig.margin

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


def training_table(data: Path, out: Path) -> Path:
    """The train split as a training table (``caption`` = the full description)."""
    source = data / "train.parquet"
    table = read_parquet(source)
    if "caption" in table.column_names:
        return source
    captions = table.column("captions").to_pylist()
    table = table.append_column("caption", pa.array([c[-1] for c in captions], pa.string()))
    with atomic_write(out, "wb") as fh:
        pq.write_table(table, fh)
    return out


def train_model(
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
    """Train ``init`` on the table with the package's trainer (CPU); (model file, seconds)."""
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
        out[arm] = train_model(
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


def evaluate(model: Path, data: Path) -> dict:
    """Intrinsic rates (test split) and correlation with the graded candidates' F1."""
    scorer = load(str(model), device="cpu")
    rows = read_sdci(data, split="test")
    rates, _ = run_intrinsic(scorer, rows)
    graded = [rec for _, rec in read_jsonl(data / "graded_test.jsonl", objects=True)]
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


def export_model(source: Path, target: Path) -> None:
    """Store a trained model as fp16 safetensors (the loader upcasts to fp32)."""
    state = read_state_dict(source)
    save_state_dict({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, target)
    target.chmod(0o644)  # package data: readable by every user of the installation


def write_examples(settings: Settings, work: Path, target: Path, n_scenes: int = 5) -> None:
    """Regenerate ``examples/``: scenes of an unseen seed with three captions each."""
    fresh = work / "examples-data"
    generate(
        fresh,
        n=n_scenes,
        seed=settings.seed + EXAMPLE_SEED_OFFSET,
        image_size=settings.image_size,
        test_fraction=1.0,
        graded_per_scene=0,
    )
    rows = read_parquet(fresh / "test.parquet").to_pylist()
    images = target / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    lines = []
    for i, row in enumerate(rows):
        name = f"scene{i + 1}.png"
        copy_file(fresh / row["image"], images / name)
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
    write_text(target / "captions.jsonl", "\n".join(lines) + "\n")


def export_demo(models: dict[str, Path], out: Path, settings: Settings, work: Path) -> Path:
    """Write the demo pair into ``out``: ``specs-synth-demo.safetensors`` (from
    ``models["specs"]``), ``clip-synth-demo.safetensors`` (``models["baseline"]``) and
    ``examples/`` (scenes of an unseen seed with three captions each). Returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for arm, name in DEMO_FILES.items():
        export_model(models[arm], out / name)
    write_examples(settings, work, out / "examples")
    return out


def cell_labels(row: dict) -> tuple[torch.Tensor, int]:
    """Per cell (colour or empty, shape, size, texture; -100 = no object) and background."""
    scene = json.loads(row["scene"])
    labels = torch.full((CELLS, 4), -100, dtype=torch.long)
    labels[:, 0] = len(COLOUR_NAMES)  # empty
    for o in scene["objects"]:
        labels[o["cell"]] = torch.tensor(
            [
                COLOUR_NAMES.index(o["colour"]),
                SHAPES.index(o["shape"]),
                SIZES.index(o["size"]),
                TEXTURES.index(o["texture"]),
            ]
        )
    return labels, COLOUR_NAMES.index(scene["background"])


def parse_head(model: LongCLIP) -> torch.nn.Linear:
    """Linear scene parser on the image embedding (per-cell classes, then the background)."""
    return torch.nn.Linear(model.config.embed_dim, CELLS * sum(CELL_CLASSES) + len(COLOUR_NAMES))


def parse_loss(out: torch.Tensor, cells: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the parse head's output ``out`` against the scene labels."""
    width = sum(CELL_CLASSES)
    per_cell = out[:, : CELLS * width].reshape(len(out), CELLS, width)
    loss = F.cross_entropy(out[:, CELLS * width :], background)
    offset = 0
    for j, n in enumerate(CELL_CLASSES):
        logits = per_cell[..., offset : offset + n].reshape(-1, n)
        loss = loss + F.cross_entropy(logits, cells[..., j].reshape(-1))
        offset += n
    return loss


def segments(row: dict) -> tuple[list[str], list[str | None]]:
    """True segment ``k`` of a scene and the false segment of its negative ``n_k``."""
    c, negs = row["captions"], row["neg_captions"]
    true = [c[0]] + [c[k][len(c[k - 1]) + 1 :] for k in range(1, len(c))]
    false = [None] + [negs[k - 1][len(c[k - 1]) + 1 :] for k in range(1, len(c))]
    return true, false


def token_batch(texts: list[str]) -> torch.Tensor:
    """Token ids of ``texts``, cut to the context with EOT last (the tokenizer's truncation),
    padded to the longest row only."""
    ids = default_tokenizer()(texts, CONTEXT)
    width = int((ids != 0).any(dim=0).nonzero().max()) + 1  # every row ends with EOT
    return ids[:, :width]
