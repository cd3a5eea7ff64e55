"""One command-line convention (docs/cli-conventions.md): every command's parser is walked and
checked, and the behaviours behind the rules are run: the exit status when rows fail, outputs
that are never replaced silently, formats that follow the extension, reports without
matplotlib, file modes."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import BENCH_COMMANDS, COMMANDS, build_parser, main
from specs_metric.data.scorefiles import read_score_rows

ROOT = Path(__file__).resolve().parents[1]
NO_OUTPUT = {"models", "serve"}  # commands that write nothing
NO_PROGRESS = {"models", "serve"}  # commands that take no --quiet / --no-progress (a server logs)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def _walk(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command of ``parser`` by its name (``score``, ``bench human``, ...)."""
    out = {}
    for name, sub in _subparsers(parser).items():
        full = f"{prefix} {name}".strip()
        out.update(_walk(sub, full) if _subparsers(sub) else {full: sub})
    return out


PARSERS = _walk(build_parser())  # argv None: every command's module is loaded


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def test_every_command_is_walked():
    names = {name for name, _, _ in COMMANDS} | {f"bench {n}" for n, _, _ in BENCH_COMMANDS}
    assert set(PARSERS) == names


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_outputs_are_named_output_and_never_replaced_silently(name):
    opts = _options(PARSERS[name])
    if name in NO_OUTPUT:
        assert "--output" not in opts and "--overwrite" not in opts
        return
    output = opts["--output"]
    assert output.help != argparse.SUPPRESS
    for old in ("--out", "--json"):  # former names: hidden aliases of the same option
        if old in opts:
            assert opts[old].dest == output.dest and opts[old].help == argparse.SUPPRESS
    visible = {o for o, a in opts.items() if a.help != argparse.SUPPRESS}
    assert {o for o in visible if o.startswith("--out")} <= {
        "--output", "--output-dir", "--output-format",
    }  # fmt: skip
    assert not visible & {"--json", "--out"}
    assert opts["--overwrite"].help and opts["--overwrite"].default is False


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_quiet_and_no_progress_are_one_flag_everywhere(name):
    opts = _options(PARSERS[name])
    if name in NO_PROGRESS:
        assert "--quiet" not in opts and "--no-progress" not in opts
        return
    assert opts["--quiet"] is opts["--no-progress"] and opts["--quiet"].dest == "quiet"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_batch_size_and_model_defaults(name):
    opts = _options(PARSERS[name])
    batch = opts.get("--batch-size")
    if batch is not None:
        if name == "train":  # the training batch: another quantity, said so
            assert "training examples per process" in batch.help
        else:
            assert batch.default is None and "by device" in batch.help
            assert "1 on a CPU" in batch.help and "256 on CUDA" in batch.help
    model = opts.get("--model")
    if model is not None and model.default is not None:
        assert model.default == "specs-b32" and "default specs-b32" in model.help


def test_hidden_aliases_and_synonyms_parse_to_the_same_option():
    def parse(*argv):
        return build_parser(list(argv)).parse_args(list(argv))

    old = parse("sweep", "--out", "o", "--no-progress", "a.jsonl")
    new = parse("sweep", "--output", "o", "--quiet", "a.jsonl")
    assert old.output == new.output == Path("o") and old.quiet and new.quiet
    assert parse("bench", "intrinsic", "--model", "m", "--data", "d", "--json", "r.json").output \
        == Path("r.json")  # fmt: skip
    assert parse("compare", "a", "b", "--out", "r").output == Path("r")
    text = _subparsers(build_parser(["sweep"]))["sweep"].format_help()
    assert "--out " not in text and "--output" in text


# --------------------------------------------------------------------------- behaviours


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, three images, and inputs: all good, some bad, all bad, empty."""
    d = tmp_path_factory.mktemp("conventions")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")

    def rows(name, images):
        with open(d / name, "w") as fh:
            for i, image in enumerate(images):
                cap = f"A small picture. It has number {i}."
                fh.write(json.dumps({"id": i, "image": image, "caption": cap}) + "\n")

    rows("good.jsonl", ["0.png", "1.png", "2.png"])
    rows("some.jsonl", ["0.png", "missing.png", "2.png"])
    rows("none.jsonl", ["a.png", "b.png", "c.png"])  # a wrong --image-root looks like this
    (d / "empty.jsonl").write_text("")
    return d


def _run(world, command, src, out, *extra):
    args = [command, "--model", str(world / "tiny.pt"), "--input", str(world / src)]
    if command == "score":
        args += ["--workers", "0"]
    return main([*args, "--output", str(out), "--no-progress", *extra])


def _stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("specs ")]


@pytest.mark.parametrize("command", ["score", "explain"])
def test_no_scored_row_is_an_error_in_one_line(world, tmp_path, capsys, command):
    out = tmp_path / "out.jsonl"
    assert _run(world, command, "none.jsonl", out) == 2
    lines = _stderr_lines(capsys)
    assert lines == [
        f"specs {command}: error: no row could be scored: all 3 rows have an error (the first: "
        f"line 1: {world / 'a.png'}: image file not found); see the error column of {out}"
    ]
    assert [r["error"] is not None for r in read_score_rows(out)] == [True] * 3  # still written
    # --strict says nothing else: still the error
    assert _run(world, command, "none.jsonl", out, "--strict", "--overwrite") == 2


@pytest.mark.parametrize("command", ["score", "explain"])
def test_row_errors_warn_and_strict_exits_1(world, tmp_path, capsys, command):
    out = tmp_path / "out.jsonl"
    assert _run(world, command, "some.jsonl", out) == 0
    (line,) = _stderr_lines(capsys)
    assert line.startswith(f"specs {command}: warning: 1 of 3 rows in {out} could not be scored")
    assert "missing.png: image file not found" in line
    assert _run(world, command, "some.jsonl", out, "--strict", "--overwrite") == 1
    assert _run(world, command, "good.jsonl", out, "--strict", "--overwrite") == 0
    capsys.readouterr()
    assert _run(world, command, "empty.jsonl", out, "--overwrite") == 0
    assert _stderr_lines(capsys) == [
        f"specs {command}: warning: the input has no rows; {out} is empty"
    ]


def test_score_refuses_an_earlier_run_and_says_what_to_pass(world, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _run(world, "score", "good.jsonl", out) == 0
    reference = out.read_bytes()
    capsys.readouterr()
    assert _run(world, "score", "good.jsonl", out) == 2  # a finished output
    assert _stderr_lines(capsys) == [
        f"specs score: error: --output {out} already exists; pass --overwrite to replace it, "
        "or --resume to keep it"
    ]
    # an interrupted run: its part file holds the first row, its record says unfinished
    part = tmp_path / "out.jsonl.part-0-of-1.jsonl"
    part.write_text(reference.decode().splitlines(keepends=True)[0])
    job = tmp_path / "out.jsonl.job.json"
    job.write_text(json.dumps({**json.loads(job.read_text()), "complete": False}))
    out.unlink()
    assert _run(world, "score", "good.jsonl", out) == 2
    assert _stderr_lines(capsys) == [
        f"specs score: error: --output {out} holds an interrupted run (its part files are "
        "kept); pass --resume to continue it, or --overwrite to start over"
    ]
    assert part.exists()  # nothing was discarded
    assert _run(world, "score", "good.jsonl", out, "--resume", "--overwrite") == 2
    assert _run(world, "score", "good.jsonl", out, "--resume") == 0
    assert out.read_bytes() == reference and not part.exists()
    assert _run(world, "score", "good.jsonl", out, "--overwrite") == 0
    assert out.read_bytes() == reference


def test_score_output_dir_refuses_an_earlier_shard(world, tmp_path, capsys):
    folder = tmp_path / "shards"
    args = ["score", "--model", str(world / "tiny.pt"), "--input", str(world / "good.jsonl")]
    args += ["--output-dir", str(folder), "--workers", "0", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    (line,) = _stderr_lines(capsys)
    assert f"--output-dir file {folder / 'good.jsonl'} already exists" in line
    assert main([*args, "--resume"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "--model", "M", "--input", "{w}/good.jsonl", "--output", "{x}"],
        ["compare", "{w}/a.jsonl", "{w}/b.jsonl", "--output", "{d}"],
        ["bench", "intrinsic", "--model", "M", "--data", "{w}", "--output", "{x}"],
        ["bench", "retrieval", "--model", "M", "--data", "{w}", "--json", "{x}"],
        ["bench", "zeroshot", "--model", "M", "--data", "{w}", "--output", "{x}"],
        ["bench", "details", "--model", "M", "--data", "{w}", "--output", "{x}"],
        ["bench", "human", "--data", "{w}", "--format", "longcap-arena", "--out", "{d}"],
        ["prepare", "--input", "{w}/good.jsonl", "--output", "{x}"],
        ["convert", "M", "{p}"],
        ["train", "--init", "M", "--data", "{w}", "--output", "{d}"],
    ],
    ids=lambda argv: " ".join(argv[:2]) if argv[0] == "bench" else argv[0],
)
def test_an_existing_output_is_refused_before_any_work(world, tmp_path, capsys, argv):
    existing = tmp_path / "existing.jsonl"
    existing.write_text("earlier work\n")
    checkpoint = tmp_path / "existing.pt"
    checkpoint.write_text("earlier work\n")
    folder = tmp_path / "report"
    folder.mkdir()
    for name in ("report.json", "scores.jsonl", "config.json"):  # each command's own file
        (folder / name).write_text("{}")
    argv = [a.format(w=world, x=existing, d=folder, p=checkpoint) for a in argv]
    argv = [str(world / "tiny.pt") if a == "M" else a for a in argv]
    assert main(argv) == 2
    (line,) = _stderr_lines(capsys)
    assert "--overwrite" in line and ("already exists" in line or "holds a" in line), line
    for kept in (existing, checkpoint):
        assert kept.read_text() == "earlier work\n"
    assert (folder / "report.json").read_text() == "{}"


def test_the_format_follows_the_extension(world, tmp_path, capsys):
    for bad in ("out.txt", "out.json", "out"):
        for command in ("score", "explain"):
            assert _run(world, command, "good.jsonl", tmp_path / bad) == 2
            (line,) = _stderr_lines(capsys)
            assert "the format follows the extension: .jsonl, .csv or .parquet" in line
            assert not (tmp_path / bad).exists()
    # --output-format is for --output-dir: it cannot contradict --output's extension
    assert _run(world, "score", "good.jsonl", tmp_path / "o.jsonl", "--output-format", "csv") == 2
    (line,) = _stderr_lines(capsys)
    assert "--output-format is for --output-dir" in line
    rows = {}
    for ext in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"e.{ext}"
        assert _run(world, "explain", "some.jsonl", out) == 0
        rows[ext] = list(read_score_rows(out))
    assert (tmp_path / "e.csv").read_text().startswith("id,image,caption,score,")
    assert str(pq.read_schema(tmp_path / "e.parquet").field("segments").type) == (
        "list<element: struct<text: string, score: double, delta: double, beyond_context: bool>>"
    )
    segments = [r["segments"] for r in rows["jsonl"]]
    assert segments[0] and segments[1] is None  # the failed row has none
    for ext in ("csv", "parquet"):
        assert [r["segments"] for r in rows[ext]] == segments
        assert [r["error"] for r in rows[ext]] == [r["error"] for r in rows["jsonl"]]
    # specs compare reads explain outputs in any of the formats
    assert main(["compare", str(tmp_path / "e.csv"), str(tmp_path / "e.parquet")]) == 0


def test_summary_and_job_files_follow_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out.jsonl"
        assert _run(world, "score", "good.jsonl", out) == 0
        assert _run(world, "explain", "good.jsonl", tmp_path / "e.jsonl") == 0
    finally:
        os.umask(old)
    for name in ("out.jsonl", "out.jsonl.summary.json", "out.jsonl.job.json",
                 "e.jsonl", "e.jsonl.summary.json"):  # fmt: skip
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------- plots


def _without_matplotlib(monkeypatch):
    real = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


def test_reports_are_written_without_matplotlib(world, tmp_path, capsys, monkeypatch):
    for name in ("a", "b"):
        assert _run(world, "score", "good.jsonl", tmp_path / f"{name}.jsonl") == 0
    _without_matplotlib(monkeypatch)
    capsys.readouterr()
    report = tmp_path / "report"
    # (the former option names, which every version takes)
    assert main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                 "--out", str(report)]) == 0  # fmt: skip
    (line,) = _stderr_lines(capsys)
    assert line.startswith("specs compare: warning: no plots: matplotlib cannot be imported")
    assert {p.name for p in report.iterdir()} == {"report.md", "report.json", "report.html"}
    assert "no plots: matplotlib cannot be imported" in (report / "report.html").read_text()
    sweep = tmp_path / "sweep"
    args = ["sweep", "--model", str(world / "tiny.pt"), "--out", str(sweep), "--no-progress"]
    args += ["--image-root", str(world), "--n-boot", "100", "--n-perm", "100"]
    assert main([*args, str(tmp_path / "a.jsonl"), str(world / "good.jsonl")]) == 0
    warnings = [line for line in _stderr_lines(capsys) if "warning" in line]
    assert warnings == [
        line for line in warnings if "no plots: matplotlib cannot be imported" in line
    ] and len(warnings) == 1
    assert (sweep / "sweep.json").is_file() and not (sweep / "sweep.png").exists()
    assert "no plots" in (sweep / "report.html").read_text()


def test_matplotlib_is_a_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("matplotlib") for dep in project["dependencies"])


def test_the_quick_start_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["scores.jsonl", "scores.jsonl.summary.json", "scores.jsonl.job.json",
             "scores.jsonl.part-0-of-1.jsonl", "scores.jsonl.lock", "explain.jsonl",
             "explain.html"]  # fmt: skip
    done = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.stdout.split() == names
