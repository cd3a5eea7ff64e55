"""``specs score`` end to end: formats, bad rows, resume after SIGKILL, torchrun sharding."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from factories import score_args as _base
from specs_metric.cli import main
from specs_metric.data.scorefiles import read_score_rows
from subprocesses import child_env, torchrun


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, five images and a corpus mixing good and bad rows."""
    d = tmp_path_factory.mktemp("world")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = rng.integers(0, 255, size=(30 + i, 41, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
    (d / "copy_of_0.png").write_bytes((d / "img0.png").read_bytes())
    (d / "not_image.png").write_bytes(b"this is text, not a PNG")
    (d / "empty.png").write_bytes(b"")
    full = (d / "img1.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.new("RGB", (300, 300)).save(d / "bomb.png")
    return d


GOOD = {"id": "g", "image": "img0.png", "caption": "a noisy picture"}
BAD_ROWS = {
    "missing file": ({"image": "nope.png", "caption": "x"}, "not found"),
    "zero bytes": ({"image": "empty.png", "caption": "x"}, "empty"),
    "truncated": ({"image": "truncated.png", "caption": "x"}, "truncated|decode"),
    "not an image": ({"image": "not_image.png", "caption": "x"}, "not a recognised image"),
    "bomb": ({"image": "bomb.png", "caption": "x"}, "decompression"),
    "empty caption": ({"image": "img0.png", "caption": ""}, "caption is empty"),
    "blank caption": ({"image": "img0.png", "caption": " \t\n"}, "caption is empty"),
    "non-string caption": ({"image": "img0.png", "caption": ["a"]}, "not a string"),
    "no image": ({"caption": "a caption"}, "no image"),
}


def _write_jsonl(path: Path, rows: list, malformed_at: int | None = None) -> None:
    with open(path, "w") as fh:
        for i, row in enumerate(rows):
            if i == malformed_at:
                fh.write('{"id": "broken", "image": \n')
            fh.write(json.dumps(row) + "\n")


def test_bad_rows_become_row_errors(world, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    rows, expected = [], {}
    for n, (name, (row, pattern)) in enumerate(BAD_ROWS.items()):
        rows.append({**GOOD, "id": f"good{n}", "image": f"img{n % 5}.png"})
        rows.append({"id": name, **row})
        expected[name] = pattern
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, rows, malformed_at=4)
    out = tmp_path / "out.jsonl"
    code = main(
        [
            *_base(world, src, out),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    result = list(read_score_rows(out))
    assert len(result) == len(rows) + 1  # one output row per input row, malformed included
    by_id = {r["id"]: r for r in result}
    # the malformed line keeps its place; its id is unknown, so it is the row number
    assert result[4]["id"] == 4 and result[4]["error"].startswith("line 5: malformed JSON")
    import re

    for name, pattern in expected.items():
        assert by_id[name]["score"] is None
        assert re.search(pattern, by_id[name]["error"]), (name, by_id[name]["error"])
        assert re.match(r"line \d+: ", by_id[name]["error"])
    good = [r for r in result if str(r["id"]).startswith("good")]
    assert len(good) == len(BAD_ROWS) and all(r["error"] is None for r in good)
    assert all(0 <= r["score"] <= 1 for r in good)
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["n_errors"] == len(BAD_ROWS) + 1 and summary["n_scored"] == len(BAD_ROWS)
    assert summary["mean"] == pytest.approx(np.mean([r["score"] for r in good]), abs=1e-12)
    # --strict turns row errors into a non-zero exit code, after writing everything
    strict = main(
        [
            *_base(world, src, out),
            "--workers",
            "0",
            "--no-progress",
            "--strict",
            "--overwrite",  # the output of the run above exists
        ]
    )
    assert strict == 1 and len(list(read_score_rows(out))) == len(rows) + 1


def test_scores_equal_the_python_api_and_are_order_invariant(world, tmp_path):
    import specs_metric

    captions = [f"caption {'word ' * k}number {k}" for k in range(30)]
    images = [f"img{k % 5}.png" for k in range(30)]
    images[7] = "copy_of_0.png"  # same content as img0: encoded once
    rows = [
        {"id": k, "image": im, "caption": c}
        for k, (im, c) in enumerate(zip(images, captions, strict=True))
    ]
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, rows)
    out = tmp_path / "out.jsonl"
    main(
        [
            *_base(world, src, out),
            "--workers",
            "1",
            "--batch-size",
            "3",
            "--token-budget",
            "64",
            "--chunk-rows",
            "7",
            "--no-progress",
        ]
    )
    result = list(read_score_rows(out))
    scorer = specs_metric.load(world / "tiny.pt")
    # independent path: one pair at a time, full padding, no batching
    with torch.no_grad():
        for rec in result:
            pixels = scorer.preprocess(Image.open(world / rec["image"]))[None]
            img = scorer.model.encode_image(pixels)[0].double()
            txt = scorer.model.encode_text(scorer.tokenize([rec["caption"]]))[0].double()
            cos = float(img @ txt / (img.norm() * txt.norm()))
            assert rec["cosine"] == pytest.approx(cos, abs=1e-6)
            assert rec["score"] == pytest.approx(max(0.0, (cos + 1) / 2), abs=1e-6)
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["images_encoded_rank0"] == 5  # six files, five distinct contents

    shuffled = rows[::-1]
    src2 = tmp_path / "rev.jsonl"
    _write_jsonl(src2, shuffled)
    out2 = tmp_path / "rev.csv"
    main(
        [
            *_base(world, src2, out2),
            "--workers",
            "0",
            "--batch-size",
            "64",
            "--no-progress",
        ]
    )
    reversed_rows = {r["id"]: r for r in read_score_rows(out2)}
    assert [r["id"] for r in read_score_rows(out2)] == [str(r["id"]) for r in shuffled]
    for rec in result:
        assert reversed_rows[str(rec["id"])]["score"] == pytest.approx(rec["score"], abs=1e-6)


def test_csv_and_clipscore_json_inputs(world, tmp_path):
    with open(tmp_path / "in.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "caption"])
        w.writerow(["a", "img1.png", 'a caption, with "quotes"\nand a newline'])
        w.writerow(["b", "img2.png", "second"])
    (tmp_path / "caps.json").write_text(json.dumps({"img3": "third caption", "zzz": "none"}))
    for name in ("in.csv", "caps.json"):
        out = tmp_path / f"{name}.out.jsonl"
        main(
            [
                *_base(world, tmp_path / name, out),
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        result = list(read_score_rows(out))
        assert len(result) == 2
    assert result[0]["id"] == "img3" and result[0]["error"] is None
    assert "not found" in result[1]["error"]


def test_long_caption_policies(world, tmp_path):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{"id": 1, "image": "img0.png", "caption": "word " * 300}])
    out = tmp_path / "o.jsonl"
    args = [
        *_base(world, src, out),
        "--workers",
        "0",
        "--no-progress",
    ]
    main(args)
    (rec,) = read_score_rows(out)
    assert rec["truncated"] is True and rec["tokens"] == 302 and rec["error"] is None
    main([*args, "--long-captions", "error", "--overwrite"])  # replaces the output above
    (rec,) = read_score_rows(out)
    assert rec["score"] is None and "302 tokens" in rec["error"]


def _big_corpus(world: Path, path: Path, n: int) -> None:
    rows = [
        {"id": k, "image": f"img{k % 5}.png", "caption": f"row {k} " + "detail " * (k % 40)}
        for k in range(n)
    ]
    _write_jsonl(path, rows)


def test_resume_after_sigkill_gives_identical_output(world, tmp_path):
    src = tmp_path / "in.jsonl"
    _big_corpus(world, src, 1500)
    base = [
        sys.executable,
        "-m",
        "specs_metric",
        "score",
        "--model",
        str(world / "tiny.pt"),
        "--input",
        str(src),
        "--image-root",
        str(world),
        "--workers",
        "0",
        "--chunk-rows",
        "8",
        "--no-progress",
    ]
    reference = tmp_path / "ref.jsonl"
    subprocess.run(
        [*base, "--output", str(reference)], check=True, env=child_env(), capture_output=True
    )

    out = tmp_path / "out.jsonl"
    part = out.with_name("out.jsonl.part-0-of-1.jsonl")
    proc = subprocess.Popen(
        [*base, "--output", str(out)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600  # generous: 2 busy cores can be very slow
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.stat().st_size > 20_000:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = part.read_text().count("\n")
    assert 0 < done < 1500, "the run was not interrupted mid-way"
    assert not out.exists()
    # a torn last line, as a crash in the middle of a write leaves it
    with open(part, "a") as fh:
        fh.write('{"id": 99999, "image": "img')
    subprocess.run(
        [*base, "--output", str(out), "--resume"], check=True, env=child_env(), capture_output=True
    )
    assert out.read_bytes() == reference.read_bytes()
    assert not part.exists()


def test_resume_refuses_other_settings(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    _big_corpus(world, src, 20)
    out = tmp_path / "o.jsonl"
    args = [*_base(world, src, out), "--workers", "0", "--no-progress"]
    assert main(args) == 0
    first = out.read_bytes()
    assert main([*args, "--resume"]) == 0  # complete and unchanged: nothing to redo
    assert out.read_bytes() == first
    code = main([*args, "--resume", "--scale", "clip-s"])
    assert code == 2
    err = capsys.readouterr().err
    assert "other settings (scale)" in err and str(out) in err
    assert out.read_bytes() == first


def test_torchrun_two_processes_equal_one(world, tmp_path):
    src = tmp_path / "in.jsonl"
    _big_corpus(world, src, 101)
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    rows[50]["image"] = "nope.png"
    _write_jsonl(src, rows)
    common = [
        "score",
        "--model",
        str(world / "tiny.pt"),
        "--input",
        str(src),
        "--image-root",
        str(world),
        "--workers",
        "0",
        "--chunk-rows",
        "16",  # ranks get whole chunks: 4 and 3 of them
        "--no-progress",
        "--device",
        "cpu",
    ]
    single = tmp_path / "single.jsonl"
    main([*common, "--output", str(single)])
    multi = tmp_path / "multi.jsonl"
    torchrun(["-m", "specs_metric", *common, "--output", str(multi)])
    a, b = list(read_score_rows(single)), list(read_score_rows(multi))
    assert [(r["id"], r["error"]) for r in a] == [(r["id"], r["error"]) for r in b]
    for x, y in zip(a, b, strict=True):
        if x["score"] is not None:
            assert abs(x["score"] - y["score"]) <= 1e-6
    summary = json.loads((tmp_path / "multi.jsonl.summary.json").read_text())
    assert summary["world_size"] == 2 and summary["n_rows"] == 101 and summary["n_errors"] == 1
    assert not list(tmp_path.glob("multi.jsonl.part-*"))
