"""``specs score --output-dir``: one scoring job per input file (shard), map-per-shard.

Each file of the input spec is scored into ``DIR/<shard name>.<format>`` with its own
``.summary.json`` and ``.job.json``, so a big job is many small independent ones. With
``resume``, a shard whose job is complete is skipped and the unfinished one continues where
it stopped (see :func:`specs_metric.jobs.job.run_job`). ``DIR/summary.json`` sums up all shards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from specs_metric.data.locations import SHARD_SUFFIXES, TABLE_SUFFIXES, TEXT_SUFFIXES, expand
from specs_metric.data.sources import protect_inputs
from specs_metric.errors import UsageError
from specs_metric.io.jsonio import write_json
from specs_metric.io.writing import check_not_input
from specs_metric.jobs.job import JobConfig
from specs_metric.scoring.scales import corpus_from_mean

_INPUT_SUFFIXES = SHARD_SUFFIXES + TABLE_SUFFIXES + TEXT_SUFFIXES


def shard_name(name: str) -> str:
    """The output stem of an input file: its name without the input suffix.

    >>> shard_name("s3://bucket/laion/00042.tar"), shard_name("/data/train")
    ('00042', 'train')
    """
    base = name.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _INPUT_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def plan(spec: str | Path, output_dir: Path, fmt: str) -> list[tuple[str, Path]]:
    """``(input file, output file)`` per shard, in input order.

    Raises:
        UsageError: two shards would write the same output (same name in two folders).
    """
    pairs: list[tuple[str, Path]] = []
    seen: dict[Path, str] = {}
    for name in expand(spec):
        out = output_dir / f"{shard_name(name)}.{fmt}"
        if out in seen:
            raise UsageError(
                f"--output-dir: {name} and {seen[out]} would both write {out}; "
                "give shards with distinct names"
            )
        seen[out] = name
        pairs.append((name, out))
    return pairs


def combine(summaries: list[dict], scale: str) -> dict:
    """Counts, mean and std over all shards, from the per-shard summaries (``mean``, ``std``
    and ``corpus_score`` are null when no row was scored, as in a shard's summary)."""
    n = sum(s["n_scored"] for s in summaries)
    total = sum(s["mean"] * s["n_scored"] for s in summaries if s["n_scored"])
    total_sq = sum(
        (s["std"] ** 2 + s["mean"] ** 2) * s["n_scored"] for s in summaries if s["n_scored"]
    )
    mean = total / n if n else None
    std = math.sqrt(max(total_sq / n - mean * mean, 0.0)) if n else None
    errors = [s["first_error"] for s in summaries if s.get("first_error")]
    return {
        "n_rows": sum(s["n_rows"] for s in summaries),
        "n_scored": n,
        "n_errors": sum(s["n_errors"] for s in summaries),
        "n_truncated": sum(s["n_truncated"] for s in summaries),
        "n_duplicate_ids": sum(s["n_duplicate_ids"] for s in summaries),
        "n_warnings": sum(s["n_warnings"] for s in summaries),
        "mean": mean,
        "std": std,
        "first_error": errors[0] if errors else None,
        "corpus_score": None if mean is None else corpus_from_mean(mean, scale),
        "scale": scale,
    }


def run_shards(
    config: JobConfig,
    output_dir: Path,
    fmt: str,
    run: Callable[[list[JobConfig]], list[dict]],
    is_main: bool = True,
) -> dict:
    """Score each file of ``config.input`` into ``output_dir`` with ``run`` (which runs a
    list of jobs, e.g. :func:`~specs_metric.jobs.job.run_job` on each, and returns their
    summaries); returns (and, on the main process, writes) the combined summary."""
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    protect_inputs(config.input)  # every shard, before the first output is written
    pairs = plan(config.input, output_dir, fmt)
    for _, out in pairs:
        check_not_input(out, "--output-dir file")
    summaries = run([replace(config, input=name, output=out) for name, out in pairs])
    if not is_main:
        return {}
    shards = [
        {"input": name, "output": str(out), "n_rows": summary["n_rows"]}
        for (name, out), summary in zip(pairs, summaries, strict=True)
    ]
    combined = {
        **combine(summaries, config.scale),
        "shards": shards,
        "seconds": round(time.perf_counter() - started, 3),
        "output_dir": str(output_dir),
    }
    write_json(output_dir / "summary.json", combined)
    return combined
