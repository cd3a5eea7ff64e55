"""Fine-tuning LongCLIP with the specificity objective (or CLIP pre-training).

:func:`train` runs the loop for a :class:`TrainConfig`; ``specs train`` is a thin wrapper.
Defaults are the released SPECS recipe (docs/training.md, "Objective" and "Schedule and
optimisation"): lc = 1, ld = 8, ln = 0.8, adaptive margin, AdamW (lr 1e-5, weight decay
0.01 on every parameter), cosine schedule with 40 warm-up steps, 6 epochs, batch 100 per
process x 4 accumulation steps, mixed precision.

Behaviour worth knowing (see docs/training.md):

- Learning rate: warm-up, then cosine (:func:`~specs_metric.training.recipe.lr_factor`).
- Each micro-batch loss is divided by ``grad_accum`` (also in the shorter last group of an
  epoch, as in the reference); the adaptive margin is updated per micro-batch.
- With several processes the embeddings of all ranks are gathered (with gradient) so the
  loss is that of the global batch; ``gather=False`` computes it per process instead.
- ``positional_embedding`` is frozen when the initial checkpoint is an OpenAI CLIP one
  (stretched to 248 positions, as LongCLIP training does) and trained otherwise (the
  reference fine-tunes every parameter of a LongCLIP checkpoint).

What a run is asked to do (:class:`TrainConfig`) and the schedule are in
:mod:`specs_metric.training.recipe`, the run's RNG state and checkpoint layout in
:mod:`specs_metric.training.state`, its logs in :mod:`specs_metric.training.logs`. What is
left is the loop itself: one :class:`Trainer` whose setup, step, checkpointing and resuming
share its state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from specs_metric.errors import TrainError
from specs_metric.io.writing import copy_file, write_text
from specs_metric.models.config import config_metadata
from specs_metric.models.factory import model_from_checkpoint
from specs_metric.models.weights.checkpoint import save_state_dict, write_torch
from specs_metric.models.weights.loading import read_checkpoint
from specs_metric.runtime.distributed import DistInfo, gather_with_grad, init_from_env
from specs_metric.runtime.policy import resolve_device, resolve_training_autocast
from specs_metric.training.data import (
    ResumableSampler,
    SpecificityDataset,
    check_images_readable,
    collate_examples,
)
from specs_metric.training.logs import LOG_COLUMNS, CsvLog, tensorboard_writer
from specs_metric.training.loss import LossOutput, SpecificityLoss, clip_loss
from specs_metric.training.recipe import TrainConfig, lr_factor
from specs_metric.training.state import (
    CHECKPOINT_DIR,
    STATE_FILE,
    find_checkpoints,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)

MODEL_FILES = ("model.pt", "model.safetensors")


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    output: Path
    final_checkpoint: Path
    steps: int
    skipped_images: int
    log_file: Path


# ----------------------------------------------------------------------------- helpers


def _resolve_resume(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = find_checkpoints(config.output)
        if not found:
            raise TrainError(
                f"--resume latest: no checkpoint under {Path(config.output) / CHECKPOINT_DIR}"
            )
        return found[-1]
    path = Path(config.resume)
    if path.is_file():
        path = path.parent
    if not (path / STATE_FILE).is_file():
        raise TrainError(f"--resume {config.resume}: no {STATE_FILE} in {path}")
    return path


def _autocast(precision: str, device: torch.device):
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """One training run; :func:`train` is the usual entry point."""

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        self.config = config
        device = resolve_device(config.device)
        self.dist: DistInfo = init_from_env(device)
        if self.dist.enabled and self.dist.backend == "nccl":
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.precision = resolve_training_autocast(config.precision, self.device)
        self.output = Path(config.output)
        self.is_main = self.dist.is_main
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        seed_everything(config.seed)

        # The shared loading path: names, files and HF folders; 77-position CLIP models
        # are stretched to 248 positions there.
        init = read_checkpoint(config.init, arch=config.arch, longclip=True)
        from_clip = init.stretched
        self.model = model_from_checkpoint(init, reference_rounding=False)
        self.model.train().to(self.device)
        freeze = from_clip if config.freeze_positional is None else config.freeze_positional
        self.model.positional_embedding.requires_grad_(not freeze)

        self.dataset = SpecificityDataset(
            config.data,
            resolution=self.model.config.image_resolution,
            context_length=self.model.context_length,
            details=config.objective == "specs",
            seed=config.seed,
            image_root=config.image_root,
        )
        check_images_readable(self.dataset)
        self.sampler = ResumableSampler(
            self.dataset, self.dist.world_size, self.dist.rank, config.seed
        )
        self.batches_per_epoch = math.ceil(self.sampler.num_samples / config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs

        self.ddp = (
            DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.dist.enabled
            else None
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        warmup, total = config.warmup_steps, self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: lr_factor(n + 1, warmup, total)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.loss_fn = SpecificityLoss(
            config.lambda_contrast, config.lambda_detail, config.lambda_neg, config.margin
        )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_images = 0
        if self.is_main:
            trainable = sum(p.numel() for p in params)
            log.info(
                "%s: %s; %d trainable parameters%s; %d rows; %d updates of %d x %d x %d "
                "examples; %s on %s",
                config.init, self.model.config, trainable,
                " (positional_embedding frozen)" if freeze else "", len(self.dataset),
                self.total_steps, self.dist.world_size, config.batch_size, config.grad_accum,
                self.precision, self.device,
            )

    # -- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_images": self.skipped_images,
            "world_size": self.dist.world_size,
            "batch_size": self.config.batch_size,
            "rng": rng_state(),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N/{model.pt, model.safetensors, trainer_state.pt}``."""
        final = self.output / CHECKPOINT_DIR / f"step-{self.step}"
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        weights = {k: v.detach().float() if v.is_floating_point() else v
                   for k, v in self.model.state_dict().items()}
        # The safetensors copy records the architecture (activation, head widths).
        metadata = config_metadata(self.model.config)
        for name in MODEL_FILES:
            save_state_dict(weights, tmp / name, metadata=metadata)
        write_torch(self.state_dict(), tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def load_checkpoint(self, path: Path) -> None:
        from specs_metric.models.weights.checkpoint import load_weights_only, read_state_dict

        state = load_weights_only(path / STATE_FILE, "trainer state")
        needed = ("world_size", "batch_size", "optimizer", "scheduler", "scaler", "loss", "step",
                  "epoch", "batch_in_epoch", "skipped_images", "rng")  # fmt: skip
        if not isinstance(state, dict) or any(k not in state for k in needed):
            raise TrainError(f"--resume {path}: {STATE_FILE} is not a trainer state")
        if (state["world_size"] * state["batch_size"]
                != self.dist.world_size * self.config.batch_size):
            raise TrainError(
                f"--resume {path}: saved with global batch {state['world_size']} x "
                f"{state['batch_size']}, now {self.dist.world_size} x {self.config.batch_size}"
            )
        weights = read_state_dict(path / MODEL_FILES[0])
        try:  # torch reports a state of another model or objective as RuntimeError/ValueError
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.loss_fn.load_state_dict(state["loss"])
        except (RuntimeError, ValueError, KeyError) as exc:
            message = " ".join(str(exc).split())[:300]
            raise TrainError(
                f"--resume {path}: the checkpoint does not fit this run's model or settings "
                f"({message})"
            ) from exc
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.skipped_images = state["skipped_images"]
        set_rng_state(state["rng"])

    # -- one micro-batch ----------------------------------------------------------------

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist.enabled and self.config.gather:
            return gather_with_grad(tensor)
        return tensor

    def _forward(self, batch) -> LossOutput:
        pixels = batch.pixels.to(self.device, non_blocking=True)
        fields = list(batch.tokens)
        tokens = torch.cat([batch.tokens[f] for f in fields]).to(self.device, non_blocking=True)
        model = self.ddp or self.model
        with _autocast(self.precision, self.device):
            image, text = model(pixels, tokens)
        texts = dict(zip(fields, text.chunk(len(fields)), strict=True))
        image = self._gather(image)
        texts = {f: self._gather(t) for f, t in texts.items()}
        scale = self.model.logit_scale.exp()
        if self.config.objective == "clip":
            loss = clip_loss(image, texts["caption"], scale)
            zero = loss.new_zeros(())
            return LossOutput(loss, loss, zero, zero, 0.0, 0.0, 0.0)
        return self.loss_fn(
            image, texts["caption"], texts["base"], texts["detail"], texts["negative"], scale
        )

    def _all_sum(self, value: int) -> int:
        if not self.dist.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self._collective_device())
        dist.all_reduce(t)
        return int(t)

    def _collective_device(self) -> torch.device:
        return self.device if self.dist.backend == "nccl" else torch.device("cpu")

    # -- the run ------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.config.batch_size,
            sampler=self.sampler,
            num_workers=self.config.workers,
            collate_fn=collate_examples,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def run(self, on_checkpoint: Callable[[int, Path], None] | None = None) -> TrainResult:
        config = self.config
        resume_from = _resolve_resume(config)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_text(
                self.output / "config.json", json.dumps(dataclasses.asdict(config), indent=2)
            )
        csv_log = CsvLog(self.output / "train_log.csv", self.step if resume_from else None) \
            if self.is_main else None
        board = tensorboard_writer(self.output, config.tensorboard) if self.is_main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not (self.is_main and config.progress))
        self._saved_step = self.step if resume_from else None
        started = time.time()
        try:
            while self.step < self.total_steps:
                if self.batch_in_epoch >= self.batches_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                self._run_epoch(csv_log, board, bar, started, on_checkpoint)
                if self.step >= self.total_steps:
                    break
            if self._saved_step != self.step:
                self._checkpoint(on_checkpoint)
        finally:
            bar.close()
            if csv_log:
                csv_log.close()
            if board:
                board.close()
        final = self.output / CHECKPOINT_DIR / f"step-{self.step}"
        if self.is_main:
            for name in MODEL_FILES:
                copy_file(final / name, self.output / name)
        if self.dist.enabled:
            dist.barrier()
        return TrainResult(self.output, self.output / MODEL_FILES[0], self.step,
                           self.skipped_images, self.output / "train_log.csv")

    def _checkpoint(self, on_checkpoint) -> None:
        if self.is_main:
            path = self.save_checkpoint()
            if on_checkpoint is not None:
                on_checkpoint(self.step, path)
        if self.dist.enabled:
            dist.barrier()
        self._saved_step = self.step

    def _run_epoch(self, csv_log, board, bar, started, on_checkpoint) -> None:
        config = self.config
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_position(self.batch_in_epoch * config.batch_size)
        sums: dict[str, float] = {}
        micro = 0
        images = 0
        for batch in self._loader():
            self.batch_in_epoch += 1
            last_of_group = (
                self.batch_in_epoch % config.grad_accum == 0
                or self.batch_in_epoch == self.batches_per_epoch
            )
            self.skipped_images += self._all_sum(batch.skipped)
            if self._all_sum(int(len(batch) == 0)):
                log.warning("micro-batch without decodable images skipped on some rank")
            else:
                sync = self.ddp is None or last_of_group
                context = nullcontext() if sync else self.ddp.no_sync()
                with context:
                    out = self._forward(batch)
                    self.scaler.scale(out.total / config.grad_accum).backward()
                for key, value in out.scalars().items():
                    sums[key] = sums.get(key, 0.0) + value
                micro += 1
                images += self._all_sum(len(batch))
            if not last_of_group:
                continue
            lr = self.optimizer.param_groups[0]["lr"]
            if micro:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            row = {k: v / max(micro, 1) for k, v in sums.items()}
            row.update(
                step=self.step, epoch=self.epoch, lr=lr, margin=float(self.loss_fn.running_margin)
                if config.margin == 0 else config.margin,
                logit_scale=float(self.model.logit_scale.detach().exp()), images=images,
                skipped_images=self.skipped_images, seconds=round(time.time() - started, 3),
            )
            if config.objective == "clip":
                row["margin"] = 0.0
            self._log(row, csv_log, board, bar)
            sums, micro, images = {}, 0, 0
            if config.save_every and self.step % config.save_every == 0:
                self._checkpoint(on_checkpoint)
            if self.step >= self.total_steps:
                return

    def _log(self, row: dict, csv_log, board, bar) -> None:
        if not self.is_main:
            return
        row = {k: row.get(k, 0.0) for k in LOG_COLUMNS}
        csv_log.write(row)
        if board is not None:
            for key in LOG_COLUMNS[2:-1]:
                board.add_scalar(f"train/{key}", row[key], row["step"])
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['margin']:.3f}")


def train(
    config: TrainConfig, on_checkpoint: Callable[[int, Path], None] | None = None
) -> TrainResult:
    """Run training as configured.

    Args:
        config: the run's settings.
        on_checkpoint: called on rank 0 as ``on_checkpoint(step, directory)`` after each
            checkpoint is written.

    Returns:
        A :class:`TrainResult`; the final weights are ``output/model.pt`` and
        ``output/model.safetensors`` (also under ``output/checkpoints/step-N``).
    """
    return Trainer(config).run(on_checkpoint)
