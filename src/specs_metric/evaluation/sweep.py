"""Score a captioner's checkpoints on the same images and test each step (``specs sweep``).

One caption file per checkpoint (rows ``id``, ``image``, ``caption``, as for ``specs
score``). The checkpoints are put in training order by the numbers in their names
(:func:`natural_key`: ``ckpt-2000`` before ``ckpt-10000``, which a shell's glob sorts the
other way), unless the order given is asked for (``order="given"``, and always with
``labels``); the report says which order it used. Each file is scored by the streaming job
of ``specs score`` into ``OUT/scores/<label>.jsonl``; all of them share the image-embedding
cache ``OUT/cache``, so each distinct image goes through the image tower once for the whole
sweep (and never again when files are added later). With ``resume``, a score file whose job
is complete and whose settings match is reused as it is, so adding a checkpoint to a sweep
scores only the new file.

Per checkpoint: the mean score over its rows (the mean ``specs score`` reports for that
file) with a bootstrap CI that resamples images (an image's captions are drawn together),
and paired tests against the previous checkpoint and against the best one, made by
:func:`specs_metric.evaluation.compare.compare_files` with rows paired by image (several
captions of an
image are averaged per checkpoint before the test).

Writes ``OUT/sweep.json``, ``OUT/sweep.png`` (score against checkpoint with CI bands) and
``OUT/report.html`` (the plot inlined). A folder that already holds a sweep is refused
unless ``resume`` (its finished score files are reused; every checkpoint of its report must
be among the files) or ``overwrite`` (its score files and report are replaced).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specs_metric.errors import OutputError, SpecsError, SweepError, UsageError
from specs_metric.evaluation.compare import compare_files, read_scores
from specs_metric.evaluation.stats import cluster_bootstrap_ci
from specs_metric.io.reading import read_json
from specs_metric.jobs.job import JobConfig, run_job
from specs_metric.limits import MAX_METADATA_BYTES
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
ORDERS = ("natural", "given")
ORDER_TEXT = {
    "natural": "natural order of the names (the numbers in them compared as numbers)",
    "given": "the order given",
}
_REPORT_FILES = ("sweep.json", "sweep.png", "report.html")


def _stderr(message: str) -> None:
    """Where the library tells the user about a sweep by default: stderr."""
    print(message, file=sys.stderr)


@dataclass
class SweepOptions:
    """Settings of :func:`run_sweep` besides the files and the model.

    ``order`` None means natural, or given when labels are given. ``check_rows`` is called
    with each checkpoint's job summary as soon as its file is scored (the command's check of
    row errors); ``tell`` gets the lines for the user: the order used and warnings (a plot
    that cannot be made).
    """

    image_root: Path | None = None
    scale: str = "specs"
    batch_size: int | None = None  # by device, as in `specs score` (1 on a CPU)
    num_workers: int = 1
    resume: bool = False
    overwrite: bool = False
    order: str | None = None
    show_progress: bool = True
    n_boot: int = 10000
    n_perm: int = 10000
    level: float = 0.95
    seed: int = 0
    plot: bool = True
    check_rows: Callable[[dict], object] | None = None
    tell: Callable[[str], None] = field(default=_stderr)


def natural_key(name: str) -> tuple:
    """Sort key comparing the digit runs of ``name`` as numbers and the rest as text.

    Example:
        >>> sorted(["ckpt-2000", "ckpt-10000", "ckpt-1000"], key=natural_key)
        ['ckpt-1000', 'ckpt-2000', 'ckpt-10000']
    """
    parts = re.split(r"([0-9]+)", name)
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in parts if part
    ) + ((2, 0, name),)


def ordered(
    paths: Sequence[Path], names: Sequence[str], order: str
) -> tuple[list[Path], list[str]]:
    """The checkpoints in ``order``: ``natural`` (by :func:`natural_key` of their names) or
    ``given``."""
    if order not in ORDERS:
        raise UsageError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    pairs = list(zip(paths, names, strict=True))
    if order == "natural":
        pairs.sort(key=lambda pair: natural_key(pair[1]))
    return [p for p, _ in pairs], [n for _, n in pairs]


def _score_files_in(out: Path) -> list[Path]:
    """The files this sweep's jobs write in ``OUT/scores`` (outputs, part files, records)."""
    folder = out / "scores"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if ".jsonl" in p.name and p.is_file())


def _earlier_sweep(out: Path) -> list[str] | None:
    """The checkpoint names of the sweep already in ``out`` ([] when its report is missing
    or unreadable), or None when ``out`` holds none."""
    report = out / "sweep.json"
    if report.is_file():
        try:
            report_data = read_json(report, MAX_METADATA_BYTES, what="sweep report", protect=False)
            return [str(c["name"]) for c in report_data["checkpoints"]]
        except (OSError, SpecsError, KeyError, TypeError):
            return []
    if _score_files_in(out) or any((out / name).exists() for name in _REPORT_FILES):
        return []
    return None


def _some(names: Sequence[str], most: int = 6) -> str:
    """``names`` joined, the middle ones elided when there are more than ``most``."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"


def check_output_folder(out: Path, names: Sequence[str], options: SweepOptions) -> None:
    """Refuse to replace an earlier sweep in ``out`` silently (one line each):

    - without ``resume`` or ``overwrite``: any earlier sweep;
    - with ``resume``: one whose report has checkpoints that are not among ``names`` (the
      new report would drop them);

    and with ``overwrite``, remove the earlier sweep's score files and report (the image
    cache is kept: it only depends on the images and the model).
    """
    if options.resume and options.overwrite:
        raise UsageError("--resume keeps an earlier sweep and --overwrite replaces it; choose one")
    earlier = _earlier_sweep(out)
    if earlier is None:
        return
    if options.overwrite:
        for path in _score_files_in(out) + [out / name for name in _REPORT_FILES]:
            path.unlink(missing_ok=True)
        return
    shown = f"a sweep of {len(earlier)} checkpoint(s) ({_some(earlier)})" if earlier else (
        "an unfinished sweep"
    )
    if not options.resume:
        raise OutputError(
            f"--output {out} already holds {shown}; pass --resume to reuse its score files "
            "(and add files to it) or --overwrite to replace it"
        )
    dropped = [name for name in earlier if name not in names]
    if dropped:
        raise OutputError(
            f"--resume: the sweep in {out} also has {_some(dropped)}, not among the files "
            "given (its new report would drop them); give those files too, or pass "
            "--overwrite to replace the sweep"
        )


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
        if options.check_rows is not None:
            options.check_rows(summary)
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
        OutputError: ``out`` holds an earlier sweep (see :func:`check_output_folder`).
        JobError: ``resume`` with a score file made under other settings.
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
    order = options.order or ("given" if labels is not None else "natural")
    paths, names = ordered(paths, names, order)
    check_output_folder(out, names, options)
    moved = [str(p) for p in paths] != [str(f) for f in files]
    if moved or options.show_progress:  # a new order is said even under --quiet
        options.tell(
            f"specs sweep: checkpoints in {ORDER_TEXT[order]}"
            f"{' (not the order given)' if moved else ''}: {', '.join(names)}"
        )
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
        "order": order,
        "order_description": ORDER_TEXT[order],
        "best": checkpoints[best]["name"],
        "checkpoints": checkpoints,
    }
    write_sweep_report(result, out, plot=options.plot, tell=options.tell)
    return result


def write_sweep_report(
    result: dict, out: Path, *, plot: bool = True, tell: Callable[[str], None] = _stderr
) -> None:
    """``sweep.json``, ``sweep.png`` (unless ``plot`` is false, or matplotlib cannot be
    imported: then ``tell`` gets one warning line and the page says so) and
    ``report.html``."""
    from specs_metric.evaluation.reports.html import sweep_page
    from specs_metric.evaluation.reports.html_parts import read_png
    from specs_metric.evaluation.reports.report import plot_sweep, try_plot
    from specs_metric.io.jsonio import dumps
    from specs_metric.io.writing import write_text

    write_text(out / "sweep.json", dumps(result, indent=2) + "\n")
    notes: list[str] = []
    png = None
    if plot:
        made = try_plot(lambda: plot_sweep(result, out / "sweep.png"), notes.append)
        for note in notes:
            tell(f"specs sweep: warning: {note}")
        png = read_png(made) if made is not None else None
    write_text(out / "report.html", sweep_page(result, plot_png=png, notes=notes))
