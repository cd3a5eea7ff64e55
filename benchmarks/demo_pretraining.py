"""Pre-training the demo models' starting point at scale (run Q's recipe, on a GPU).

docs/synthetic-replication.md shows that tiny models ground single facts only with far more
data and steps than the replication's 15 CPU minutes allow (run Q: 19,600 scenes, 37 min).
This script runs the same recipe (:mod:`specs_metric.demo.grounding`), sized for an
accelerator:

* ``prepare``: generates ``--shards`` synthetic worlds in parallel (seeds ``1000 + j``,
  train split only: no held-out colour-shape pair) and one evaluation world (seed 999, test
  split), and stores them as arrays (:func:`~specs_metric.demo.grounding.world_arrays`) in
  one file.
* ``train --variant V``: from random weights, ``--parse-steps`` of scene parsing for the
  image tower, then ``--steps`` of the CLIP loss plus the sentence-level grounding loss
  (:func:`~specs_metric.demo.grounding.pretrain_grounded`; the trainer's warm-up and cosine
  schedule in each phase). After the parsing, every ``--eval-every`` steps and at the end it
  prints the intrinsic rates of the evaluation world and saves the model (fp16
  safetensors) to ``--save``, with its history next to it (``.json``).

The models it writes are starting points: ``grounding_experiments.py finetune --init``
fine-tunes them into the demo pair (contrastive twin and SPECS).

Usage (one GPU; three variants share it):
    python benchmarks/demo_pretraining.py prepare --out /tmp/demo --scenes-per-shard 6250 \\
        --shards 16 --workers 12
    python benchmarks/demo_pretraining.py train --data /tmp/demo/world.pt --variant qi \\
        --parse-steps 5000 --steps 4700 --device cuda --save out/qi.safetensors
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from specs_metric.demo.grounding import (
    VARIANTS,
    Batches,
    merge_worlds,
    pretrain_grounded,
    world_arrays,
    world_intrinsic,
)
from specs_metric.models.weights.checkpoint import save_state_dict
from specs_metric.synth import generate

EVAL_SEED, EVAL_SCENES, FIRST_SEED = 999, 300, 1000


def _shard(job: tuple[int, int, str]) -> dict:
    seed, n, split = job
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), n=n, seed=seed, test_fraction=1.0 if split == "test" else 0.0)
        return world_arrays(Path(tmp), split)


def prepare(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    jobs = [(FIRST_SEED + j, args.scenes_per_shard, "train") for j in range(args.shards)]
    jobs.append((EVAL_SEED, EVAL_SCENES, "test"))
    with ProcessPoolExecutor(args.workers) as pool:
        parts = list(pool.map(_shard, jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"train": merge_worlds(parts[:-1]), "eval": parts[-1]}
    torch.save(data, args.out / "world.pt")
    n = len(data["train"]["pixels"])
    print(f"prepared {n} train scenes in {time.perf_counter() - start:.0f} s", flush=True)


def train(args: argparse.Namespace) -> None:
    recipe = VARIANTS[args.variant]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data = torch.load(args.data, weights_only=True)
    batches = Batches(data["train"], device)
    model = recipe.build(args.seed).to(device)
    history: list[dict] = []
    start = time.perf_counter()

    def report(phase: str, step: int) -> None:
        rates = world_intrinsic(model, data["eval"])
        elapsed = time.perf_counter() - start
        history.append(
            {
                "phase": phase,
                "step": step,
                "seconds": round(elapsed),
                "positive": round(rates.positive, 1),
                "negative": round(rates.negative, 1),
            }
        )
        print(
            f"[{args.variant}] {phase} step {step} {elapsed:.0f}s: positive {rates.positive:.1f} "
            f"negative {rates.negative:.1f}",
            flush=True,
        )
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().half().cpu() for k, v in model.state_dict().items()}
            save_state_dict(state, args.save)
            meta = {"variant": args.variant, **asdict(recipe), "scenes": len(batches)}
            args.save.with_suffix(".json").write_text(
                json.dumps({**meta, "history": history}, indent=1)
            )

    pretrain_grounded(
        model,
        batches,
        recipe,
        parse_steps=args.parse_steps,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        autocast=device.type == "cuda",
        eval_every=args.eval_every,
        on_eval=report,
        log=lambda line: print(f"[{args.variant}] {line}", flush=True),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["prepare", "train"])
    p.add_argument("--out", type=Path, help="prepare: output folder")
    p.add_argument("--scenes-per-shard", type=int, default=6250)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--data", type=Path, help="train: the prepared world.pt")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="q")
    p.add_argument("--parse-steps", type=int, default=5000, help="scene-parsing steps")
    p.add_argument("--steps", type=int, default=4700, help="CLIP + grounding steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=1000, help="steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path)
    args = p.parse_args(argv)
    {"prepare": prepare, "train": train}[args.command](args)


if __name__ == "__main__":
    main()
