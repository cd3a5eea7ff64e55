"""``specs sweep``: score one caption file per checkpoint and test each step."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specs_metric.cli.common import (
    add_model_options,
    load_scorer,
    nonnegative_int,
    positive_int,
    probability,
)
from specs_metric.errors import UsageError
from specs_metric.integrations.logging import log_target
from specs_metric.scoring.scales import SCALES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="score a captioner's checkpoints (one caption file each) and test each step",
        description=(
            "Score each FILE (rows id, image, caption; one file per checkpoint, in training "
            "order) with one model, encoding each distinct image once for the whole sweep. "
            "Reports each checkpoint's mean with a bootstrap CI over images, and paired "
            "tests against the previous and the best checkpoint. Writes OUT/sweep.json, "
            "OUT/sweep.png, OUT/report.html and OUT/scores/<label>.jsonl."
        ),
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="caption files, in order")
    p.add_argument("--model", default="specs-b32", help="model name (see `specs models`) or path")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--labels", help="comma-separated checkpoint names (default: the file names' stems)"
    )
    p.add_argument(
        "--image-root",
        type=Path,
        help="folder for relative image paths (default: each caption file's folder)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the complete score files in OUT/scores (only new files are scored)",
    )
    p.add_argument("--scale", default="specs", choices=SCALES, help="score scale")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="images per forward pass (default 1, as in `specs score`)",
    )
    p.add_argument(
        "--workers", type=nonnegative_int, default=1, help="image-decoding worker processes"
    )
    add_model_options(p)
    p.add_argument("--n-boot", type=positive_int, default=10000, help="bootstrap resamples (10000)")
    p.add_argument(
        "--n-perm", type=positive_int, default=10000, help="sign-flip permutations (10000)"
    )
    p.add_argument("--level", type=probability, default=0.95, help="confidence level (0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--no-plots", action="store_true", help="no sweep.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--log-to", action="append", type=log_target, metavar="{tensorboard,wandb}",
        help="also send the numbers, table and plot to TensorBoard (OUT/tensorboard) or W&B; "
        "repeatable (docs/integrations/logging.md)",
    )  # fmt: skip
    p.set_defaults(func=run)


def _table(result: dict) -> str:
    lines = [
        "| checkpoint | rows | mean | CI | vs previous | p | vs best | p |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def test(t: dict | None) -> str:
        if not t:
            return "— | —"
        star = "*" if t["significant"] else ""
        return f"{t['mean_diff']:+.4f}{star} | {t['p_value']:.4f}"

    for ck in result["checkpoints"]:
        best = " (best)" if ck["name"] == result["best"] else ""
        lines.append(
            f"| {ck['name']}{best} | {ck['n']} | {ck['mean']:.4f} | "
            f"[{ck['ci_low']:.4f}, {ck['ci_high']:.4f}] | {test(ck['vs_previous'])} | "
            f"{test(ck['vs_best'])} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from specs_metric.evaluation.sweep import SweepOptions, run_sweep
    from specs_metric.integrations.logging import log_sweep

    if args.n_boot < 1 or args.n_perm < 1:
        raise UsageError("--n-boot and --n-perm must be at least 1")
    if not 0 < args.level < 1:
        raise UsageError(f"--level must be in (0, 1), got {args.level}")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    scorer = load_scorer(args, args.model)
    options = SweepOptions(
        image_root=args.image_root,
        scale=args.scale,
        batch_size=args.batch_size,
        num_workers=args.workers,
        resume=args.resume,
        show_progress=not args.no_progress,
        n_boot=args.n_boot,
        n_perm=args.n_perm,
        level=args.level,
        seed=args.seed,
        plot=not args.no_plots,
    )
    result = run_sweep(args.files, scorer, args.out, labels=labels, options=options)
    log_sweep(result, args.out, args.log_to or [])
    print(_table(result))
    brief = {k: result[k] for k in ("model", "images", "images_encoded", "best")}
    print(json.dumps(brief), file=sys.stderr)
    print(f"report written to {args.out}", file=sys.stderr)
    return 0
