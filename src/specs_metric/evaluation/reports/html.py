"""Self-contained HTML reports (explain, compare, sweep): one file, readable offline.

Everything a page needs is inline: the CSS, a few lines of JavaScript that sort a table when
its header is clicked, image thumbnails as ``data:`` URIs (downscaled by PIL, so a page
stays small however large the images are) and plots as PNG ``data:`` URIs. Caption segments
are drawn as spans coloured by their delta on a diverging scale (red lowers the score, green
raises it), with the values in the ``title`` attribute, shown on hover.

Sorting can also be asked for in the URL: ``report.html#sort=TABLE_ID:COLUMN:desc`` sorts
table ``TABLE_ID`` by its column ``COLUMN`` (0-based) once the page has loaded, and
``#click=TABLE_ID:COLUMN:TIMES`` clicks that header ``TIMES`` times (for tests). The page
records the last sort in ``data-sorted`` on ``<body>``, which tests read back. Empty cells
(missing values) stay last in either direction.

The three pages are built from the blocks of
:mod:`specs_metric.evaluation.reports.html_parts` (escaping,
cells, tables, colours, thumbnails and the page frame).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from specs_metric.evaluation.reports.html_parts import (
    Cell,
    Thumbnails,
    caption_html,
    delta_color,
    delta_scale,
    esc,
    facts_html,
    fmt,
    legend_html,
    note_html,
    num_cell,
    page,
    png_data_uri,
    table_html,
)

if TYPE_CHECKING:  # pragma: no cover
    from specs_metric.evaluation.compare import Comparison

# the pages, and the delta colouring they share with other renderers
__all__ = ["compare_page", "delta_color", "delta_scale", "explain_page", "sweep_page"]

# Rows of a table a page shows at most by default: a row with its thumbnail and coloured
# segments is a few kilobytes, so 2,000 rows made an 11.8 MB page. The files hold every row.
MAX_HTML_ROWS = 500


def _shown(n_shown: int, n_total: int, where: str | None) -> str | None:
    """The note of a table capped at ``n_shown`` of ``n_total`` rows (None if all shown)."""
    if n_shown >= n_total:
        return None
    held = f"; every row is in {where}" if where else ""
    return f"Showing the first {n_shown} of {n_total} rows{held}."


def explain_page(
    records: list[dict],
    image_root: Path | None,
    title: str,
    *,
    max_rows: int | None = MAX_HTML_ROWS,
    output: str | None = None,
    warn: Callable[[str], None] | None = None,
    summary: dict | None = None,
) -> str:
    """The report of ``specs explain``: one row per caption, its segments coloured by delta.

    ``records`` are explain output rows (``id, image, caption, score, segments, error``);
    relative image paths are resolved against ``image_root``. Columns sort by clicking; the
    "lowest delta" column finds the captions with the most harmful segment. The facts count
    every record (or, given ``summary``, the run's summary, when ``records`` are only its
    first rows); the table shows the first ``max_rows`` (None: all), with a note saying so
    and naming ``output``, the file that holds them all. ``warn`` gets the note of images
    without a thumbnail.
    """
    thumbs = Thumbnails([image_root])
    scale = delta_scale(records)
    if summary is None:
        from specs_metric.jobs.explain_files import summarize_records

        summary = summarize_records(records)
    facts = facts_html(
        [
            ("rows", summary["n_rows"]),
            ("scored", summary["n_scored"]),
            ("errors", summary["n_errors"]),
            ("segments", summary["n_segments"]),
            ("segments beyond the context", summary["n_beyond_context"]),
            ("mean score", fmt(summary["mean"])),
        ]
    )
    rows = []
    shown = records if max_rows is None else records[:max_rows]
    for rec in shown:
        segs = [s for s in rec.get("segments") or () if not s.get("beyond_context")]
        deltas = [float(s["delta"]) for s in segs if s.get("delta") is not None]
        low = min(deltas) if deltas else None
        caption = caption_html(rec, scale)
        if rec.get("error"):
            caption = f'<span class="err">{esc(rec["error"])}</span><br>{esc(rec.get("caption"))}'
        rows.append(
            [
                Cell(esc(rec.get("id")), rec.get("id")),
                Cell(thumbs.cell(rec.get("image")), str(rec.get("image"))),
                num_cell(rec.get("score")),
                Cell(str(len(rec.get("segments") or ())), len(rec.get("segments") or ()), "num"),
                num_cell(low, signed=True),
                Cell(caption, None, "cap"),
            ]
        )
    table = table_html(
        "rows", ["id", "image", "score", "segments", "lowest delta", "caption"], rows
    )
    notes = [_shown(len(shown), summary["n_rows"], output), _thumbnail_note(thumbs, warn)]
    return page(title, [facts, *map(note_html, notes), legend_html(scale), table])


def _thumbnail_note(thumbs: Thumbnails, warn: Callable[[str], None] | None) -> str | None:
    note = thumbs.note()
    if note and warn is not None:
        warn(note)
    return note


def _side_html(rows: Sequence[dict], scale: float) -> str:
    """One side's captions of a unit: each coloured when it has segments, with its score."""
    if len(rows) == 1:
        return caption_html(rows[0], scale)
    return "".join(
        f'<div class="cand"><span class="muted">[{fmt(r.get("score"))}]</span> '
        f"{caption_html(r, scale)}</div>"
        for r in rows
    )


def compare_page(
    comparison: Comparison,
    *,
    image_roots: Sequence[Path | None] = (),
    plot_png: bytes | None = None,
    title: str = "specs compare",
    notes: Sequence[str] = (),
    warn: Callable[[str], None] | None = None,
) -> str:
    """The report of ``specs compare``: the test, the plot, the units that changed most.

    The changed-most table shows both sides' captions next to each other; captions from
    ``specs explain`` outputs are coloured by segment delta; at most :data:`MAX_HTML_ROWS`
    (the report's JSON holds them all). ``notes`` are shown above the results (e.g. a plot
    that could not be made); ``warn`` gets the note of images without a thumbnail.
    """
    c = comparison
    level = int(round(100 * c.level))
    verdict = "significant" if c.significant else "not significant"
    thumbs = Thumbnails(image_roots)
    tops = c.top_changes[:MAX_HTML_ROWS]
    scale = delta_scale([r for t in tops for r in t.get("rows_a", []) + t.get("rows_b", [])])
    has_segments = any(
        r.get("segments") for t in tops for r in t.get("rows_a", []) + t.get("rows_b", [])
    )
    unit_text = (
        "rows (the same captions on both sides)"
        if c.unit == "row"
        else f"images (paired by {c.pair_by})"
    )
    facts = [
        ("A", f"{c.file_a} (model {c.model_a})"),
        ("B", f"{c.file_b} (model {c.model_b})"),
        ("scale", c.scale),
        ("units", f"{c.n_used} {unit_text}; {c.n_skipped} skipped for errors"),
        ("captions used", f"A: {c.captions_a}, B: {c.captions_b} over {c.n_images} images"),
        ("mean A / mean B", f"{fmt(c.mean_a)} / {fmt(c.mean_b)}"),
        ("mean B − A", f"{fmt(c.mean_diff)}  [{fmt(c.ci_low)}, {fmt(c.ci_high)}] {level}% CI"),
        (f"p ({c.test})", fmt(c.p_value)),
        ("B wins / ties / loses", f"{c.wins} / {c.ties} / {c.losses}"),
    ]
    body = [facts_html(facts)]
    note = (
        f"The difference is <b>{verdict}</b> at the {100 - level}% level "
        f"({c.n_boot} bootstrap resamples, {c.n_perm} sign flips, seed {c.seed})."
    )
    if c.averaged:
        note += (
            " Several captions per image: each side's scores were averaged per image before "
            "the test."
        )
    body.append(f"<p>{note}</p>")
    if plot_png:
        body.append(f'<img class="plot" alt="score distributions" src="{png_data_uri(plot_png)}">')
    if tops:
        body.append(
            f"<h2>The {len(tops)} {'rows' if c.unit == 'row' else 'images'} that changed most</h2>"
        )
        if has_segments:
            body.append(legend_html(scale))
        body.append(note_html(_shown(len(tops), len(c.top_changes), "report.json")))
        rows = []
        for t in tops:
            rows_a = t.get("rows_a") or [{"caption": t["caption"], "score": t["score_a"]}]
            rows_b = t.get("rows_b") or [
                {"caption": t.get("caption_b", t["caption"]), "score": t["score_b"]}
            ]
            rows.append(
                [
                    Cell(esc(t["id"]), t["id"]),
                    Cell(thumbs.cell(t["image"]), str(t["image"])),
                    num_cell(t["score_a"]),
                    Cell(_side_html(rows_a, scale), None, "cap"),
                    num_cell(t["score_b"]),
                    Cell(_side_html(rows_b, scale), None, "cap"),
                    num_cell(t["diff"], signed=True),
                ]
            )
        body.append(
            table_html(
                "changes", ["id", "image", "A", "caption A", "B", "caption B", "B − A"], rows
            )
        )
    body[1:1] = [note_html(n) for n in (*notes, _thumbnail_note(thumbs, warn))]
    return page(title, body)


def _test_cells(test: dict | None) -> list[Cell]:
    if not test:
        return [Cell("—", ""), Cell("—", "")]
    diff = num_cell(test["mean_diff"], signed=True)
    cls = "pos" if test["mean_diff"] > 0 else "neg"
    if test.get("significant"):
        diff.html = f'<b class="{cls}">{diff.html}</b>'
    diff.html += f' <span class="muted">[{fmt(test["ci_low"])}, {fmt(test["ci_high"])}]</span>'
    return [diff, num_cell(test["p_value"])]


def sweep_page(
    result: dict,
    *,
    plot_png: bytes | None = None,
    title: str = "specs sweep",
    notes: Sequence[str] = (),
) -> str:
    """The report of ``specs sweep``: the plot and one sortable row per checkpoint, in the
    order the sweep used (which the page states); ``notes`` are shown above the plot."""
    level = int(round(100 * result.get("level", 0.95)))
    facts = facts_html(
        [
            ("model", f"{result['model']} (sha256 {str(result['checkpoint_sha256'])[:12]}…)"),
            ("scale", result.get("scale")),
            ("checkpoints", len(result["checkpoints"])),
            ("order", result.get("order_description", "the order given")),
            ("images", result.get("images")),
            ("images encoded by this run", result.get("images_encoded")),
            ("best", result.get("best")),
        ]
    )
    body = [facts, *map(note_html, notes)]
    if plot_png:
        body.append(f'<img class="plot" alt="score by checkpoint" src="{png_data_uri(plot_png)}">')
    rows = []
    for k, ck in enumerate(result["checkpoints"]):
        name = esc(ck["name"])
        if ck["name"] == result.get("best"):
            name = f"<b>{name}</b> ★"
        rows.append(
            [
                Cell(str(k), k, "num"),
                Cell(name, ck["name"]),
                Cell(esc(ck["file"])),
                Cell(str(ck["n"]), ck["n"], "num"),
                num_cell(ck["mean"]),
                Cell(f"[{fmt(ck['ci_low'])}, {fmt(ck['ci_high'])}]", ck["ci_low"], "num"),
                *_test_cells(ck.get("vs_previous")),
                *_test_cells(ck.get("vs_best")),
            ]
        )
    headers = [
        "#",
        "checkpoint",
        "file",
        "rows",
        "mean",
        f"{level}% CI",
        "vs previous",
        "p",
        "vs best",
        "p",
    ]
    body.append("<h2>Checkpoints</h2>")
    body.append(table_html("checkpoints", headers, rows))
    body.append(
        '<p class="muted">Differences are paired over images (captions of an image averaged '
        f"per checkpoint), with {level}% paired bootstrap CIs and sign-flip permutation "
        "p-values; bold = significant.</p>"
    )
    return page(title, body)
