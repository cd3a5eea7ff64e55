"""Reports of meta-evaluation runs: markdown tables, JSON, and PNG plots.

Plots draw on matplotlib's Agg canvas directly (no pyplot, no global backend switch);
matplotlib is imported only when a plot is made. matplotlib is a dependency of the package,
but where it cannot be imported anyway (a broken or stripped install) a plot raises
:class:`~specs_metric.errors.PlotError`, and the commands write the rest of their report
with one warning line (:func:`try_plot`): the numbers are worth more than their picture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from specs_metric.errors import PlotError
from specs_metric.evaluation.stats import STATISTICS, Estimate
from specs_metric.io.jsonio import dumps
from specs_metric.io.writing import atomic_write, write_text

if TYPE_CHECKING:  # pragma: no cover
    from specs_metric.evaluation.compare import Comparison
    from specs_metric.evaluation.human import SetReport

STAT_TITLES = {
    "kendall_b": "Kendall τ-b",
    "kendall_c": "Kendall τ-c",
    "pearson": "Pearson r",
    "spearman": "Spearman ρ",
}


def write_json(data: dict, path: Path) -> Path:
    """Write ``data`` as strict JSON (no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, dumps(data, indent=2) + "\n")
    return path


def _num(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _est(e: Estimate | None, digits: int = 3) -> str:
    if e is None or not math.isfinite(e.value):
        return "–"
    return f"{e.value:.{digits}f} [{_num(e.low, digits)}, {_num(e.high, digits)}]"


# --------------------------------------------------------------------------------------
# specs bench human


def human_report_dict(reports: Sequence[SetReport], meta: dict) -> dict:
    """The JSON report of ``specs bench human``."""
    sets = []
    for rep in reports:
        metrics = []
        for m in rep.metrics:
            metrics.append(
                {
                    "label": m.label,
                    "metric": m.name,
                    "model": m.model,
                    "checkpoint_sha256": m.checkpoint_sha256,
                    "n_rows": m.n_rows,
                    "n_failed": m.n_failed,
                    "correlations": {k: e.as_dict() for k, e in m.correlations.items()},
                    "pairwise_accuracy": m.pairwise_accuracy.as_dict()
                    if m.pairwise_accuracy
                    else None,
                    "seconds": m.seconds,
                    "seconds_per_1000_captions": m.seconds_per_1000,
                    "n_scored_pairs": m.n_scored,
                    "model_load_seconds": m.load_seconds,
                    "skipped": m.skipped,
                    "errors": m.errors[:20],
                }
            )
        sets.append(
            {
                "name": rep.name,
                "n_rows": rep.n_rows,
                "n_images": rep.n_images,
                "n_groups": rep.n_groups,
                "metrics": metrics,
            }
        )
    return {**meta, "sets": sets}


def human_markdown(reports: Sequence[SetReport], meta: dict) -> str:
    """Markdown tables: one row per metric with correlations, CIs and cost."""
    level = int(round(100 * meta.get("level", 0.95)))
    lines = [
        "# Agreement with human judgments",
        "",
        f"Data: `{meta.get('data')}` (format `{meta.get('format')}`). "
        f"{level}% percentile bootstrap CIs over images, {meta.get('n_boot')} resamples, "
        f"seed {meta.get('seed')}. Time: seconds of scoring per 1,000 distinct captions "
        "(model loading excluded; scales of one checkpoint share one model pass).",
    ]
    for rep in reports:
        stats_used = [s for s in STATISTICS if any(s in m.correlations for m in rep.metrics)]
        has_pairs = any(m.pairwise_accuracy for m in rep.metrics)
        header = ["metric", "model", "n"] + [STAT_TITLES[s] for s in stats_used]
        if has_pairs:
            header.append("pairwise acc.")
        header.append("s / 1k captions")
        lines += [
            "",
            f"## {rep.name}",
            "",
            f"{rep.n_rows} judgments, {rep.n_images} images"
            + (f", {rep.n_groups} groups" if rep.n_groups else "")
            + ".",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for m in rep.metrics:
            if m.skipped:
                cells = [m.label, m.model or "", "0"] + ["–"] * len(stats_used)
                cells += ["–"] * has_pairs + [f"skipped: {m.skipped}"]
            else:
                cells = [m.label, f"`{m.model}`" if m.model else "", str(m.n_rows)]
                cells += [_est(m.correlations.get(s)) for s in stats_used]
                if has_pairs:
                    cells.append(_est(m.pairwise_accuracy))
                cells.append(_num(m.seconds_per_1000, 2))
            lines.append("| " + " | ".join(cells) + " |")
        failed = [m for m in rep.metrics if m.n_failed]
        for m in failed:
            lines.append(f"\n{m.label}: {m.n_failed} row(s) without a score, e.g. {m.errors[:1]}")
    return "\n".join(lines) + "\n"


def _canvas(nrows: int, ncols: int, width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotError(
            f"no plots: matplotlib cannot be imported ({exc}); reinstall it with "
            "pip install matplotlib"
        ) from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def try_plot(make: Callable[[], Path], warn: Callable[[str], None]) -> Path | None:
    """``make()`` (a plot), or None with a warning when plots cannot be made here."""
    try:
        return make()
    except PlotError as exc:
        warn(str(exc))
        return None


def _save(fig, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path


def plot_scatter(rep: SetReport, path: Path, max_points: int = 20000) -> Path:
    """Metric score against human score, one panel per metric, with a least-squares line."""
    shown = [m for m in rep.metrics if not m.skipped and m.n_rows >= 2]
    n = max(1, len(shown))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = _canvas(rows, cols, 4.2 * cols, 3.6 * rows)
    rng = np.random.default_rng(0)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(shown):
            ax.set_axis_off()
            continue
        m = shown[k]
        x, y = rep.scores[m.label], rep.human
        ok = np.isfinite(x)
        x, y = x[ok], y[ok]
        if x.size > max_points:  # keep the file small; the fit uses every point
            pick = rng.choice(x.size, max_points, replace=False)
        else:
            pick = slice(None)
        small = x.size <= 2000
        ax.scatter(x[pick], y[pick], s=14 if small else 5, alpha=0.6 if small else 0.3, lw=0)
        if np.ptp(x) > 0:
            slope, icept = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, slope * xs + icept, color="C3", lw=1.5)
        tau = m.correlations.get("kendall_b")
        title = m.label if tau is None else f"{m.label}  (τ-b {_num(tau.value)})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("metric score")
        ax.set_ylabel("human score")
    fig.suptitle(rep.name, fontsize=10)
    return _save(fig, path)


def plot_correlation_bars(rep: SetReport, path: Path) -> Path:
    """Grouped bars: each statistic per metric, with its bootstrap CI as error bar."""
    shown = [m for m in rep.metrics if m.correlations]
    stats_used = [s for s in STATISTICS if any(s in m.correlations for m in shown)]
    fig, axes = _canvas(1, 1, max(5.0, 1.2 * len(shown) * max(1, len(stats_used)) / 2), 4.0)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(stats_used))
    xs = np.arange(len(shown))
    for j, s in enumerate(stats_used):
        vals = np.array([m.correlations[s].value for m in shown])
        lows = np.array([m.correlations[s].low for m in shown])
        highs = np.array([m.correlations[s].high for m in shown])
        err = np.nan_to_num(np.vstack([vals - lows, highs - vals]), nan=0.0)
        ax.bar(
            xs + (j - (len(stats_used) - 1) / 2) * width,
            vals,
            width,
            yerr=err,
            capsize=3,
            label=STAT_TITLES[s],
        )
    ax.set_xticks(xs)
    ax.set_xticklabels([m.label for m in shown], rotation=20, ha="right", fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("correlation with human scores")
    ax.set_title(rep.name, fontsize=10)
    if stats_used:
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_human_report(
    reports: Sequence[SetReport],
    meta: dict,
    out_dir: Path,
    plots: bool = True,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and (optionally) PNG plots into ``out_dir``;
    without matplotlib, ``warn`` gets one line and no plot is made (the rest is written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": write_json(human_report_dict(reports, meta), out_dir / "report.json"),
        "markdown": out_dir / "report.md",
    }
    write_text(files["markdown"], human_markdown(reports, meta))
    if plots:
        try:
            for rep in reports:
                stem = rep.name.replace("/", "_")
                files[f"scatter:{rep.name}"] = plot_scatter(rep, out_dir / f"scatter_{stem}.png")
                files[f"bars:{rep.name}"] = plot_correlation_bars(rep, out_dir / f"bars_{stem}.png")
        except PlotError as exc:
            if warn is None:
                raise
            warn(str(exc))
    return files


# --------------------------------------------------------------------------------------
# specs compare


def compare_markdown(c: Comparison) -> str:
    """Markdown summary of a paired comparison of two score files."""
    level = int(round(100 * c.level))
    verdict = "significant" if c.significant else "not significant"
    if c.unit == "row":
        units = f"rows compared: {c.n_used} of {c.n_rows} ({c.n_skipped} skipped for errors)"
    else:
        units = (
            f"images compared (paired by {c.pair_by}): {c.n_used} ({c.n_skipped} skipped for "
            f"errors), from {c.captions_a} captions in A and {c.captions_b} in B"
        )
    lines = [
        "# Paired comparison of two score files",
        "",
        f"- A: `{c.file_a}` (model `{c.model_a}`)",
        f"- B: `{c.file_b}` (model `{c.model_b}`)",
        f"- scale: `{c.scale}`; {units}",
        "",
        "| mean A | mean B | mean B − A | "
        f"{level}% CI (paired bootstrap) | p ({c.test}) | B wins | ties | B loses |",
        "|---|---|---|---|---|---|---|---|",
        f"| {_num(c.mean_a, 4)} | {_num(c.mean_b, 4)} | {_num(c.mean_diff, 4)} | "
        f"[{_num(c.ci_low, 4)}, {_num(c.ci_high, 4)}] | {_num(c.p_value, 4)} | "
        f"{c.wins} | {c.ties} | {c.losses} |",
        "",
        f"The difference is **{verdict}** at the {100 - level}% level "
        f"({c.n_boot} bootstrap resamples, {c.n_perm} sign flips, seed {c.seed}).",
    ]
    if c.averaged:
        lines.append(
            "Several captions per image: each side's scores were averaged per image before "
            "the test."
        )
    if c.top_changes:

        def cell(text: object) -> str:
            cap = str(text).replace("|", "\\|").replace("\n", " ")
            return cap if len(cap) <= 80 else cap[:77] + "..."

        what = "Rows" if c.unit == "row" else "Images"
        two = c.unit != "row"
        lines += ["", f"## {what} that changed most", ""]
        if two:
            lines += [
                "| id | image | caption A | caption B | A | B | B − A |",
                "|---|---|---|---|---|---|---|",
            ]
        else:
            lines += ["| id | image | caption | A | B | B − A |", "|---|---|---|---|---|---|"]
        for r in c.top_changes:
            caps = f"{cell(r['caption'])} | {cell(r['caption_b'])}" if two else cell(r["caption"])
            lines.append(
                f"| {r['id']} | {r['image']} | {caps} | {_num(r['score_a'], 4)} | "
                f"{_num(r['score_b'], 4)} | {_num(r['diff'], 4)} |"
            )
    return "\n".join(lines) + "\n"


def distributions_figure(
    a: np.ndarray,
    b: np.ndarray,
    labels: tuple[str, str] = ("A", "B"),
    unit: str = "row",
):
    """The figure of :func:`plot_distributions`: counts are of ``unit`` (rows or images)."""
    fig, axes = _canvas(1, 2, 10.0, 3.8)
    lo = float(min(a.min(), b.min())) if a.size else 0.0
    hi = float(max(a.max(), b.max())) if a.size else 1.0
    bins = np.linspace(lo, hi if hi - lo > 1e-9 else lo + 1e-6, 41)
    ax = axes[0, 0]
    ax.hist(a, bins=bins, alpha=0.55, label=labels[0])
    ax.hist(b, bins=bins, alpha=0.55, label=labels[1])
    ax.set_xlabel("score" if unit == "row" else f"score (mean per {unit})")
    ax.set_ylabel(f"{unit}s")
    ax.legend(fontsize=8)
    ax.set_title("score distributions", fontsize=10)
    ax = axes[0, 1]
    d = b - a
    lo, hi = (float(d.min()), float(d.max())) if d.size else (0.0, 0.0)
    pad = max(1e-9, 1e-6 * abs(hi)) if hi - lo < 1e-9 else 0.0  # constant shift: one bar
    ax.hist(d, bins=np.linspace(lo - pad, hi + pad, 41), color="C2")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"B − A per {unit}")
    ax.set_ylabel(f"{unit}s")
    ax.set_title("paired differences", fontsize=10)
    return fig


def plot_distributions(
    a: np.ndarray,
    b: np.ndarray,
    path: Path,
    labels: tuple[str, str] = ("A", "B"),
    unit: str = "row",
) -> Path:
    """Histograms of the two score sets, and of the paired differences B − A, per ``unit``
    (``row``, or ``image`` when captions were averaged per image)."""
    return _save(distributions_figure(a, b, labels, unit), path)


def plot_sweep(result: dict, path: Path) -> Path:
    """Mean score against checkpoint (``specs sweep``), with the bootstrap CI as a band."""
    return _save(sweep_figure(result), path, layout=False)


def sweep_figure(result: dict):
    """The figure of :func:`plot_sweep`, laid out so that no two tick labels overlap
    (:func:`fit_tick_labels`)."""
    from specs_metric.evaluation.reports.ticks import fit_tick_labels, short_names

    cks = result["checkpoints"]
    x = np.arange(len(cks))
    mean = np.array([c["mean"] for c in cks], dtype=float)
    low = np.array([c["ci_low"] for c in cks], dtype=float)
    high = np.array([c["ci_high"] for c in cks], dtype=float)
    fig, axes = _canvas(1, 1, max(5.0, min(14.0, 1.0 + 0.7 * len(cks))), 4.2)
    ax = axes[0, 0]
    level = int(round(100 * result.get("level", 0.95)))
    ax.fill_between(x, low, high, alpha=0.25, color="C0", label=f"{level}% CI (images)")
    ax.plot(x, mean, "o-", color="C0", label="mean score")
    best = next(i for i, c in enumerate(cks) if c["name"] == result["best"])
    ax.plot([x[best]], [mean[best]], "*", color="C3", markersize=14, label="best")
    for i, c in enumerate(cks):
        vs = c.get("vs_previous")
        if vs and vs.get("significant"):  # a step the paired test supports
            ax.annotate("*", (x[i], high[i]), ha="center", va="bottom", fontsize=12)
    prefix, names = short_names([c["name"] for c in cks])
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=9)
    ax.margins(x=0.05, y=0.15)  # room for the stars above the bands
    order = {"natural": "natural order of the names", "given": "the order given"}.get(
        result.get("order", "given"), "the order given"
    )
    named = f"{prefix}…, " if prefix else ""
    ax.set_xlabel(f"checkpoint ({named}in {order})")
    ax.set_ylabel(f"mean score ({result.get('scale', 'specs')})")
    ax.set_title(f"{result.get('model')}: * = significant change from the previous", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fit_tick_labels(fig, ax)
    return fig
