"""Why tiny models do not ground single facts: the experiments of docs/synthetic-replication.md.

Runs K-Q and the two tower probes of that page, on a synthetic world generated here (seed 0).
Each command trains from random weights with the replication's model shape
(``specs_metric.demo.recipe.Settings``) and prints its progress:

* ``pretrain``: the package's grounded pre-training on the CPU
  (:func:`specs_metric.demo.grounding.pretrain_grounded`): contrastive pre-training on
  (image, full description) plus, with ``--grounding W``, a sentence-level loss: for each
  image ``--pairs`` of its true segments ``s_k`` and the false segments of its negatives
  ``n_k`` (from ``neg_captions``),
  ``softplus(s(false) - s(true))`` on logit-scaled cosines; ``--in-batch W`` adds a loss
  asking each true segment to pick its image among the batch's; ``--vision-parse N`` first
  trains the image tower for N steps to parse scenes from its embedding (per cell: colour or
  empty, shape, size, texture; the background colour). Intrinsic rates (docs/intrinsic.md) of the
  first ``--eval-scenes`` test scenes are printed every ``--eval-every`` steps.
* ``finetune``: the replication's two fine-tuning arms (contrastive baseline and SPECS, 400
  steps of batch 32) from ``--init`` on this world's train split, then each arm and the
  starting model on all test scenes (intrinsic rates and Kendall tau-b, as the replication);
  ``--export-demo DIR`` writes the two arms as the demo pair into DIR.
* ``negatives``: the negative rate of ``--model`` on the test split, broken down by what its
  false detail gets wrong (fact kind; whether the objects it names are in the scene; for
  relations between present objects, the stated relation), parsing each false segment with
  :func:`specs_metric.synth.parse_segment`.
* ``probe-vision``: the image tower with a linear head predicting which colour-shape pairs
  are present (binary cross-entropy), evaluated by the per-image AUC on ``--held-back``
  training-distribution scenes it never trains on.
* ``probe-text``: the text tower with a linear head naming the colour-shape pair of
  ``The <colour> <shape> is small.``

Usage:
    python benchmarks/grounding_experiments.py pretrain --scenes 2000 --grounding 1   # run K
    python benchmarks/grounding_experiments.py pretrain --scenes 20000 --steps 600 \\
        --grounding 1 --vision-parse 1500 --save runs/p.safetensors                    # run P
    python benchmarks/grounding_experiments.py pretrain --scenes 20000 --steps 3000 \
        --grounding 1 --vision-parse 4000 --eval-every 1000 --save runs/q.safetensors  # run Q
    python benchmarks/grounding_experiments.py finetune --scenes 20000 --init runs/q.safetensors
    python benchmarks/grounding_experiments.py negatives --scenes 20000 --model specs-synth-demo
    python benchmarks/grounding_experiments.py probe-vision --scenes 2000 --steps 1500
    python benchmarks/grounding_experiments.py probe-vision --scenes 20000 --steps 1500 \
        --held-back 400
    python benchmarks/grounding_experiments.py probe-text
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from specs_metric.demo.grounding import (
    Batches,
    Recipe,
    head,
    pretrain_grounded,
    world_arrays,
    world_intrinsic,
)
from specs_metric.demo.recipe import (
    DEMO_FILES,
    Settings,
    evaluate,
    export_demo,
    finetune_arms,
    segments,
    token_batch,
    training_table,
)
from specs_metric.evaluation.intrinsic import IntrinsicResult
from specs_metric.models.model import LongCLIP
from specs_metric.models.weights.checkpoint import save_state_dict
from specs_metric.processing.transform import open_image, preprocess
from specs_metric.scoring.scorer import load
from specs_metric.synth import Scene, generate, parse_segment
from specs_metric.synth.world import COLOUR_NAMES, SHAPES

REPO = Path(__file__).resolve().parents[1]
WARMUP = 20  # warm-up updates of the trainer's cosine schedule (lr_factor)

BATCH = 64
TEST_SCENES = 400  # test split size for --scenes >= 2000


def world(root: Path, scenes: int, seed: int) -> Path:
    """The synthetic world with ``scenes`` scenes, 400 of them (at most 20%) test scenes."""
    data = root / f"world-{scenes}-seed{seed}"
    if not (data / "test.parquet").exists():
        generate(data, n=scenes, seed=seed, test_fraction=min(0.2, TEST_SCENES / scenes))
    return data


def load_split(data: Path, split: str) -> tuple[list[dict], torch.Tensor]:
    rows = pq.read_table(data / f"{split}.parquet").to_pylist()
    pixels = [preprocess(open_image(str(data / r["image"])).convert("RGB"), 64) for r in rows]
    return rows, torch.stack(pixels)


def rates_line(label: str, rates: IntrinsicResult) -> str:
    return f"{label}: positive {rates.positive:.1f} negative {rates.negative:.1f}"


def setup(args: argparse.Namespace) -> tuple[np.random.Generator, Path, LongCLIP]:
    """Seeds, the world, and a freshly initialised model of the replication's shape."""
    torch.manual_seed(args.seed)
    model = LongCLIP(Settings().model_config()).init_weights(
        torch.Generator().manual_seed(args.seed)
    )
    return np.random.default_rng(args.seed), world(args.root, args.scenes, args.seed), model


def pretrain(args: argparse.Namespace) -> None:
    """Runs K-Q: the package's grounded pre-training on this world, on the CPU."""
    _, data, model = setup(args)
    batches = Batches(world_arrays(data, "train"), torch.device("cpu"))
    test = head(world_arrays(data, "test"), args.eval_scenes)
    recipe = Recipe(
        pairs=args.pairs, grounding=args.grounding, in_batch=args.in_batch, lr=args.lr,
        warmup=WARMUP,
    )  # fmt: skip

    def report(phase: str, step: int) -> None:
        label = "after parsing" if phase == "parse" else f"step {step}"
        print(rates_line(label, world_intrinsic(model, test)), flush=True)

    pretrain_grounded(
        model,
        batches,
        recipe,
        parse_steps=args.vision_parse,
        steps=args.steps,
        batch=BATCH,
        seed=args.seed,
        eval_every=args.eval_every,
        on_eval=report,
        log_every=50,
    )
    if args.save:
        save_state_dict({k: v.detach() for k, v in model.state_dict().items()}, args.save)


def finetune(args: argparse.Namespace) -> None:
    if args.init is None:
        raise SystemExit("finetune needs --init MODEL")
    data = world(args.root, args.scenes, args.seed)
    lr = "" if args.finetune_lr is None else f"-lr{args.finetune_lr:g}"
    steps = "" if args.finetune_steps is None else f"-steps{args.finetune_steps}"
    batch = "" if args.finetune_batch is None else f"-batch{args.finetune_batch}"
    neg = "" if args.finetune_lambda_neg is None else f"-neg{args.finetune_lambda_neg:g}"
    out = args.root / f"finetune-{args.init.stem}{lr}{steps}{batch}{neg}"
    out.mkdir(parents=True, exist_ok=True)
    table = training_table(data, out / "train_table.parquet")
    settings = Settings(seed=args.seed)
    if args.finetune_lr is not None:
        settings = replace(settings, finetune_lr=args.finetune_lr)
    if args.finetune_steps is not None:
        settings = replace(settings, finetune_steps=args.finetune_steps)
    if args.finetune_batch is not None:
        settings = replace(settings, finetune_batch_size=args.finetune_batch)
    if args.finetune_lambda_neg is not None:
        settings = replace(settings, lambda_neg=args.finetune_lambda_neg)
    arms = finetune_arms(settings, args.init, table, data, out)
    for arm, (model, _) in arms.items():
        print(f"{arm}: {evaluate(model, data)}", flush=True)
    print(f"starting model: {evaluate(args.init, data)}")
    if args.export_demo:
        models = {arm: model for arm, (model, _) in arms.items()}
        export_demo(models, args.export_demo, Settings(seed=args.seed), out)
        print(f"exported {', '.join(DEMO_FILES.values())} and examples/ to {args.export_demo}")


def false_detail_kind(segment: str, scene: Scene) -> str:
    """What a false segment gets wrong: its fact kind, whether the objects it names are in
    the scene, and for relations between present objects the stated relation."""
    fact = parse_segment(segment)
    if fact.kind in ("background", "exists"):
        return fact.kind
    named = [fact.subject] + ([fact.other] if fact.other else [])
    if not all(scene.find(*key) for key in named):
        return f"{fact.kind}, an object absent"
    if fact.kind == "relation":
        return f"relation '{fact.value}', both present"
    return f"{fact.kind}, object present"


def negatives(args: argparse.Namespace) -> None:
    """The negative rate (``s(c_k) > s(n_k)``) by kind of false detail."""
    data = world(args.root, args.scenes, args.seed)
    rows = pq.read_table(data / "test.parquet").to_pylist()
    scorer = load(args.model, device="cpu")
    images, texts, kinds = [], [], []
    for row in rows:
        scene = Scene.from_dict(json.loads(row["scene"]))
        false = segments(row)[1]
        for k in range(1, len(false)):  # n_k pairs with c_k; n_1 does not exist
            images += [str(data / row["image"])] * 2
            texts += [row["captions"][k], row["neg_captions"][k - 1]]
            kinds.append(false_detail_kind(false[k], scene))
    scores = scorer.score(images, texts)
    won = [scores[2 * i] > scores[2 * i + 1] for i in range(len(kinds))]
    wins: dict[str, list[bool]] = {}
    for kind, w in zip(kinds, won, strict=True):
        wins.setdefault(kind, []).append(w)
    print(f"{args.model} on {data} (test split, {len(rows)} scenes)")
    print("| false detail | pairs | negative rate % |\n|---|---:|---:|")
    for kind in sorted(wins):
        print(f"| {kind} | {len(wins[kind])} | {100 * np.mean(wins[kind]):.1f} |")
    print(f"| all | {len(kinds)} | {100 * np.mean(won):.1f} |")


def probe_vision(args: argparse.Namespace) -> None:
    rng, data, model = setup(args)
    rows, pixels = load_split(data, "train")
    index = {pair: i for i, pair in enumerate((c, s) for c in COLOUR_NAMES for s in SHAPES)}
    present = torch.zeros(len(rows), len(index))
    for i, row in enumerate(rows):
        for o in json.loads(row["scene"])["objects"]:
            present[i, index[(o["colour"], o["shape"])]] = 1
    n_train = len(rows) - args.held_back
    held = slice(n_train, None)  # training-distribution scenes never trained on
    head = torch.nn.Linear(model.config.embed_dim, len(index))
    params = list(model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    for step in range(args.steps + 1):
        idx = torch.from_numpy(rng.choice(n_train, BATCH, replace=False))
        logits = head(model.encode_image(pixels[idx]))
        loss = F.binary_cross_entropy_with_logits(logits, present[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            with torch.no_grad():
                scores, truth = head(model.encode_image(pixels[held])), present[held]
            auc = [
                (s[t == 1][:, None] > s[t == 0][None, :]).float().mean().item()
                for s, t in zip(scores, truth, strict=True)
            ]
            print(f"{step} loss {loss.item():.4f} held-back per-image AUC {np.mean(auc):.3f}")


def probe_text(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = LongCLIP(Settings().model_config()).init_weights(
        torch.Generator().manual_seed(args.seed)
    )
    head = torch.nn.Linear(model.config.embed_dim, len(COLOUR_NAMES) * len(SHAPES))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=args.lr)
    for step in range(args.steps + 1):
        colour = rng.integers(len(COLOUR_NAMES), size=BATCH)
        shape = rng.integers(len(SHAPES), size=BATCH)
        texts = [
            f"The {COLOUR_NAMES[c]} {SHAPES[s]} is small."
            for c, s in zip(colour, shape, strict=True)
        ]
        target = torch.from_numpy(colour * len(SHAPES) + shape)
        logits = head(model.encode_text(token_batch(texts)))
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            accuracy = (logits.argmax(-1) == target).float().mean().item()
            print(f"{step} loss {loss.item():.4f} accuracy {accuracy:.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "command", choices=["pretrain", "finetune", "negatives", "probe-vision", "probe-text"]
    )
    p.add_argument("--root", type=Path, default=REPO / "runs" / "grounding", help="world folder")
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grounding", type=float, default=0.0, help="weight of the pair loss")
    p.add_argument("--in-batch", type=float, default=0.0, help="weight of the in-batch loss")
    p.add_argument("--pairs", type=int, default=4, help="true/false segment pairs per image")
    p.add_argument("--vision-parse", type=int, default=0, help="scene-parsing steps first")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-scenes", type=int, default=100)
    p.add_argument("--save", type=Path, help="pretrain: write the model here (safetensors)")
    p.add_argument("--held-back", type=int, default=200, help="probe-vision: scenes held back")
    p.add_argument(
        "--finetune-lr", type=float, help="finetune: learning rate (default: the replication's)"
    )
    p.add_argument(
        "--finetune-steps", type=int, help="finetune: steps (default: the replication's)"
    )
    p.add_argument(
        "--finetune-batch", type=int, help="finetune: batch size (default: the replication's 32)"
    )
    p.add_argument(
        "--finetune-lambda-neg",
        type=float,
        help="finetune: weight of the SPECS arm's negative hinge (default: the recipe's 0.8)",
    )
    p.add_argument(
        "--export-demo",
        type=Path,
        metavar="DIR",
        help="finetune: write both arms as the demo models (fp16) and a fresh examples/ into "
        "DIR (copy them to src/specs_metric/assets/ and examples/ to update the bundle)",
    )
    p.add_argument("--init", type=Path, help="finetune: the pre-trained model")
    p.add_argument("--model", default="specs-synth-demo", help="negatives: the model to break down")
    args = p.parse_args(argv)
    commands = {
        "pretrain": pretrain,
        "finetune": finetune,
        "negatives": negatives,
        "probe-vision": probe_vision,
        "probe-text": probe_text,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
