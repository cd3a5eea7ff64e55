"""One row pipeline: every command that reads scoring rows reads every input format the same
way. For each format ``specs score`` reads, ``specs explain`` reads the same rows, with the
same ids, errors and scores (an explanation's score is its caption's score), and the Ray
engine's row preparation gives the same errors as the local job's."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.data.scorefiles import read_score_rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(4)
    images = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (26, 33, 3), dtype=np.uint8)).save(d / f"p{i}.png")
        images.append((d / f"p{i}.png").read_bytes())
    # five rows: three good, an empty caption, a missing image (for path formats)
    rows = [
        {"id": "a", "image": "p0.png", "caption": "A red thing. It is small."},
        {"id": "b", "image": "p1.png", "caption": "A blue thing on the left. Two dots."},
        {"id": "c", "image": "p2.png", "caption": ""},
        {"id": "d", "image": "missing.png", "caption": "Nothing here."},
        {"id": "e", "image": "p0.png", "caption": "The same image, another caption."},
    ]
    return d, rows, images


def _formats(world, tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """Input spec and extra options per format, all holding the same rows."""
    d, rows, images = world
    out = {}
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["jsonl"] = (str(tmp / "rows.jsonl"), ["--image-root", str(d)])
    lines = ["id,image,caption"] + [f'{r["id"]},{r["image"]},"{r["caption"]}"' for r in rows]
    (tmp / "rows.csv").write_text("\n".join(lines) + "\n")
    out["csv"] = (str(tmp / "rows.csv"), ["--image-root", str(d)])
    # a glob of two JSONL parts
    (tmp / "parts").mkdir()
    (tmp / "parts" / "0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp / "parts" / "1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    out["glob"] = (str(tmp / "parts" / "*.jsonl"), ["--image-root", str(d)])
    # tables holding the image bytes (paths for the missing one)
    cells = [
        {"bytes": images[int(r["image"][1])], "path": None} if r["image"] != "missing.png"
        else {"bytes": None, "path": "missing.png"}
        for r in rows
    ]  # fmt: skip
    table = pa.table({"id": [r["id"] for r in rows], "image": cells,
                      "caption": [r["caption"] for r in rows]})  # fmt: skip
    pq.write_table(table, tmp / "rows.parquet")
    out["parquet"] = (str(tmp / "rows.parquet"), ["--image-root", str(d)])
    with pa.ipc.new_stream(tmp / "rows.arrow", table.schema) as writer:
        writer.write_table(table)
    out["arrow"] = (str(tmp / "rows.arrow"), ["--image-root", str(d)])
    hf = tmp / "hf"
    hf.mkdir()
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    (hf / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    out["hf-folder"] = (str(hf), ["--image-root", str(d)])
    # a webdataset shard with the caption in a json member
    with tarfile.open(tmp / "rows.tar", "w") as tar:
        for r in rows:
            members = [(f"{r['id']}.json", json.dumps({"alt": r["caption"]}).encode())]
            if r["image"] != "missing.png":
                members.insert(0, (f"{r['id']}.png", images[int(r["image"][1])]))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out["webdataset"] = (str(tmp / "rows.tar"), ["--caption-key", "alt"])
    return out


FORMATS = ["jsonl", "csv", "glob", "parquet", "arrow", "hf-folder", "webdataset"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_explain_reads_every_input_score_reads(world, tmp_path, fmt):
    spec, extra = _formats(world, tmp_path)[fmt]
    model = str(world[0] / "tiny.pt")
    scores, explained = tmp_path / "scores.jsonl", tmp_path / "explained.jsonl"
    common = ["--model", model, "--input", spec, "--no-progress", *extra]
    assert main(["score", *common, "--output", str(scores), "--workers", "0"]) == 0
    assert main(["explain", *common, "--output", str(explained)]) == 0
    a, b = list(read_score_rows(scores)), list(read_score_rows(explained))
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 5
    for x, y in zip(a, b, strict=True):
        assert (x["error"] is None) == (y["error"] is None), (x, y)
        if x["error"] is None:
            assert y["score"] == pytest.approx(x["score"], abs=1e-6)
            assert len(y["segments"]) >= 1
        else:
            assert y["error"] == x["error"]  # the same message, from the same checks
    assert sum(r["error"] is not None for r in a) == 2  # the empty caption, the missing image


def test_ray_preparation_gives_the_local_jobs_errors(world):
    """The Ray engine's CPU stage checks and prepares rows with the data layer's and the
    scoring layer's functions: a row gets the message the local job gives it."""
    from specs_metric.data.rows import build_row
    from specs_metric.jobs.ray import prepare_batch
    from specs_metric.processing.tokenizer import default_tokenizer
    from specs_metric.scoring.prepare import RowPreparer

    d, _, _ = world
    cells = [
        {"image": "p0.png", "caption": "   "},
        {"image": "p0.png", "caption": None},
        {"image": None, "caption": "no image"},
        {"image": "  ", "caption": "a blank image path"},
        {"image": "missing.png", "caption": "missing"},
        {"image": "p1.png", "caption": "good"},
    ]
    batch = pa.Table.from_pylist(cells)
    out = prepare_batch(batch, image_column="image", caption_column="caption", id_column="id",
                        image_root=str(d), context_length=248, resolution=32,
                        long_captions="truncate")  # fmt: skip
    errors = out["error"].to_pylist()
    preparer = RowPreparer(default_tokenizer(), 248, "truncate")
    for i, row_cells in enumerate(cells):
        row = build_row(i, row_cells, Path(d), where=f"row {i}", image_cell=True)
        expected = preparer.prepare(row)[0]["error"]
        if expected is None and i == 4:  # found when the image is read
            expected = f"row {i}: {row.path}: image file not found"
        assert errors[i] == expected, (i, errors[i], expected)
    assert errors[:5] == [e for e in errors[:5] if e] and errors[5] is None
