"""``specs score``: score a file of (image, caption) rows."""

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
    load_scorer,
    nonnegative_int,
    positive_int,
    refuse_existing,
    register_inputs,
    rows_exit_status,
    source_options,
)
from specs_metric.errors import OutputError, UsageError
from specs_metric.runtime.policy import CPU_POLICY, CUDA_TOKEN_BUDGET
from specs_metric.scoring.scales import SCALES

BY_DEVICE = "default: by device"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score image-caption rows (JSONL, CSV, JSON, webdataset shards, parquet, ...)",
        description="Score every row of INPUT; writes one output row per input row, in order.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument(
        "--input",
        required=True,
        help=INPUT_HELP,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--output", type=Path, help="results: .jsonl, .csv or .parquet (format by extension)"
    )
    where.add_argument(
        "--output-dir",
        type=Path,
        help="one output per input file (shard), named after it, with its summary and "
        ".job.json; --resume skips finished shards",
    )
    p.add_argument(
        "--output-format",
        default=None,
        choices=["jsonl", "csv", "parquet"],
        help="format of the files in --output-dir (default jsonl; --output's format follows "
        "its extension)",
    )
    add_source_options(p)
    add_batch_size_option(p)
    p.add_argument(
        "--token-budget",
        type=positive_int,
        default=None,
        help=f"rows x tokens per text batch ({BY_DEVICE}: {CPU_POLICY.token_budget} on a CPU, "
        f"{CUDA_TOKEN_BUDGET} on CUDA)",
    )
    add_model_options(p)
    p.add_argument("--scale", default="specs", choices=SCALES, help="score scale")
    p.add_argument(
        "--chunk-rows",
        type=positive_int,
        default=None,
        help=f"rows prepared and written together ({BY_DEVICE}: {CPU_POLICY.chunk_rows} on a "
        "CPU, 2048 on CUDA)",
    )
    p.add_argument(
        "--workers",
        type=nonnegative_int,
        default=None,
        help=f"tokenizing and image-decoding worker processes ({BY_DEVICE}: "
        f"{CPU_POLICY.workers} on a CPU; on CUDA one per core but one, at most 16)",
    )
    p.add_argument("--cache-dir", type=Path, help="on-disk image-embedding cache")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (a finished output with the same settings is kept)",
    )
    add_overwrite_option(p, resume=True)
    p.add_argument("--strict", action="store_true", help="exit 1 if any row has an error")
    add_progress_options(p)
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this process (and torchrun ranks); ray: a Ray Data pipeline (pip install "
        "'specs-metric[ray]')",
    )
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=0.0,
        help="Ray: GPUs per scoring actor (0 = CPU; default 0)",
    )
    p.add_argument(
        "--ray-workers", type=int, default=1, help="Ray: number of scoring actors (default 1)"
    )
    p.set_defaults(func=run)


def _outputs(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """The option and the files this command line writes its rows to."""
    if args.output is not None:
        return "--output", [args.output]
    from specs_metric.jobs.shards import plan

    return "--output-dir file", [out for _, out in plan(args.input, args.output_dir,
                                                        args.output_format)]  # fmt: skip


def check_earlier_runs(args: argparse.Namespace) -> None:
    """Refuse, in one line, to replace what an earlier run left at an output (a finished
    output, or the part files of an interrupted one) without ``--resume`` or
    ``--overwrite``."""
    from specs_metric.io.locking import OutputLock
    from specs_metric.io.writing import check_not_input
    from specs_metric.jobs.results import earlier_run

    if args.resume and args.overwrite:
        raise UsageError("--resume keeps an earlier run and --overwrite replaces it; choose one")
    option, outputs = _outputs(args)
    for out in outputs:
        check_not_input(out, option)  # even with --overwrite
    if args.resume or args.overwrite:
        return
    for out in outputs:
        state = earlier_run(out)
        if state is not None:  # a job writing it now is said as such (the lock's error)
            lock = OutputLock(out)
            lock.acquire()
            lock.release()
        if state == "complete":
            refuse_existing(option, out, "already exists", resume=False)
        if state == "partial":
            refuse_existing(
                option, out, "holds an interrupted run (its part files are kept)", resume=True
            )


def run(args: argparse.Namespace) -> int:
    from specs_metric.jobs.job import JobConfig, run_job
    from specs_metric.jobs.outputs import output_format
    from specs_metric.jobs.shards import run_shards
    from specs_metric.runtime.distributed import DistInfo, init_from_env, local_device

    register_inputs(args.input)
    if args.output is not None:
        if args.output.exists() and not args.output.is_file():
            # The result is renamed into place: that would replace a device or fail on a folder.
            raise OutputError(f"--output {args.output} exists and is not a regular file")
        if args.output_format is not None:
            raise UsageError(
                f"--output-format is for --output-dir; the format of --output {args.output} "
                "follows its extension (.jsonl, .csv or .parquet)"
            )
        output_format(args.output)  # the format follows the extension; others are refused
    else:
        args.output_format = args.output_format or "jsonl"
    check_earlier_runs(args)
    source = source_options(args)
    config = JobConfig(
        input=args.input,
        output=args.output or Path(),
        image_root=args.image_root,
        source=source,
        scale=args.scale,
        batch_size=args.batch_size,
        token_budget=args.token_budget,
        num_workers=args.workers,
        chunk_rows=args.chunk_rows,
        cache_dir=args.cache_dir,
        resume=args.resume,
        show_progress=not args.quiet,
    )
    if args.engine == "ray":
        from specs_metric.jobs.ray import RayOptions
        from specs_metric.jobs.ray_jobs import run_ray_jobs

        info = DistInfo()
        ray_options = RayOptions(
            model=args.model,
            address=args.ray_address,
            num_gpus_per_worker=args.num_gpus_per_worker,
            workers=args.ray_workers,
            precision=args.precision,
            reference_rounding=not args.full_precision_weights,
            long_captions=args.long_captions,
        )

        # The actors' device decides the batching defaults.
        config = config.for_device("cuda" if args.num_gpus_per_worker > 0 else "cpu")

        def jobs(configs: list[JobConfig]) -> list[dict]:  # one pipeline for all shards
            return run_ray_jobs(configs, ray_options)

    else:
        info = init_from_env(args.device)
        scorer = load_scorer(args, args.model, local_device(info, args.device))
        config = config.for_device(scorer.device)  # the batching defaults follow the device

        def jobs(configs: list[JobConfig]) -> list[dict]:
            return [run_job(c, scorer, info) for c in configs]

    if args.output_dir is not None:
        summary = run_shards(config, args.output_dir, args.output_format, jobs, info.is_main)
    else:
        (summary,) = jobs([config])
    if not info.is_main:
        return 0
    print(json.dumps(summary, indent=2, allow_nan=False), file=sys.stderr)
    return rows_exit_status("score", summary, args.strict)
