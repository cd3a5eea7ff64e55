"""Scoring datasets: webdataset shards, parquet/arrow/HF folders, COCO results, fsspec URLs,
parquet output, ``--output-dir`` with shard-level resume."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.data.locations import expand
from specs_metric.data.scorefiles import read_score_rows
from subprocesses import child_env

N_PAIRS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, a few images and N_PAIRS (key, image file, caption) pairs."""
    d = tmp_path_factory.mktemp("datasets")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(1)
    for i in range(5):
        arr = rng.integers(0, 255, size=(28 + i, 37, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
    pairs = [
        (f"s{k:04d}", f"img{k % 5}.png", f"pair {k} " + "with more words " * (k % 4))
        for k in range(N_PAIRS)
    ]
    return d, pairs


def _score(world_dir: Path, src, out: Path, *extra: str, code: int = 0) -> list[dict]:
    """``specs score`` of ``src`` into ``out``, which must exit with ``code`` (2 when no row
    could be scored); the output rows."""
    expected = code
    code = main(
        [
            "score",
            "--model",
            str(world_dir / "tiny.pt"),
            "--input",
            str(src),
            "--output",
            str(out),
            "--workers",
            "0",
            "--no-progress",
            *extra,
        ]
    )
    assert code == expected
    return list(read_score_rows(out))


def _jsonl(world, path: Path) -> Path:
    d, pairs = world
    with open(path, "w") as fh:
        for key, image, caption in pairs:
            fh.write(json.dumps({"id": key, "image": str(d / image), "caption": caption}) + "\n")
    return path


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shards(world, folder: Path, per_shard: int, json_caption: bool = False) -> list[Path]:
    """The pairs as webdataset shards ``folder/0000N.tar`` (png + txt, or png + json)."""
    d, pairs = world
    folder.mkdir(exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(pairs), per_shard)):
        members = []
        for key, image, caption in pairs[start : start + per_shard]:
            members.append((f"{key}.png", (d / image).read_bytes()))
            if json_caption:
                meta = {"alt": caption, "url": f"http://example/{key}"}
                members.append((f"{key}.json", json.dumps(meta).encode()))
            else:
                members.append((f"{key}.txt", caption.encode()))
        paths.append(_tar(folder / f"{n:05d}.tar", members))
    return paths


def _table(world, struct: bool = False) -> pa.Table:
    d, pairs = world
    data = [(d / image).read_bytes() for _, image, _ in pairs]
    images = [{"bytes": b, "path": None} for b in data] if struct else data
    return pa.table(
        {
            "key": [k for k, _, _ in pairs],
            "jpg": images,
            "text": [c for _, _, c in pairs],
        }
    )


def _same(a: list[dict], b: list[dict], exact: bool = True) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["caption"] for r in a] == [r["caption"] for r in b]
    assert all(r["error"] is None for r in a + b)
    for x, y in zip(a, b, strict=True):
        for key in ("score", "cosine"):
            if exact:
                assert x[key] == y[key]
            else:
                assert x[key] == pytest.approx(y[key], abs=1e-6)
        assert (x["tokens"], x["truncated"]) == (y["tokens"], y["truncated"])


def test_jsonl_webdataset_and_parquet_give_identical_results(world, tmp_path):
    d, pairs = world
    reference = _score(d, _jsonl(world, tmp_path / "in.jsonl"), tmp_path / "ref.jsonl")
    assert len(reference) == N_PAIRS
    # webdataset: three shards by brace range, then a glob, captions from txt or json
    _shards(world, tmp_path / "wds", per_shard=5)
    shards = _score(d, f"{tmp_path}/wds/{{00000..00002}}.tar", tmp_path / "wds.jsonl")
    _same(shards, reference)
    assert [r["image"] for r in shards] == [f"{k}.png" for k, _, _ in pairs]
    _shards(world, tmp_path / "wdsj", per_shard=4, json_caption=True)
    by_json = _score(d, f"{tmp_path}/wdsj/*.tar", tmp_path / "wdsj.jsonl", "--caption-key", "alt")
    _same(by_json, reference)
    # parquet: image bytes, and HF {bytes, path} structs; other column names
    columns = ["--image-column", "jpg", "--caption-column", "text", "--id-column", "key"]
    pq.write_table(_table(world), tmp_path / "t.parquet", row_group_size=5)
    _same(_score(d, tmp_path / "t.parquet", tmp_path / "pq.jsonl", *columns), reference)
    pq.write_table(_table(world, struct=True), tmp_path / "hf.parquet")
    _same(_score(d, tmp_path / "hf.parquet", tmp_path / "hf.jsonl", *columns), reference)
    # image paths relative to the table's folder, and gzipped shards
    (tmp_path / "images").mkdir()
    for _, image, _ in pairs:
        (tmp_path / "images" / image).write_bytes((d / image).read_bytes())
    paths = _table(world).set_column(1, "jpg", pa.array([f"images/{i}" for _, i, _ in pairs]))
    pq.write_table(paths, tmp_path / "paths.parquet")
    _same(_score(d, tmp_path / "paths.parquet", tmp_path / "p.jsonl", *columns), reference)
    for shard in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(tmp_path / "wds" / f"{shard.stem}.tgz", "w:gz") as tgz:
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    tgz.addfile(member, tar.extractfile(member))
    _same(_score(d, f"{tmp_path}/wds/*.tgz", tmp_path / "tgz.jsonl"), reference)


def test_parquet_output_has_the_rows_of_the_jsonl_output(world, tmp_path):
    d, _ = world
    src = _jsonl(world, tmp_path / "in.jsonl")
    with open(src, "a") as fh:  # an error row and a non-string caption
        fh.write(json.dumps({"id": "bad", "image": "nope.png", "caption": "x"}) + "\n")
        fh.write(json.dumps({"id": "odd", "image": "img0.png", "caption": [1]}) + "\n")
    jsonl = _score(d, src, tmp_path / "o.jsonl")
    parquet = _score(d, src, tmp_path / "o.parquet")
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("tokens").type == pa.int64()
    assert table.schema.field("id").type == pa.string()  # not all ids are integers
    assert table.num_rows == len(jsonl) == N_PAIRS + 2
    for a, b in zip(parquet, jsonl, strict=True):
        assert a == b
    assert jsonl[-1]["caption"] is None and "caption is not a string" in jsonl[-1]["error"]
    summary = json.loads((tmp_path / "o.parquet.summary.json").read_text())
    assert summary["n_rows"] == N_PAIRS + 2 and summary["n_errors"] == 2


def test_filter_by_score_one_liner(world, tmp_path):
    """The pyarrow one-liner of docs/datasets.md keeps exactly the scored rows at or above a
    threshold."""
    d, _ = world
    rows = _score(d, _jsonl(world, tmp_path / "in.jsonl"), tmp_path / "scores.parquet")
    threshold = float(np.median([r["score"] for r in rows]))
    import pyarrow.compute as pc

    kept = pq.read_table(tmp_path / "scores.parquet").filter(pc.field("score") >= threshold)
    assert kept.column("id").to_pylist() == [r["id"] for r in rows if r["score"] >= threshold]
    assert 0 < kept.num_rows < len(rows)


def test_bad_samples_become_row_errors(world, tmp_path):
    d, pairs = world
    good = (d / "img0.png").read_bytes()
    shard = _tar(
        tmp_path / "bad.tar",
        [
            ("a.png", good),
            ("a.txt", b"a fine caption"),
            ("noimage.txt", b"caption without image"),
            ("junk.jpg", b"not an image at all"),
            ("junk.txt", b"caption"),
            ("empty.png", good),
            ("empty.txt", b"   "),
            ("badutf.png", good),
            ("badutf.txt", b"\xff\xfe caption"),
            ("nocap.png", good),
            ("README", b"no extension: skipped"),
            ("z.png", good),
            ("z.txt", b"last one"),
        ],
    )
    result = _score(d, shard, tmp_path / "bad.jsonl")
    by_id = {r["id"]: r for r in result}
    assert [r["id"] for r in result] == [
        "a",
        "noimage",
        "junk",
        "empty",
        "badutf",
        "nocap",
        "z",
    ]
    assert by_id["a"]["error"] is None and by_id["z"]["error"] is None
    expected = {
        "noimage": "no image member",
        "junk": "not a recognised image",
        "empty": "caption is empty",
        "badutf": "not valid UTF-8",
        "nocap": "no caption",
    }
    for key, text in expected.items():
        error = by_id[key]["error"]
        assert error.startswith(f"bad.tar: sample '{key}': ") and text in error, error
        assert by_id[key]["score"] is None
    # a shard cut short (a partial download) keeps its samples before the cut; a file that
    # is not a tar at all is one error row
    whole = (tmp_path / "bad.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2 + 100])
    cut = _score(d, tmp_path / "cut.tar", tmp_path / "cut.jsonl")
    assert [r["id"] for r in cut[:-1]] == [r["id"] for r in result[: len(cut) - 1]]
    assert 1 < len(cut) < len(result) and "cut.tar" in cut[-1]["error"]
    assert cut[-1]["id"] == len(cut) - 1 and cut[-1]["score"] is None
    (tmp_path / "text.tar").write_bytes(b"just some text\n" * 100)
    # its one row is an error: no row could be scored, exit 2 with the output written
    (text,) = _score(d, tmp_path / "text.tar", tmp_path / "text.jsonl", code=2)
    assert "not a readable tar shard" in text["error"]
    # a parquet row without image bytes, and undecodable bytes, name the table row
    table = pa.table({"image": [good, None, b"\x00\x01"], "caption": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    rows = _score(d, tmp_path / "bad.parquet", tmp_path / "badpq.jsonl")
    assert [r["id"] for r in rows] == [0, 1, 2] and rows[0]["error"] is None
    assert rows[1]["error"] == "bad.parquet: row 1: row has no image"
    assert rows[2]["error"].startswith("bad.parquet: row 2: ")


def test_missing_columns_and_inputs_are_one_line_errors(world, tmp_path, capsys):
    d, _ = world
    pq.write_table(_table(world), tmp_path / "t.parquet")
    base = ["score", "--model", str(d / "tiny.pt"), "--output", str(tmp_path / "o.jsonl")]
    assert main([*base, "--input", str(tmp_path / "t.parquet"), "--workers", "0"]) == 2
    assert "no column(s) ['image', 'caption']" in capsys.readouterr().err
    assert main([*base, "--input", str(tmp_path / "none-{0..3}.tar")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--input", str(tmp_path / "*.tar")]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_hf_datasets_folder_and_arrow_files(world, tmp_path):
    d, pairs = world
    reference = _score(d, _jsonl(world, tmp_path / "in.jsonl"), tmp_path / "ref.jsonl")
    # the save_to_disk layout: state.json naming arrow IPC stream files
    folder = tmp_path / "hfds"
    folder.mkdir()
    table = _table(world, struct=True).rename_columns(["id", "image", "caption"])
    names = []
    for n, (start, stop) in enumerate([(0, 7), (7, N_PAIRS)]):
        name = f"data-{n:05d}-of-00002.arrow"
        with pa.ipc.new_stream(folder / name, table.schema) as writer:
            writer.write_table(table.slice(start, stop - start))
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names}))
    (folder / "dataset_info.json").write_text("{}")
    _same(_score(d, folder, tmp_path / "hf.jsonl"), reference)
    # one arrow file (IPC file format) on its own
    with pa.ipc.new_file(tmp_path / "t.arrow", table.schema) as writer:
        writer.write_table(table)
    _same(_score(d, tmp_path / "t.arrow", tmp_path / "arrow.jsonl"), reference)
    # a DatasetDict folder asks for a split
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    code = main(
        [
            "score",
            "--model",
            str(d / "tiny.pt"),
            "--input",
            str(tmp_path / "dd"),
            "--output",
            str(tmp_path / "dd.jsonl"),
        ]
    )
    assert code == 2


def test_fsspec_urls(world, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    d, _ = world
    reference = _score(d, _jsonl(world, tmp_path / "in.jsonl"), tmp_path / "ref.jsonl")
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    pq.write_table(_table(world).rename_columns(["id", "image", "caption"]), buf)
    fs.pipe("/specs-test/part-0.parquet", buf.getvalue())
    assert expand("memory://specs-test/*.parquet") == ["memory:///specs-test/part-0.parquet"]
    _same(_score(d, "memory://specs-test/part-0.parquet", tmp_path / "mem.jsonl"), reference)
    _shards(world, tmp_path / "wds", per_shard=5)
    url = f"file://{tmp_path}/wds/{{00000..00002}}.tar"
    _same(_score(d, url, tmp_path / "file.jsonl"), reference)


def test_coco_results_file_with_image_pattern(world, tmp_path):
    d, pairs = world
    images = tmp_path / "val2014"
    images.mkdir()
    entries, rows = [], []
    for n, (_, image, caption) in enumerate(pairs):
        image_id = 100 + n
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.open(d / image).convert("RGB").save(images / name, quality=95)
        entries.append({"image_id": image_id, "caption": caption})
        rows.append({"id": image_id, "image": name, "caption": caption})
    entries.append({"image_id": 999, "caption": "no such image"})
    (tmp_path / "results.json").write_text(json.dumps(entries))
    with open(tmp_path / "same.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    pattern = ["--image-pattern", "COCO_val2014_{image_id:012d}.jpg", "--image-root", str(images)]
    result = _score(d, tmp_path / "results.json", tmp_path / "coco.jsonl", *pattern)
    reference = _score(
        d, tmp_path / "same.jsonl", tmp_path / "ref.jsonl", "--image-root", str(images)
    )
    _same(result[:-1], reference)
    assert [r["image"] for r in result[:-1]] == [r["image"] for r in rows]
    assert result[-1]["id"] == 999 and "not found" in result[-1]["error"]
    # a pattern that does not fit the entries is a row error, not a crash
    bad = _score(  # every row: exit 2 (no row could be scored), the output written
        d, tmp_path / "results.json", tmp_path / "b.jsonl", "--image-pattern", "{nope}.jpg", code=2
    )
    assert all("does not fit" in r["error"] for r in bad)


def _shard_dir(world, folder: Path) -> list[Path]:
    """Four shards: a small one first, then bigger ones (one chunk each)."""
    d, _ = world
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for n, size in enumerate([3, 150, 150, 150]):
        members = []
        for k in range(size):
            members.append((f"{n}-{k:04d}.png", (d / f"img{rng.integers(5)}.png").read_bytes()))
            members.append((f"{n}-{k:04d}.txt", f"shard {n} row {k} {'x ' * (k % 30)}".encode()))
        paths.append(_tar(folder / f"part-{n:03d}.tar", members))
    return paths


def test_output_dir_resume_after_sigkill_equals_an_uninterrupted_run(world, tmp_path):
    d, _ = world
    _shard_dir(world, tmp_path / "shards")
    base = [
        sys.executable, "-m", "specs_metric", "score", "--model", str(d / "tiny.pt"),
        "--input", str(tmp_path / "shards" / "part-{000..003}.tar"),
        "--workers", "0", "--no-progress", "--output-format", "parquet",
    ]  # fmt: skip
    reference = tmp_path / "ref"
    subprocess.run([*base, "--output-dir", str(reference)], check=True, env=child_env(),
                   capture_output=True)  # fmt: skip
    names = [f"part-{n:03d}.parquet" for n in range(4)]
    assert sorted(p.name for p in reference.glob("*.parquet")) == names
    for name in names:
        assert (reference / f"{name}.summary.json").exists()
        assert json.loads((reference / f"{name}.job.json").read_text())["complete"]
    combined = json.loads((reference / "summary.json").read_text())
    assert combined["n_rows"] == 453 and [s["n_rows"] for s in combined["shards"]] == [
        3,
        150,
        150,
        150,
    ]
    scores = [r["score"] for n in names for r in read_score_rows(reference / n)]
    assert combined["mean"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert combined["std"] == pytest.approx(np.std(scores), abs=1e-9)

    out = tmp_path / "out"
    proc = subprocess.Popen([*base, "--output-dir", str(out)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    first_done = out / f"{names[0]}.summary.json"  # written after the shard's job is complete
    while time.time() < deadline and not first_done.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [name for name in names if (out / name).exists()]
    assert names[0] in finished and len(finished) < 4, "the run was not interrupted mid-way"
    first = (out / names[0]).stat().st_mtime_ns
    subprocess.run([*base, "--output-dir", str(out), "--resume"], check=True, env=child_env(),
                   capture_output=True)  # fmt: skip
    assert (out / names[0]).stat().st_mtime_ns == first  # a finished shard is not redone
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.glob("*.part-*"))


def test_output_dir_refuses_shards_with_the_same_name(world, tmp_path, capsys):
    d, _ = world
    for sub in ("a", "b"):
        _shards(world, tmp_path / sub, per_shard=N_PAIRS)
    code = main(
        [
            "score",
            "--model",
            str(d / "tiny.pt"),
            "--input",
            f"{tmp_path}/{{a,b}}/00000.tar",
            "--output-dir",
            str(tmp_path / "out"),
        ]  # fmt: skip
    )
    assert code == 2 and "would both write" in capsys.readouterr().err
