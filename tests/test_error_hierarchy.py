"""One error family: every user-caused problem is a ``SpecsError`` kind, which ``specs``
prints in one line (exit 2); any other exception, a plain ``ValueError`` included, is a bug
and keeps its traceback."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

import specs_metric.errors as errors
from specs_metric.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "specs_metric"
DEMO = "specs-synth-demo"
DEEP_JSON = "[" * 100_000 + "]" * 100_000  # RecursionError in the json module

# Exceptions defined outside errors.py: private, caught within their own module.
# Control flow, not errors a user sees: a CSV line too long to read, and SIGTERM raised where
# Ctrl-C would be.
ALLOWED_LOCAL_EXCEPTIONS = {("data/text.py", "_LineTooLong"), ("cli/interrupts.py", "Terminated")}


def _error_line(argv: list[str], capsys) -> str:
    """The one stderr line of ``specs ARGV``, which must exit with status 2."""
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    command = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    assert lines[0].startswith(f"specs {command}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------- the one handler


@pytest.fixture()
def synth_run(monkeypatch):
    """Replace ``specs synth``'s run with one that raises the given exception."""
    from specs_metric.cli import synth

    def use(exc: BaseException) -> list[str]:
        def run(args):
            raise exc

        monkeypatch.setattr(synth, "run", run)
        return ["synth", "--n", "2", "--output", "unused"]

    return use


@pytest.mark.parametrize("kind", [errors.SpecsError, errors.DataError, errors.OutputLockedError])
def test_specs_errors_are_one_line(kind, synth_run, capsys):
    argv = synth_run(kind("data.jsonl, row 3: a problem\nspread over lines"))
    line = _error_line(argv, capsys)
    assert line == "specs synth: error: data.jsonl, row 3: a problem spread over lines"


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug"),
                                 TypeError("a bug")], ids=lambda e: type(e).__name__)
def test_other_errors_keep_their_traceback(exc, synth_run, capsys):
    argv = synth_run(exc)
    with pytest.raises(type(exc), match="a bug"):
        main(argv)
    assert capsys.readouterr().err == ""


def test_specs_debug_raises_specs_errors(synth_run, monkeypatch):
    monkeypatch.setenv("SPECS_DEBUG", "1")
    with pytest.raises(errors.UsageError, match="shown"):
        main(synth_run(errors.UsageError("shown")))


# ------------------------------------------------------------------------ the family


def test_every_error_is_a_specs_error_and_a_value_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == errors.__name__]
    assert len(classes) >= 17
    for cls in classes:
        assert issubclass(cls, errors.SpecsError) and issubclass(cls, ValueError), cls


def _base_names(node: ast.ClassDef) -> list[str]:
    names = []
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.append(base.id)
        elif isinstance(base, ast.Attribute):
            names.append(base.attr)
    return names


def test_no_module_defines_its_own_exception():
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                n.endswith(("Error", "Exception", "Exit", "Interrupt")) for n in _base_names(node)
            ):
                found.add((rel, node.name))
    assert found <= ALLOWED_LOCAL_EXCEPTIONS, sorted(found - ALLOWED_LOCAL_EXCEPTIONS)


def test_reading_names_the_file_and_passes_specs_errors():
    with pytest.raises(errors.DataError, match=r"^x\.json: cannot read \(nested too deeply\)$"):
        with errors.reading("x.json"):
            json.loads(DEEP_JSON)
    with pytest.raises(errors.TrainError, match=r"^x\.csv: bad \(not UTF-8 text \(byte 0xff\)\)"):
        with errors.reading("x.csv", errors.TrainError, "bad"):
            b"a\xff".decode("utf-8")
    with pytest.raises(errors.ImageError, match="^as is$"):
        with errors.reading("x.json"):
            raise errors.ImageError("as is")


# ------------------------------------------------------------- one case per command


def test_score_output_that_is_the_input(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"image": "a.png", "caption": "c"}\n')
    line = _error_line(["score", "--model", DEMO, "--input", str(src), "--output", str(src)],
                       capsys)
    assert f"--output {src} is the input file" in line


def test_compare_file_that_is_not_utf8(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b'{"id": 1, "image": "x.png", "caption": "\xff", "score": 0.5}\n')
    line = _error_line(["compare", str(a), str(a)], capsys)
    assert f"{a}, line 1: not a score row (not UTF-8 text" in line


def test_sweep_missing_file(tmp_path, capsys):
    argv = ["sweep", str(tmp_path / "missing.jsonl"), "--model", DEMO, "--out",
            str(tmp_path / "out"), "--no-progress", "--no-plots"]
    assert f"{tmp_path / 'missing.jsonl'}: no such file" in _error_line(argv, capsys)


def test_prepare_deeply_nested_json(tmp_path, capsys):
    src = tmp_path / "rows.json"
    src.write_text(DEEP_JSON)
    line = _error_line(["prepare", "--input", str(src), "--output", str(tmp_path / "o.parquet"),
                        "--quiet"], capsys)
    assert f"{src}: invalid JSON (nested too deeply)" in line


def test_train_fp16_on_cpu(tmp_path, capsys):
    argv = ["train", "--init", DEMO, "--data", str(tmp_path / "d.parquet"), "--output",
            str(tmp_path / "o"), "--device", "cpu", "--precision", "fp16"]
    assert "--precision fp16 needs CUDA" in _error_line(argv, capsys)


def test_bench_human_csv_that_is_not_utf8(tmp_path, capsys):
    data = tmp_path / "judged.csv"
    data.write_bytes(b"image,caption,human_score\nx.png,caf\xe9,1\n")
    argv = ["bench", "human", "--data", str(data), "--format", "generic", "--out",
            str(tmp_path / "out")]
    assert f"{data}: cannot read (not UTF-8 text (byte 0xe9))" in _error_line(argv, capsys)


def test_bench_intrinsic_deeply_nested_line(tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text(DEEP_JSON + "\n")
    argv = ["bench", "intrinsic", "--model", DEMO, "--data", str(data)]
    assert f"{data}, line 1: not valid JSON (nested too deeply)" in _error_line(argv, capsys)


def test_bench_retrieval_bad_ks(capsys):
    argv = ["bench", "retrieval", "--model", DEMO, "--data", "d", "--ks", "0,5"]
    assert "--ks '0,5': expected positive integers" in _error_line(argv, capsys)


def test_bench_zeroshot_unreadable_templates(tmp_path, capsys):
    templates = tmp_path / "t.json"
    templates.write_text('["a photo of a {}.", ')
    argv = ["bench", "zeroshot", "--model", DEMO, "--data", "d", "--templates", str(templates)]
    assert f"{templates}: cannot read (Expecting value" in _error_line(argv, capsys)


def test_convert_hf_output_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "model"
    out.write_text("taken")
    line = _error_line(["convert", DEMO, str(out), "--to", "hf"], capsys)
    assert f"{out}: an HF model is a folder" in line


def test_synth_bad_test_fraction(tmp_path, capsys):
    argv = ["synth", "--n", "2", "--output", str(tmp_path / "w"), "--test-fraction", "2"]
    assert "--test-fraction must be in [0, 1], got 2.0" in _error_line(argv, capsys)
