"""``specs train``: fine-tune with the specificity objective (or CLIP pre-training)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from specs_metric.cli.common import (
    add_device_option,
    add_overwrite_option,
    add_progress_options,
    nonnegative_int,
    positive_int,
)
from specs_metric.errors import OutputError, UsageError
from specs_metric.runtime.policy import TRAINING_AUTOCAST

# What a training run writes in its output folder (an earlier run's are not replaced
# silently); checkpoints/step-N folders and tensorboard/ besides.
RUN_FILES = ("config.json", "train_log.csv", "model.pt", "model.safetensors")


def register(subparsers: argparse._SubParsersAction) -> None:
    from specs_metric.training.recipe import OBJECTIVES, TrainConfig

    d = TrainConfig(init="", data="", output="")
    p = subparsers.add_parser(
        "train",
        help="fine-tune a LongCLIP checkpoint with the SPECS objective",
        description=(
            "Train on a set built by `specs prepare`. Defaults are the released SPECS recipe "
            "(docs/training.md). Launch with torchrun for several processes or nodes: "
            "--batch-size is the training batch per process."
        ),
    )
    p.add_argument(
        "--init",
        required=True,
        help="initial checkpoint: LongCLIP, or OpenAI CLIP (stretched to 248); a name, "
        "file or HF save_pretrained folder",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="architecture of an --init file that is not the OpenAI convention "
        "(see `specs models --archs`)",
    )
    p.add_argument("--data", required=True, help="training set: .parquet or datasets directory")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=d.objective,
        help="specs (default) or clip: symmetric contrastive pre-training",
    )
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help="optimizer updates (overrides --epochs; sets the schedule length)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help=f"training examples per process and step (default {d.batch_size}); not the "
        "inference --batch-size of the other commands",
    )
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=nonnegative_int, default=d.warmup_steps)
    p.add_argument("--lambda-contrast", type=float, default=d.lambda_contrast)
    p.add_argument("--lambda-detail", type=float, default=d.lambda_detail)
    p.add_argument("--lambda-neg", type=float, default=d.lambda_neg)
    p.add_argument("--margin", type=float, default=d.margin, help="hinge margin; 0 = adaptive")
    p.add_argument(
        "--save-every",
        type=nonnegative_int,
        default=d.save_every,
        help="checkpoint every N updates (0: only at the end)",
    )
    p.add_argument(
        "--precision",
        choices=TRAINING_AUTOCAST,
        default=d.precision,
        help="training autocast; auto: fp16 (with gradient scaling) on CUDA, fp32 on CPU; "
        "bf16 works on CPU too",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint directory (OUTPUT/checkpoints/step-N) or 'latest'",
    )
    add_overwrite_option(p, resume=True)
    p.add_argument("--image-root", default=None, help="folder for relative image paths")
    p.add_argument("--workers", type=nonnegative_int, default=d.workers, help="DataLoader workers")
    add_device_option(p, "default: CUDA if available")
    p.add_argument(
        "--local-loss",
        action="store_true",
        help="compute the loss per process instead of on the gathered global batch",
    )
    p.add_argument(
        "--freeze-positional",
        choices=("auto", "yes", "no"),
        default="auto",
        help="freeze positional_embedding (auto: only for OpenAI CLIP inits)",
    )
    p.add_argument(
        "--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)"
    )
    p.add_argument("--no-tensorboard", action="store_true")
    add_progress_options(p)
    p.set_defaults(func=run)


def _run_files(output: Path) -> list[Path]:
    """The files and folders an earlier training run left in ``output``."""
    found = [output / name for name in (*RUN_FILES, "tensorboard") if (output / name).exists()]
    checkpoints = output / "checkpoints"
    if checkpoints.is_dir():
        found += sorted(p for p in checkpoints.iterdir() if p.name.startswith("step-"))
    return found


def check_earlier_run(args: argparse.Namespace) -> None:
    """Refuse (one line) to start over in a folder that holds a run, unless ``--resume``
    continues it or ``--overwrite`` replaces it (its own files are removed first, by one
    process: a later ``--resume latest`` must not find an old run's checkpoint).

    Every torchrun process checks before the process group meets, and so before any
    process has written anything."""
    output = Path(args.output)
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume continues an earlier run and --overwrite replaces it")
    found = _run_files(output)
    if not found or args.resume is not None:
        return
    if not args.overwrite:
        raise OutputError(
            f"--output {output} holds a training run ({', '.join(p.name for p in found[:3])}"
            f"{' ...' if len(found) > 3 else ''}); pass --resume latest to continue it, or "
            "--overwrite to start over (its files are removed)"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def run(args: argparse.Namespace) -> int:
    from specs_metric.training.trainer import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_earlier_run(args)
    config = TrainConfig(
        init=args.init,
        data=args.data,
        output=args.output,
        objective=args.objective,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lambda_contrast=args.lambda_contrast,
        lambda_detail=args.lambda_detail,
        lambda_neg=args.lambda_neg,
        margin=args.margin,
        save_every=args.save_every,
        precision=args.precision,
        seed=args.seed,
        resume=args.resume,
        image_root=args.image_root,
        workers=args.workers,
        device=args.device,
        gather=not args.local_loss,
        freeze_positional={"auto": None, "yes": True, "no": False}[args.freeze_positional],
        deterministic=args.deterministic,
        progress=not args.quiet,
        tensorboard=not args.no_tensorboard,
        arch=args.arch,
    )
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(
        f"trained {result.steps} steps; final weights {result.final_checkpoint} "
        f"(and .safetensors); {result.skipped_images} unreadable images skipped"
    )
    return 0
