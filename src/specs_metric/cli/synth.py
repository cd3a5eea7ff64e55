"""``specs synth``: generate the synthetic specificity world (sDCI layout + graded captions)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from specs_metric.cli.common import add_progress_options, nonnegative_int, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate synthetic scenes with known facts (sDCI layout + graded captions)",
        description=(
            "Render N deterministic scenes and write DIR/images/, DIR/train.parquet, "
            "DIR/test.parquet (sDCI layout), DIR/graded_train.jsonl, DIR/graded_test.jsonl "
            "and DIR/world.json. The same arguments give byte-identical files."
        ),
    )
    p.add_argument("--n", type=positive_int, required=True, help="number of scenes (train + test)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--output", type=Path, required=True, help="output directory")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share of test scenes, rounded (default 0.2)",
    )
    p.add_argument(
        "--image-size", type=positive_int, default=64, help="image side in pixels (default 64)"
    )
    p.add_argument(
        "--graded-per-scene",
        type=nonnegative_int,
        default=6,
        help="graded candidate captions per scene (default 6)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a data set already in --output (removes only its own files; default: "
        "refuse a folder that is not empty)",
    )
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.synth import generate

    start = time.perf_counter()
    summaries = generate(
        args.output,
        n=args.n,
        seed=args.seed,
        image_size=args.image_size,
        test_fraction=args.test_fraction,
        graded_per_scene=args.graded_per_scene,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    for s in summaries:
        print(
            f"{s.split:5s}: {s.scenes} scenes, {s.captions} cumulative captions, "
            f"{s.negatives} negatives, {s.graded} graded captions, "
            f"full captions {s.tokens_min}-{s.tokens_max} tokens"
        )
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0
