"""``specs prepare``: build the SPECS training set (cumulative captions and negatives)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from specs_metric.cli.common import (
    add_overwrite_option,
    add_progress_options,
    check_new_outputs,
    positive_int,
    register_inputs,
)
from specs_metric.errors import NothingScoredError


def register(subparsers: argparse._SubParsersAction) -> None:
    from specs_metric.processing.segmentation import DEFAULT_SEGMENTER, SEGMENTERS
    from specs_metric.training.prepare import DEFAULT_SHUFFLE_FRACTION

    parser = subparsers.add_parser(
        "prepare",
        help="build a training set (captions, cumulative captions, negatives)",
        description=(
            "Read image/caption pairs (ShareGPT4V JSON, JSONL, CSV, parquet or a datasets "
            "directory), cut captions into detail segments, build cumulative captions and "
            "negatives, and write parquet (OUT ending in .parquet) or a datasets directory. "
            "Skipped rows are counted per reason; see docs/training.md."
        ),
    )
    parser.add_argument("--input", required=True, help="input file or datasets directory")
    parser.add_argument(
        "--output", required=True, type=Path, help="OUT.parquet or a datasets directory"
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="directory relative image paths are joined to (default: the input's directory)",
    )
    parser.add_argument(
        "--segmenter",
        choices=SEGMENTERS,
        default=DEFAULT_SEGMENTER,
        help="clause: rule-based, no data (default); sentence; chunk: the reference NLTK "
        "grammar (needs NLTK data)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of negative sampling")
    parser.add_argument(
        "--shuffle-fraction",
        type=float,
        default=DEFAULT_SHUFFLE_FRACTION,
        help="leading fraction of rows whose negative segments are word-shuffled",
    )
    parser.add_argument("--context-length", type=positive_int, default=248, help="token limit")
    parser.add_argument("--workers", type=positive_int, default=1, help="segmentation processes")
    parser.add_argument(
        "--no-image-check",
        action="store_true",
        help="do not open image headers (missing paths are still not detected)",
    )
    add_overwrite_option(parser)
    add_progress_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.training.prepare import prepare_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report_file = args.output.with_name(args.output.name + ".report.json")
    register_inputs(args.input)
    check_new_outputs("--output", [args.output, report_file], args.overwrite)
    report = prepare_dataset(
        args.input,
        args.output,
        image_root=args.image_root,
        segmenter=args.segmenter,
        seed=args.seed,
        shuffle_fraction=args.shuffle_fraction,
        context_length=args.context_length,
        check_images=not args.no_image_check,
        workers=args.workers,
        progress=not args.quiet,
        log_fn=print,
    )
    if not report.kept:  # an empty training set trains nothing: one line, not success
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.items() if n) or "no rows"
        raise NothingScoredError(
            f"no row could be used: {report.rows} rows read, none kept ({reasons}); see "
            f"{report_file}"
        )
    return 0
