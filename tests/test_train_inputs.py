"""``specs train`` reads its images like every other command: relative paths against the
data file's folder (or ``--image-root``), whatever folder it runs from; and a training set
none of whose images can be read is refused with one line, not trained on and saved."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.models.weights.checkpoint import save_state_dict

COLORS = ["red", "green", "blue", "yellow"]


def _caption(color: str) -> str:
    return f"A {color} square. It has a thin {color} border. The {color} paint looks fresh."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A training table in ``w/`` whose image cells are paths relative to ``w/``."""
    root = tmp_path_factory.mktemp("traininputs")
    (root / "w" / "img").mkdir(parents=True)
    for color in COLORS:
        Image.new("RGB", (36, 32), color).save(root / "w" / "img" / f"{color}.png")
    captions = [[_caption(c).split(". ")[0] + ".", _caption(c)] for c in COLORS]
    negatives = [[captions[(i + 1) % 4][1]] for i in range(4)]
    table = pa.table(
        {
            "image": [f"img/{c}.png" for c in COLORS],
            "caption": [_caption(c) for c in COLORS],
            "captions": captions,
            "neg_captions": negatives,
        }
    )
    pq.write_table(table, root / "w" / "train.parquet")
    save_state_dict(make_state_dict(seed=0), root / "init.pt")
    return root


def _train(root, out, *extra: str) -> int:
    return main(["train", "--init", str(root / "init.pt"), "--data", str(root / "w" /
                 "train.parquet"), "--output", str(out), "--max-steps", "2", "--batch-size",
                 "4", "--workers", "0", "--no-tensorboard", "--quiet", *extra])  # fmt: skip


def test_relative_image_paths_resolve_against_the_data_files_folder(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the data file's folder
    assert _train(data, tmp_path / "run") == 0
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    header = log[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in log[1:]]
    assert rows and all(float(r["skipped_images"]) == 0 for r in rows)
    assert sum(float(r["images"]) for r in rows) == 8  # 2 steps x 4 images, none skipped


def test_image_root_overrides_the_data_files_folder(data, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    (moved / "img").mkdir(parents=True)
    for color in COLORS:
        (moved / "img" / f"{color}.png").write_bytes(
            (data / "w" / "img" / f"{color}.png").read_bytes()
        )
    assert _train(data, tmp_path / "run", "--image-root", str(moved)) == 0


def test_a_training_set_whose_images_all_fail_is_refused(data, tmp_path, capsys):
    empty = tmp_path / "no-images"
    empty.mkdir()
    code = _train(data, tmp_path / "run", "--image-root", str(empty))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "none of the 4 image(s) tried can be read" in lines[0]
    assert "image file not found" in lines[0] and str(empty) in lines[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_prepare_writes_paths_that_work_from_any_folder(tmp_path, monkeypatch):
    # specs prepare resolves relative paths against its input's folder and writes them
    # absolute, so the training table does not depend on the folder it is used from.
    src = tmp_path / "src"
    src.mkdir()
    for color in COLORS:
        Image.new("RGB", (30, 30), color).save(src / f"{color}.png")
    (src / "in.jsonl").write_text(
        "".join(json.dumps({"image": f"{c}.png", "caption": _caption(c)}) + "\n" for c in COLORS)
    )
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--input", "src/in.jsonl", "--output", "out/train.parquet",
                 "--segmenter", "sentence", "--quiet"]) == 0  # fmt: skip
    images = pq.read_table(tmp_path / "out" / "train.parquet").column("image").to_pylist()
    assert images and all(img.startswith("/") and img.endswith(".png") for img in images)
    assert all((src / img.rsplit("/", 1)[1]).samefile(img) for img in images)
