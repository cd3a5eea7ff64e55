"""Score a captioner's checkpoints on the same images and test each step (``specs sweep``).

One caption file per checkpoint (rows ``id``, ``image``, ``caption``, as for ``specs
score``), in training order. Each file is scored by the streaming job of ``specs score``
into ``OUT/scores/<label>.jsonl``; all of them share the image-embedding cache
``OUT/cache``, so each distinct image goes through the image tower once for the whole sweep
(and never again when files are added later). With ``resume``, a score file whose job is
complete and whose settings match is reused as it is, so adding a checkpoint to a sweep
scores only the new file.

Per checkpoint: the mean score over its rows (the mean ``specs score`` reports for that
file) with a bootstrap CI that resamples images (an image's captions are drawn together),
and paired tests against the previous checkpoint and against the best one, made by
:func:`specs_metric.evaluation.compare.compare_files` with rows paired by image (several
captions of an
image are averaged per checkpoint before the test).

Writes ``OUT/sweep.json``, ``OUT/sweep.png`` (score against checkpoint with CI bands) and
``OUT/report.html`` (the plot inlined).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specs_metric.errors import SweepError
from specs_metric.evaluation.compare import cluster_bootstrap_ci, compare_files, read_scores
from specs_metric.jobs.job import JobConfig, run_job
from specs_metric.scoring.scorer import Scorer

# keys of a compare_files result kept in vs_previous / vs_best
_TEST_KEYS = (
    "mean_a",
    "mean_b",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_value",
    "n_used",
    "wins",
    "ties",
    "losses",
)



@dataclass
class SweepOptions:
    """Settings of :func:`run_sweep` besides the files and the model."""

    image_root: Path | None = None
    scale: str = "specs"
    batch_size: int = 1  # as in `specs score`: embeddings independent of batch mates
    num_workers: int = 1
    resume: bool = False
    show_progress: bool = True
    n_boot: int = 10000
    n_perm: int = 10000
    level: float = 0.95
    seed: int = 0
    plot: bool = True


def checkpoint_labels(files: Sequence[Path], labels: Sequence[str] | None = None) -> list[str]:
    """Labels of the checkpoints: ``labels`` or the file names without their suffix.

    Raises:
        SweepError: wrong count, a repeated label, or one that is not a safe file name.
    """
    if labels is None:
        labels = [Path(f).stem for f in files]
    elif len(labels) != len(files):
        raise SweepError(f"--labels has {len(labels)} label(s) for {len(files)} file(s)")
    seen: set[str] = set()
    for label in labels:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", label):
            raise SweepError(
                f"label {label!r}: use letters, digits and . _ + = - (it names a score file)"
            )
        if label in seen:
            raise SweepError(f"label {label!r} is given twice; name the files apart with --labels")
        seen.add(label)
    return list(labels)


def _checkpoint_stats(path: Path, options: SweepOptions, seed: int) -> dict:
    """n, per-image clusters and the image-bootstrap CI of the row mean of one score file."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for rec in read_scores(path).values():
        if rec.get("error") or rec.get("score") is None:
            continue
        key = str(rec["image"])
        sums[key] = sums.get(key, 0.0) + float(rec["score"])
        counts[key] = counts.get(key, 0) + 1
    if not sums:
        raise SweepError(f"{path}: no row was scored")
    s = np.array(list(sums.values()))
    c = np.array(list(counts.values()), dtype=float)
    low, high = cluster_bootstrap_ci(
        s, c, options.n_boot, options.level, np.random.default_rng(seed)
    )
    return {"n": int(c.sum()), "n_images": len(sums), "ci_low": low, "ci_high": high}


def _test(a: Path, b: Path, against: str, options: SweepOptions) -> dict:
    c = compare_files(
        a,
        b,
        pair_by="image",
        n_boot=options.n_boot,
        n_perm=options.n_perm,
        level=options.level,
        seed=options.seed,
        top=0,
    ).as_dict()
    return {"against": against, **{k: c[k] for k in _TEST_KEYS}, "significant": c["significant"]}


def _score_files(
    paths: Sequence[Path], names: Sequence[str], scorer: Scorer, out: Path, options: SweepOptions
) -> tuple[list[dict], int]:
    """Score every file into ``OUT/scores/<name>.jsonl`` (one shared image cache); the
    job summaries and the number of images encoded."""
    score_dir = out / "scores"
    score_dir.mkdir(parents=True, exist_ok=True)
    encoded = 0
    summaries = []
    for k, (path, name) in enumerate(zip(paths, names, strict=True), 1):
        if options.show_progress:
            print(f"[{k}/{len(paths)}] {name}: {path}", file=sys.stderr)
        config = JobConfig(
            input=path,
            output=score_dir / f"{name}.jsonl",
            image_root=options.image_root,
            scale=options.scale,
            batch_size=options.batch_size,
            num_workers=options.num_workers,
            cache_dir=out / "cache",
            resume=options.resume,
            show_progress=options.show_progress,
        )
        summary = run_job(config, scorer)
        encoded += int(summary.get("images_encoded_rank0", 0))
        summaries.append(summary)
    return summaries, encoded


def _checkpoint_row(path: Path, name: str, summary: dict, options: SweepOptions, seed: int) -> dict:
    """One checkpoint's line of the sweep: its scores and the CI of their mean."""
    stats = _checkpoint_stats(Path(summary["output"]), options, seed)
    return {
        "name": name,
        "file": str(path),
        "scores": str(summary["output"]),
        "n": summary["n_scored"],
        "n_errors": summary["n_errors"],
        "n_images": stats["n_images"],
        "mean": summary["mean"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
    }


def _add_tests(checkpoints: list[dict], best: int, options: SweepOptions) -> None:
    """Each checkpoint against the previous one and against the best (``vs_previous``,
    ``vs_best``; None where there is nothing to test against)."""
    for k, ck in enumerate(checkpoints):
        prev = checkpoints[k - 1] if k else None
        ck["vs_previous"] = (
            _test(Path(prev["scores"]), Path(ck["scores"]), prev["name"], options) if prev else None
        )
        top = checkpoints[best]
        ck["vs_best"] = (
            _test(Path(top["scores"]), Path(ck["scores"]), top["name"], options)
            if k != best
            else None
        )


def run_sweep(
    files: Sequence[str | os.PathLike[str]],
    scorer: Scorer,
    out: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    options: SweepOptions | None = None,
) -> dict:
    """Score each caption file with ``scorer`` and test the checkpoints against each other.

    Returns:
        The contents of ``OUT/sweep.json``.

    Raises:
        SweepError: bad labels, a missing file, or a file without a scored row.
        ValueError: ``resume`` with a score file made under other settings.
    """
    options = options or SweepOptions()
    out = Path(out)
    paths = [Path(f) for f in files]
    if not paths:
        raise SweepError("no caption file given")
    for p in paths:
        if not p.is_file():
            raise SweepError(f"{p}: no such file")
    names = checkpoint_labels(paths, labels)
    summaries, encoded = _score_files(paths, names, scorer, out, options)
    checkpoints = [
        _checkpoint_row(path, name, summary, options, options.seed + k)
        for k, (path, name, summary) in enumerate(zip(paths, names, summaries, strict=True))
    ]
    best = max(range(len(checkpoints)), key=lambda i: checkpoints[i]["mean"])
    _add_tests(checkpoints, best, options)
    images = set()
    for ck in checkpoints:
        images.update(str(r["image"]) for r in read_scores(ck["scores"]).values())
    result = {
        "model": scorer.name,
        "checkpoint_sha256": scorer.checkpoint_sha256,
        "scale": options.scale,
        "level": options.level,
        "n_boot": options.n_boot,
        "n_perm": options.n_perm,
        "seed": options.seed,
        "images": len(images),
        "images_encoded": encoded,
        "best": checkpoints[best]["name"],
        "checkpoints": checkpoints,
    }
    write_sweep_report(result, out, plot=options.plot)
    return result


def write_sweep_report(result: dict, out: Path, *, plot: bool = True) -> None:
    """``sweep.json``, ``sweep.png`` (unless ``plot`` is false) and ``report.html``."""
    from specs_metric.evaluation.reports.html import sweep_page
    from specs_metric.evaluation.reports.html_parts import read_png
    from specs_metric.evaluation.reports.report import plot_sweep
    from specs_metric.io.jsonio import dumps
    from specs_metric.io.writing import write_text

    write_text(out / "sweep.json", dumps(result, indent=2) + "\n")
    png = read_png(plot_sweep(result, out / "sweep.png")) if plot else None
    write_text(out / "report.html", sweep_page(result, plot_png=png))
