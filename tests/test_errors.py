"""Every ``specs`` command turns a user or machine error into one line on stderr and exit
status 2 (bad values, devices, unwritable or full outputs, unreachable model servers), while
genuine bugs keep their traceback."""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import factories
from specs_metric.cli import main
from subprocesses import child_env, free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "captions.jsonl"
DEMO = "specs-synth-demo"


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and the non-empty stderr lines of ``specs ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits on its own errors
        code = exc.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line_error(argv: list[str], fragment: str, capsys) -> str:
    code, lines = run_cli(argv, capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert "Traceback" not in line
    command = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    assert line.startswith(f"specs {command}: error: "), line
    assert fragment in line, line
    return line


# ------------------------------------------------------------------ argument validation

SCORE = ["score", "--input", "in.jsonl", "--output", "out.jsonl"]
TRAIN = ["train", "--init", "i.pt", "--data", "d.parquet", "--output", "o"]
HUMAN = ["bench", "human", "--data", "d", "--format", "generic"]

BAD_VALUES = [
    (SCORE + ["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (SCORE + ["--batch-size", "-1"], "argument --batch-size: expected a positive integer, got -1"),
    (SCORE + ["--batch-size", "many"], "argument --batch-size: expected an integer, got 'many'"),
    (SCORE + ["--chunk-rows", "0"], "argument --chunk-rows: expected a positive integer"),
    (SCORE + ["--token-budget", "0"], "argument --token-budget: expected a positive integer"),
    (SCORE + ["--workers", "-1"], "argument --workers: expected an integer >= 0, got -1"),
    (SCORE + ["--device", "banana"], "argument --device: unknown device 'banana'"),
    (SCORE + ["--device", "meta"], "argument --device: unsupported device 'meta'"),
    (SCORE[:3], "one of the arguments --output --output-dir is required"),
    (TRAIN + ["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    (TRAIN + ["--grad-accum", "0"], "argument --grad-accum: expected a positive integer"),
    (TRAIN + ["--workers", "-1"], "argument --workers: expected an integer >= 0"),
    (TRAIN + ["--device", "banana"], "argument --device: unknown device 'banana'"),
    (["compare", "a", "b", "--n-boot", "0"], "argument --n-boot: expected a positive integer"),
    (["compare", "a", "b", "--level", "1.5"], "argument --level: expected a number between 0"),
    (["synth", "--n", "0", "--output", "o"], "argument --n: expected a positive integer"),
    (["prepare", "--input", "i", "--output", "o", "--workers", "0"], "argument --workers"),
    (["convert"], "the following arguments are required: input"),
    (["explain", "--input", "i", "--output", "o.jsonl", "--chunk-rows", "0"],
     "argument --chunk-rows: expected a positive integer, got 0"),
    (HUMAN + ["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    (HUMAN + ["--device", "banana"], "argument --device: unknown device 'banana'"),
    (["bench", "intrinsic", "--model", "m", "--data", "d", "--chains-per-batch", "0"],
     "argument --chains-per-batch: expected a positive integer"),
    (["bench", "retrieval", "--data", "d", "--batch-size", "-1"], "argument --batch-size"),
    (["bench", "retrieval", "--data", "d", "--workers", "-1"], "argument --workers"),
    (["bench", "zeroshot", "--data", "d", "--device", "banana"], "unknown device 'banana'"),
    (["nonsense"], "invalid choice: 'nonsense'"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_one_line(argv, fragment, capsys):
    code, lines = run_cli(argv, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert fragment in lines[0] and "Traceback" not in lines[0]
    assert "--help" in lines[0]  # where to look instead of a usage dump


CUDA_COMMANDS = [SCORE, TRAIN, HUMAN, ["bench", "retrieval", "--data", "d"],
                 ["bench", "intrinsic", "--model", "m", "--data", "d"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", CUDA_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_cuda_device_without_cuda_is_one_line(argv, capsys):
    code, lines = run_cli(argv + ["--device", "cuda"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "CUDA is not available" in lines[0] and "--device cpu" in lines[0]


# ---------------------------------------------------------------- outputs that cannot be written


@pytest.fixture()
def blocker(tmp_path) -> Path:
    """A plain file where a command expects a folder."""
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


def _output_under_file(blocker: Path) -> list[list[str]]:
    out = str(blocker / "sub" / "out")
    data = str(EXAMPLES)
    return [
        ["score", "--model", DEMO, "--input", data, "--output", out + ".jsonl", "--no-progress"],
        ["synth", "--n", "2", "--output", out],
        ["convert", DEMO, out + ".safetensors"],
        ["compare", data, data, "--out", out],
        ["prepare", "--input", data, "--output", out + ".parquet"],
        ["train", "--init", DEMO, "--data", data, "--output", out],
        ["bench", "human", "--data", data, "--format", "generic", "--out", out],
        ["bench", "intrinsic", "--model", DEMO, "--data", data, "--json", out + ".json"],
        ["bench", "retrieval", "--model", DEMO, "--data", data, "--json", out + ".json"],
        ["bench", "zeroshot", "--model", DEMO, "--data", data, "--json", out + ".json"],
    ]


@pytest.mark.parametrize("index", range(10), ids=lambda i: f"command{i}")
def test_output_under_a_file_is_one_line_before_any_work(index, blocker, capsys):
    argv = _output_under_file(blocker)[index]
    line = assert_one_line_error(argv, "is a file, not a folder", capsys)
    assert str(blocker) in line


def test_existing_output_that_is_not_a_file_is_refused(tmp_path, capsys):
    folder = tmp_path / "taken"
    folder.mkdir()
    argv = ["score", "--model", DEMO, "--input", str(EXAMPLES), "--output", str(folder)]
    assert_one_line_error(argv, "exists and is not a regular file", capsys)


def _failing_writes(monkeypatch, under: Path, error: OSError, *, on_open: bool) -> None:
    """Make writes of files below ``under`` fail: at open (permission) or at write (space)."""
    real_open = builtins.open

    class FullFile(io.TextIOBase):
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            raise error

        def close(self):
            self._fh.close()

    def patched(file, mode="r", *args, **kwargs):
        writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
        if writing and str(Path(file).absolute()).startswith(str(under)):
            if on_open:
                raise type(error)(error.errno, error.strerror, os.fspath(file))
            return FullFile(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", patched)
    monkeypatch.setattr(io, "open", patched)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EACCES = PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_disk_full_while_scoring_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out" / "scores.jsonl"
    _failing_writes(monkeypatch, tmp_path / "out", ENOSPC, on_open=False)
    argv = ["score", "--model", DEMO, "--input", str(EXAMPLES), "--output", str(out),
            "--workers", "0", "--no-progress"]
    line = assert_one_line_error(argv, "No space left on device", capsys)
    assert str(out) in line  # the write carries no file name; the output option does


def test_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    # Root may write anywhere, so the refusal of a read-only folder is simulated.
    out = tmp_path / "ro" / "scores.jsonl"
    _failing_writes(monkeypatch, tmp_path / "ro", EACCES, on_open=True)
    argv = ["score", "--model", DEMO, "--input", str(EXAMPLES), "--output", str(out),
            "--workers", "0", "--no-progress"]
    line = assert_one_line_error(argv, "Permission denied", capsys)
    assert str(tmp_path / "ro") in line


def test_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else
                        real_access(p, m))
    argv = ["synth", "--n", "2", "--output", str(tmp_path / "world")]
    assert_one_line_error(argv, f"Permission denied (the output must go to a folder you can "
                                f"write to) ({tmp_path})", capsys)


def test_disk_full_in_synth_is_one_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    line = assert_one_line_error(["synth", "--n", "2", "--output", str(tmp_path / "w"),
                                  "--quiet"], "No space left on device", capsys)
    assert str(tmp_path / "w") in line


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_disk_full_in_convert_is_one_line(suffix, tmp_path, monkeypatch, capsys):
    """torch and safetensors report a failed write as their own error types."""
    import safetensors.torch
    from safetensors import SafetensorError

    def torch_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def safetensors_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full)
    out = tmp_path / f"model{suffix}"
    line = assert_one_line_error(["convert", DEMO, str(out)], "could not write", capsys)
    assert str(out) in line
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_genuine_bugs_keep_their_traceback(monkeypatch, tmp_path):
    from specs_metric.cli import synth

    def buggy(args):
        raise TypeError("a bug")

    monkeypatch.setattr(synth, "run", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["synth", "--n", "2", "--output", str(tmp_path / "w")])


def test_specs_debug_shows_the_traceback_of_a_handled_error(monkeypatch, tmp_path, blocker):
    monkeypatch.setenv("SPECS_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        main(["synth", "--n", "2", "--output", str(blocker / "w")])


# ------------------------------------------------------------------ unreachable model servers


@pytest.fixture()
def silent_server():
    """A local port that accepts connections (kernel backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture()
def closed_endpoint():
    """A local port nobody listens on (connections are refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


_TIMED_MAIN = textwrap.dedent(
    """
    import sys, time
    from specs_metric.cli import main
    start = time.monotonic()
    code = main(sys.argv[1:])
    print(f"{time.monotonic() - start:.1f}")
    sys.exit(code)
    """
)


@pytest.mark.parametrize("server", ["closed_endpoint", "silent_server"])
def test_hub_model_without_network_fails_fast_with_one_line(server, request, tmp_path):
    endpoint = request.getfixturevalue(server)
    env = child_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    argv = ["score", "--model", "specs-b32", "--input", str(EXAMPLES), "--output",
            str(tmp_path / "o.jsonl")]
    done = subprocess.run([sys.executable, "-c", _TIMED_MAIN, *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "spec.pt" in lines[0] and "--model /path/to/spec.pt" in lines[0]
    assert endpoint in lines[0]
    # The probe waits 5 s at most; the Hub client's retries took 26 s and more.
    assert float(done.stdout.split()[-1]) < 20


@pytest.mark.parametrize("server", ["closed_endpoint", "silent_server"])
def test_url_model_without_network_fails_fast_with_one_line(server, request, tmp_path,
                                                            monkeypatch, capsys):
    import time

    from specs_metric.models.weights.pretrained import REGISTRY, PretrainedModel

    endpoint = request.getfixturevalue(server)
    monkeypatch.setenv("SPECS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SPECS_OFFLINE", raising=False)
    entry = PretrainedModel("clip-test", "test", url=f"{endpoint}/ViT-T.pt", sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, "clip-test", entry)
    start = time.monotonic()
    line = assert_one_line_error(
        ["score", "--model", "clip-test", "--input", str(EXAMPLES), "--output",
         str(tmp_path / "o.jsonl")], "--model /path/to/ViT-T.pt", capsys)
    assert time.monotonic() - start < 20  # urllib alone waited 30 s for a silent server
    assert endpoint in line


# ------------------------------------------------------------------------ synth folders


def test_synth_refuses_a_used_folder_and_overwrite_clears_only_its_files(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["synth", "--n", "6", "--output", str(out)]) == 0
    before = sorted(p.name for p in (out / "images").iterdir())
    assert len(before) == 6
    (out / "notes.txt").write_text("mine\n")
    (out / "images" / "my_drawing.png").write_bytes(b"mine")
    capsys.readouterr()
    assert_one_line_error(["synth", "--n", "3", "--output", str(out)], "--overwrite", capsys)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([*before, "my_drawing.png"])

    assert main(["synth", "--n", "3", "--output", str(out), "--overwrite"]) == 0
    images = sorted(p.name for p in (out / "images").iterdir())
    # No image of the earlier, larger run is left; the user's files are untouched.
    assert images == ["my_drawing.png", "test_000000.png", "train_000000.png",
                      "train_000001.png"]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert json.loads((out / "world.json").read_text())["n"] == 3


def test_synth_into_an_empty_folder_needs_no_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["synth", "--n", "2", "--output", str(tmp_path / "empty")]) == 0


# -------------------------------------------------------------------------- strict JSON


def test_json_helper_writes_null_for_non_finite_numbers():
    import numpy as np

    from specs_metric.io.jsonio import dumps

    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.float32("nan"),
            "d": np.array([1.0, np.nan])}
    assert json.loads(dumps(data)) == {"a": None, "b": [None, None, 1.5], "c": None,
                                       "d": [1.0, None]}


def test_intrinsic_json_has_no_nan(tmp_path):
    from specs_metric.cli.bench_intrinsic import _write_json

    path = tmp_path / "sub" / "rates.json"
    _write_json(path, {"rate": math.nan, "per_image": [{"score": math.inf}]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"rate": None, "per_image": [{"score": None}]}


def test_human_outputs_have_no_nan(tmp_path, capsys):
    """A metric that cannot score (BLEU without references) is null in every output file."""
    rows = tmp_path / "rows.jsonl"
    image = factories.image_file("rgb_37x53")
    rows.write_text("".join(json.dumps({"image": str(image), "caption": f"caption {i}",
                                        "human_score": float(i), "group": "g"}) + "\n"
                            for i in range(4)))
    out = tmp_path / "report"
    code = main(["bench", "human", "--data", str(rows), "--format", "generic", "--metrics",
                 "bleu-4", "--out", str(out), "--no-plots", "--n-boot", "10"])
    assert code == 0, capsys.readouterr().err
    files = list(out.glob("*.json*"))
    assert files
    for path in files:
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text, path.name
        for line in text.splitlines() if path.suffix == ".jsonl" else [text]:
            json.loads(line)
