"""``specs explain``: per-segment scores and deltas of image-caption rows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specs_metric.cli.common import add_model_options, load_scorer
from specs_metric.errors import UsageError
from specs_metric.scoring.scales import SCALES


def register(subparsers: argparse._SubParsersAction) -> None:
    from specs_metric.processing.segmentation import SEGMENTERS
    from specs_metric.scoring.explain import ATTRIBUTIONS, DEFAULT_SEGMENTER, NEUTRAL_SENTENCE

    p = subparsers.add_parser(
        "explain",
        help="which segments of each caption raise or lower its score",
        description=(
            "Cut every caption into segments and give each the score of the caption through "
            "it and its delta against the caption before it (or, with --attribution "
            "leave-one-out, the full score minus the score without it). Writes one JSONL "
            "row per input row, in order: a score file plus `segments`."
        ),
    )
    p.add_argument("--model", default="specs-b32", help="model name (see `specs models`) or path")
    p.add_argument("--input", required=True, type=Path, help="rows: .jsonl, .csv or .json")
    p.add_argument("--output", required=True, type=Path, help="results (JSONL)")
    p.add_argument(
        "--image-root",
        type=Path,
        help="folder for relative image paths (default: the input file's folder)",
    )
    p.add_argument(
        "--segmenter",
        default=DEFAULT_SEGMENTER,
        choices=SEGMENTERS,
        help=f"how captions are cut (default {DEFAULT_SEGMENTER}; chunk needs NLTK data)",
    )
    p.add_argument(
        "--attribution",
        default="prefix",
        choices=ATTRIBUTIONS,
        help="prefix (default): s(through k) - s(before k); leave-one-out: s(caption) - "
        "s(caption without k); neutral: s(through k) - s(before k + a neutral sentence)",
    )
    p.add_argument(
        "--neutral",
        default=NEUTRAL_SENTENCE,
        help=f"the neutral sentence of --attribution neutral (default {NEUTRAL_SENTENCE!r})",
    )
    p.add_argument("--scale", default="specs", choices=SCALES, help="score scale")
    p.add_argument("--html", type=Path, help="also write a self-contained HTML report here")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--chunk-rows", type=int, default=64, help="rows prepared and written together")
    add_model_options(p)
    p.add_argument("--strict", action="store_true", help="exit non-zero if any row has an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.io.writing import write_text
    from specs_metric.jobs.explain_files import ExplainConfig, explain_file

    if args.chunk_rows < 1 or args.batch_size < 1:
        raise UsageError("--chunk-rows and --batch-size must be at least 1")
    scorer = load_scorer(args, args.model)
    config = ExplainConfig(
        input=args.input,
        output=args.output,
        image_root=args.image_root,
        segmenter=args.segmenter,
        attribution=args.attribution,
        scale=args.scale,
        neutral=args.neutral,
        chunk_rows=args.chunk_rows,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    summary, records = explain_file(scorer, config)
    if args.html is not None:
        from specs_metric.evaluation.reports.html import explain_page

        title = f"specs explain: {args.input.name} ({scorer.name}, {args.attribution})"
        root = args.image_root if args.image_root is not None else args.input.parent
        write_text(args.html, explain_page(records, root, title))
        summary["html"] = str(args.html)
    print(json.dumps(summary, indent=2), file=sys.stderr)
    if args.strict and summary["n_errors"]:
        print(f"specs explain: {summary['n_errors']} row(s) had errors (--strict)", file=sys.stderr)
        return 1
    return 0
