"""Pre-training the demo models' starting point at scale (run Q's recipe, on a GPU).

docs/synthetic-replication.md shows that tiny models ground single facts only with far more
data and steps than the replication's 15 CPU minutes allow (run Q: 19,600 scenes, 37 min).
This script runs the same recipe, sized for an accelerator:

* ``prepare``: generates ``--shards`` synthetic worlds in parallel (seeds ``1000 + j``,
  train split only: no held-out colour-shape pair) and one evaluation world (seed 999, test
  split), and stores pixels (uint8), scene labels and tokenized segments in one file.
  Captions are cumulative, and the tokenizer works word by word, so the tokens of ``c_k``
  are the tokens of its ``k + 1`` segments in a row; ``prepare`` checks that against the
  tokenizer on the first scenes of every world.
* ``train --variant V``: from random weights, a supervised scene-parsing phase for the image
  tower (``--parse-share`` of the time), then the symmetric CLIP loss on (image, full
  description) plus the sentence-level grounding loss (true segment vs the false segment of
  its negative, and optionally in-batch: each true segment picks its image), for
  ``--minutes`` in all, with a cosine schedule over time. Every ``--eval-every`` seconds it
  prints the intrinsic rates (README) of the evaluation world and saves the model (fp16
  safetensors) to ``--save``.

The models it writes are starting points: ``grounding_experiments.py finetune --init``
fine-tunes them into the demo pair (contrastive twin and SPECS).

Usage (one GPU; three variants share it):
    python benchmarks/demo_pretraining.py prepare --out /tmp/demo --scenes-per-shard 6250 \\
        --shards 16 --workers 12
    python benchmarks/demo_pretraining.py train --data /tmp/demo/world.pt --variant q \\
        --minutes 5 --device cuda --save out/q.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from specs_metric.bench.intrinsic import image_rates
from specs_metric.checkpoint import save_state_dict
from specs_metric.model import LongCLIP
from specs_metric.synth import generate
from specs_metric.synth.pretrain import Settings, cell_labels, parse_head, parse_loss, segments
from specs_metric.tokenizer import EOT_ID, SOT_ID, default_tokenizer
from specs_metric.training.loss import clip_loss
from specs_metric.transform import MEAN, STD, open_image, preprocess

CONTEXT = 248
EVAL_SEED, EVAL_SCENES, FIRST_SEED = 999, 300, 1000


@dataclass(frozen=True)
class Variant:
    """Model shape (beyond the replication's) and grounding losses of one run."""

    vision_width: int = 128
    vision_layers: int = 2
    text_layers: int = 2
    pairs: int = 4  # true/false segment pairs per image
    in_batch: float = 0.0  # weight of the in-batch segment-to-image loss
    lr: float = 1e-3


VARIANTS = {
    "q": Variant(),  # run Q's losses and the replication's shape (bundle size unchanged)
    "qi": Variant(pairs=8, in_batch=1.0),
    "wide": Variant(vision_width=256, vision_layers=4, text_layers=4, pairs=8, in_batch=1.0),
}


# ----------------------------------------------------------------------------- prepare


def _world_arrays(root: Path, seed: int, n: int, split: str, check: int = 5) -> dict:
    """Generate one world and return its scenes as arrays (see :func:`prepare`)."""
    generate(root, n=n, seed=seed, test_fraction=1.0 if split == "test" else 0.0)
    rows = pq.read_table(root / f"{split}.parquet").to_pylist()
    tok = default_tokenizer()
    pixels = np.stack([np.asarray(open_image(str(root / r["image"])).convert("RGB")) for r in rows])
    tokens: list[int] = []
    seg_start, true_first, false_first, n_segs = [0], [], [], []
    for row in rows:
        true, false = segments(row)
        true_first.append(len(seg_start) - 1)
        n_segs.append(len(true))
        for seg in true:
            tokens += tok.encode(seg)
            seg_start.append(len(tokens))
        false_first.append(len(seg_start) - 1)
        for seg in false[1:]:
            tokens += tok.encode(seg)
            seg_start.append(len(tokens))
    labels = [cell_labels(r) for r in rows]
    out = {
        "pixels": torch.from_numpy(pixels),
        "tokens": torch.tensor(tokens, dtype=torch.int32),
        "seg_start": torch.tensor(seg_start, dtype=torch.int64),
        "true_first": torch.tensor(true_first, dtype=torch.int64),
        "false_first": torch.tensor(false_first, dtype=torch.int64),
        "n_segs": torch.tensor(n_segs, dtype=torch.int64),
        "cells": torch.stack([lab[0] for lab in labels]),
        "background": torch.tensor([lab[1] for lab in labels]),
    }
    world = World(out)
    for i, row in enumerate(rows[:check]):  # concatenated segments == tokenizer of the text
        for k, caption in enumerate(row["captions"]):
            assert world.chain(i, k).tolist() == tok.token_ids(caption)[:CONTEXT], (seed, i, k)
            if k:
                neg = tok.token_ids(row["neg_captions"][k - 1])[:CONTEXT]
                assert world.negative(i, k).tolist() == neg, (seed, i, k)
    pixel_check = preprocess(open_image(str(root / rows[0]["image"])).convert("RGB"), 64)
    assert torch.allclose(normalize(out["pixels"][:1])[0], pixel_check, atol=1e-6)
    return out


def _shard(job: tuple[int, int, str]) -> dict:
    seed, n, split = job
    with tempfile.TemporaryDirectory() as tmp:
        return _world_arrays(Path(tmp), seed, n, split)


def merge(parts: list[dict]) -> dict:
    """Concatenate worlds, shifting token and segment offsets."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in parts[0]}
    tokens = segs = 0
    for part in parts:
        for k, v in part.items():
            if k == "seg_start":
                v = (v if not out[k] else v[1:]) + tokens
            elif k in ("true_first", "false_first"):
                v = v + segs
            out[k].append(v)
        tokens += len(part["tokens"])
        segs += len(part["seg_start"]) - 1
    return {k: torch.cat(v) for k, v in out.items()}


def prepare(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    jobs = [(FIRST_SEED + j, args.scenes_per_shard, "train") for j in range(args.shards)]
    jobs.append((EVAL_SEED, EVAL_SCENES, "test"))
    with ProcessPoolExecutor(args.workers) as pool:
        parts = list(pool.map(_shard, jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"train": merge(parts[:-1]), "eval": parts[-1]}
    torch.save(data, args.out / "world.pt")
    n = len(data["train"]["pixels"])
    print(f"prepared {n} train scenes in {time.perf_counter() - start:.0f} s", flush=True)


# ----------------------------------------------------------------------------- data


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the model's normalized input; equals ``preprocess`` for
    images already at the model's size (``prepare`` checks one)."""
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class World:
    """Token sequences of one prepared world (segment ``k`` of scene ``i`` is true)."""

    def __init__(self, data: dict) -> None:
        self.tokens = data["tokens"].numpy()
        self.seg_start = data["seg_start"].numpy()
        self.true_first = data["true_first"].numpy()
        self.false_first = data["false_first"].numpy()
        self.n_segs = data["n_segs"].numpy()

    def _wrap(self, *pieces: np.ndarray) -> np.ndarray:
        body = np.concatenate(pieces)[: CONTEXT - 2]
        return np.concatenate([[SOT_ID], body, [EOT_ID]]).astype(np.int64)

    def _span(self, first: int, last: int) -> np.ndarray:
        return self.tokens[self.seg_start[first] : self.seg_start[last]]

    def chain(self, i: int, k: int) -> np.ndarray:
        """``c_{k+1}``: the first ``k + 1`` true segments."""
        first = self.true_first[i]
        return self._wrap(self._span(first, first + k + 1))

    def negative(self, i: int, k: int) -> np.ndarray:
        """``c_k`` followed by the false version of segment ``k`` (k >= 1)."""
        first, bad = self.true_first[i], self.false_first[i] + k - 1
        return self._wrap(self._span(first, first + k), self._span(bad, bad + 1))

    def segment(self, i: int, k: int, true: bool = True) -> np.ndarray:
        s = self.true_first[i] + k if true else self.false_first[i] + k - 1
        return self._wrap(self._span(s, s + 1))


def _fill(starts: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> torch.Tensor:
    """Rows ``[SOT] + tokens[start : start + length] + [EOT]``, zero-padded."""
    rows = np.zeros((len(starts), int(lengths.max()) + 2), dtype=np.int64)
    row = np.repeat(np.arange(len(starts)), lengths)
    col = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows[row, col + 1] = tokens[np.repeat(starts, lengths) + col]
    rows[:, 0] = SOT_ID
    rows[np.arange(len(starts)), lengths + 1] = EOT_ID
    return torch.from_numpy(rows)


class Batches:
    """The training world on the device: every full description and every segment as a
    padded token row, so a step's batch is a gather (no Python loop per caption)."""

    def __init__(self, data: dict, device: torch.device) -> None:
        seg_start = data["seg_start"].numpy()
        tokens = data["tokens"].numpy().astype(np.int64)
        seg_len = np.diff(seg_start)
        assert seg_len.max() + 2 <= CONTEXT
        self.segments = _fill(seg_start[:-1], seg_len, tokens).to(device)
        self.segment_len = torch.from_numpy(seg_len + 2).to(device)
        first, n = data["true_first"].numpy(), data["n_segs"].numpy()
        start = seg_start[first]
        full_len = np.minimum(seg_start[first + n] - start, CONTEXT - 2)
        self.full = _fill(start, full_len, tokens).to(device)
        self.full_len = torch.from_numpy(full_len + 2).to(device)
        self.true_first = data["true_first"].to(device)
        self.false_first = data["false_first"].to(device)
        self.n_segs = data["n_segs"].to(device)

    def descriptions(self, idx: torch.Tensor) -> torch.Tensor:
        return self.full[idx, : int(self.full_len[idx].max())]

    def pairs(self, idx: torch.Tensor, per_image: int, generator: torch.Generator):
        """Up to ``per_image`` distinct k >= 1 per image: (true rows, false rows, owner)."""
        k = torch.arange(int(self.n_segs.max()), device=idx.device)
        valid = (k >= 1) & (k < self.n_segs[idx, None])
        draw = torch.rand(valid.shape, device=idx.device, generator=generator)
        draw = draw.masked_fill(~valid, -1.0)
        score, pick = draw.topk(min(per_image, draw.shape[1]), dim=1)
        owner, slot = (score >= 0).nonzero(as_tuple=True)
        k = pick[owner, slot]
        true = self.true_first[idx[owner]] + k
        false = self.false_first[idx[owner]] + k - 1
        rows = torch.cat([true, false])
        width = int(self.segment_len[rows].max())
        return self.segments[rows, :width], owner


def pad(seqs: list[np.ndarray], device: torch.device) -> torch.Tensor:
    out = np.zeros((len(seqs), max(map(len, seqs))), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out).to(device, non_blocking=True)


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def intrinsic(model: LongCLIP, data: dict, device: torch.device) -> tuple[float, float]:
    """Positive and negative rate (%) of the evaluation world."""
    model.eval()
    world = World(data)
    images = F.normalize(model.encode_image(normalize(data["pixels"].to(device))).float(), dim=-1)
    pos, neg = [], []
    for i in range(len(images)):
        n = int(world.n_segs[i])
        seqs = [world.chain(i, k) for k in range(n)] + [world.negative(i, k) for k in range(1, n)]
        emb = F.normalize(model.encode_text(pad(seqs, device)).float(), dim=-1) @ images[i]
        rates = image_rates(emb[:n].tolist(), emb[n:].tolist())
        if rates.positive is not None:
            pos.append(rates.positive)
            neg.append(rates.negative)
    model.train()
    return 100 * float(np.mean(pos)), 100 * float(np.mean(neg))


def schedule(elapsed: float, budget: float, step: int, warmup: int = 100) -> float:
    return (
        min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
    )


def build(variant: Variant, seed: int) -> LongCLIP:
    settings = replace(
        Settings(seed=seed),
        vision_width=variant.vision_width,
        vision_layers=variant.vision_layers,
        text_layers=variant.text_layers,
    )
    return LongCLIP(settings.model_config()).init_weights(torch.Generator().manual_seed(seed))


def train(args: argparse.Namespace) -> None:
    variant = VARIANTS[args.variant]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = torch.load(args.data, weights_only=True)
    train_data, eval_data = data["train"], data["eval"]
    batches = Batches(train_data, device)
    world = World(train_data)
    for i in range(3):  # the gathered rows are the scenes' token sequences
        n = int(world.n_segs[i])
        full = batches.full[i, : int(batches.full_len[i])].tolist()
        assert full == world.chain(i, n - 1).tolist()
        s = int(world.false_first[i])
        assert (
            batches.segments[s, : int(batches.segment_len[s])].tolist()
            == world.segment(i, 1, true=False).tolist()
        )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pixels = train_data["pixels"].to(device)
    cells, background = train_data["cells"].to(device), train_data["background"].to(device)
    n_scenes = len(pixels)
    model = build(variant, args.seed).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history: list[dict] = []
    budget = args.minutes * 60
    start = time.perf_counter()

    def report(phase: str, step: int) -> None:
        positive, negative = intrinsic(model, eval_data, device)
        elapsed = time.perf_counter() - start
        history.append(
            {
                "phase": phase,
                "step": step,
                "seconds": round(elapsed),
                "positive": round(positive, 1),
                "negative": round(negative, 1),
            }
        )
        print(
            f"[{args.variant}] {phase} step {step} {elapsed:.0f}s: positive {positive:.1f} "
            f"negative {negative:.1f}",
            flush=True,
        )
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().half().cpu() for k, v in model.state_dict().items()}
            save_state_dict(state, args.save)
            args.save.with_suffix(".json").write_text(
                json.dumps(
                    {
                        "variant": args.variant,
                        **vars(variant),
                        "scenes": n_scenes,
                        "history": history,
                    },
                    indent=1,
                )
            )

    # Phase 1: the image tower learns to parse scenes.
    head = parse_head(model).to(device)
    params = list(model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=variant.lr, weight_decay=0.01)
    parse_budget, step = budget * args.parse_share, 0
    while (elapsed := time.perf_counter() - start) < parse_budget:
        for group in opt.param_groups:
            group["lr"] = variant.lr * schedule(elapsed, parse_budget, step)
        idx = torch.from_numpy(rng.choice(n_scenes, args.batch, replace=False)).to(device)
        with autocast:
            out = head(model.encode_image(normalize(pixels[idx])))
        loss = parse_loss(out.float(), cells[idx], background[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            print(
                f"[{args.variant}] parse {step} {elapsed:.0f}s loss {loss.item():.3f}", flush=True
            )
    report("parse", step)
    last_eval = time.perf_counter()

    # Phase 2: CLIP loss + sentence-level grounding.
    opt = torch.optim.AdamW(model.parameters(), lr=variant.lr, weight_decay=0.01)
    phase_start, step, clip_budget = time.perf_counter(), 0, budget - parse_budget
    while (elapsed := time.perf_counter() - phase_start) < clip_budget:
        for group in opt.param_groups:
            group["lr"] = variant.lr * schedule(elapsed, clip_budget, step)
        idx = torch.from_numpy(rng.choice(n_scenes, args.batch, replace=False)).to(device)
        seg_rows, owner = batches.pairs(idx, variant.pairs, generator)
        n_pairs = len(owner)
        with autocast:
            images = F.normalize(model.encode_image(normalize(pixels[idx])).float(), dim=-1)
            texts = F.normalize(model.encode_text(batches.descriptions(idx)).float(), dim=-1)
            segs = F.normalize(model.encode_text(seg_rows).float(), dim=-1)
        scale = model.logit_scale.exp()
        loss_clip = clip_loss(images, texts, scale)
        s_true = scale * (segs[:n_pairs] * images[owner]).sum(-1)
        s_false = scale * (segs[n_pairs:] * images[owner]).sum(-1)
        loss_ground = F.softplus(s_false - s_true).mean()
        if variant.in_batch:
            picks = scale * segs[:n_pairs] @ images.T
            loss_ground = loss_ground + variant.in_batch * F.cross_entropy(picks, owner)
        loss = loss_clip + loss_ground
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % 200 == 0:
            print(
                f"[{args.variant}] {step} {elapsed:.0f}s clip {loss_clip.item():.3f} "
                f"grounding {loss_ground.item():.3f}",
                flush=True,
            )
        if time.perf_counter() - last_eval > args.eval_every:
            report("clip", step)
            last_eval = time.perf_counter()
    report("final", step)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["prepare", "train"])
    p.add_argument("--out", type=Path, help="prepare: output folder")
    p.add_argument("--scenes-per-shard", type=int, default=6250)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--data", type=Path, help="train: the prepared world.pt")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="q")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--parse-share", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path)
    args = p.parse_args(argv)
    {"prepare": prepare, "train": train}[args.command](args)


if __name__ == "__main__":
    main()
