"""Inputs nobody here wrote: one test per class of attack, across the commands that read or
write that kind of file. Each case must end in a row error or one line with a non-zero exit,
within bounded memory and time, with nothing overwritten and the rows already written kept.

Classes: small files that make us allocate gigabytes; writes that would follow a planted
link; outputs that are inputs; files that would hang a reader (FIFOs, devices); malformed
files that would end in a traceback; inputs edited in place between a run and its resume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
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
from subprocesses import child_env

GB = 2**30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("adversarial")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(d / f"g{i}.png")
    rows = [{"id": i, "image": f"g{i % 3}.png", "caption": f"picture {i}"} for i in range(6)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _score(world: Path, src, out, *extra: str) -> list[str]:
    return ["score", "--model", str(world / "tiny.pt"), "--input", str(src), "--output",
            str(out), "--workers", "0", "--no-progress", *extra]  # fmt: skip


def _one_line(code: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(" ")]
    errors = [line for line in lines if ": error: " in line]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _peak_rss_gb(argv: list[str], timeout: float = 120) -> tuple[int, float, str]:
    """Run ``specs ARGV`` in a fresh process: its exit code, peak RSS (GB) and stderr."""
    script = textwrap.dedent(
        """
        import resource, sys
        from specs_metric.cli import main
        code = main(sys.argv[1:])
        sys.stderr.write(f"\\nPEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n")
        sys.exit(code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], env=child_env(), capture_output=True, text=True,
        timeout=timeout,
    )
    peak = int(done.stderr.rsplit("PEAK ", 1)[1].split()[0]) / 2**20
    return done.returncode, peak, done.stderr


# --- small files that allocate gigabytes ---------------------------------------------------------


def test_a_compressed_shard_member_too_large_is_a_row_error_read_unbounded_never(world, tmp_path):
    # 200 MB of zeros compress to ~200 kB: the member is refused from its header, unread.
    shard = tmp_path / "bomb.tgz"
    big = tmp_path / "zeros"
    with open(big, "wb") as fh:
        fh.truncate(200 * 2**20)
    with tarfile.open(shard, "w:gz") as tar:
        tar.add(big, arcname="000.jpg")
        _add(tar, "000.txt", b"hello")
        _add(tar, "001.png", (world / "g0.png").read_bytes())  # a good sample after it
        _add(tar, "001.txt", b"a good one")
    big.unlink()
    assert shard.stat().st_size < 2**20
    out = tmp_path / "out.jsonl"
    code, peak, err = _peak_rss_gb(_score(world, shard, out))
    assert code == 0, err
    assert peak < 1.0, f"peak RSS {peak:.2f} GB"
    bomb, good = read_score_rows(out)
    assert "too large" in bomb["error"] and bomb["score"] is None
    assert good["error"] is None and good["score"] is not None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, __import__("io").BytesIO(data))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar for a sparse member")
def test_a_sparse_shard_member_is_refused(world, tmp_path):
    sparse = tmp_path / "s" / "000.jpg"
    sparse.parent.mkdir()
    with open(sparse, "wb") as fh:
        fh.truncate(3 * GB)  # a hole: nothing on disk
    (sparse.parent / "000.txt").write_text("a sparse image")
    shutil.copy(world / "g0.png", sparse.parent / "001.png")
    (sparse.parent / "001.txt").write_text("a good one")
    shard = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(shard), "-C", str(sparse.parent), "000.jpg",
                    "000.txt", "001.png", "001.txt"], check=True)  # fmt: skip
    assert shard.stat().st_size < 2**20
    out = tmp_path / "out.jsonl"
    code, peak, err = _peak_rss_gb(_score(world, shard, out))
    assert code == 0 and peak < 1.0, (err, peak)
    bad, good = read_score_rows(out)
    assert "sparse" in bad["error"] or "too large" in bad["error"]
    assert good["error"] is None


def test_a_brace_range_of_a_hundred_million_files_is_refused_before_expanding(world, capsys):
    code = main(_score(world, "x/{0..99999999}.tar", "/tmp/never.jsonl"))
    _one_line(code, capsys, "names more than")


def test_table_image_cells_of_the_wrong_type_are_row_errors(world, tmp_path):
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": None, "path": "g0.png"}, {"bytes": None, "path": None}],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "caption": ["good", "no image"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    # a struct whose bytes is an integer (10**12: bytes(10**12) would allocate a terabyte),
    # or text; each beside a good row given by its path
    for kind, value in (("int", 10**12), ("str", "abc")):
        cells = [{"bytes": value, "path": None}, {"bytes": None, "path": "g0.png"}]
        pq.write_table(pa.table({"image": cells, "caption": [kind, "good"]}),
                       tmp_path / f"{kind}.parquet")  # fmt: skip
    for name, wanted in (("t.parquet", [None, "row has no image"]),
                         ("int.parquet", ["not bytes (got int)", None]),
                         ("str.parquet", ["not bytes (got str)", None])):  # fmt: skip
        out = tmp_path / f"{name}.jsonl"
        assert main(_score(world, tmp_path / name, out, "--image-root", str(world))) == 0
        rows = list(read_score_rows(out))
        for row, want in zip(rows, wanted, strict=True):
            assert (row["error"] is None) if want is None else (want in row["error"]), row


def test_a_cache_entry_declaring_2_to_the_60_elements_reads_as_missing(world, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "a.jsonl"
    assert main(_score(world, world / "rows.jsonl", out, "--cache-dir", str(cache))) == 0
    entries = sorted(cache.rglob("*.npy"))
    assert entries
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1152921504606846976,), }"
    header += b" " * (118 - len(header)) + b"\n"
    for entry in entries:
        entry.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    again = tmp_path / "b.jsonl"
    code, peak, err = _peak_rss_gb(_score(world, world / "rows.jsonl", again, "--cache-dir",
                                          str(cache)))  # fmt: skip
    assert code == 0 and peak < 1.0, (err, peak)
    assert [r["score"] for r in read_score_rows(again)] == [
        r["score"] for r in read_score_rows(out)
    ]


def test_a_coco_results_file_is_read_in_bounded_memory(tmp_path):
    # json.load would hold every entry at once (some 300 MB of objects for this 60 MB file);
    # read element by element, counting its rows costs about what importing the reader does.
    path = tmp_path / "results.json"
    entry = '{"image_id": %d, "caption": "a caption of some length, with a few more words"}'
    with open(path, "w") as fh:
        fh.write("[" + ", ".join(entry % i for i in range(700_000)) + "]")
    assert path.stat().st_size > 50 * 2**20
    script = textwrap.dedent(
        """
        import resource, sys
        from specs_metric.data.sources import count_rows
        from specs_metric.data.rows import SourceOptions
        if sys.argv[1] != "-":
            n = count_rows(sys.argv[1], sys.argv[2], SourceOptions(image_pattern="{image_id}.jpg"))
            assert n == 700_000, n
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )

    def peak_mb(*args: str) -> float:
        done = subprocess.run([sys.executable, "-c", script, *args], env=child_env(),
                              capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
        return int(done.stdout) / 1024

    baseline = peak_mb("-", "-")
    reading = peak_mb(str(path), str(tmp_path))
    assert reading - baseline < 60, f"{reading:.0f} MB vs {baseline:.0f} MB with nothing read"


# --- writes that would follow a planted link -----------------------------------------------------


@pytest.mark.parametrize("planted", ["lock", "part", "summary", "job"])
def test_a_planted_symlink_is_never_written_through(world, tmp_path, planted, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out.jsonl"
    names = {"lock": "out.jsonl.lock", "part": "out.jsonl.part-0-of-1.jsonl",
             "summary": "out.jsonl.summary.json", "job": "out.jsonl.job.json"}  # fmt: skip
    (tmp_path / names[planted]).symlink_to(victim)
    code = main(_score(world, world / "rows.jsonl", out))
    assert victim.read_text() == "precious\n"
    if planted == "lock":  # the lock must be opened in place: refused, one line
        _one_line(code, capsys, "symbolic link")
        return
    if planted == "part":  # looks like an interrupted run: refused unless told
        _one_line(code, capsys, "--resume", "--overwrite")
        code = main(_score(world, world / "rows.jsonl", out, "--overwrite"))
    # replaced (rename) or recreated (the link removed first): the job goes on
    assert code == 0
    assert victim.read_text() == "precious\n"
    assert len(list(read_score_rows(out))) == 6
    assert not (tmp_path / names[planted]).is_symlink()


def test_a_planted_part_link_is_refused_on_resume(world, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out.jsonl"
    assert main(_score(world, world / "rows.jsonl", out)) == 0
    out.unlink()  # as if the job had stopped before its output appeared
    (tmp_path / "out.jsonl.part-0-of-1.jsonl").symlink_to(victim)
    code = main(_score(world, world / "rows.jsonl", out, "--resume"))
    assert victim.read_text() == "precious\n"
    assert code == 2
    assert "symbolic link" in capsys.readouterr().err or "regular file" in capsys.readouterr().err


# --- outputs that are inputs ---------------------------------------------------------------------


def test_output_that_is_a_file_of_the_input_glob_is_refused(world, tmp_path, capsys):
    for i in range(2):
        shutil.copy(world / "rows.jsonl", tmp_path / f"part{i}.jsonl")
    before = (tmp_path / "part1.jsonl").read_bytes()
    code = main(_score(world, str(tmp_path / "part*.jsonl"), tmp_path / "part1.jsonl",
                       "--image-root", str(world)))  # fmt: skip
    _one_line(code, capsys, "is the input file")
    assert (tmp_path / "part1.jsonl").read_bytes() == before


def test_output_dir_that_would_overwrite_an_input_is_refused(world, tmp_path, capsys):
    shutil.copy(world / "rows.jsonl", tmp_path / "a.jsonl")
    before = (tmp_path / "a.jsonl").read_bytes()
    argv = ["score", "--model", str(world / "tiny.pt"), "--input", str(tmp_path / "*.jsonl"),
            "--output-dir", str(tmp_path), "--output-format", "jsonl", "--image-root",
            str(world), "--workers", "0", "--no-progress"]  # fmt: skip
    _one_line(main(argv), capsys, "is the input file")
    assert (tmp_path / "a.jsonl").read_bytes() == before


def test_output_that_is_a_hard_link_to_the_input_is_refused(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    shutil.copy(world / "rows.jsonl", src)
    os.link(src, tmp_path / "out.jsonl")
    before = src.read_bytes()
    _one_line(main(_score(world, src, tmp_path / "out.jsonl", "--image-root", str(world))),
              capsys, "input file")  # fmt: skip
    assert src.read_bytes() == before


def test_explain_output_equal_to_its_input_is_refused(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    shutil.copy(world / "rows.jsonl", src)
    before = src.read_bytes()
    argv = ["explain", "--model", str(world / "tiny.pt"), "--input", str(src), "--output",
            str(src), "--image-root", str(world), "--no-progress"]  # fmt: skip
    _one_line(main(argv), capsys, "input")
    assert src.read_bytes() == before


# --- files that would hang a reader --------------------------------------------------------------


def test_fifos_never_hang_a_reader(world, tmp_path, capsys):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    _one_line(main(_score(world, fifo, tmp_path / "o.jsonl")), capsys, "FIFO")
    model = tmp_path / "model.pt"
    os.mkfifo(model)
    argv = _score(world, world / "rows.jsonl", tmp_path / "o2.jsonl")
    argv[argv.index("--model") + 1] = str(model)
    _one_line(main(argv), capsys, "FIFO")
    scores = tmp_path / "scores.jsonl"
    os.mkfifo(scores)
    _one_line(main(["compare", str(scores), str(scores)]), capsys, str(scores))


def test_a_fifo_listed_by_a_dataset_folder_never_hangs(world, tmp_path, capsys):
    folder = tmp_path / "ds"
    folder.mkdir()
    os.mkfifo(folder / "data-00000-of-00001.arrow")
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    _one_line(main(_score(world, folder, tmp_path / "o.jsonl")), capsys, "FIFO")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "/dev/zero"}]}))
    _one_line(main(_score(world, folder, tmp_path / "o.jsonl")), capsys, "/dev/zero")


def test_a_fifo_in_place_of_a_cache_entry_is_a_miss(world, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "a.jsonl"
    assert main(_score(world, world / "rows.jsonl", out, "--cache-dir", str(cache))) == 0
    for entry in cache.rglob("*.npy"):
        entry.unlink()
        os.mkfifo(entry)
    again = tmp_path / "b.jsonl"
    done = subprocess.run([sys.executable, "-m", "specs_metric", *_score(
        world, world / "rows.jsonl", again, "--cache-dir", str(cache))], env=child_env(),
        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["score"] for r in read_score_rows(again)] == [
        r["score"] for r in read_score_rows(out)
    ]


# --- malformed files: one line, never a traceback ------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        ("5\n", "not a score row (a JSON object), got int"),
        ("null\n", "got null"),
        ('{"id": 1, "image": "a", "caption": "c", "score": [1]}\n', "score must be a number"),
        ('{"id": 1, "image": "a", "caption": "c", "score": "0.5"}\n', "score must be a number"),
        ('{"id": 1, "image": "a", "caption": "c", "score": 0.5, "tokens": 1.5}\n', "tokens"),
    ],
)
def test_compare_on_a_malformed_score_file_is_one_line(tmp_path, capsys, content, needle):
    a = tmp_path / "a.jsonl"
    a.write_text(content)
    _one_line(main(["compare", str(a), str(a)]), capsys, f"{a}, line 1", needle)


def test_compare_with_a_summary_that_is_a_list_is_one_line(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text('{"id": 1, "image": "a", "caption": "c", "score": 0.5}\n')
    (tmp_path / "a.jsonl.summary.json").write_text("[1, 2]")
    _one_line(main(["compare", str(a), str(a)]), capsys, "summary")


def test_a_utf16_input_is_one_line_not_garbage_rows(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text((world / "rows.jsonl").read_text(), encoding="utf-16")
    _one_line(main(_score(world, src, tmp_path / "o.jsonl")), capsys, "UTF-16")


def test_an_arrow_file_without_rows_is_an_empty_input(world, tmp_path):
    schema = pa.schema([("image", pa.string()), ("caption", pa.string())])
    with pa.ipc.new_stream(tmp_path / "empty.arrow", schema):
        pass
    out = tmp_path / "o.jsonl"
    assert main(_score(world, tmp_path / "empty.arrow", out)) in (0, 1, 2)
    assert not out.exists() or list(read_score_rows(out)) == []


# --- inputs edited in place ----------------------------------------------------------------------


def test_resume_notices_an_input_edited_with_size_and_times_kept(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    shutil.copy(world / "rows.jsonl", src)
    out = tmp_path / "out.jsonl"
    assert main(_score(world, src, out, "--image-root", str(world))) == 0
    stat = src.stat()
    text = src.read_text().replace("picture 1", "picture 7")  # same size
    src.write_text(text)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -t do
    assert src.stat().st_size == stat.st_size and src.stat().st_mtime_ns == stat.st_mtime_ns
    code = main(_score(world, src, out, "--image-root", str(world), "--resume"))
    _one_line(code, capsys, "other settings", "input_sha256")


# --- caches that cannot be written, and image paths kept inside the root -------------------------


def test_a_read_only_cache_is_a_warning_and_the_job_goes_on(world, tmp_path, capsys, monkeypatch):
    from specs_metric.scoring import cache as cache_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache"))

    monkeypatch.setattr(cache_module, "atomic_write", refuse)
    out = tmp_path / "o.jsonl"
    argv = _score(world, world / "rows.jsonl", out, "--cache-dir", str(tmp_path / "cache"))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the image-embedding cache") == 1
    assert all(r["error"] is None for r in read_score_rows(out))


def test_confine_images_keeps_paths_inside_the_image_root(world, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(world / "g0.png", root / "in.png")
    (root / "link.png").symlink_to(world / "g1.png")
    rows = [{"image": "in.png", "caption": "inside"}, {"image": "../x.png", "caption": "up"},
            {"image": str(world / "g0.png"), "caption": "absolute"},
            {"image": "link.png", "caption": "a link out"}, {"image": "~/x.png", "caption": "home"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    assert main(_score(world, src, out, "--image-root", str(root), "--confine-images")) == 0
    got = list(read_score_rows(out))
    assert got[0]["error"] is None
    assert all("leaves the image root" in r["error"] for r in got[1:4]), got
    # "~" is a character like any other here: a path inside the root, not the home folder
    assert f"{root}/~/x.png: image file not found" in got[4]["error"]
