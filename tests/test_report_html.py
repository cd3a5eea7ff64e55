"""HTML reports in a real browser (headless Chromium): DOM after the scripts ran, screenshots.

The pages are loaded from disk with ``--dump-dom`` (the DOM after the scripts ran) and
``--screenshot``. Screenshots go to the test's tmp folder and, when ``SPECS_TEST_ARTIFACTS``
is set, are copied there for a person to look at. Without Chromium the tests skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specs_metric.cli import main
from specs_metric.evaluation.reports.html import delta_color, delta_scale, explain_page, sweep_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"
)


def _chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dom(tmp_path: Path, page: Path, fragment: str = "") -> str:
    """The page's DOM after its scripts ran."""
    text = _chromium(tmp_path, "--dump-dom", page.as_uri() + fragment)
    assert 'data-ready="1"' in text, "the page's script did not run"
    return text


def screenshot(tmp_path: Path, page: Path, name: str) -> Path:
    shot = tmp_path / name
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("SPECS_TEST_ARTIFACTS"):
        target = Path(os.environ["SPECS_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / name)
    return shot


class Tables(HTMLParser):
    """Rows of each table (cell texts), and the segment spans with their attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.spans: list[dict] = []
        self.images: list[str] = []
        self._table = None
        self._cell: list[str] | None = None
        self._in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._table.append([])
        elif tag == "td" and self._in_body:
            self._cell = []
        elif tag == "span" and "seg" in (a.get("class") or "").split():
            self.spans.append(a)
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.zeros((48, 48, 3), np.uint8)
        arr[:] = rng.integers(40, 220, 3)
        arr[12:36, 12:36] = rng.integers(0, 255, 3)  # a square on a plain background
        Image.fromarray(arr).save(folder / f"{i}.png")


SENTENCES = [
    "The background is teal.",
    "There is a red star.",
    "The red star is small.",
    "The red star is in the top left.",
    "There is a blue ring.",
]


def _explain_rows(n: int, seed: int, beyond: bool = False, shift: int = 0) -> list[dict]:
    """Rows in the layout of `specs explain` (a score file plus segments)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = 2 + (i + shift) % 4  # another shift: other captions of the same images
        deltas = rng.normal(0, 0.02, k)
        scores = 0.5 + np.cumsum(deltas)
        segs = [
            {
                "text": SENTENCES[j],
                "score": float(scores[j]),
                "delta": float(deltas[j]),
                "beyond_context": False,
            }
            for j in range(k)
        ]
        if beyond and i == 0:
            segs.append(
                {
                    "text": "Words past the context.",
                    "score": None,
                    "delta": None,
                    "beyond_context": True,
                }
            )
        rows.append(
            {
                "id": f"r{i}",
                "image": f"{i}.png",
                "caption": " ".join(s["text"] for s in segs),
                "score": float(scores[-1]),
                "cosine": None,
                "segments": segs,
                "error": None,
            }
        )
    return rows


@needs_chromium
def test_explain_page_rows_colours_and_sorting(tmp_path):
    _images(tmp_path, 6)
    rows = _explain_rows(6, seed=1, beyond=True)
    rows.append(
        {
            "id": "bad",
            "image": "nope.png",
            "caption": "x",
            "score": None,
            "segments": [],
            "error": "line 7: image file not found",
        }
    )
    page = tmp_path / "explain.html"
    page.write_text(explain_page(rows, tmp_path, "explain"), "utf-8")
    t = Tables(dom(tmp_path, page))
    assert len(t.tables["rows"]) == 7
    shown = [s for s in t.spans if "beyond" not in s["class"]]
    assert len(shown) == sum(len(r["segments"]) for r in rows) - 1
    # each segment's colour and hover text follow its delta: green up, red down
    for span, seg in zip(
        shown, [s for r in rows for s in r["segments"] if s["delta"] is not None], strict=True
    ):
        assert f"delta {seg['delta']:.4f}" in span["title"]
        assert ("26,152,80" if seg["delta"] > 0 else "215,48,39") in span["style"].replace(" ", "")
    assert sum("beyond" in s["class"] for s in t.spans) == 1
    assert sum(src.startswith("data:image/jpeg;base64,") for src in t.images) == 6
    # sorted by score, descending, through the URL; the row without a score stays last
    t = Tables(dom(tmp_path, page, "#sort=rows:2:desc"))
    got = [r[0] for r in t.tables["rows"]]
    want = [r["id"] for r in sorted(rows[:-1], key=lambda r: -r["score"])] + ["bad"]
    assert got == want
    # two clicks on the "lowest delta" header: ascending, then descending
    text = dom(tmp_path, page, "#click=rows:4:2")
    assert 'data-sorted="rows:4:desc"' in text
    lows = [float(r[4]) for r in Tables(text).tables["rows"][:-1]]
    assert lows == sorted(lows, reverse=True)
    assert lows == pytest.approx(
        sorted(
            (min(s["delta"] for s in r["segments"] if s["delta"] is not None) for r in rows[:-1]),
            reverse=True,
        ),
        abs=1e-4,
    )
    screenshot(tmp_path, page, "explain-report.png")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    summary = {"model": "tiny", "checkpoint_sha256": "0" * 64, "scale": "specs"}
    path.with_name(path.name + ".summary.json").write_text(json.dumps(summary))
    return path


@needs_chromium
def test_compare_page_of_two_explain_outputs(tmp_path):
    _images(tmp_path, 8)
    a = _write(tmp_path / "a.jsonl", _explain_rows(8, seed=2))
    b = _write(tmp_path / "b.jsonl", _explain_rows(8, seed=3, shift=1))
    out = tmp_path / "cmp"
    args = ["compare", str(a), str(b), "--out", str(out), "--top", "5"]
    assert main([*args, "--n-boot", "200", "--n-perm", "200"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["unit"] == "image" and report["n_used"] == 8  # two captioners
    page = out / "report.html"
    t = Tables(dom(tmp_path, page))
    changes = t.tables["changes"]
    assert len(changes) == len(report["top_changes"]) == 5
    for row, top in zip(changes, report["top_changes"], strict=True):
        assert row[0] == top["id"] and row[3] == top["caption"] and row[5] == top["caption_b"]
    n_segments = sum(
        len(r["segments"]) for t_ in report["top_changes"] for r in t_["rows_a"] + t_["rows_b"]
    )
    assert len(t.spans) == n_segments > 0
    assert all("rgba(" in s["style"] for s in t.spans)
    assert any(src.startswith("data:image/png;base64,") for src in t.images)  # the plot
    assert sum(src.startswith("data:image/jpeg;base64,") for src in t.images) == 5
    text = dom(tmp_path, page, "#sort=changes:6:asc")
    diffs = [float(r[6]) for r in Tables(text).tables["changes"]]
    assert diffs == sorted(diffs) and diffs != [float(r[6]) for r in changes]
    screenshot(tmp_path, page, "compare-report.png")


@needs_chromium
def test_sweep_page_with_its_plot(tmp_path):
    from specs_metric.evaluation.reports.report import plot_sweep

    cks = []
    for k, m in enumerate([0.52, 0.55, 0.54, 0.6]):
        test = {
            "against": "x",
            "mean_diff": 0.01 * (k - 1),
            "ci_low": -0.01,
            "ci_high": 0.03,
            "p_value": 0.04,
            "significant": k == 3,
        }
        cks.append(
            {
                "name": f"step-{k}",
                "file": f"c{k}.jsonl",
                "n": 40,
                "mean": m,
                "ci_low": m - 0.02,
                "ci_high": m + 0.02,
                "vs_previous": test if k else None,
                "vs_best": None if k == 3 else test,
            }
        )
    result = {
        "model": "m",
        "checkpoint_sha256": "ab" * 32,
        "scale": "specs",
        "images": 40,
        "images_encoded": 40,
        "best": "step-3",
        "level": 0.95,
        "checkpoints": cks,
    }
    png = plot_sweep(result, tmp_path / "sweep.png").read_bytes()
    page = tmp_path / "sweep.html"
    page.write_text(sweep_page(result, plot_png=png), "utf-8")
    t = Tables(dom(tmp_path, page, "#click=checkpoints:4:2"))
    rows = t.tables["checkpoints"]
    assert len(rows) == 4 and t.images and t.images[0].startswith("data:image/png;base64,")
    assert [float(r[4]) for r in rows] == [0.6, 0.55, 0.54, 0.52]
    screenshot(tmp_path, page, "sweep-report.png")


def test_delta_colours_are_diverging_and_bounded():
    assert delta_color(0.0, 1.0) == "rgba(215,48,39,0.0)"
    assert delta_color(1.0, 1.0) == delta_color(5.0, 1.0) == "rgba(26,152,80,0.8)"
    assert delta_color(-0.5, 1.0) == "rgba(215,48,39,0.44)"
    assert delta_color(None, 1.0) == "transparent"
    assert re.fullmatch(r"rgba\(26,152,80,0\.\d+\)", delta_color(1e-3, 1.0))


def test_delta_scale_is_a_quantile_of_the_page():
    recs = [{"segments": [{"delta": d} for d in (-0.01, 0.02, -0.03, 0.04, 0.5)]}, {"segments": []}]
    # |deltas| sorted: .01 .02 .03 .04 .5; the 0.75 quantile (index 3) is 0.04
    assert delta_scale(recs, quantile=0.75) == pytest.approx(0.04)
    assert delta_scale(recs, quantile=1.0) == pytest.approx(0.5)
    assert delta_scale([{"segments": [{"delta": None}]}]) == 1e-6


@needs_chromium
def test_a_large_explain_page_shows_its_first_rows_and_says_so(tmp_path):
    """2,000 explained rows made an 11.8 MB page; the table is capped, with a note."""
    _images(tmp_path, 6)
    rows = []
    for k in range(2000):
        row = _explain_rows(1, seed=k)[0]
        rows.append({**row, "id": f"r{k}", "image": f"{k % 6}.png" if k % 3 else f"gone{k}.png"})
    page = tmp_path / "explain.html"
    plain = explain_page(rows, tmp_path, "explain")
    assert plain.count("<tr>") == 1 + 500
    assert "Showing the first 500 of 2000 rows." in plain
    warnings: list[str] = []
    page.write_text(explain_page(rows, tmp_path, "explain", output="explain.jsonl",
                                 warn=warnings.append), "utf-8")  # fmt: skip
    text = dom(tmp_path, page)
    table = Tables(text).tables["rows"]
    assert [r[0] for r in table] == [f"r{k}" for k in range(500)]
    assert "Showing the first 500 of 2000 rows; every row is in " \
        "explain.jsonl." in text  # fmt: skip
    assert "<dd>2000</dd>" in text  # the facts count every row
    assert page.stat().st_size < 2_000_000
    # images without a thumbnail: counted on the page and in one warning
    assert warnings == [
        "167 of 171 images have no thumbnail: not found or not readable under "
        f"{tmp_path} (e.g. gone0.png); pass --image-root with the folder of the relative "
        "image paths"
    ]
    assert warnings[0] in text.replace("&#x27;", "'")
    screenshot(tmp_path, page, "explain-capped.png")
    # max_rows=None: all of them
    everything = explain_page(rows, tmp_path, "explain", max_rows=None)
    assert everything.count("<tr>") == 2001 and "Showing the first" not in everything
