"""``specs bench intrinsic``: positive / negative / average rates
(docs/intrinsic.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from specs_metric.cli.common import (
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "intrinsic",
        help="intrinsic specificity: do added details raise and wrong details lower the score?",
        description=(
            "Positive rate (s(c_k+1) > s(c_k)), negative rate (s(c_k) > s(n_k)) and their "
            "average, in percent over images with at least 3 cumulative captions, on data "
            "in the sDCI layout (datasets folder, parquet or JSONL)."
        ),
    )
    p.add_argument("--model", required=True, help="model name (see `specs models`) or path")
    p.add_argument("--data", required=True, type=Path, help="sDCI-layout folder or file")
    p.add_argument("--split", default=None, help="split of a multi-split source (default test)")
    p.add_argument("--image-root", type=Path, help="folder for relative image paths")
    add_output_option(p, "write rates and per-image results here (JSON)", aliases=("--json",))
    add_overwrite_option(p)
    p.add_argument("--limit", type=positive_int, help="only the first N images")
    add_model_options(p)
    p.add_argument(
        "--chains-per-batch", type=positive_int, default=16, help="images per text batch"
    )
    p.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="encode every caption on its own (slower; same result)",
    )
    p.add_argument(
        "--timing-chains",
        type=nonnegative_int,
        default=16,
        help="time prefix reuse against plain encoding on this many images (0: skip)",
    )
    add_progress_options(p)
    p.set_defaults(func=run)


def _write_json(path: Path, payload: dict) -> None:
    from specs_metric.io.jsonio import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload, indent=1)


def _per_image(rows, scores, rates=None) -> list[dict]:
    out = []
    for i, (row, sc) in enumerate(zip(rows, scores, strict=False)):
        entry = {"id": row.id, "caption_scores": sc.captions, "neg_scores": sc.negatives}
        if rates is not None:
            r = rates[i]
            entry["positive"] = None if r.positive is None else 100.0 * r.positive
            entry["negative"] = None if r.negative is None else 100.0 * r.negative
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specs_metric.evaluation.intrinsic import embed_row_images, run_intrinsic, time_prefix_reuse
    from specs_metric.evaluation.sdci import read_sdci

    register_inputs(args.data)
    check_new_outputs("--output", [args.output], args.overwrite)
    rows = read_sdci(args.data, args.split, args.image_root)
    if args.limit is not None:
        rows = rows[: args.limit]
    scorer = load_scorer(args, args.model)
    print(f"{len(rows)} images from {args.data}; model {scorer.name} on {scorer.device}")
    header = {"model": scorer.name, "data": str(args.data), "split": args.split}

    timing = None
    if args.timing_chains > 0 and rows:
        sample = rows[: args.timing_chains]
        images = embed_row_images(scorer, sample)
        timing = time_prefix_reuse(scorer, sample, images)
        print(
            f"prefix reuse on {timing.chains} images ({timing.captions} captions): "
            f"{timing.prefix_seconds:.2f} s, plain: {timing.plain_seconds:.2f} s, "
            f"speed-up {timing.speedup:.1f}x, max |cosine difference| {timing.max_abs_diff:.2e}"
        )

    last_write = [time.monotonic()]
    bar = tqdm(total=len(rows), unit="img", desc="intrinsic", file=sys.stderr,
               disable=args.quiet)  # fmt: skip

    def progress(done: int, scores) -> None:
        if args.output is not None and time.monotonic() - last_write[0] > 30:
            partial = {**header, "complete": False, "done": done}
            _write_json(args.output, {**partial, "per_image": _per_image(rows, scores)})
            last_write[0] = time.monotonic()
        bar.update(done - bar.n)

    start = time.perf_counter()
    result, scores = run_intrinsic(
        scorer,
        rows,
        prefix_reuse=not args.no_prefix_reuse,
        chains_per_batch=args.chains_per_batch,
        on_progress=progress,
    )
    bar.close()
    elapsed = time.perf_counter() - start

    print(f"{'metric':<10} {'value':>8}")
    print(f"{'positive':<10} {result.positive:>8.2f}")
    print(f"{'negative':<10} {result.negative:>8.2f}")
    print(f"{'average':<10} {result.average:>8.2f}")
    print(
        f"{result.n_images} images scored, {result.n_skipped} skipped (< 3 captions), "
        f"{elapsed:.1f} s"
    )
    if args.output is not None:
        payload = {
            **header,
            "complete": True,
            "positive": result.positive,
            "negative": result.negative,
            "average": result.average,
            "n_images": result.n_images,
            "n_skipped": result.n_skipped,
            "prefix_reuse": not args.no_prefix_reuse,
            "seconds": elapsed,
            "timing": None
            if timing is None
            else {
                "chains": timing.chains,
                "captions": timing.captions,
                "prefix_seconds": timing.prefix_seconds,
                "plain_seconds": timing.plain_seconds,
                "speedup": timing.speedup,
                "max_abs_diff": timing.max_abs_diff,
            },
            "per_image": _per_image(rows, scores, result.per_image),
        }
        _write_json(args.output, payload)
        print(f"wrote {args.output}")
    return 0
