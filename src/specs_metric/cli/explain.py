"""``specs explain``: per-segment scores and deltas of image-caption rows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specs_metric.cli.common import (
    DEFAULT_MODEL,
    INPUT_HELP,
    MODEL_HELP,
    add_batch_size_option,
    add_model_options,
    add_overwrite_option,
    add_progress_options,
    add_source_options,
    check_new_outputs,
    load_scorer,
    nonnegative_int,
    positive_int,
    register_inputs,
    rows_exit_status,
    source_options,
    warn,
)
from specs_metric.scoring.scales import SCALES


def register(subparsers: argparse._SubParsersAction) -> None:
    from specs_metric.evaluation.reports.html import MAX_HTML_ROWS
    from specs_metric.processing.segmentation import SEGMENTERS
    from specs_metric.scoring.explain import ATTRIBUTIONS, DEFAULT_SEGMENTER, NEUTRAL_SENTENCE

    p = subparsers.add_parser(
        "explain",
        help="which segments of each caption raise or lower its score",
        description=(
            "Cut every caption into segments and give each the score of the caption through "
            "it and its delta against the caption before it (or, with --attribution "
            "leave-one-out, the full score minus the score without it). Writes one row per "
            "input row, in order: a score file plus `segments` (.jsonl, .csv with segments "
            "as JSON text, or .parquet with segments as a list of structs)."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--input", required=True, help=INPUT_HELP)
    p.add_argument(
        "--output",
        required=True,
        type=Path,
        help="results: .jsonl, .csv or .parquet (format by extension)",
    )
    add_source_options(p)
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
    p.add_argument(
        "--html-rows",
        type=nonnegative_int,
        default=MAX_HTML_ROWS,
        help=f"rows the HTML report shows, the first ones (default {MAX_HTML_ROWS}; 0: all); "
        "the page says how many it shows",
    )
    add_batch_size_option(p)
    p.add_argument(
        "--chunk-rows",
        type=positive_int,
        default=64,
        help="rows prepared and written together (default 64)",
    )
    add_model_options(p)
    add_overwrite_option(p)
    p.add_argument("--strict", action="store_true", help="exit 1 if any row has an error")
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.io.writing import write_text
    from specs_metric.jobs.explain_files import ExplainConfig, explain_file
    from specs_metric.jobs.outputs import output_format

    output_format(args.output)  # the format follows the extension; others are refused
    register_inputs(args.input)
    part = args.output.with_name(args.output.name + ".part")
    check_new_outputs("--output", [args.output, part], args.overwrite)
    check_new_outputs("--html", [args.html], args.overwrite)
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
        show_progress=not args.quiet,
        source=source_options(args),
    )
    # the HTML page shows the first --html-rows rows; nothing else is kept in memory
    keep = 0 if args.html is None else (args.html_rows or None)
    summary, records = explain_file(scorer, config, keep=keep)
    if args.html is not None:
        from specs_metric.evaluation.reports.html import explain_page

        title = f"specs explain: {Path(args.input).name} ({scorer.name}, {args.attribution})"
        root = args.image_root if args.image_root is not None else Path(args.input).parent
        page = explain_page(
            records,
            root,
            title,
            max_rows=args.html_rows or None,
            output=str(args.output),
            warn=lambda note: warn("explain", note),
            summary=summary,
        )
        write_text(args.html, page)
        summary["html"] = str(args.html)
    print(json.dumps(summary, indent=2, allow_nan=False), file=sys.stderr)
    return rows_exit_status("explain", summary, args.strict)
