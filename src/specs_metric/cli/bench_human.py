"""``specs bench human``: correlation of metrics with human judgments, with cost per caption."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs_metric.cli.common import (
    MODEL_HELP,
    add_batch_size_option,
    add_model_options,
    add_output_option,
    add_overwrite_option,
    add_progress_options,
    check_new_outputs,
    load_scorer,
    positive_int,
    probability,
    register_inputs,
    warn,
)
from specs_metric.errors import UsageError
from specs_metric.evaluation.human import DEFAULT_MODEL, FORMATS
from specs_metric.io.jsonio import dumps


def _candidates(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = {}
    for item in text.split(","):
        cap, sep, score = item.partition(":")
        if not sep or not cap.strip() or not score.strip():
            raise UsageError(f"--candidates: expected CAPTION_COLUMN:SCORE_COLUMN, got {item!r}")
        pairs[cap.strip()] = score.strip()
    return pairs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "human",
        help="correlation of SPECS, CLIP-S and text metrics with human judgments",
        description=(
            "Score human-judged captions with each metric and report Kendall tau-b/tau-c, "
            "Pearson and Spearman (bootstrap CIs over images), pairwise accuracy, and "
            "seconds per 1,000 captions. Formats are described in docs/meta-evaluation.md."
        ),
    )
    p.add_argument("--data", required=True, type=Path, help="data file or folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="layout of --data")
    p.add_argument(
        "--metrics",
        default="specs,clip-s,bleu-4,rouge-l,cider-d",
        help="comma list of [LABEL=]NAME[@MODEL]; NAME: specs, clip-s, cosine, torchmetrics "
        "(model scores) or bleu-4, rouge-l, cider-d (need references)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model for NAMEs without @MODEL: {MODEL_HELP}",
    )
    p.add_argument("--split", default="test", help="LongCap-Arena split (default test)")
    p.add_argument("--image-root", type=Path, help="folder for relative image paths")
    p.add_argument(
        "--candidates", help="DetailCaps: CAPTION_COLUMN:SCORE_COLUMN,... (default: by name)"
    )
    p.add_argument(
        "--aggregate",
        default="each",
        choices=["each", "mean"],
        help="Flickr8k-Expert: one row per expert judgment (each) or their mean",
    )
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--level", type=probability, default=0.95, help="confidence level (0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    add_model_options(p)
    add_batch_size_option(p)
    add_output_option(
        p,
        "report folder: report.md, report.json, scores.jsonl, plots (default bench_human)",
        aliases=("--out",),
        default=Path("bench_human"),
    )
    add_overwrite_option(p)
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specs_metric.evaluation.human import (
        evaluate,
        iter_score_rows,
        parse_metrics,
        read_judgments,
        run_metrics,
    )
    from specs_metric.evaluation.reports.report import human_markdown, write_human_report
    from specs_metric.io.writing import atomic_write, open_append

    out = args.output
    register_inputs(args.data)
    check_new_outputs("--output", [out / "report.json", out / "scores.jsonl"], args.overwrite)
    metrics = parse_metrics(args.metrics, args.model)
    sets = read_judgments(
        args.data,
        args.format,
        split=args.split,
        image_root=args.image_root,
        candidates=_candidates(args.candidates),
        aggregate=args.aggregate,
    )
    out.mkdir(parents=True, exist_ok=True)
    scores_path = out / "scores.jsonl"
    scores_path.unlink(missing_ok=True)

    def progress(jset, res) -> None:
        if res.skipped:
            warn("bench human", f"{jset.name}: {res.spec.label} skipped ({res.skipped})")
            return
        # write each metric's scores as soon as they exist, so a long run keeps its work
        name = res.spec.label.replace("/", "_")
        with open_append(out / f"scores_{name}.jsonl", "scores file") as fh:
            for rec, value in zip(jset.rows, res.scores.tolist(), strict=True):
                fh.write(dumps({"set": jset.name, "id": rec.id, "score": value}) + "\n")
        if not args.quiet:
            rate = res.seconds_per_1000
            tqdm.write(f"{jset.name}: {res.spec.label} done ({rate:.2f} s / 1000 captions)",
                       file=sys.stderr)  # fmt: skip

    for stale in out.glob("scores_*.jsonl"):
        stale.unlink()

    results = run_metrics(
        sets,
        metrics,
        loader=lambda model: load_scorer(args, model),
        batch_size=args.batch_size,
        on_result=progress,
        progress=not args.quiet,
    )
    reports = [
        evaluate(s, results[s.name], n_boot=args.n_boot, level=args.level, seed=args.seed)
        for s in sets
    ]
    with atomic_write(scores_path) as fh:
        for s in sets:
            for rec in iter_score_rows(s, results[s.name]):
                fh.write(dumps(rec) + "\n")
    meta = {
        "data": str(args.data),
        "format": args.format,
        "metrics": [m.__dict__ for m in metrics],
        "n_boot": args.n_boot,
        "level": args.level,
        "seed": args.seed,
    }
    write_human_report(
        reports, meta, out, plots=not args.no_plots, warn=lambda m: warn("bench human", m)
    )
    print(human_markdown(reports, meta))
    print(f"report written to {out}", file=sys.stderr)
    return 0
