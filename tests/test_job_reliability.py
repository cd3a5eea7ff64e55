"""What ``specs score`` promises about the job itself: resume after ``kill -9`` writes the same
bytes at any kill point, workers and torchrun do not change them, workers die with the job,
one job per output, damaged cache entries are recomputed, strict JSON, duplicate ids."""

from __future__ import annotations

import json
import math
import os
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
from specs_metric.cli import main
from specs_metric.data.scorefiles import read_score_rows
from specs_metric.io.locking import OutputLock
from subprocesses import child_env, torchrun

N_IMAGES = 12
CHUNK = 8
THREADS = 1  # every byte-identity run uses one thread: the thread count changes rounding


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint and twelve distinct images of assorted sizes."""
    d = tmp_path_factory.mktemp("jobworld")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        arr = rng.integers(0, 255, size=(28 + 3 * i, 50 - 2 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"im{i}.png")
    return d


@pytest.fixture
def one_thread():
    """The in-process runs use the same thread count as the child processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _corpus(path: Path, n: int, seed: int = 0) -> None:
    """Rows whose images recur in an irregular order and whose captions vary in length, so
    that which images and captions meet in a batch depends on where a run starts."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "id": k,
            "image": f"im{int(rng.integers(N_IMAGES))}.png",
            "caption": f"row {k} " + "more detail " * int(rng.integers(0, 30)),
        }
        for k in range(n)
    ]
    _write_jsonl(path, rows)


def _args(world: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "score", "--model", str(world / "tiny.pt"), "--input", str(src), "--image-root",
        str(world), "--output", str(out), "--chunk-rows", str(CHUNK), "--token-budget", "96",
        "--no-progress", *extra,
    ]  # fmt: skip


def _part(out: Path) -> Path:
    return out.with_name(f"{out.name}.part-0-of-1.jsonl")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# --- byte-identical output ------------------------------------------------------------------


def test_resume_at_any_kill_point_is_byte_identical(world, tmp_path, one_thread):
    src = tmp_path / "in.jsonl"
    _corpus(src, 400)
    reference = tmp_path / "ref.jsonl"
    assert main([*_args(world, src, reference, "--workers", "0")]) == 0
    ref_bytes = reference.read_bytes()
    ref_lines = ref_bytes.splitlines(keepends=True)
    job = json.loads(reference.with_name("ref.jsonl.job.json").read_text())

    # A real kill -9 of a running job, wherever it happens to be.
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "specs_metric", *_args(world, src, out, "--workers", "1")],
        env=child_env(OMP_NUM_THREADS=str(THREADS)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: _lines(_part(out)) >= 3 * CHUNK or proc.poll() is not None, "rows")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert main([*_args(world, src, out, "--workers", "1", "--resume")]) == 0
    assert out.read_bytes() == ref_bytes

    # Kill points placed exactly: mid-chunk, at a chunk boundary, one row past one, with a
    # torn line as a crash mid-write leaves it, and before the first row.
    for cut, torn in [(13, True), (3 * CHUNK, False), (5 * CHUNK + 1, True), (0, True)]:
        out = tmp_path / f"cut{cut}.jsonl"
        _part(out).write_bytes(b"".join(ref_lines[:cut]) + (b'{"id": 1, "ima' if torn else b""))
        out.with_name(out.name + ".job.json").write_text(json.dumps({**job, "complete": False}))
        assert main([*_args(world, src, out, "--workers", "0", "--resume")]) == 0
        assert out.read_bytes() == ref_bytes, f"resume after {cut} rows differs"
        assert not _part(out).exists()


def test_workers_do_not_change_the_bytes(world, tmp_path, one_thread):
    src = tmp_path / "in.jsonl"
    _corpus(src, 150, seed=1)
    outputs = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.jsonl"
        assert main([*_args(world, src, out, "--workers", workers)]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_torchrun_output_is_byte_identical_to_one_process(world, tmp_path):
    src = tmp_path / "in.jsonl"
    _corpus(src, 101, seed=2)  # 13 chunks: rank 0 gets 7, rank 1 gets 6 (the last one short)
    env = child_env(OMP_NUM_THREADS=str(THREADS))
    single = tmp_path / "single.jsonl"
    common = ["--workers", "0", "--device", "cpu"]
    subprocess.run(
        [sys.executable, "-m", "specs_metric", *_args(world, src, single, *common)],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    multi = tmp_path / "multi.jsonl"
    torchrun(["-m", "specs_metric", *_args(world, src, multi, *common)], env=env)
    assert multi.read_bytes() == single.read_bytes()


# --- workers die with the job ---------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie that nobody reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_dies_with_the_killed_job(world, tmp_path):
    # A prepared chunk (its pixels) is larger than a pipe's buffer, and the main process,
    # with a wider text tower and long captions, is slower than the worker: so the worker is
    # blocked writing a chunk when the job is killed, and would not notice the death itself.
    torch.save(make_state_dict(seed=0, text_width=256, text_layers=4), tmp_path / "slow.pt")
    rng = np.random.default_rng(5)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"w{i}.png"
        )
    src = tmp_path / "in.jsonl"
    caption = "a long caption with many words " * 12
    _write_jsonl(
        src,
        [{"id": k, "image": f"w{k % 20}.png", "caption": f"{k} {caption}"} for k in range(5000)],
    )
    out = tmp_path / "out.jsonl"
    command = [
        sys.executable, "-m", "specs_metric", "score", "--model", str(tmp_path / "slow.pt"),
        "--input", str(src), "--output", str(out), "--workers", "1", "--chunk-rows", "64",
        "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: _lines(_part(out)) >= 64 or proc.poll() is not None, "rows")
        assert proc.poll() is None, "the job ended before it could be killed"
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        workers = [
            c for c in _children(proc.pid) if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline
        ]
        assert workers, "no DataLoader worker found"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        _wait_for(lambda: not any(_alive(w) for w in workers), "the worker to exit", 20)
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# --- one job per output ---------------------------------------------------------------------


def test_second_job_on_the_same_output_is_refused(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    _corpus(src, 160, seed=3)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "specs_metric", *_args(world, src, out, "--workers", "0")],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: _part(out).exists() or proc.poll() is not None, "the first job")
        proc.send_signal(signal.SIGSTOP)  # hold the first job mid-way while the second tries
        assert proc.poll() is None, "the first job ended too soon"
        code = main([*_args(world, src, out, "--workers", "0")])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1 and "another job" in err and str(out) in err
    finally:
        proc.send_signal(signal.SIGCONT)
    _, first_err = proc.communicate(timeout=300)
    assert proc.returncode == 0, first_err.decode()[-2000:]
    assert len(list(read_score_rows(out))) == 160
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.jsonl")) == [
        "out.jsonl", "out.jsonl.job.json", "out.jsonl.summary.json",
    ]  # fmt: skip
    # the lock went with the job: a third job runs (replacing the finished output)
    assert main([*_args(world, src, out, "--workers", "0", "--overwrite")]) == 0


def test_lock_held_by_another_process_refuses_the_job(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    _corpus(src, 10)
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pathlib; from specs_metric.io.locking import OutputLock;"
         "lock = OutputLock(pathlib.Path(sys.argv[1])); lock.acquire(); print('held', flush=True);"
         "sys.stdin.read()", str(out)],
        env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_args(world, src, out, "--workers", "0")) == 2
        assert "another job is writing" in capsys.readouterr().err
        assert not out.exists() and not _part(out).exists()
    finally:
        holder.communicate("", timeout=60)
    assert main(_args(world, src, out, "--workers", "0")) == 0


def test_output_must_hold_one_row_per_input_row(world, tmp_path, capsys, monkeypatch):
    """A part file that lost rows (here: cut by hand) never becomes an output."""
    import specs_metric.jobs.job as job

    src = tmp_path / "in.jsonl"
    _corpus(src, 30)
    out = tmp_path / "out.jsonl"
    real = job._score_shard

    def lose_rows(config, scorer, info, total, done, part):
        result = real(config, scorer, info, total, done, part)
        lines = part.read_bytes().splitlines(keepends=True)
        part.write_bytes(b"".join(lines[:-3]))
        return result

    monkeypatch.setattr(job, "_score_shard", lose_rows)
    assert main(_args(world, src, out, "--workers", "0")) == 2
    err = capsys.readouterr().err
    assert "27 rows but the input has 30" in err and str(out) in err
    assert not out.exists() and _lines(_part(out)) == 27
    assert not out.with_name("out.jsonl.tmp").exists()
    monkeypatch.setattr(job, "_score_shard", real)
    assert main([*_args(world, src, out, "--workers", "0", "--resume")]) == 0
    assert len(list(read_score_rows(out))) == 30


def test_lock_file_is_removed_and_relocked(tmp_path):
    out = tmp_path / "o.jsonl"
    with OutputLock(out) as lock:
        assert lock.path.exists()
        with pytest.raises(ValueError, match="another job"):
            OutputLock(out).acquire()
    assert not lock.path.exists()
    with OutputLock(out):
        pass


# --- damaged cache entries ------------------------------------------------------------------


def _damage(path: Path, kind: str, dim: int) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not a numpy file at all")
    elif kind == "shape":
        np.save(path, np.ones(dim + 3, np.float32))
    elif kind == "matrix":
        np.save(path, np.ones((2, dim), np.float32))
    elif kind == "dtype":
        np.save(path, np.ones(dim, np.float64))
    elif kind == "nan":
        value = np.ones(dim, np.float32)
        value[1] = np.nan
        np.save(path, value)
    elif kind == "inf":
        value = np.ones(dim, np.float32)
        value[0] = np.inf
        np.save(path, value)


DAMAGE = ("empty", "garbage", "shape", "matrix", "dtype", "nan", "inf")


def test_damaged_cache_entries_are_recomputed_and_rewritten(world, tmp_path):
    src = tmp_path / "in.jsonl"
    _corpus(src, 40, seed=4)
    cache = tmp_path / "cache"
    plain = tmp_path / "plain.jsonl"
    assert main(_args(world, src, plain, "--workers", "0")) == 0
    first = tmp_path / "first.jsonl"
    assert main([*_args(world, src, first, "--workers", "0", "--cache-dir", str(cache))]) == 0
    entries = sorted(cache.glob("*/*/*.npy"))
    used = {json.loads(line)["image"] for line in src.read_text().splitlines()}
    assert len(entries) == len(used) > len(DAMAGE)
    dim = np.load(entries[0]).shape[0]
    for entry, kind in zip(entries, DAMAGE, strict=False):  # one entry damaged each way
        _damage(entry, kind, dim)
    again = tmp_path / "again.jsonl"
    for workers in ("0", "1"):
        args = _args(world, src, again, "--workers", workers, "--cache-dir", str(cache))
        assert main([*args, "--overwrite"]) == 0  # the second round replaces the first's
        summary = _strict_json(again.with_name("again.jsonl.summary.json").read_text())
        assert summary["images_encoded_rank0"] == (len(DAMAGE) if workers == "0" else 0)
        assert summary["n_errors"] == 0
        assert again.read_bytes() == plain.read_bytes()  # exactly what an uncached run writes
    for entry in entries[: len(DAMAGE)]:
        value = np.load(entry)
        assert value.dtype == np.float32 and value.shape == (dim,) and np.isfinite(value).all()


# --- strict JSON ----------------------------------------------------------------------------


def test_empty_input_gives_a_valid_summary(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    out = tmp_path / "out.jsonl"
    assert main(_args(world, src, out, "--workers", "0")) == 0
    assert out.read_bytes() == b""
    summary = _strict_json(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["n_rows"] == 0 and summary["mean"] is None and summary["std"] is None
    assert summary["corpus_score"] is None
    printed = capsys.readouterr().err.splitlines()
    # the summary, then a warning line: an input without rows is said, not silent
    assert printed[-1] == f"specs score: warning: the input has no rows; {out} is empty"
    assert _strict_json("\n".join(printed[:-1]))["mean"] is None


def test_nan_weights_give_null_scores_with_a_warning(world, tmp_path, capsys):
    sd = make_state_dict(seed=0)
    sd["visual.proj"] = torch.full_like(sd["visual.proj"], float("nan"))
    torch.save(sd, tmp_path / "nan.pt")
    src = tmp_path / "in.jsonl"
    _corpus(src, 10)
    out = tmp_path / "out.jsonl"
    args = _args(world, src, out, "--workers", "0")
    args[args.index("--model") + 1] = str(tmp_path / "nan.pt")
    assert main(args) == 2  # no row could be scored: an error, the output written
    err = capsys.readouterr().err
    assert "warning: 10 row(s) got a non-finite score" in err
    assert err.splitlines()[-1].startswith("specs score: error: no row could be scored")
    for line in out.read_text().splitlines():
        rec = _strict_json(line)
        assert rec["score"] is None and rec["cosine"] is None
        assert rec["error"].startswith("line ") and "not finite" in rec["error"]
    summary = _strict_json(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["n_errors"] == 10 and summary["mean"] is None
    assert main([*args, "--strict", "--overwrite"]) == 2  # still: --strict says nothing else


def test_nan_and_infinity_in_input_rows_stay_out_of_the_output(world, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": 1, "image": "im0.png", "caption": NaN}\n'
        '{"id": Infinity, "image": "im1.png", "caption": "fine"}\n'
        '{"id": 3, "image": "im2.png", "caption": "fine", "extra": [NaN]}\n'
    )
    out = tmp_path / "out.jsonl"
    assert main(_args(world, src, out, "--workers", "0")) == 0
    rows = [_strict_json(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["caption"] is None and "not a string" in rows[0]["error"]
    # JSON has no Infinity: the id cannot be written back, so the row is an error
    assert rows[1]["id"] is None and "id is not a finite number" in rows[1]["error"]
    assert math.isfinite(rows[2]["score"])


# --- duplicate ids --------------------------------------------------------------------------


def test_duplicate_ids_are_counted_and_warned(world, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    ids = ["a", "b", "a", 1, "1", "b", "a"]  # 1 and "1" are different JSON ids
    _write_jsonl(src, [{"id": i, "image": "im0.png", "caption": "c"} for i in ids])
    out = tmp_path / "out.jsonl"
    assert main(_args(world, src, out, "--workers", "0")) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "repeat the id" in line]
    assert warnings == [
        'specs score: warning: 3 row(s) repeat the id of an earlier row (first: "a"); '
        "`specs compare` needs unique ids"
    ]
    summary = _strict_json(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["n_duplicate_ids"] == 3 and summary["n_rows"] == 7


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_lone_surrogates_in_input_rows_do_not_stop_the_output(world, tmp_path, suffix):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": "s\\ud800", "image": "im0.png", "caption": "x\\ud800y"}\n'
        '{"id": 2, "image": "im1.png", "caption": "fine"}\n'
    )
    out = tmp_path / f"out{suffix}"
    assert main(_args(world, src, out, "--workers", "0")) == 0
    out.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    rows = list(read_score_rows(out))
    assert len(rows) == 2 and math.isfinite(rows[1]["score"])
    if suffix == ".jsonl":
        for line in out.read_text().splitlines():
            _strict_json(line)


# --- job records and summaries are written whole --------------------------------------------


def test_a_write_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    import specs_metric.io.jsonio as jsonio

    target = tmp_path / "out.jsonl.job.json"
    jsonio.write_json(target, {"complete": False})
    before = target.read_bytes()

    def torn(obj, **kwargs):  # the process dies while the text is being produced
        raise KeyboardInterrupt

    monkeypatch.setattr(jsonio, "dumps", torn)
    with pytest.raises(KeyboardInterrupt):
        jsonio.write_json(target, {"complete": True})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.job.json"]


def test_an_unreadable_job_record_is_one_line_on_resume(world, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _corpus(src, 5)
    (tmp_path / "out.jsonl.job.json").write_text('{"input": "tor')  # torn by another program
    assert main(_args(world, src, out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out.jsonl.job.json: cannot read the job record" in err[0]
