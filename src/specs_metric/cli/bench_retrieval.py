"""``specs bench retrieval``: image -> text and text -> image Recall@K."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs_metric import __version__
from specs_metric.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_output_option,
    add_overwrite_option,
    add_progress_options,
    check_new_outputs,
    load_scorer,
    nonnegative_int,
    positive_int,
    register_inputs,
)
from specs_metric.errors import UsageError


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Model, data and run options shared by the extrinsic benchmarks."""
    p.add_argument(
        "--model",
        required=True,
        action="append",
        help="model name (see `specs models`) or checkpoint path; repeat to compare models",
    )
    p.add_argument("--data", required=True, type=Path, help="data set (see docs/extrinsic.md)")
    p.add_argument("--split", default=None, help="split of a multi-split source (default test)")
    p.add_argument("--image-root", type=Path, help="folder for relative image paths")
    p.add_argument("--image-column", default="image", help="image column of a table (image)")
    add_output_option(p, "write the results here (JSON)", aliases=("--json",))
    add_overwrite_option(p)
    p.add_argument("--limit", type=positive_int, help="only the first N images")
    add_model_options(p)
    add_batch_size_option(p)
    p.add_argument(
        "--workers", type=nonnegative_int, default=2, help="image decoding processes (0: none)"
    )
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out unreadable images (counted in the output) instead of stopping",
    )
    add_progress_options(p)


def setup(args: argparse.Namespace):
    """torchrun position and device of this process (after refusing to replace an earlier
    result file without ``--overwrite``)."""
    from specs_metric.runtime.distributed import init_from_env, local_device

    register_inputs(args.data)
    check_new_outputs("--output", [args.output], args.overwrite)
    info = init_from_env(args.device)
    return info, local_device(info, args.device)


def run_meta(args: argparse.Namespace, info) -> dict:
    return {
        "version": __version__,
        "data": str(args.data),
        "split": args.split,
        "limit": args.limit,
        "world_size": info.world_size,
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "retrieval",
        help="image-text retrieval Recall@1/5/10 in both directions",
        description=(
            "Image -> text (a hit when any caption of the image is in the top K) and "
            "text -> image Recall@K on an image-caption set: a JSONL/CSV/parquet/datasets "
            "table with image + caption(s), a COCO captions JSON or an Urban1k folder. "
            "Works under torchrun (embedding is sharded over ranks)."
        ),
    )
    add_common_arguments(p)
    p.add_argument(
        "--captions",
        default="all",
        choices=["all", "first", "last"],
        help="which captions of an image to use (last: the full one of cumulative lists)",
    )
    p.add_argument(
        "--max-captions-per-image",
        type=positive_int,
        help="keep only the first N captions of each image (the reference COCO script: 5)",
    )
    p.add_argument("--caption-column", help="caption column (default caption, else captions)")
    p.add_argument(
        "--ks", default="1,5,10", help="comma-separated K values of Recall@K (default 1,5,10)"
    )
    p.set_defaults(func=run)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise UsageError(f"--ks {text!r}: expected positive integers such as 1,5,10")
    return ks


def print_table(rows: list[tuple[str, object]], heads: list[str], values) -> None:
    """One line per model: its name, then ``values(result)`` under ``heads``."""
    width = max(len("model"), *(len(name) for name, _ in rows))
    print(f"{'model':<{width}}  " + "  ".join(f"{h:>9}" for h in heads))
    for name, res in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{v:>9.2f}" for v in values(res)))


def embed_options(args: argparse.Namespace) -> dict:
    """The embedding keywords of ``evaluate_retrieval`` / ``evaluate_zeroshot`` from the
    shared arguments."""
    return {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "skip_bad_images": args.skip_bad_images,
        "show_progress": not args.quiet,
    }


def save_results(args: argparse.Namespace, header: dict, results: list[dict], done: bool) -> None:
    """Write the JSON report (after every model, so a long multi-model run keeps its work)."""
    from specs_metric.evaluation.reports.report import write_json

    if args.output is not None:
        write_json({**header, "complete": done, "results": results}, args.output)


def run(args: argparse.Namespace) -> int:
    from specs_metric.evaluation.retrieval import evaluate_retrieval, read_retrieval

    ks = parse_ks(args.ks)
    info, device = setup(args)
    data = read_retrieval(
        args.data,
        split=args.split,
        image_root=args.image_root,
        image_column=args.image_column,
        caption_column=args.caption_column,
        captions=args.captions,
        max_captions_per_image=args.max_captions_per_image,
    )
    if args.limit is not None:
        data = data.head(args.limit)
    if info.is_main:
        print(f"{len(data)} images, {len(data.captions)} captions from {data.source}")
    header = {
        "benchmark": "retrieval",
        **run_meta(args, info),
        "captions": args.captions,
        "max_captions_per_image": args.max_captions_per_image,
        "tie_rule": "rank = #higher + #equal with a smaller index",
    }
    rows = evaluate_models(
        args,
        info,
        device,
        header,
        lambda scorer: evaluate_retrieval(
            scorer,
            data,
            info,
            ks=ks,
            **embed_options(args),
        ),
    )
    if info.is_main:
        print_table(
            rows,
            [f"i2t R@{k}" for k in ks] + [f"t2i R@{k}" for k in ks],
            lambda res: [res.image_to_text[k] for k in ks] + [res.text_to_image[k] for k in ks],
        )
        finish(args)
    return 0


def evaluate_models(args: argparse.Namespace, info, device, header: dict, evaluate) -> list:
    """Run ``evaluate(scorer)`` for every ``--model``; rank 0 rewrites the JSON after each
    model (``complete: false`` until the last) and gets ``[(name, result), ...]``."""
    rows, results = [], []
    for name in args.model:
        scorer = load_scorer(args, name, device)
        result = evaluate(scorer)
        if info.is_main:
            if result.skipped_images:
                print(
                    f"{name}: skipped {len(result.skipped_images)} unreadable images",
                    file=sys.stderr,
                )
            rows.append((name, result))
            results.append({**scorer.summary_fields(), **result.to_dict()})
            save_results(args, header, results, done=len(results) == len(args.model))
        del scorer
    return rows


def finish(args: argparse.Namespace) -> None:
    if args.output is not None:
        print(f"wrote {args.output}")
