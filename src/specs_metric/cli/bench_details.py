"""``specs bench details``: does a sentence's delta say whether it is wrong?"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from specs_metric.cli.common import (
    add_model_options,
    add_output_option,
    add_overwrite_option,
    add_progress_options,
    check_new_outputs,
    load_scorer,
    positive_int,
    register_inputs,
)
from specs_metric.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    from specs_metric.evaluation.details import ATTRIBUTIONS
    from specs_metric.scoring.explain import NEUTRAL_SENTENCE

    p = subparsers.add_parser(
        "details",
        help="per-sentence attribution on a synthetic world: AUROC of -delta, false vs true",
        description=(
            "Explain the graded captions of a `specs synth` folder sentence by sentence and "
            "report, per model, attribution and calibration, the AUROC of -delta for false "
            "against true sentences (with a 95%% bootstrap CI over scenes)."
        ),
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="model name or path; repeat to compare models (e.g. a SPECS model and its twin)",
    )
    p.add_argument("--data", required=True, type=Path, help="a `specs synth` output folder")
    p.add_argument("--split", default="test", help="evaluated split (default test)")
    p.add_argument(
        "--calibration-split",
        default="train",
        help="split whose deltas give the per-position baseline (default train; 'none': skip)",
    )
    p.add_argument("--limit", type=int, default=150, help="graded captions evaluated (default 150)")
    p.add_argument(
        "--calibration-limit",
        type=positive_int,
        default=300,
        help="graded captions of the calibration split (default 300)",
    )
    p.add_argument(
        "--attribution",
        action="append",
        choices=ATTRIBUTIONS,
        help="attributions to evaluate (repeatable; default all)",
    )
    p.add_argument("--neutral", default=NEUTRAL_SENTENCE, help="the neutral sentence")
    p.add_argument(
        "--n-boot", type=positive_int, default=1000, help="bootstrap samples (default 1000)"
    )
    add_output_option(p, "write the results here (JSON)", aliases=("--json",))
    add_overwrite_option(p)
    add_model_options(p)
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.evaluation.details import markdown_table, read_graded, run_details

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    register_inputs(args.data)
    check_new_outputs("--output", [args.output], args.overwrite)
    test = read_graded(args.data, args.split, args.limit)
    train = None
    if args.calibration_split != "none":
        train = read_graded(args.data, args.calibration_split, args.calibration_limit)
    scorers = {name: load_scorer(args, name) for name in args.model}
    attributions = args.attribution or ["prefix", "leave-one-out", "neutral"]
    start = time.perf_counter()
    results = run_details(
        scorers,
        test,
        train,
        attributions,
        args.neutral,
        n_boot=args.n_boot,
        show_progress=not args.quiet,
    )
    elapsed = time.perf_counter() - start
    n_sent = sum(len(c.sentences) for c in test)
    print(
        f"{len(test)} graded captions ({n_sent} sentences) of {args.data} [{args.split}]; "
        f"position baseline from {len(train) if train else 0} [{args.calibration_split}] "
        f"captions; {elapsed:.1f} s"
    )
    print(markdown_table(results))
    if args.output is not None:
        payload = {
            "data": str(args.data),
            "split": args.split,
            "n_captions": len(test),
            "n_sentences": n_sent,
            "calibration_split": args.calibration_split,
            "n_calibration_captions": len(train) if train else 0,
            "neutral": args.neutral,
            "models": {
                name: {"checkpoint_sha256": s.checkpoint_sha256} for name, s in scorers.items()
            },
            "n_boot": args.n_boot,
            "seconds": elapsed,
            "results": [dataclasses.asdict(r) for r in results],
        }
        from specs_metric.io.jsonio import write_json

        write_json(args.output, payload, indent=1)
        print(f"wrote {args.output}")
    return 0
