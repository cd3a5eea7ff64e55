"""The building blocks of the HTML reports (:mod:`specs_metric.evaluation.reports.html`).

Escaping and number formatting, thumbnails inlined as ``data:`` URIs (downscaled by PIL,
at most :data:`MAX_THUMBS` per page, no file over :data:`MAX_IMAGE_BYTES` opened), caption
segments coloured by their delta on a diverging scale, sortable tables, and the page frame
with its inline CSS and JavaScript (the sorting and the ``#sort=`` / ``#click=`` URL hooks
described in :mod:`specs_metric.evaluation.reports.html`).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from specs_metric.io.reading import read_bounded, read_image_bytes
from specs_metric.limits import MAX_IMAGE_BYTES

THUMB_SIDE = 96  # pixels, longest side of an inlined thumbnail
MAX_THUMBS = 500  # distinct images inlined per page; later rows show the path only

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;background:#fff;line-height:1.4}
h1{font-size:1.5em;margin:0 0 .4em}h2{font-size:1.15em;margin:1.4em 0 .5em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 7px;vertical-align:top;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th:hover{background:#e6e6e6}
th.asc::after{content:" \\25B2";font-size:.75em}th.desc::after{content:" \\25BC";font-size:.75em}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.cap{max-width:560px;min-width:240px}
img.thumb{width:96px;height:auto;image-rendering:pixelated;display:block;border:1px solid #ccc}
span.seg{border-radius:3px;padding:0 1px}
span.seg.beyond{color:#888;text-decoration:line-through;background:repeating-linear-gradient(
45deg,#eee,#eee 3px,#fff 3px,#fff 6px)}
.err{color:#b00020}.muted{color:#777}.pos{color:#1a7f37}.neg{color:#b00020}
.legend span{display:inline-block;padding:1px 6px;margin-right:2px;border-radius:3px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:.4em 0}
dl.facts dt{color:#555}dl.facts dd{margin:0}
img.plot{max-width:100%;border:1px solid #ddd}
div.cand{margin-bottom:4px}
p.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;max-width:70em}
"""

_JS = """
(function(){
function val(td){var v=td.getAttribute('data-v');if(v===null)v=td.textContent;
if(v==='')return {m:1};var n=parseFloat(v);
return isNaN(n)||!/^\\s*[-+]?[0-9.]/.test(v)?{s:v.toLowerCase()}:{n:n};}
function cmp(a,b){if(a.n!==undefined&&b.n!==undefined)return a.n-b.n;
if(a.n!==undefined)return -1;if(b.n!==undefined)return 1;return a.s<b.s?-1:a.s>b.s?1:0;}
function sortTable(table,col,dir){var body=table.tBodies[0];
var rows=Array.prototype.slice.call(body.rows);
var keyed=rows.map(function(r,i){return {r:r,k:val(r.cells[col]),i:i};});
keyed.sort(function(x,y){if(x.k.m||y.k.m)return (x.k.m||0)-(y.k.m||0)||x.i-y.i;
var c=cmp(x.k,y.k);if(dir==='desc')c=-c;return c||x.i-y.i;});
keyed.forEach(function(x){body.appendChild(x.r);});
var ths=table.tHead.rows[0].cells;
for(var j=0;j<ths.length;j++){ths[j].classList.remove('asc','desc');}
ths[col].classList.add(dir);document.body.setAttribute('data-sorted',table.id+':'+col+':'+dir);}
window.specsSort=sortTable;
document.querySelectorAll('table.sortable').forEach(function(t){
var ths=t.tHead.rows[0].cells;for(var j=0;j<ths.length;j++){(function(col){
ths[col].addEventListener('click',function(){
var dir=ths[col].classList.contains('asc')?'desc':'asc';sortTable(t,col,dir);});})(j);}});
var m=/sort=([^:&]+):(\\d+)(?::(asc|desc))?/.exec(decodeURIComponent(location.hash));
if(m){var t=document.getElementById(m[1]);if(t)sortTable(t,parseInt(m[2],10),m[3]||'asc');}
var c=/click=([^:&]+):(\\d+)(?::(\\d+))?/.exec(decodeURIComponent(location.hash));
if(c){var u=document.getElementById(c[1]);if(u){var h=u.tHead.rows[0].cells[parseInt(c[2],10)];
for(var q=0;q<parseInt(c[3]||'1',10);q++)h.click();}}
document.body.setAttribute('data-ready','1');
})();
"""


def esc(text: object) -> str:
    """HTML-escaped ``str(text)`` (quotes included, so it is safe in attributes)."""
    return html.escape("" if text is None else str(text), quote=True)


def fmt(value: object, digits: int = 4) -> str:
    """A number for a table cell: fixed digits, '—' for missing or non-finite values."""
    if value is None:
        return "—"
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return esc(value)
    return f"{x:.{digits}f}" if math.isfinite(x) else "—"


# --- images -----------------------------------------------------------------------------------


def png_data_uri(data: bytes) -> str:
    """A ``data:`` URI of PNG bytes (plots)."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def read_png(path: Path) -> bytes:
    """A plot this command just wrote, read back to embed it in a page."""
    return read_bounded(path, MAX_IMAGE_BYTES, what="plot", protect=False)


def thumbnail_uri(path: Path, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG ``data:`` URI of the image at ``path``; None when it cannot be read.

    The image is downscaled to at most ``side`` pixels (``draft`` lets JPEG decode at a
    reduced size), so a thumbnail costs a few kilobytes whatever the source.
    """
    from PIL import Image

    try:
        data = read_image_bytes(path)  # bounded: a regular file of at most MAX_IMAGE_BYTES
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (side * 2, side * 2))
            img = img.convert("RGB")
            # nearest keeps small synthetic images crisp; large ones get a smooth filter
            small = max(img.size) <= side
            img.thumbnail(
                (side, side), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
            )
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken image must not break the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Thumbnails:
    """Thumbnails by image path for one page: each file read once, at most ``limit`` of them.

    Relative paths are tried against each of ``roots`` in order. Images without a thumbnail
    are counted (:attr:`not_found`, :attr:`over_limit`) so that the page can say why
    (:meth:`note`) instead of leaving the cells silently bare.
    """

    def __init__(self, roots: Sequence[Path | None] = (), limit: int = MAX_THUMBS) -> None:
        self.roots = [Path(r) for r in roots if r is not None]
        self.limit = limit
        self._done: dict[str, str | None] = {}
        self.not_found: list[str] = []  # no file at the path (under any root), or unreadable
        self.over_limit = 0  # distinct images past ``limit``

    def resolve(self, image: object) -> Path | None:
        p = Path(str(image))
        if p.is_absolute():
            return p
        for root in self.roots:
            if (root / p).is_file():
                return root / p
        return p if p.is_file() else None

    def cell(self, image: object) -> str:
        """An ``<img>`` tag (or the escaped path when no thumbnail is available)."""
        key = str(image)
        if key not in self._done:
            uri = None
            if len(self._done) >= self.limit:
                self.over_limit += 1
            else:
                path = self.resolve(image)
                uri = thumbnail_uri(path) if path is not None else None
                if uri is None:
                    self.not_found.append(key)
            self._done[key] = uri
        uri = self._done[key]
        if uri is None:
            return f'<span class="muted">{esc(image)}</span>'
        return f'<img class="thumb" src="{uri}" alt="{esc(image)}" title="{esc(image)}">'

    def note(self) -> str | None:
        """Why some images have no thumbnail (None when all have one), for the page and
        the command's warning line."""
        parts = []
        if self.not_found:
            roots = list(dict.fromkeys(str(r) for r in self.roots))  # each folder once
            where = ", ".join(roots) or "the current folder"
            parts.append(
                f"{len(self.not_found)} of {len(self._done)} images have no thumbnail: not "
                f"found or not readable under {where} (e.g. {self.not_found[0]}); pass "
                "--image-root with the folder of the relative image paths"
            )
        if self.over_limit:
            parts.append(
                f"{self.over_limit} images past the first {self.limit} are shown by path only"
            )
        return "; ".join(parts) or None


def note_html(text: str | None) -> str:
    """A highlighted note above a page's tables (empty without text)."""
    return f'<p class="note">{esc(text)}</p>' if text else ""


# --- segments ---------------------------------------------------------------------------------


def delta_scale(records: Iterable[dict], quantile: float = 0.95) -> float:
    """The |delta| that gets the fullest colour: the ``quantile`` of the page's |deltas|.

    A quantile rather than the maximum, so that one outlier does not wash out the colours
    of every other segment; larger deltas are clipped to the fullest colour.
    """
    values = sorted(
        abs(float(seg["delta"]))
        for rec in records
        for seg in rec.get("segments") or ()
        if seg.get("delta") is not None and math.isfinite(float(seg["delta"]))
    )
    if not values:
        return 1e-6
    return max(values[int(round(quantile * (len(values) - 1)))], 1e-6)


def delta_color(delta: float | None, scale: float) -> str:
    """Background colour of a segment: red for negative, green for positive deltas.

    The opacity grows with |delta| / ``scale`` (clipped to 1), so the strongest segment of
    a page is fully coloured and a zero delta is white.
    """
    if delta is None or not math.isfinite(float(delta)):
        return "transparent"
    t = min(1.0, abs(float(delta)) / scale)
    alpha = round(0.08 + 0.72 * t, 3) if t > 0 else 0.0
    rgb = "26,152,80" if delta > 0 else "215,48,39"
    return f"rgba({rgb},{alpha})"


def segments_html(segments: Sequence[dict], scale: float) -> str:
    """The caption as one ``<span class="seg">`` per segment, coloured by its delta.

    Segments beyond the model's context (``beyond_context``) are struck through and grey:
    the model did not see them, so their delta says nothing.
    """
    parts = []
    for seg in segments:
        delta, score = seg.get("delta"), seg.get("score")
        if seg.get("beyond_context"):
            title = "beyond the model's context: not seen by the model"
            parts.append(
                f'<span class="seg beyond" title="{esc(title)}">{esc(seg.get("text"))}</span>'
            )
            continue
        title = f"delta {fmt(delta, 4)} (prefix score {fmt(score, 4)})"
        d = float(delta) if delta is not None else None
        parts.append(
            f'<span class="seg" data-delta="{fmt(delta, 6)}" title="{esc(title)}" '
            f'style="background:{delta_color(d, scale)}">{esc(seg.get("text"))}</span>'
        )
    return " ".join(parts)


def caption_html(rec: dict, scale: float) -> str:
    """Coloured segments when the record has them, else the escaped caption."""
    if rec.get("segments"):
        return segments_html(rec["segments"], scale)
    return esc(rec.get("caption"))


def legend_html(scale: float) -> str:
    steps = [-1.0, -0.5, 0.0, 0.5, 1.0]
    cells = "".join(
        f'<span style="background:{delta_color(s * scale, scale)}">'
        f"{({-1.0: '≤', 1.0: '≥'}).get(s, '')}{s * scale:+.3g}</span>"
        if s
        else "<span>0</span>"
        for s in steps
    )
    return (
        f'<p class="legend">segment delta: {cells} '
        '<span class="muted">(hover a segment for its value; struck-through segments lie '
        "beyond the model's context)</span></p>"
    )


# --- tables and pages -------------------------------------------------------------------------


@dataclass
class Cell:
    """A table cell: inner HTML, an optional sort value and CSS class."""

    html: str
    sort: object = None
    cls: str = ""


def num_cell(value: object, digits: int = 4, signed: bool = False) -> Cell:
    text = fmt(value, digits)
    if signed and text != "—" and not text.startswith("-"):
        text = "+" + text
    sort = value if value is not None and text != "—" else ""
    return Cell(text, sort, "num")


def table_html(table_id: str, headers: Sequence[str], rows: Iterable[Sequence[Cell | str]]) -> str:
    """A sortable table (click a header; numeric columns sort by value)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for c in row:
            cell = c if isinstance(c, Cell) else Cell(esc(c))
            attrs = f' class="{cell.cls}"' if cell.cls else ""
            if cell.sort is not None:
                attrs += f' data-v="{esc(cell.sort)}"'
            cells.append(f"<td{attrs}>{cell.html}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="sortable" id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def facts_html(items: Sequence[tuple[str, object]]) -> str:
    """A definition list of (label, value) pairs; values are escaped."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


def page(title: str, body: Sequence[str]) -> str:
    """A complete HTML document with the inline CSS and the sorting script."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>{''.join(body)}<script>{_JS}</script></body></html>\n"
    )


# --- the reports ------------------------------------------------------------------------------
