"""``specs score``: score a file of (image, caption) rows."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from specs_metric.cli.common import (
    add_model_options,
    load_scorer,
    nonnegative_int,
    positive_int,
)
from specs_metric.scorer import DEFAULT_TOKEN_BUDGET
from specs_metric.scores import SCALES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score image-caption rows (JSONL, CSV or clipscore-style JSON)",
        description="Score every row of INPUT; writes one output row per input row, in order.",
    )
    p.add_argument("--model", default="specs-b32", help="model name (see `specs models`) or path")
    p.add_argument("--input", required=True, type=Path, help="rows: .jsonl, .csv or .json")
    p.add_argument("--output", required=True, type=Path, help="results: .jsonl, or .csv")
    p.add_argument(
        "--image-root",
        type=Path,
        help="folder for relative image paths (default: the input file's folder)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="images per forward pass (default 1: each embedding independent of the others, "
        "which byte-identical resume needs; larger is faster on GPUs)",
    )
    p.add_argument(
        "--token-budget",
        type=positive_int,
        default=DEFAULT_TOKEN_BUDGET,
        help=f"rows x tokens per text batch (default {DEFAULT_TOKEN_BUDGET})",
    )
    add_model_options(p)
    p.add_argument("--scale", default="specs", choices=SCALES, help="score scale")
    p.add_argument(
        "--chunk-rows", type=positive_int, default=512, help="rows prepared and written together"
    )
    p.add_argument(
        "--workers", type=nonnegative_int, default=1, help="image-decoding worker processes"
    )
    p.add_argument("--cache-dir", type=Path, help="on-disk image-embedding cache")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any row has an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_output_is_not_input(source: Path, output: Path) -> None:
    """Refuse an output that is the input file (by any path: a link, a relative path)."""
    if source.exists() and output.exists() and os.path.samefile(source, output):
        raise ValueError(f"--output {output} is the input file {source}; choose another output")


def run(args: argparse.Namespace) -> int:
    from specs_metric.distributed import init_from_env, local_device
    from specs_metric.job import JobConfig, run_job

    check_output_is_not_input(args.input, args.output)
    if args.output.exists() and not args.output.is_file():
        # The result is renamed into place: that would replace a device or fail on a folder.
        raise ValueError(f"--output {args.output} exists and is not a regular file")
    info = init_from_env(args.device)
    scorer = load_scorer(args, args.model, local_device(info, args.device))
    config = JobConfig(
        input=args.input,
        output=args.output,
        image_root=args.image_root,
        scale=args.scale,
        batch_size=args.batch_size,
        token_budget=args.token_budget,
        num_workers=args.workers,
        chunk_rows=args.chunk_rows,
        cache_dir=args.cache_dir,
        resume=args.resume,
        show_progress=not args.no_progress,
    )
    summary = run_job(config, scorer, info)
    if not info.is_main:
        return 0
    print(json.dumps(summary, indent=2, allow_nan=False), file=sys.stderr)
    if args.strict and summary["n_errors"]:
        print(f"specs score: {summary['n_errors']} row(s) had errors (--strict)", file=sys.stderr)
        return 1
    return 0
