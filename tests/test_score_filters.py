"""The one-liners of docs/datasets.md that filter a ``specs score --output-dir`` by score
(DuckDB, Polars), run as written there by a shell (``python`` being this interpreter) on
parquet outputs and checked against a filter of the JSONL outputs computed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from specs_metric.cli import main
from specs_metric.data.scorefiles import read_score_rows
from test_datasets import world  # noqa: F401

PAGE = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"


def _shell_line(module: str) -> str:
    """The line of docs/datasets.md that runs ``python -c "import MODULE; ..."``, as written."""
    lines = [
        line for line in PAGE.read_text().splitlines()
        if line.startswith(f'python -c "import {module}')
    ]  # fmt: skip
    assert len(lines) == 1, f"{PAGE.name}: {len(lines)} lines run {module}"
    return lines[0]


def _with_threshold(program: str, threshold: float) -> str:
    assert program.count(">= 0.3") == 1, program
    return program.replace(">= 0.3", f">= {threshold!r}")


def _run_as_written(line: str, folder: Path, tmp_path: Path) -> str:
    """Run ``line`` with bash in ``folder``, ``python`` being this interpreter; its stdout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def scores(world, tmp_path_factory):  # noqa: F811
    """``scores/`` of two parquet shards (one with an error row) and the rows the page's
    filters keep at a threshold, chosen from the JSONL outputs of the same shards."""
    d, pairs = world
    tmp = tmp_path_factory.mktemp("filters")
    (tmp / "in").mkdir()
    for n, part in enumerate((pairs[:5], pairs[5:])):
        with open(tmp / "in" / f"in-{n}.jsonl", "w") as fh:
            for key, image, caption in part:
                fh.write(json.dumps({"id": key, "image": str(d / image), "caption": caption}))
                fh.write("\n")
            if n:  # a row with an error has a null score
                fh.write(json.dumps({"id": "bad", "image": "nope.png", "caption": "x"}) + "\n")
    base = ["score", "--model", str(d / "tiny.pt"), "--input", f"{tmp}/in/*.jsonl",
            "--workers", "0", "--no-progress"]  # fmt: skip
    assert main([*base, "--output-dir", str(tmp / "scores"), "--output-format", "parquet"]) == 0
    assert main([*base, "--output-dir", str(tmp / "json"), "--output-format", "jsonl"]) == 0
    rows = [r for n in range(2) for r in read_score_rows(tmp / "json" / f"in-{n}.jsonl")]
    assert len(rows) == len(pairs) + 1 and rows[-1]["score"] is None
    values = sorted({r["score"] for r in rows if r["score"] is not None})
    middle = len(values) // 2
    threshold = (values[middle - 1] + values[middle]) / 2  # halfway: no rounding question
    kept = sorted(r["id"] for r in rows if r["score"] is not None and r["score"] >= threshold)
    assert 0 < len(kept) < len(pairs)
    return tmp, threshold, kept


def test_duckdb_one_liner_keeps_the_ids_at_or_above_the_threshold(scores, tmp_path):
    pytest.importorskip("duckdb")
    folder, threshold, kept = scores
    (folder / "keep.parquet").unlink(missing_ok=True)
    # the one-liner names scores/ and keep.parquet relatively: run in the folder
    _run_as_written(_with_threshold(_shell_line("duckdb"), threshold), folder, tmp_path)
    ids = pq.read_table(folder / "keep.parquet").column("id").to_pylist()
    assert sorted(ids) == kept


def test_polars_one_liner_keeps_the_ids_at_or_above_the_threshold(scores, tmp_path):
    pytest.importorskip("polars")
    folder, threshold, kept = scores
    line = _with_threshold(_shell_line("polars"), threshold)
    printed = _run_as_written(line.replace(".collect())", ".collect()['id'].to_list())"),
                              folder, tmp_path)  # fmt: skip
    # in order: scan_parquet reads the files by name, rows as written (the ids sort so too)
    assert printed.strip() == repr(kept)
