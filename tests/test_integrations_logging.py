"""`specs sweep` and `specs compare` with `--log-to tensorboard --log-to wandb`: real
TensorBoard event files and offline W&B runs, read back with TensorBoard's reader and a
reader of the W&B file format; the values equal the means of the score files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from integration_helpers import tensorboard_events, wandb_history, wandb_records
from specs_metric.cli import main

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

WORDS = ["red", "blue", "small", "large", "striped", "round", "shape", "corner"]
LABELS = ["ckpt-100", "ckpt-200", "ckpt-300"]


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "specs-tests")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_NAME", raising=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("logging")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    files = []
    for k, label in enumerate(LABELS):
        path = d / f"{label}.jsonl"
        with open(path, "w") as fh:
            for i in range(6):
                words = " ".join(WORDS[(i + k + j) % len(WORDS)] for j in range(k + 2))
                fh.write(json.dumps({"id": str(i), "image": f"{i}.png", "caption": words}) + "\n")
        files.append(path)
    return d, files


def _file_mean(path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return float(np.mean([r["score"] for r in rows]))


def _wandb_run(out: Path) -> Path:
    runs = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    return runs[0]


def test_sweep_logs_to_tensorboard_and_wandb(world, tmp_path):
    d, files = world
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(d / "tiny.pt"), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--n-boot", "300", "--n-perm", "300",
                 "--log-to", "tensorboard", "--log-to", "wandb", *map(str, files)])  # fmt: skip
    assert code == 0
    means = [_file_mean(out / "scores" / f"{label}.jsonl") for label in LABELS]
    sweep = json.loads((out / "sweep.json").read_text())

    events = tensorboard_events(out / "tensorboard")
    logged = events.Scalars("sweep/mean")
    assert [e.step for e in logged] == [100, 200, 300]
    assert [e.value for e in logged] == pytest.approx(means, abs=1e-6)  # float32 in events
    lows = [e.value for e in events.Scalars("sweep/ci_low")]
    assert lows == pytest.approx([c["ci_low"] for c in sweep["checkpoints"]], abs=1e-6)
    diffs = events.Scalars("sweep/vs_previous/mean_diff")
    assert [e.step for e in diffs] == [200, 300]
    assert [e.value for e in diffs] == pytest.approx(np.diff(means), abs=1e-5)
    (plot,) = events.Images("sweep/plot")
    assert plot.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and plot.width > 100
    (text,) = events.Tensors("sweep/checkpoints/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert all(label in table for label in LABELS)

    history = wandb_history(_wandb_run(out))
    scalar_rows = [h for h in history if "sweep/mean" in h]
    assert [h["_step"] for h in scalar_rows] == [100, 200, 300]
    assert [h["sweep/mean"] for h in scalar_rows] == pytest.approx(means, abs=1e-12)
    last = history[-1]  # media values are stored flattened: <key>/_type, <key>/path, ...
    assert last["_step"] == 300 and last["sweep/plot/_type"] == "image-file"
    assert last["sweep/checkpoints/_type"] == "table-file"
    run_files = _wandb_run(out).parent / "files"
    tables = list(run_files.glob("media/table/sweep/checkpoints_*.table.json"))
    assert len(tables) == 1
    data = json.loads(tables[0].read_text())["data"]
    assert [row[0] for row in data] == LABELS
    assert list(run_files.glob("media/images/sweep/plot_*.png"))
    config = [r for r in wandb_records(_wandb_run(out)) if r.WhichOneof("record_type") == "run"]
    assert config and config[0].run.project == "specs-tests"


def test_compare_logs_and_needs_out(world, tmp_path, capsys):
    d, files = world
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(d / "tiny.pt"), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--no-plots", "--n-boot", "50", "--n-perm", "50",
                 *map(str, files[:2])]) == 0  # fmt: skip
    a, b = (out / "scores" / f"{label}.jsonl" for label in LABELS[:2])
    report = tmp_path / "cmp"
    code = main(["compare", str(a), str(b), "--pair-by", "image", "--out", str(report),
                 "--n-boot", "300", "--n-perm", "300", "--log-to", "tensorboard",
                 "--log-to", "wandb"])  # fmt: skip
    assert code == 0
    expected = json.loads((report / "report.json").read_text())
    mean_a, mean_b = _file_mean(a), _file_mean(b)  # one caption per image: unit means
    events = tensorboard_events(report / "tensorboard")
    assert events.Scalars("compare/mean_a")[0].value == pytest.approx(mean_a, abs=1e-6)
    assert events.Scalars("compare/mean_diff")[0].value == pytest.approx(mean_b - mean_a,
                                                                          abs=1e-6)  # fmt: skip
    assert events.Scalars("compare/p_value")[0].value == pytest.approx(expected["p_value"],
                                                                        abs=1e-6)  # fmt: skip
    assert events.Images("compare/distributions")
    (row,) = [h for h in wandb_history(_wandb_run(report)) if "compare/mean_b" in h]
    assert row["compare/mean_b"] == pytest.approx(mean_b, abs=1e-12)
    assert row["compare/wins"] + row["compare/ties"] + row["compare/losses"] == 6

    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--log-to", "tensorboard"]) == 2
    assert "--log-to needs --out" in capsys.readouterr().err


def test_log_to_takes_known_trackers_only(world, capsys):
    d, files = world
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(files[0]), str(files[1]), "--log-to", "mlflow"])
    assert exit_.value.code == 2
    assert "expected one of tensorboard, wandb" in capsys.readouterr().err
