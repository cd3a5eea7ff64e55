"""A job stopped from outside ends with one line that says how to go on, and going on gives
the output an uninterrupted run gives: Ctrl-C (SIGINT to the whole process group, as a
terminal sends it), SIGTERM (``kill``), and a decoding worker killed as the kernel's
out-of-memory killer would kill it."""

from __future__ import annotations

import json
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
from subprocesses import child_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CHUNK = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model slow enough (wide text tower) for a job to be caught mid-run, and images."""
    d = tmp_path_factory.mktemp("interrupts")
    torch.save(make_state_dict(seed=0, text_width=128, text_layers=2), d / "slow.pt")
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(d / f"i{i}.png")
    caption = "a caption with a few words in it " * 6
    rows = [{"id": k, "image": f"i{k % 10}.png", "caption": f"{k} {caption}"} for k in range(3000)]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _args(world: Path, out: Path) -> list[str]:
    return [
        "score", "--model", str(world / "slow.pt"), "--input", str(world / "in.jsonl"),
        "--output", str(out), "--chunk-rows", str(CHUNK), "--workers", "1", "--no-progress",
    ]  # fmt: skip


def _part_lines(out: Path) -> int:
    part = out.with_name(f"{out.name}.part-0-of-1.jsonl")
    return part.read_bytes().count(b"\n") if part.exists() else 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _start(world: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "specs_metric", *_args(world, out)],
        env=child_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


def _wait_for_rows(proc: subprocess.Popen, out: Path, rows: int = 2 * CHUNK) -> None:
    deadline = time.monotonic() + 240
    while _part_lines(out) < rows:
        assert proc.poll() is None, f"the job ended first: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for rows"
        time.sleep(0.02)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    # the same thread count as the child processes: the same bytes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(world, out)) == 0
    finally:
        torch.set_num_threads(before)
    return out.read_bytes()


def _resume_equals_reference(world, out, reference, line) -> None:
    assert line.endswith(f"specs {' '.join(_args(world, out))} --resume"), line
    done = subprocess.run(
        [sys.executable, "-m", "specs_metric", *_args(world, out), "--resume"],
        env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference


def test_ctrl_c_is_one_line_with_the_resume_command(world, tmp_path, reference):
    out = tmp_path / "out.jsonl"
    proc = _start(world, out)
    _wait_for_rows(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the job and its workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    line = _one_line(stderr)
    assert line.startswith("specs score: interrupted (Ctrl-C); the work done so far is kept")
    _resume_equals_reference(world, out, reference, line)


def test_sigterm_is_one_line_with_the_resume_command(world, tmp_path, reference):
    out = tmp_path / "out.jsonl"
    proc = _start(world, out)
    _wait_for_rows(proc, out)
    proc.terminate()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    line = _one_line(stderr)
    assert line.startswith("specs score: terminated (SIGTERM); the work done so far is kept")
    _resume_equals_reference(world, out, reference, line)


def test_a_killed_worker_is_one_line_naming_memory(world, tmp_path, reference):
    out = tmp_path / "out.jsonl"
    proc = _start(world, out)
    _wait_for_rows(proc, out)
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    workers = [
        c for c in _children(proc.pid) if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline
    ]
    assert workers, "no decoding worker found"
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    line = _one_line(stderr)
    assert line.startswith("specs score: error: a decoding worker died")
    assert "out of memory" in line
    _resume_equals_reference(world, out, reference, line)
