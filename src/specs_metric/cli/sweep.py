"""``specs sweep``: score one caption file per checkpoint and test each step."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specs_metric.cli.common import (
    DEFAULT_MODEL,
    MODEL_HELP,
    add_batch_size_option,
    add_model_options,
    add_output_option,
    add_overwrite_option,
    add_progress_options,
    load_scorer,
    nonnegative_int,
    positive_int,
    probability,
    register_inputs,
    rows_exit_status,
)
from specs_metric.errors import UsageError
from specs_metric.integrations.logging import log_target
from specs_metric.scoring.scales import SCALES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="score a captioner's checkpoints (one caption file each) and test each step",
        description=(
            "Score each FILE (rows id, image, caption; one file per checkpoint) with one "
            "model, encoding each distinct image once for the whole sweep. The checkpoints "
            "are ordered by the numbers in their names (ckpt-2000 before ckpt-10000, "
            "whatever order the shell gave) unless --labels or --order given. Reports each "
            "checkpoint's mean with a bootstrap CI over images, and paired tests against the "
            "previous and the best checkpoint. Writes OUTPUT/sweep.json, OUTPUT/sweep.png, "
            "OUTPUT/report.html and OUTPUT/scores/<label>.jsonl."
        ),
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="caption files")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    add_output_option(p, "output folder", required=True, aliases=("--out",))
    p.add_argument(
        "--labels",
        help="comma-separated checkpoint names, one per FILE, in the order given (default: "
        "the file names' stems)",
    )
    p.add_argument(
        "--order",
        choices=("natural", "given"),
        default=None,
        help="natural: by the numbers in the names, compared as numbers (default); given: "
        "as on the command line (the default with --labels)",
    )
    p.add_argument(
        "--image-root",
        type=Path,
        help="folder for relative image paths (default: each caption file's folder)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the complete score files in OUTPUT/scores (only new files are scored)",
    )
    add_overwrite_option(p, resume=True)
    p.add_argument("--scale", default="specs", choices=SCALES, help="score scale")
    add_batch_size_option(p)
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
    p.add_argument("--strict", action="store_true", help="exit 1 if any row has an error")
    add_progress_options(p)
    p.add_argument(
        "--log-to", action="append", type=log_target, metavar="{tensorboard,wandb}",
        help="also send the numbers, table and plot to TensorBoard (OUTPUT/tensorboard) or "
        "W&B; repeatable (docs/integrations/logging.md)",
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
    register_inputs(args.files)
    scorer = load_scorer(args, args.model)
    codes = [0]
    options = SweepOptions(
        image_root=args.image_root,
        scale=args.scale,
        batch_size=args.batch_size,
        num_workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        order=args.order,
        show_progress=not args.quiet,
        n_boot=args.n_boot,
        n_perm=args.n_perm,
        level=args.level,
        seed=args.seed,
        plot=not args.no_plots,
        check_rows=lambda summary: codes.append(rows_exit_status("sweep", summary, args.strict)),
    )
    result = run_sweep(args.files, scorer, args.output, labels=labels, options=options)
    log_sweep(result, args.output, args.log_to or [])
    print(_table(result))
    brief = {k: result[k] for k in ("model", "images", "images_encoded", "order", "best")}
    print(json.dumps(brief), file=sys.stderr)
    print(f"report written to {args.output}", file=sys.stderr)
    return max(codes)
