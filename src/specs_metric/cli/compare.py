"""``specs compare``: paired comparison of two ``specs score`` outputs (e.g. two checkpoints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs_metric.cli.common import (
    add_output_option,
    add_overwrite_option,
    add_progress_options,
    check_new_outputs,
    nonnegative_int,
    positive_int,
    probability,
    register_inputs,
    warn,
)
from specs_metric.integrations.logging import log_target

# What compare writes in its --output folder (an earlier report there is not replaced
# silently).
REPORT_FILES = ("report.md", "report.json", "report.html", "distributions.png")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare two `specs score` outputs: two scoring models or two captioners (B - A)",
        description=(
            "Match the rows of A and B by id (or by image) and report the mean difference "
            "B - A with a paired bootstrap CI, a sign-flip permutation p-value, win/tie/loss "
            "counts and the rows that changed most. With the same captions on both sides "
            "(two scoring models) each row is a unit; when captions differ (two captioners) "
            "each image is, its captions' scores averaged per side."
        ),
    )
    p.add_argument("a", type=Path, help="first `specs score` or `specs explain` output")
    p.add_argument("b", type=Path, help="second output, of the same rows or images")
    p.add_argument(
        "--pair-by",
        choices=("id", "image"),
        default="id",
        help="match rows by id (default) or by image (captions of an image averaged per side)",
    )
    p.add_argument(
        "--image-root",
        type=Path,
        help="folder of relative image paths, for the thumbnails of report.html "
        "(default: tried next to A and B, then the current folder)",
    )
    p.add_argument("--n-boot", type=positive_int, default=10000, help="bootstrap resamples (10000)")
    p.add_argument(
        "--n-perm", type=positive_int, default=10000, help="sign-flip permutations (10000)"
    )
    p.add_argument("--level", type=probability, default=0.95, help="confidence level (0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument(
        "--top", type=nonnegative_int, default=10, help="rows that changed most to list (10)"
    )
    p.add_argument("--tie-tolerance", type=float, default=0.0, help="|B - A| counted as a tie (0)")
    add_output_option(
        p, "folder for report.md, report.json, report.html and plots", aliases=("--out",)
    )
    add_overwrite_option(p)
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in --output")
    add_progress_options(p)
    p.add_argument(
        "--log-to", action="append", type=log_target, metavar="{tensorboard,wandb}",
        help="also send the numbers, top changes and plot to TensorBoard (OUTPUT/tensorboard) "
        "or W&B (needs --output); repeatable (docs/integrations/logging.md)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.evaluation.compare import compare_files
    from specs_metric.evaluation.reports.html import compare_page
    from specs_metric.evaluation.reports.html_parts import read_png
    from specs_metric.evaluation.reports.report import (
        compare_markdown,
        plot_distributions,
        try_plot,
        write_json,
    )
    from specs_metric.integrations.logging import log_compare
    from specs_metric.io.writing import write_text

    out = args.output
    if out is not None:
        register_inputs(args.a, args.b)
        check_new_outputs("--output", [out / name for name in REPORT_FILES], args.overwrite)
    result = compare_files(
        args.a,
        args.b,
        pair_by=args.pair_by,
        n_boot=args.n_boot,
        n_perm=args.n_perm,
        level=args.level,
        seed=args.seed,
        top=args.top,
        tie_tolerance=args.tie_tolerance,
    )
    text = compare_markdown(result)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "report.md", text)
        write_json(result.as_dict(), out / "report.json")
        plot, notes = None, []
        if not args.no_plots:
            made = try_plot(
                lambda: plot_distributions(
                    result.scores_a,
                    result.scores_b,
                    out / "distributions.png",
                    (f"A: {args.a.name}", f"B: {args.b.name}"),
                    result.unit,
                ),
                notes.append,
            )
            plot = read_png(made) if made is not None else None
        for note in notes:
            warn("compare", note)
        roots = [args.image_root, args.a.parent, args.b.parent]
        html = compare_page(
            result,
            image_roots=roots,
            plot_png=plot,
            notes=notes,
            warn=lambda note: warn("compare", note),
        )
        write_text(out / "report.html", html)
        print(f"report written to {out}", file=sys.stderr)
    log_compare(result.as_dict(), out, args.log_to or [])
    return 0
