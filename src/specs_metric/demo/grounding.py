"""Grounded pre-training: the start the bundled demo models are fine-tuned from.

From random weights, on synthetic worlds (docs/synthetic-replication.md, "Pre-training at
scale on a GPU"):

1. the image tower learns to parse scenes (:func:`~specs_metric.demo.recipe.parse_loss`:
   per cell colour or empty, shape, size, texture; the background);
2. then the symmetric CLIP loss on (image, full description) plus the sentence-level
   grounding loss (:func:`specs_metric.training.loss.grounding_loss`: a true segment
   against the false segment of its negative, and optionally in-batch).

Both phases follow the trainer's warm-up and cosine schedule
(:func:`specs_metric.training.trainer.lr_factor`) over a number of steps.

A world is prepared once into arrays (:func:`world_arrays`, :func:`merge_worlds`): pixels
(uint8), scene labels, and the token ids of every segment in one flat array. Captions are
cumulative and the tokenizer works word by word, so the ids of ``c_k`` are the ids of its
``k + 1`` segments in a row (:func:`world_arrays` checks that against the tokenizer).
:class:`Batches` keeps every description and segment as a padded token row on the device,
so that a step's batch is a gather. :func:`world_intrinsic` measures the intrinsic rates
(:mod:`specs_metric.evaluation.intrinsic`) of a prepared world.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from specs_metric.demo.recipe import Settings, cell_labels, parse_head, parse_loss, segments
from specs_metric.evaluation.intrinsic import IntrinsicResult, intrinsic_rates
from specs_metric.io.reading import read_parquet
from specs_metric.models.model import LongCLIP
from specs_metric.models.prefix import encode_plain
from specs_metric.processing.tokenizer import (
    EOT_ID,
    SOT_ID,
    default_tokenizer,
    pad_ids,
    truncate_ids,
)
from specs_metric.processing.transform import normalize_pixels, open_image, preprocess
from specs_metric.scoring.scales import cosine_matrix
from specs_metric.training.loss import clip_loss, grounding_loss
from specs_metric.training.recipe import lr_factor

CONTEXT = 248
# keys of a prepared world with one entry per scene (the others index the token array)
PER_SCENE = ("pixels", "true_first", "false_first", "n_segs", "cells", "background")


@dataclass(frozen=True)
class Recipe:
    """Model shape (beyond the replication's), losses and schedule of one pre-training run."""

    vision_width: int = 128
    vision_layers: int = 2
    text_layers: int = 2
    pairs: int = 4  # true/false segment pairs per image
    grounding: float = 1.0  # weight of the pair loss (0 with in_batch 0: CLIP loss only)
    in_batch: float = 0.0  # weight of the in-batch segment-to-image loss
    lr: float = 1e-3
    warmup: int = 100  # warm-up updates of each phase
    weight_decay: float = 0.01

    def build(self, seed: int) -> LongCLIP:
        """A freshly initialised model of the replication's shape, widened as the recipe says."""
        settings = replace(
            Settings(seed=seed),
            vision_width=self.vision_width,
            vision_layers=self.vision_layers,
            text_layers=self.text_layers,
        )
        return LongCLIP(settings.model_config()).init_weights(torch.Generator().manual_seed(seed))


VARIANTS = {
    "q": Recipe(),  # run Q's losses and the replication's shape (bundle size unchanged)
    "qi": Recipe(pairs=8, in_batch=1.0),
    "wide": Recipe(vision_width=256, vision_layers=4, text_layers=4, pairs=8, in_batch=1.0),
}


# ----------------------------------------------------------------------------- worlds


def world_arrays(root: Path, split: str, check: int = 5) -> dict[str, torch.Tensor]:
    """The scenes of a generated world's split (``root/<split>.parquet``) as arrays.

    Keys: ``pixels`` (N, H, W, 3) uint8; ``tokens``, the BPE ids of every segment (no
    SOT/EOT) in one array, segment ``s`` at ``tokens[seg_start[s]:seg_start[s + 1]]``; per
    scene ``true_first`` and ``false_first`` (its first true segment and the false segment
    of its first negative), ``n_segs``, ``cells`` and ``background`` (scene labels). The
    first ``check`` scenes are checked against the tokenizer and :func:`preprocess`.
    """
    rows = read_parquet(root / f"{split}.parquet").to_pylist()
    tok = default_tokenizer()
    images = [open_image(str(root / r["image"])).convert("RGB") for r in rows]
    pixels = np.stack([np.asarray(image) for image in images])
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
    _check_world(World(out), rows[:check], images[:1], out["pixels"][:1])
    return out


def _check_world(
    world: World, rows: list[dict], images: list[Image.Image], pixels: torch.Tensor
) -> None:
    """Concatenated segments are the tokenizer's ids of the captions; pixels preprocess."""
    tok = default_tokenizer()
    for i, row in enumerate(rows):
        for k, caption in enumerate(row["captions"]):
            if world.chain(i, k) != truncate_ids(tok.token_ids(caption), CONTEXT):
                raise AssertionError(f"scene {i}: segments of c_{k + 1} differ from its ids")
            if k:
                neg = truncate_ids(tok.token_ids(row["neg_captions"][k - 1]), CONTEXT)
                if world.negative(i, k) != neg:
                    raise AssertionError(f"scene {i}: segments of n_{k} differ from its ids")
    for image, px in zip(images, pixels, strict=True):
        if not torch.allclose(normalize_pixels(px), preprocess(image, px.shape[0]), atol=1e-6):
            raise AssertionError("normalize_pixels differs from preprocess")


def merge_worlds(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate prepared worlds, shifting token and segment offsets."""
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


def head(data: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` scenes of a prepared world."""
    return {k: v[:n] if k in PER_SCENE else v for k, v in data.items()}


class World:
    """Token ids of the captions of a prepared world (segment ``k`` of scene ``i`` is true),
    with SOT and EOT, cut to the context by
    :func:`~specs_metric.processing.tokenizer.truncate_ids`."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.tokens = data["tokens"].numpy()
        self.seg_start = data["seg_start"].numpy()
        self.true_first = data["true_first"].numpy()
        self.false_first = data["false_first"].numpy()
        self.n_segs = data["n_segs"].numpy()

    def __len__(self) -> int:
        return len(self.n_segs)

    def _ids(self, *spans: tuple[int, int]) -> list[int]:
        pieces = [self.tokens[self.seg_start[a] : self.seg_start[b]] for a, b in spans]
        body = np.concatenate(pieces).tolist()
        return truncate_ids([SOT_ID, *body, EOT_ID], CONTEXT)

    def chain(self, i: int, k: int) -> list[int]:
        """``c_{k+1}``: the first ``k + 1`` true segments."""
        first = int(self.true_first[i])
        return self._ids((first, first + k + 1))

    def negative(self, i: int, k: int) -> list[int]:
        """``n_k``: ``c_k`` followed by the false version of segment ``k`` (k >= 1)."""
        first, bad = int(self.true_first[i]), int(self.false_first[i]) + k - 1
        return self._ids((first, first + k), (bad, bad + 1))

    def segment(self, i: int, k: int, true: bool = True) -> list[int]:
        """Segment ``k`` of scene ``i`` alone (its false version for ``true=False``)."""
        s = int(self.true_first[i]) + k if true else int(self.false_first[i]) + k - 1
        return self._ids((s, s + 1))


def _segment_rows(starts: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> torch.Tensor:
    """Rows ``[SOT] + tokens[start : start + length] + [EOT]``, zero-padded (no Python loop
    per segment: a world holds millions of them)."""
    rows = np.zeros((len(starts), int(lengths.max()) + 2), dtype=np.int64)
    row = np.repeat(np.arange(len(starts)), lengths)
    col = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows[row, col + 1] = tokens[np.repeat(starts, lengths) + col]
    rows[:, 0] = SOT_ID
    rows[np.arange(len(starts)), lengths + 1] = EOT_ID
    return torch.from_numpy(rows)


class Batches:
    """A prepared world on the device: pixels, labels, every full description and every
    segment as a padded token row, so that a step's batch is a gather."""

    def __init__(self, data: dict[str, torch.Tensor], device: torch.device) -> None:
        world = World(data)
        seg_start = data["seg_start"].numpy()
        seg_len = np.diff(seg_start)
        if seg_len.max() + 2 > CONTEXT:
            raise ValueError(f"a segment is longer than the context ({CONTEXT} ids)")
        tokens = data["tokens"].numpy().astype(np.int64)
        self.segments = _segment_rows(seg_start[:-1], seg_len, tokens).to(device)
        self.segment_len = torch.from_numpy(seg_len + 2).to(device)
        full = [world.chain(i, int(world.n_segs[i]) - 1) for i in range(len(world))]
        self.full = pad_ids(full).to(device)
        self.full_len = torch.tensor([len(ids) for ids in full], device=device)
        self.true_first = data["true_first"].to(device)
        self.false_first = data["false_first"].to(device)
        self.n_segs = data["n_segs"].to(device)
        self.pixels = data["pixels"].to(device)
        self.cells = data["cells"].to(device)
        self.background = data["background"].to(device)

    def __len__(self) -> int:
        return len(self.n_segs)

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(self.pixels[idx])

    def descriptions(self, idx: torch.Tensor) -> torch.Tensor:
        return self.full[idx, : int(self.full_len[idx].max())]

    def pairs(
        self, idx: torch.Tensor, per_image: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``per_image`` distinct k >= 1 per image: (true rows then false rows, owner)."""
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


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def world_intrinsic(model: LongCLIP, data: dict[str, torch.Tensor]) -> IntrinsicResult:
    """Intrinsic rates of a prepared world, each caption encoded on its own."""
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    world = World(data)
    images = model.encode_image(normalize_pixels(data["pixels"].to(device)))
    captions, negatives = [], []
    for i in range(len(world)):
        n = int(world.n_segs[i])
        seqs = [world.chain(i, k) for k in range(n)] + [world.negative(i, k) for k in range(1, n)]
        cos = cosine_matrix(images[i : i + 1], encode_plain(model, seqs))[0]
        captions.append(cos[:n])
        negatives.append(cos[n:])
    model.train(was_training)
    return intrinsic_rates(captions, negatives)


# ----------------------------------------------------------------------------- training


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@dataclass
class _Run:
    """What both phases of :func:`pretrain_grounded` share."""

    model: LongCLIP
    batches: Batches
    recipe: Recipe
    batch: int
    rng: np.random.Generator
    generator: torch.Generator
    amp: torch.autocast
    log: Callable[[str], None]
    log_every: int
    start: float

    def draw(self) -> torch.Tensor:
        """The scenes of one step, drawn without replacement."""
        idx = self.rng.choice(len(self.batches), self.batch, replace=False)
        return torch.from_numpy(idx).to(self.batches.pixels.device)

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=self.recipe.lr, weight_decay=self.recipe.weight_decay)

    def schedule(self, opt: torch.optim.Optimizer, step: int, steps: int) -> None:
        _set_lr(opt, self.recipe.lr * lr_factor(step + 1, self.recipe.warmup, steps))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def parse_phase(self, steps: int) -> None:
        """The image tower (and a linear head) learn to parse scenes."""
        model, batches = self.model, self.batches
        head = parse_head(model).to(batches.pixels.device)
        opt = self.optimizer(list(model.visual.parameters()) + list(head.parameters()))
        for step in range(steps):
            self.schedule(opt, step, steps)
            idx = self.draw()
            with self.amp:
                out = head(model.encode_image(batches.images(idx)))
            loss = parse_loss(out.float(), batches.cells[idx], batches.background[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % self.log_every == 0:
                self.log(f"parse {step + 1} {self.elapsed():.0f}s loss {loss.item():.3f}")

    def grounded_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLIP loss and the grounding loss of one batch (the latter 0 when off)."""
        model, batches, recipe = self.model, self.batches, self.recipe
        idx = self.draw()
        grounded = bool(recipe.grounding or recipe.in_batch)
        with self.amp:
            images = model.encode_image(batches.images(idx))
            texts = model.encode_text(batches.descriptions(idx))
            if grounded:
                rows, owner = batches.pairs(idx, recipe.pairs, self.generator)
                segs = model.encode_text(rows)
        scale = model.logit_scale.exp()
        loss_clip = clip_loss(images, texts, scale)
        if not grounded:
            return loss_clip, torch.zeros((), device=loss_clip.device)
        true, false = segs[: len(owner)], segs[len(owner) :]
        loss_ground = grounding_loss(
            images, true, false, owner, scale,
            pair_weight=recipe.grounding, in_batch=recipe.in_batch,
        )  # fmt: skip
        return loss_clip, loss_ground

    def grounded_phase(
        self, steps: int, eval_every: int, on_eval: Callable[[str, int], None] | None
    ) -> None:
        """The whole model on the CLIP loss plus the grounding loss."""
        model = self.model
        opt = self.optimizer(list(model.parameters()))
        for step in range(steps):
            self.schedule(opt, step, steps)
            loss_clip, loss_ground = self.grounded_step()
            opt.zero_grad(set_to_none=True)
            (loss_clip + loss_ground).backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if (step + 1) % self.log_every == 0:
                self.log(
                    f"{step + 1} {self.elapsed():.0f}s clip {loss_clip.item():.3f} "
                    f"grounding {loss_ground.item():.3f}"
                )
            if on_eval is not None and eval_every and (step + 1) % eval_every == 0:
                if step + 1 < steps:
                    on_eval("clip", step + 1)


def pretrain_grounded(
    model: LongCLIP,
    batches: Batches,
    recipe: Recipe,
    *,
    parse_steps: int,
    steps: int,
    batch: int,
    seed: int = 0,
    autocast: bool = False,
    eval_every: int = 0,
    on_eval: Callable[[str, int], None] | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 200,
) -> None:
    """Scene parsing for ``parse_steps``, then CLIP + grounding loss for ``steps`` updates.

    Each phase has its own AdamW and the trainer's schedule (``recipe.warmup`` warm-up
    updates, then cosine to 0). ``on_eval(phase, step)`` is called after the parsing
    phase, every ``eval_every`` CLIP steps (0: never) and at the end. ``autocast`` runs the
    towers under bf16 autocast (weights and losses stay fp32).
    """
    device = batches.pixels.device
    run = _Run(
        model, batches, recipe, batch,
        rng=np.random.default_rng(seed),
        generator=torch.Generator(device=device).manual_seed(seed),
        amp=torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
        log=log, log_every=log_every, start=time.perf_counter(),
    )  # fmt: skip
    run.parse_phase(parse_steps)
    if on_eval is not None and parse_steps:
        on_eval("parse", parse_steps)
    run.grounded_phase(steps, eval_every, on_eval)
    if on_eval is not None:
        on_eval("final", steps)
