"""``specs compare``: paired comparison of two ``specs score`` outputs (e.g. two checkpoints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs_metric.cli.common import nonnegative_int, positive_int, probability


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare two `specs score` outputs of the same rows (B - A)",
        description=(
            "Match the rows of A and B by id and report the mean difference B - A with a "
            "paired bootstrap CI, a sign-flip permutation p-value, win/tie/loss counts and "
            "the rows that changed most."
        ),
    )
    p.add_argument("a", type=Path, help="first `specs score` output (.jsonl or .csv)")
    p.add_argument("b", type=Path, help="second `specs score` output, same rows")
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
    p.add_argument("--out", type=Path, help="folder for report.md, report.json and plots")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.bench.report import compare_markdown, plot_distributions, write_json
    from specs_metric.compare import CompareError, compare_files

    try:
        result = compare_files(
            args.a,
            args.b,
            n_boot=args.n_boot,
            n_perm=args.n_perm,
            level=args.level,
            seed=args.seed,
            top=args.top,
            tie_tolerance=args.tie_tolerance,
        )
    except (CompareError, ValueError) as err:
        print(f"specs compare: {err}", file=sys.stderr)
        return 2
    text = compare_markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text, "utf-8")
        write_json(result.as_dict(), args.out / "report.json")
        if not args.no_plots:
            plot_distributions(
                result.scores_a,
                result.scores_b,
                args.out / "distributions.png",
                (f"A: {args.a.name}", f"B: {args.b.name}"),
            )
        print(f"report written to {args.out}", file=sys.stderr)
    return 0
