"""One error family for data that does not follow its layout, reported by the CLI in a line."""

from __future__ import annotations

import json

import pytest

from specs_metric.cli import main
from specs_metric.data import records
from specs_metric.data.hf_folders import choose_split
from specs_metric.errors import DataError
from specs_metric.evaluation import human_readers, retrieval, sdci, zeroshot
from specs_metric.io.jsonio import read_jsonl
from specs_metric.training.prepare import PrepareError


def test_every_reader_raises_the_one_family():
    for alias in (sdci.SdciFormatError, human_readers.DataFormatError,
                  retrieval.RetrievalDataError, zeroshot.LabelledDataError):  # fmt: skip
        assert alias is DataError
    assert issubclass(PrepareError, DataError) and issubclass(DataError, ValueError)


def test_datasets_split_choice_is_shared(tmp_path):
    assert choose_split(["train", "test"], None, "test", tmp_path) == "test"
    assert choose_split(["validation"], None, "test", tmp_path) == "validation"
    try:
        choose_split(["a", "b"], None, "test", tmp_path, "; choose one with --split")
    except DataError as exc:
        assert str(exc) == f"{tmp_path}: dataset has splits ['a', 'b'] and none is 'test'; " \
            "choose one with --split"
    else:
        raise AssertionError("an ambiguous split must be an error")


def test_cli_reports_a_data_error_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "text": "no caption column"}) + "\n")
    code = main(["bench", "retrieval", "--model", "specs-synth-demo", "--data", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{bad}, row 0: missing column 'captions'" in err
    assert records.read_records(bad)[0][0][0] == f"{bad}, row 0"


OK_LINE = json.dumps({"image": "a.png", "caption": "ok"}).encode() + b"\n"


def _readers():
    """Every JSON-lines reader, with how it names line 2 of its file and a first line it
    reads past (the graded reader checks each row as it goes: a blank line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from specs_metric.evaluation.details import read_graded
    from specs_metric.training.examples import iter_examples

    def graded(path):
        table = pa.table({"id": pa.array([], pa.string()), "scene": pa.array([], pa.string())})
        pq.write_table(table, path.parent / "test.parquet")
        return read_graded(path.parent, "test")

    return [
        ("records.jsonl", lambda p: records.read_records(p), "{}, line 2", OK_LINE),
        ("sdci.jsonl", lambda p: sdci.read_sdci(p), "{}, line 2", OK_LINE),
        ("human.jsonl", lambda p: human_readers.read_generic(p), "{}:2", OK_LINE),
        ("prepare.jsonl", lambda p: list(iter_examples(p)), "{} line 2", OK_LINE),
        ("graded_test.jsonl", graded, "{}:2", b"\n"),
    ]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (b'{"image": "b.png", "caption": \n', "not valid JSON (Expecting value at column 31)"),
        (b'{"caption": "caf\xe9"}\n', "not UTF-8 text"),
    ],
)
def test_jsonl_readers_name_file_and_line_in_one_line(tmp_path, second, message):
    for name, read, where, first in _readers():
        path = tmp_path / name
        path.write_bytes(first + second)
        with pytest.raises(DataError) as err:
            read(path)
        assert str(err.value) == f"{where.format(path)}: {message}", name


def test_read_jsonl_skips_blank_lines_and_checks_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \r\n[1, 2]\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, [1, 2])]
    with pytest.raises(DataError, match=r"^.*x\.jsonl:4: expected a JSON object, got list$"):
        list(read_jsonl(path, where="{path}:{line}", objects=True))


def test_read_jsonl_raises_the_error_class_asked_for(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("{oops\n")
    with pytest.raises(PrepareError, match=r"x\.jsonl row 1: not valid JSON"):
        list(read_jsonl(path, where="{path} row {line}", error=PrepareError))
