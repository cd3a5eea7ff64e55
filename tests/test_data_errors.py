"""One error family for data that does not follow its layout, reported by the CLI in a line."""

from __future__ import annotations

import json

from specs_metric.bench import human_readers, records, retrieval, sdci, zeroshot
from specs_metric.cli import main
from specs_metric.errors import DataError
from specs_metric.hf_datasets import choose_split
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
